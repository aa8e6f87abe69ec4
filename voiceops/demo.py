"""`voiceops demo` / `make demo`: the main job end to end on the embedded default (SQLite, local files)."""

from __future__ import annotations

import json

from rich.console import Console

from voice_lib.core.config import Settings


def run_demo(settings: Settings, voice_id: str, speaker: str, seconds: float, train_steps: int | None, release: bool,
             console: Console) -> int:
    from voice_lib.core.handoffs import EvaluationSummary
    from voice_lib.core.storage import artifact_store
    from voice_lib.data.audio import write_wav
    from voice_lib.data.corpus import make_voice_dataset
    from voice_lib.pipelines import onboarding
    from voice_lib.release.models import load_registered_voice
    from voice_lib.release.registry import Registry
    from voiceops import airflow_client, stack

    total = 5 if release else 4
    data = settings.resolved_upload_dir / voice_id  # where onboarding may read (VOICEOPS_INGEST__UPLOAD_DIR)
    console.rule(f"1/{total} recordings")
    make_voice_dataset(data, speaker, seconds, layout="metadata")
    console.print(f"{seconds:.0f} s of '{speaker}' speech with transcripts in {data} ('{speaker}' was held out of pretraining)")
    console.rule(f"2/{total} MLflow")
    stack.up(settings, services=("mlflow",))
    console.rule(f"3/{total} voice_onboarding: ingest → qc → features → train → evaluate → register")
    conf = {"voice_id": voice_id, "data_uri": str(data), "language": "en", "min_speech_seconds": 60, "shards": 2,
            "lora_rank": 8, "train_steps": train_steps}
    state = airflow_client.dags_test(settings, "voice_onboarding", conf, console)
    if state != "success":
        console.print(f"[red]voice_onboarding ended {state}[/red]; the log above names the failing task and why.")
        return 1
    registry = Registry(settings)
    candidate = registry.version_by_alias(f"voice-{voice_id}", "candidate")
    if release:
        console.rule(f"4/{total} release")
        from voiceops.demo_release import short_canary_release

        if short_canary_release(settings, voice_id, candidate.version, console) != 0:
            return 1
        if candidate.version == "1":
            console.print("now a second, longer fine-tune of the same voice, released through a canary:")
            from voice_lib.pipelines.training import DEFAULT_STEPS

            conf["train_steps"] = (train_steps or DEFAULT_STEPS[settings.model.backend]) * 3 // 2
            if airflow_client.dags_test(settings, "voice_onboarding", conf, console) != "success":
                return 1
            second = registry.version_by_alias(f"voice-{voice_id}", "candidate")
            if short_canary_release(settings, voice_id, second.version, console) != 0:
                return 1
    alias = "production" if release else "candidate"
    console.rule(f"{total}/{total} synthesis with voice-{voice_id}@{alias}")
    served = registry.version_by_alias(f"voice-{voice_id}", alias)
    synth, meta = load_registered_voice(settings, voice_id, alias)
    wav = settings.home / "demo" / f"{voice_id}-v{served.version}.wav"
    result = synth.synthesize("Hello! This voice was cloned from seventy five seconds of recordings.")
    write_wav(wav, result.audio, result.sample_rate)

    dataset = onboarding.ingest(voice_id, str(data), settings)  # cached: the stored dataset's handle
    store = artifact_store(settings)
    qc = onboarding.load_qc_report(dataset, settings, "en")
    model_prefix = f"voices/{voice_id}/models/{meta['training_key']}"
    marker = f"{model_prefix}/evaluation.json"
    evaluation = EvaluationSummary.from_json(json.loads(store.read_bytes(marker)), marker)
    adapted, base = evaluation.aggregates.get("adapted", {}), evaluation.aggregates.get("base", {})
    out = Console()
    out.rule("demo done")
    out.print(f"voice-{voice_id}: aliases {registry.aliases(f'voice-{voice_id}')}; shown below: version {served.version}")
    out.print(f"speaker similarity adapted {adapted.get('speaker_similarity') or float('nan'):.3f} vs base "
              f"{base.get('speaker_similarity') or float('nan'):.3f}; WER {adapted.get('wer') or float('nan'):.2f}")
    out.print(f"synthesised:        {wav}")
    out.print(f"QC report:          {qc['report_html']}")
    out.print(f"evaluation report:  {store.uri}/{model_prefix}/eval_report/report.html")
    if qc.get("mlflow_run_url"):
        out.print(f"QC run in MLflow:   {qc['mlflow_run_url']}")
    out.print(f"release history:    voiceops status {voice_id}")
    out.print(f"MLflow UI:          {settings.mlflow_tracking_uri}  (stop with `voiceops down`)")
    return 0
