"""Minimal baseline TTS servers for benchmarks/scaling.py: serving N voices without multi-LoRA.

    --mode copies  one full model per voice: the base + PeftModel.from_pretrained + merge_and_unload for every
                   voice; requests run concurrently in FastAPI's thread pool, each on its own voice's model.
    --mode swap    one global PeftModel holding every adapter (load_adapter); each request calls
                   set_adapter(voice) and synthesises under one global lock, i.e. one request at a time - the
                   GPT-SoVITS api.py pattern (one global model, weights switched per request), in its most
                   favourable form: adapters stay resident, so a switch costs no disk read.

``--backend`` picks the model: ``two_stage`` (the default backend: the shipped converter, each voice's
reference synthesizer and rendering from its two_stage.json) or ``end_to_end`` (the shipped base network).
Both use exactly the VoiceOps request path below the model: the same text frontend
(serving.synthesis.plan_chunks; two-stage: the backend's ``model_inputs`` of each sentence with the voice's
two_stage.json), model code and rendering (serving.engine.run_batch, with batches of one) and WAV encoding,
so only model management differs. No auth, registry, audit log or metrics.

    python benchmarks/baseline_server.py --mode copies --backend two_stage --voices-dir DIR --port 8101

DIR holds one version folder per voice (as training saves it: adapter_config.json, adapter_model.safetensors,
speaker_embedding.npy, two-stage: two_stage.json), named by voice id. Voices are loaded before the port opens;
GET /status says how many.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The repository root first, and not this folder: benchmarks/serving.py would shadow the serving package.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if p not in (str(ROOT), str(Path(__file__).resolve().parent))]

from pydantic import BaseModel


class TTSRequest(BaseModel):  # module level: FastAPI resolves the (postponed) annotation from the module
    text: str
    voice_id: str
    user_id: str | None = None


def load_models(backend: str, mode: str, base: Path | None, folders: list[Path]) -> tuple[dict[str, Any], Any]:
    """{voice id: backend object} (copies: a merged model each; swap: one shared PeftModel) and the PeftModel."""
    from peft import PeftModel

    from voice_lib.data.features import FeatureConfig
    from voice_lib.infer.end_to_end import EndToEndBackend
    from voice_lib.infer.two_stage import TwoStageBackend
    from voice_lib.model.checkpoints import SHIPPED_BASE, SHIPPED_CONVERTER, load_base, load_converter

    if backend == "two_stage":
        base_dir = base or SHIPPED_CONVERTER
        config = load_converter(base_dir)[1]
        make_base, wrap = (lambda: load_converter(base_dir)[0]), TwoStageBackend
    else:
        base_dir = base or SHIPPED_BASE
        config = json.loads((base_dir / "config.json").read_text())
        make_base, wrap = (lambda: load_base(base_dir)), EndToEndBackend
    features = FeatureConfig(**config["feature_config"])
    if mode == "copies":
        return {p.name: wrap(p.name, PeftModel.from_pretrained(make_base(), str(p)).merge_and_unload().eval(), {},
                             features, str(p)) for p in folders}, None
    peft_model = PeftModel.from_pretrained(make_base(), str(folders[0]), adapter_name=folders[0].name)
    for p in folders[1:]:
        peft_model.load_adapter(str(p), adapter_name=p.name)
    peft_model.eval()
    shared = wrap("swap", peft_model.get_base_model(), {}, features, "swap")
    return {p.name: shared for p in folders}, peft_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("copies", "swap"), required=True)
    parser.add_argument("--backend", choices=("two_stage", "end_to_end"), default="two_stage")
    parser.add_argument("--voices-dir", type=Path, required=True)
    parser.add_argument("--base", type=Path, default=None, help="base folder (default: the shipped base or converter)")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    import numpy as np
    import torch
    import uvicorn
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import Response

    from serving.engine import SynthesisJob, run_batch
    from serving.synthesis import ServingError, encode_audio, plan_chunks
    from voice_lib.infer.core import read_frontend
    from voice_lib.infer.multilora import LoraBank

    no_bank = LoraBank([], {})  # run_batch activates a bank; with no MultiLoraLinear in the model it is a no-op
    folders = sorted(p for p in args.voices_dir.iterdir() if (p / "adapter_config.json").exists())
    speakers = {p.name: torch.from_numpy(np.load(p / "speaker_embedding.npy").astype(np.float32)).reshape(-1) for p in folders}
    frontends = {p.name: read_frontend(p) for p in folders}
    started = time.monotonic()
    bundles, peft_model = load_models(args.backend, args.mode, args.base, folders)
    load_seconds = time.monotonic() - started
    lock = threading.Lock()
    print(f"baseline {args.mode} ({args.backend}): {len(folders)} voices loaded in {load_seconds:.1f} s", flush=True)

    app = FastAPI(title=f"baseline-{args.mode}")

    def model_inputs(voice_id: str, text: str) -> list:
        """The same frontend as VoiceOps (serving.synthesis.plan_chunks, then version_inputs' per-backend step)."""
        planned = plan_chunks(text, "auto")
        if args.backend == "end_to_end":
            return [c.ids for c in planned]
        return [bundles[voice_id].model_inputs(c.spoken_text, "en", frontends[voice_id]) for c in planned]

    def synthesize(voice_id: str, inputs: list) -> list:
        outputs = []
        for item in inputs:
            job = SynthesisJob(item, 1.0, bundles[voice_id], no_bank, 0, speakers[voice_id])
            for _, out in run_batch([job]):
                if isinstance(out, Exception):
                    raise HTTPException(500, f"synthesis failed: {out}")
                outputs.append(out)
        return outputs

    @app.post("/v1/tts")
    def tts(body: TTSRequest) -> Response:  # sync: FastAPI runs it in its thread pool
        if body.voice_id not in bundles:
            raise HTTPException(404, "voice not found")
        try:
            inputs = model_inputs(body.voice_id, body.text)
        except ServingError as exc:
            raise HTTPException(exc.status, exc.message) from None
        if args.mode == "swap":
            with lock:  # one global model: switch the adapter, then synthesise, one request at a time
                peft_model.set_adapter(body.voice_id)
                outputs = synthesize(body.voice_id, inputs)
        else:
            outputs = synthesize(body.voice_id, inputs)
        audio = np.concatenate([o.audio for o in outputs])
        wav, media_type = encode_audio(audio, outputs[0].sample_rate, "wav")
        return Response(wav, media_type=media_type, headers={"X-Voice-Variant": args.mode})

    @app.get("/livez")
    def livez() -> dict:
        return {"status": "ok"}

    @app.get("/status")
    def status() -> dict:
        return {"mode": args.mode, "backend": args.backend, "voices": sorted(bundles), "load_seconds": load_seconds,
                "torch_threads": torch.get_num_threads()}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
