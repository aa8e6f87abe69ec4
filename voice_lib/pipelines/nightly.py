"""Nightly re-evaluation of every production and canary version, for the nightly_reevaluation DAG.

Each version is evaluated again on its held-out clips (the same evaluation as at registration) and
compared with (a) the metrics recorded at registration and (b) the previous night. A drop beyond the
tolerances tags the version ``regression`` through the registry and raises an alert; a trend plot per
voice is logged to MLflow.
"""

from __future__ import annotations

import json
import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path

from voice_lib.core.config import Settings
from voice_lib.core.storage import artifact_store

log = logging.getLogger(__name__)
# metric → (direction, tolerance): "higher" metrics regress when they drop by more than the tolerance.
# DNSMOS P.808 / OVRL use the release rule's 0.2 (EvalSettings.max_p808_drop_below_production); DNSMOS is
# deterministic, so a drop on the same clips is the model's, not the instrument's.
TOLERANCES = {"speaker_similarity": ("higher", 0.05), "pesq": ("higher", 0.3), "stoi": ("higher", 0.05),
              "wer": ("lower", 0.10), "rtf": ("lower", 0.10), "bad_output_rate": ("lower", 0.0),
              "p808_mos": ("higher", 0.2), "ovrl_mos": ("higher", 0.2)}


def versions_to_check(settings: Settings) -> list[dict]:
    from voice_lib.release.registry import Registry

    registry = Registry(settings)
    out = []
    for name in registry.list_voice_models():
        aliases = registry.aliases(name)
        for alias in ("production", "canary"):
            if alias in aliases:
                out.append({"voice_id": name.removeprefix("voice-"), "alias": alias, "version": aliases[alias]})
    return out


def nightly_prefix(voice_id: str, version: str) -> str:
    return f"voices/{voice_id}/nightly/v{version}"


def nightly_results(store, voice_id: str, version: str, last: int | None = None) -> list[dict]:
    """The stored nightly re-evaluations of one version (``{day, metrics, regressions, ...}``), oldest first."""
    keys = sorted(k for k in store.list(nightly_prefix(voice_id, version)) if k.endswith(".json"))
    return [json.loads(store.read_bytes(k)) for k in (keys[-last:] if last else keys)]


def regressions(now: dict, reference: dict, label: str) -> list[str]:
    found = []
    for metric, (direction, tol) in TOLERANCES.items():
        a, b = now.get(metric), reference.get(metric)
        if a is None or b is None or math.isnan(a) or math.isnan(b):
            continue
        worse = (b - a) if direction == "higher" else (a - b)
        if worse > tol:
            found.append(f"{metric} {a:.3f} vs {b:.3f} {label} (tolerance {tol})")
    return found


def reevaluate(settings: Settings, item: dict) -> dict:
    """Evaluate one version, compare, tag regressions, store tonight's numbers. Idempotent per day."""
    from voice_lib.pipelines.evaluation import evaluate_registered
    from voice_lib.release.registry import Registry

    store = artifact_store(settings)
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    prefix = nightly_prefix(item["voice_id"], item["version"])
    if store.exists(f"{prefix}/{day}.json"):
        return json.loads(store.read_bytes(f"{prefix}/{day}.json"))
    registry, name = Registry(settings), f"voice-{item['voice_id']}"
    summary = evaluate_registered(settings, item["voice_id"], item["version"])
    adapted = summary.aggregates.get("adapted", {})
    tags = registry.version(name, item["version"]).tags
    registered = {k.removeprefix("eval_adapted_"): float(v) for k, v in tags.items() if k.startswith("eval_adapted_")}
    history = sorted(k for k in store.list(prefix) if k.endswith(".json"))
    previous = json.loads(store.read_bytes(history[-1]))["metrics"] if history else {}
    found = regressions(adapted, registered, "at registration") + regressions(adapted, previous, "last night")
    result = {"day": day, **item, "metrics": adapted, "regressions": found, "gate_failures": summary.gate_failures}
    if found:
        registry.set_version_tags(name, item["version"], {"regression": "true", "regression_reason": "; ".join(found)[:5000],
                                                          "regression_day": day})
        log.error("NIGHTLY REGRESSION %s v%s (%s): %s", name, item["version"], item["alias"], "; ".join(found))
    store.write_bytes(f"{prefix}/{day}.json", json.dumps(result, indent=2, default=float).encode())
    return result


def log_trends(settings: Settings, results: list[dict]) -> list[str]:
    """One MLflow run per voice and night, with the metric trend plot across nights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.entities import Metric

    from voice_lib.core.tracking import experiment_id, mlflow_client

    store, client, runs = artifact_store(settings), mlflow_client(settings), []
    for voice_id in sorted({r["voice_id"] for r in results}):
        fig, (ax, mos_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        for r in (x for x in results if x["voice_id"] == voice_id):
            nights = nightly_results(store, voice_id, r["version"])
            for axis, metrics in ((ax, ("speaker_similarity", "stoi", "wer")), (mos_ax, ("p808_mos", "ovrl_mos"))):
                for metric in metrics:
                    axis.plot([n["day"] for n in nights], [n["metrics"].get(metric) for n in nights], marker="o",
                              label=f"v{r['version']} ({r['alias']}) {metric}")
        ax.set(title=f"voice-{voice_id}: nightly re-evaluation", ylim=(0, 1.05))
        mos_ax.set(title="DNSMOS", ylabel="MOS", ylim=(1, 5))
        for axis in (ax, mos_ax):
            axis.legend(fontsize=7)
        fig.autofmt_xdate()
        out = settings.cache_dir / "work" / voice_id / "nightly"
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / "trend.png", dpi=90)
        plt.close(fig)
        run = client.create_run(experiment_id(client, f"voice-{voice_id}"),
                                run_name=f"nightly-{results[0]['day']}", tags={"voiceops.step": "nightly"})
        now = int(time.time() * 1000)
        metrics = [Metric(f"{r['alias']}_{k}", float(v), now, 0) for r in results if r["voice_id"] == voice_id
                   for k, v in r["metrics"].items() if isinstance(v, (int, float)) and not math.isnan(v)]
        client.log_batch(run.info.run_id, metrics=metrics)
        client.log_artifact(run.info.run_id, str(Path(out / "trend.png")), "nightly")
        client.set_terminated(run.info.run_id)
        runs.append(run.info.run_id)
    return runs
