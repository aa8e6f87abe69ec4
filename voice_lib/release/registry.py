"""The MLflow model registry as VoiceOps uses it, and the only code that writes it.

Models are ``voice-base`` and ``voice-<voice_id>``. Releases are aliases (``candidate``, ``canary``,
``production``, ``previous``) plus two registered-model tags (``canary_weight``, ``release_state``);
the deprecated stages are never touched. Names are binding: see shared/CONTRACTS.md.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from voice_lib.core.config import Settings, redact_url, validate_voice_id
from voice_lib.core.tracking import mlflow_client, mlflow_is_healthy

log = logging.getLogger(__name__)


BASE_MODEL = "voice-base"
ALIASES = ("candidate", "canary", "production", "previous")
LINEAGE_TAGS = ("base_model", "base_version", "base_sha256", "data_sha256", "code_version", "lora_rank")
# Also in every version since the two-stage backend: `backend` ("two_stage" | "end_to_end"; absent = end_to_end).
# Keys end up inside a search filter string, so only a quote-free alphabet is accepted.
_TRAINING_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")
_READY_TIMEOUT_S = 300.0
# Set by mark_candidate: the version passed every evaluation gate. promote() wants it (or force and a reason).
GATES_PASSED_TAG = "gates_passed"
# Version tags after which a version is no passed candidate any more, whatever it passed before.
_DISQUALIFIED = {"rolled_back": "was rolled back", "breaker_tripped": "tripped the circuit breaker",
                 "regression": "regressed in the nightly re-evaluation"}
_ANY = object()  # rollback(expected_canary=_ANY): no expectation, roll back whatever is there

try:  # the server's own limit (100 000 in MLflow 3); older servers allowed 5 000
    from mlflow.utils.validation import (
        MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH as _MAX_TAG_VALUE,
    )
except ImportError:  # pragma: no cover
    _MAX_TAG_VALUE = 5000


class RegistryError(RuntimeError):
    """A registry operation failed; the message names the model/version and what to do."""


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered version, as read back from the registry."""

    name: str
    version: str
    run_id: str
    source: str
    tags: dict[str, str] = field(default_factory=dict, hash=False)  # a dict cannot be hashed
    aliases: tuple[str, ...] = ()

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "run_id": self.run_id, "source": self.source,
                "tags": dict(self.tags), "aliases": list(self.aliases)}


def _info(mv: Any) -> ModelVersionInfo:
    return ModelVersionInfo(name=mv.name, version=str(mv.version), run_id=mv.run_id or "", source=mv.source or "",
                            tags=dict(mv.tags or {}), aliases=tuple(sorted(mv.aliases or ())))


def _tag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.startswith("voice-"):
        raise RegistryError(f"model name {name!r} is invalid: use {BASE_MODEL!r} or 'voice-<voice_id>' (see Registry.model_name).")
    if name == BASE_MODEL:
        return name
    try:
        validate_voice_id(name.removeprefix("voice-"))
    except ValueError as exc:
        raise RegistryError(f"model name {name!r} is invalid: {exc}") from None
    return name


def _check_alias(alias: str) -> str:
    if alias not in ALIASES:
        raise RegistryError(f"alias {alias!r} is not a VoiceOps alias; use one of {', '.join(ALIASES)}.")
    return alias


def _check_weight(weight: Any) -> int:
    # bool is an int subclass; True as "1 %" is surely a bug in the caller.
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
        raise RegistryError(f"canary weight {weight!r} is invalid: use a whole number of percent from 0 to 100.")
    return weight


class Registry:
    """Reads and writes the registry of one MLflow server (``settings.mlflow_tracking_uri``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.uri = settings.mlflow_tracking_uri
        self.display_uri = redact_url(self.uri)  # what errors and logs show: never a password
        self._client: Any = None

    # --- plumbing ------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            self._check_reachable()
            self._client = mlflow_client(self.settings)
        return self._client

    def _check_reachable(self) -> None:
        # MlflowClient retries a refused connection for about four minutes; fail in seconds instead.
        if not mlflow_is_healthy(self.uri, timeout=5.0):
            raise RegistryError(f"MLflow at {self.display_uri} is not reachable (no healthy answer from /health within 5 s); "
                                "start it with `voiceops up`.")

    @contextmanager
    def _mlflow(self, what: str) -> Iterator[None]:
        """Turn MLflow's exceptions into a RegistryError that says what we were doing."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except MlflowException as exc:
            raise RegistryError(f"{what} failed on MLflow at {self.display_uri}: {exc.message}") from exc

    @staticmethod
    def _not_found(exc: Exception) -> bool:
        return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"

    def model_name(self, voice_id: str | None = None) -> str:
        """Registered-model name of a voice; ``None`` (or ``"base"``) is the shared base ``voice-base``."""
        return BASE_MODEL if voice_id in (None, "base") else f"voice-{validate_voice_id(voice_id)}"

    def _model(self, name: str, missing_ok: bool = False) -> Any:
        from mlflow.exceptions import MlflowException

        _check_name(name)
        try:
            return self.client.get_registered_model(name)
        except MlflowException as exc:
            if not self._not_found(exc):
                raise RegistryError(f"reading {name} failed on MLflow at {self.display_uri}: {exc.message}") from exc
        if missing_ok:
            return None
        raise RegistryError(f"{name} is not registered; register a version first (voice_onboarding).")

    def _versions(self, name: str) -> list[Any]:
        with self._mlflow(f"listing versions of {name}"):
            found, token = [], None
            while True:
                page = self.client.search_model_versions(f"name = '{name}'", page_token=token)
                found += list(page)
                token = page.token
                if not token:
                    return sorted(found, key=lambda mv: int(mv.version))

    def _version(self, name: str, version: int | str) -> Any:
        from mlflow.exceptions import MlflowException

        _check_name(name)
        if not str(version).isdigit():
            raise RegistryError(f"{name}: version {version!r} is not a version number.")
        try:
            return self.client.get_model_version(name, str(version))
        except MlflowException as exc:
            if not self._not_found(exc):
                raise RegistryError(f"reading {name} version {version} failed on MLflow at {self.display_uri}: {exc.message}") from exc
        known = ", ".join(mv.version for mv in self._versions(name)) or "none"
        raise RegistryError(f"{name} has no version {version}; versions: {known}.") from None

    def _usable(self, name: str, version: int | str) -> Any:
        mv = self._version(name, version)
        if mv.tags.get("rejected") == "true":
            raise RegistryError(f"{name} version {mv.version} was rejected ({mv.tags.get('reason', 'no reason')}); "
                                "train and register a new version instead.")
        return mv

    def _set_alias(self, name: str, alias: str, version: str) -> None:
        with self._mlflow(f"setting {name}@{alias} -> {version}"):
            self.client.set_registered_model_alias(name, alias, version)

    def _drop_alias(self, name: str, alias: str) -> None:
        with self._mlflow(f"removing {name}@{alias}"):
            self.client.delete_registered_model_alias(name, alias)  # a missing alias is not an error

    def _set_model_tags(self, name: str, **tags: Any) -> None:
        with self._mlflow(f"tagging {name}"):
            for key, value in tags.items():
                self.client.set_registered_model_tag(name, key, _tag_value(value))

    def _require_voice(self, name: str, action: str) -> None:
        if _check_name(name) == BASE_MODEL:
            raise RegistryError(f"{BASE_MODEL} has no canary releases, so it cannot {action}; promote a version instead.")

    def _wait_ready(self, name: str, version: str) -> Any:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while True:
            mv = self._version(name, version)
            if mv.status == "READY":
                return mv
            if mv.status == "FAILED_REGISTRATION":
                raise RegistryError(f"{name} version {version} failed to register: {mv.status_message}")
            if time.monotonic() > deadline:
                raise RegistryError(f"{name} version {version} is still {mv.status} after {_READY_TIMEOUT_S:.0f} s.")
            time.sleep(0.5)

    def _by_training_key(self, name: str, key: str) -> list[Any]:
        with self._mlflow(f"searching {name} for training_key {key}"):
            found = self.client.search_model_versions(f"name = '{name}' and tags.training_key = '{key}'")
        return sorted(found, key=lambda mv: int(mv.version))

    # --- writes --------------------------------------------------------------------------------

    def register(self, name: str, run_id: str, artifact_path: str, tags: dict[str, Any],
                 description: str = "") -> ModelVersionInfo:
        """Register the folder ``artifact_path`` of run ``run_id`` as a new version, once per ``training_key``."""
        from mlflow.exceptions import MlflowException

        _check_name(name)
        tags = {k: _tag_value(v) for k, v in tags.items() if v is not None}
        key = tags.get("training_key", "")
        if not _TRAINING_KEY.fullmatch(key):
            raise RegistryError(f"{name}: tags need a 'training_key' of letters, digits and ._:- (got {key!r}); "
                                "it is what makes a retried registration return the same version.")
        missing = [t for t in LINEAGE_TAGS if t not in tags] if name != BASE_MODEL else []
        if missing:
            raise RegistryError(f"{name}: lineage tags missing: {', '.join(missing)}; every voice version records its base and data.")
        existing = self._by_training_key(name, key)
        if existing:
            log.info("%s: training_key %s is already version %s", name, key, existing[0].version)
            return _info(self._wait_ready(name, existing[0].version))

        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            raise RegistryError(f"{name}: MLflow run {run_id!r} not found ({exc.message}); log the model to a run first.") from None
        path = artifact_path.strip("/")
        with self._mlflow(f"listing artifacts of run {run_id}"):
            if not path or not self.client.list_artifacts(run_id, path):
                raise RegistryError(f"{name}: run {run_id} has no artifacts under {artifact_path!r}; "
                                    "log the model folder with client.log_artifacts(run_id, folder, artifact_path) first.")
        try:
            voice = name.removeprefix("voice-")
            self.client.create_registered_model(
                name, tags={"canary_weight": "0", "release_state": "idle"} if name != BASE_MODEL else None,
                description="VoiceOps shared base model" if name == BASE_MODEL else f"VoiceOps voice {voice}")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # created earlier or by a concurrent task
                raise RegistryError(f"creating {name} failed on MLflow at {self.display_uri}: {exc.message}") from exc
        # What mlflow.register_model("runs:/<run>/<path>") does in MLflow 3 for plain artifact folders: the
        # source is the run's own artifact location, so it resolves without any LoggedModel lookup.
        source = f"{run.info.artifact_uri.rstrip('/')}/{path}"
        with self._mlflow(f"creating a version of {name} from run {run_id}"):
            mv = self.client.create_model_version(name, source, run_id=run_id, tags=tags,
                                                  description=description or None, await_creation_for=0)
        mv = self._wait_ready(name, mv.version)
        # Two retries racing past the search above both create a version: keep the oldest, drop ours.
        twins = self._by_training_key(name, key)
        if twins and twins[0].version != mv.version:
            with self._mlflow(f"removing duplicate {name} version {mv.version}"):
                self.client.delete_model_version(name, mv.version)
            return _info(self._wait_ready(name, twins[0].version))
        log.info("registered %s version %s from run %s", name, mv.version, run_id)
        return _info(mv)

    def set_version_tags(self, name: str, version: int | str, tags: dict[str, Any]) -> None:
        """Add or overwrite version tags (gate metrics, lineage)."""
        mv = self._version(name, version)
        with self._mlflow(f"tagging {name} version {mv.version}"):
            for key, value in tags.items():
                self.client.set_model_version_tag(name, mv.version, key, _tag_value(value))

    def mark_candidate(self, name: str, version: int | str) -> None:
        """The version passed its gates: tag it ``gates_passed`` and point ``candidate`` at it."""
        mv = self._usable(name, version)
        self.set_version_tags(name, mv.version, {GATES_PASSED_TAG: "true"})
        self._set_alias(name, "candidate", mv.version)

    def note_action(self, name: str, version: int | str, action: str, actor: str | None, reason: str | None,
                    forced: bool = False) -> None:
        """Record a human's release action on the version: ``manual_action_<ms>`` (one per action, JSON) and
        ``last_manual_action``, each with the action, the actor, the reason, whether it was forced and when."""
        entry = json.dumps({"action": action, "actor": actor or "unknown", "reason": (reason or "").strip()[:2000],
                            "forced": forced, "ts": int(time.time())})
        self.set_version_tags(name, version, {f"manual_action_{int(time.time() * 1000)}": entry,
                                              "last_manual_action": entry})

    def promotion_problem(self, name: str, version: int | str) -> str | None:
        """Why ``version`` is not a passed candidate (so promoting it needs force and a reason), or None."""
        if name == BASE_MODEL:
            return None  # the base has no gates: pretraining registers and promotes it in one step
        tags = self._version(name, version).tags or {}
        for tag, what in _DISQUALIFIED.items():
            if tags.get(tag) == "true":
                return f"it {what} ({tags.get('reason') or tags.get(tag + '_reason') or 'no reason recorded'})"
        # A candidate alias without the tag: registered before registration tagged gates_passed.
        if tags.get(GATES_PASSED_TAG) != "true" and self.aliases(name).get("candidate") != str(version):
            return "it never passed the evaluation gates (no gates_passed tag)"
        return None

    def reject(self, name: str, version: int | str, reasons: list[str]) -> None:
        """Record why a version failed its gates and take every alias off it."""
        mv = self._version(name, version)
        if "production" in (mv.aliases or ()):
            raise RegistryError(f"{name} version {mv.version} is production; roll back or promote another version before rejecting it.")
        reason = "; ".join(r.strip() for r in reasons if r and r.strip()) or "rejected without a stated reason"
        self.set_version_tags(name, mv.version, {"rejected": "true", "reason": reason[:_MAX_TAG_VALUE]})
        for alias in mv.aliases or ():
            if alias == "canary":  # no traffic may stay on a version nobody may serve
                self._set_model_tags(name, canary_weight=0, release_state="idle")
            self._drop_alias(name, alias)
        log.info("rejected %s version %s: %s", name, mv.version, reason)

    def promote(self, name: str, version: int | str, *, force: bool = False, reason: str | None = None,
                actor: str | None = None) -> None:
        """Make ``version`` production; the old production becomes ``previous``. Safe to retry.

        A version that is not a passed candidate (never passed the gates, rolled back, tripped the breaker,
        regressed) is promoted only with ``force`` and a ``reason``; a rejected one never is. With an
        ``actor`` (a human), or when forced, the action is recorded on the version (``note_action``)."""
        mv = self._usable(name, version)
        current = self.aliases(name)
        old = current.get("production")
        problem = None if old == mv.version else self.promotion_problem(name, mv.version)
        if problem and not (force and reason and reason.strip()):
            raise RegistryError(f"{name} version {mv.version} is not a passed candidate: {problem}. Promote it only "
                                "on purpose, with force and a reason (voiceops promote VOICE --version N --force "
                                "--reason '...').")
        if old and old != mv.version:
            # previous first: a crash between the two calls leaves previous == production, and a retry repairs it.
            self._set_alias(name, "previous", old)
        self._set_alias(name, "production", mv.version)
        for alias in ("canary", "candidate"):
            if current.get(alias) == mv.version:
                self._drop_alias(name, alias)
        if name != BASE_MODEL:
            self._set_model_tags(name, canary_weight=0, release_state="idle")
        if actor or problem:
            self.note_action(name, mv.version, "promote", actor, reason, forced=bool(problem))
        log.info("promoted %s version %s to production (previous: %s)%s", name, mv.version, old,
                 f", forced by {actor or 'unknown'}: {problem}; reason: {reason}" if problem else "")

    def rollback(self, name: str, reason: str, *, expected_canary: Any = _ANY, actor: str | None = None) -> str | None:
        """Stop a canary, or else move production back to ``previous``; the bad version is tagged rolled_back.

        ``expected_canary``: the canary version the caller judged (None: it saw no canary, and means production).
        When the canary is another by now (a human promoted or rolled back meanwhile, a new rollout began),
        nothing is done and None is returned; otherwise the rolled-back version."""
        if not reason or not reason.strip():
            raise RegistryError(f"{name}: say why you roll back; the reason is recorded on the version.")
        current = self.aliases(name)
        if expected_canary is not _ANY:
            expected = None if expected_canary is None else str(expected_canary)
            if current.get("canary") != expected:
                log.warning("%s: not rolling back: the canary is %s now, not %s as judged (changed meanwhile)",
                            name, current.get("canary") or "none", expected or "none")
                return None
        voice = name != BASE_MODEL
        if "canary" in current:
            bad = current["canary"]
            if voice:
                self._set_model_tags(name, canary_weight=0)  # traffic first: the server reads the weight
            self._drop_alias(name, "canary")
        elif "previous" in current:
            bad = current.get("production", "")
            self._set_alias(name, "production", current["previous"])
            self._drop_alias(name, "previous")  # it is production now; keeping it would invite a no-op rollback
        else:
            raise RegistryError(f"{name} has no canary and no previous production to roll back to; "
                                f"aliases: {current or 'none'}.")
        if bad:
            self.set_version_tags(name, bad, {"rolled_back": "true", "reason": reason.strip()[:_MAX_TAG_VALUE]})
        if voice:
            self._set_model_tags(name, canary_weight=0, release_state="rolled_back")
        if bad and actor:
            self.note_action(name, bad, "rollback", actor, reason)
        log.warning("rolled back %s version %s: %s%s", name, bad, reason, f" (by {actor})" if actor else "")
        return bad or None

    def set_canary(self, name: str, version: int | str, weight: int) -> None:
        """Serve ``version`` to ``weight`` percent of traffic."""
        self._require_voice(name, "take a canary")
        weight = _check_weight(weight)
        mv = self._usable(name, version)
        current = self.aliases(name)
        if current.get("production") == mv.version:
            raise RegistryError(f"{name} version {mv.version} is already production; canary a newer version.")
        if current.get("canary") not in (None, mv.version):
            self._set_model_tags(name, canary_weight=0)  # never send the old share to a new version unasked
        self._set_alias(name, "canary", mv.version)
        self._set_model_tags(name, canary_weight=weight, release_state="canary")

    def set_canary_weight(self, name: str, weight: int) -> None:
        """Change the canary's share of traffic (0-100)."""
        self._require_voice(name, "change a canary weight")
        weight = _check_weight(weight)
        if weight and "canary" not in self.aliases(name):
            raise RegistryError(f"{name} has no canary; call set_canary(name, version, weight) first.")
        self._set_model_tags(name, canary_weight=weight)

    def pause(self, name: str, *, actor: str | None = None, reason: str | None = None) -> None:
        """Freeze a canary rollout at its current weight (recorded on the canary when a human does it)."""
        self._require_voice(name, "pause")
        canary = self.aliases(name).get("canary")
        if canary is None:
            raise RegistryError(f"{name} has no canary to pause.")
        self._set_model_tags(name, release_state="paused")
        if actor:
            self.note_action(name, canary, "pause", actor, reason)

    def resume(self, name: str, *, actor: str | None = None, reason: str | None = None) -> None:
        """Continue a paused canary rollout (recorded on the canary when a human does it)."""
        self._require_voice(name, "resume")
        state = self.release_state(name)
        if "canary" not in state["aliases"] or state["release_state"] != "paused":
            raise RegistryError(f"{name} is not a paused canary (release_state {state['release_state']}, aliases {state['aliases']}).")
        self._set_model_tags(name, release_state="canary")
        if actor:
            self.note_action(name, state["aliases"]["canary"], "resume", actor, reason)

    def archive(self, name: str, reason: str) -> dict[str, str]:
        """Take a voice out of serving and keep its history: canary weight 0 first (the server reads it), the
        model tagged ``archived`` with the reason and the aliases it held, then every alias dropped, so the
        server stops routing it on its next poll. Versions, their tags and runs stay. Returns the old aliases."""
        self._require_voice(name, "archive")
        if not reason or not reason.strip():
            raise RegistryError(f"{name}: say why you archive it; the reason is recorded on the model.")
        held = self.aliases(name)
        self._set_model_tags(name, canary_weight=0, archived="true", archived_reason=reason.strip()[:_MAX_TAG_VALUE],
                             archived_aliases=",".join(f"{a}={v}" for a, v in sorted(held.items())),
                             archived_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        for alias in held:
            self._drop_alias(name, alias)
        log.warning("archived %s (aliases were %s): %s", name, held or "none", reason)
        return held

    def set_release_progress(self, name: str, **progress: Any) -> None:
        """Record where a staged rollout stands (``release_step``, ``release_step_started``, ...).

        Kept on the registered model so a retried or re-triggered canary_promotion run resumes the
        rollout where it stopped; only ``release_*`` keys are accepted.
        """
        self._require_voice(name, "record release progress")
        bad = [k for k in progress if not k.startswith("release_") or k == "release_state"]
        if bad:
            raise RegistryError(f"{name}: release progress keys must start with 'release_' (not release_state): {bad}")
        self._set_model_tags(name, **progress)

    # --- reads ---------------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        return self._model(name, missing_ok=True) is not None

    def version(self, name: str, version: int | str) -> ModelVersionInfo:
        return _info(self._version(name, version))

    def version_by_alias(self, name: str, alias: str) -> ModelVersionInfo | None:
        """The version an alias points at; None when the model or the alias does not exist."""
        _check_alias(alias)
        model = self._model(name, missing_ok=True)
        version = dict(model.aliases or {}).get(alias) if model is not None else None
        return self.version(name, version) if version else None

    def versions(self, name: str) -> list[ModelVersionInfo]:
        """Every version of one model, oldest first, with its tags and aliases (MLflow's version search does not
        return aliases, so they come from the registered model)."""
        held: dict[str, list[str]] = {}
        for alias, version in self.aliases(name).items():
            held.setdefault(version, []).append(alias)
        return sorted((replace(_info(mv), aliases=tuple(sorted(held.get(str(mv.version), ()))))
                       for mv in self._versions(name)), key=lambda v: int(v.version))

    def model_tags(self, name: str) -> dict[str, str]:
        """The registered model's tags (``canary_weight``, ``release_state``, ``archived``, ...)."""
        return dict(self._model(name).tags or {})

    def aliases(self, name: str) -> dict[str, str]:
        """alias -> version for one model."""
        return {a: str(v) for a, v in dict(self._model(name).aliases or {}).items()}

    def release_state(self, name: str) -> dict[str, Any]:
        """What the server and the canary DAG need: aliases, canary_weight, release_state."""
        model = self._model(name)
        tags = dict(model.tags or {})
        try:
            weight = int(tags.get("canary_weight", "0"))
        except ValueError:
            weight = 0  # a hand-edited tag must not turn into traffic
        return {"name": name, "aliases": {a: str(v) for a, v in dict(model.aliases or {}).items()},
                "canary_weight": weight, "release_state": tags.get("release_state", "idle"),
                "progress": {k: v for k, v in tags.items() if k.startswith("release_") and k != "release_state"}}

    def list_voice_models(self) -> list[str]:
        """Names of every registered voice model (``voice-<id>``), sorted; not the base."""
        with self._mlflow("listing voice models"):
            names, token = [], None
            while True:
                page = self.client.search_registered_models("name LIKE 'voice-%'", max_results=1000, page_token=token)
                names += [m.name for m in page if m.name != BASE_MODEL]
                token = page.token
                if not token:
                    return sorted(names)

    def download(self, name: str, version_or_alias: int | str, dest: Path) -> Path:
        """Replace ``dest`` with the version's artifact folder; returns ``dest``."""
        import mlflow.artifacts

        if str(version_or_alias).isdigit():
            mv = self._version(name, version_or_alias)
        else:
            alias = _check_alias(str(version_or_alias))
            held = self.aliases(name)
            if alias not in held:
                raise RegistryError(f"{name} has no alias {alias!r}; aliases: {held or 'none'}.")
            mv = self._version(name, held[alias])
        with self._mlflow(f"resolving {name} version {mv.version}"):
            uri = self.client.get_model_version_download_uri(name, mv.version)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}"
        try:
            # models:/ URIs would ignore our tracking URI (MLflow 3 resolves them with the global registry
            # URI), so we resolve the version ourselves and download its physical location.
            with self._mlflow(f"downloading {name} version {mv.version} ({uri})"):
                got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(staging), tracking_uri=self.uri))
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            if dest.exists():
                dest.rename(old)
            got.rename(dest)  # whole folders swap: a reader never gets files of two versions mixed
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("downloaded %s version %s to %s", name, mv.version, dest)
        return dest
