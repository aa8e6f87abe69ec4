"""Minimal baseline TTS servers for benchmarks/scaling.py: serving N voices without multi-LoRA.

    --mode copies  one full model per voice: load_base + PeftModel.from_pretrained + merge_and_unload for every
                   voice; requests run concurrently in FastAPI's thread pool, each on its own voice's model.
    --mode swap    one global PeftModel holding every adapter (load_adapter); each request calls
                   set_adapter(voice) and synthesises under one global lock, i.e. one request at a time - the
                   GPT-SoVITS api.py pattern (one global model, weights switched per request), in its most
                   favourable form: adapters stay resident, so a switch costs no disk read.

Both use exactly the VoiceOps request path below the model: the same text frontend
(serving.synthesis.phoneme_chunks), model code and WORLD vocoder (serving.engine.run_batch, with batches of
one) and WAV encoding, so only model management differs. No auth, registry, audit log or metrics.

    python benchmarks/baseline_server.py --mode copies --voices-dir DIR --port 8101

DIR holds one adapter folder per voice (as training saves it: adapter_config.json, adapter_model.safetensors,
speaker_embedding.npy), named by voice id. Voices are loaded before the port opens; GET /status says how many.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The repository root first, and not this folder: benchmarks/serving.py would shadow the serving package.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if p not in (str(ROOT), str(Path(__file__).resolve().parent))]

from pydantic import BaseModel


class TTSRequest(BaseModel):  # module level: FastAPI resolves the (postponed) annotation from the module
    text: str
    voice_id: str
    user_id: str | None = None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("copies", "swap"), required=True)
    parser.add_argument("--voices-dir", type=Path, required=True)
    parser.add_argument("--base", type=Path, default=None, help="base folder (default: the shipped base)")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    import numpy as np
    import torch
    import uvicorn
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import Response
    from peft import PeftModel

    from serving.engine import SynthesisJob, run_batch
    from voice_lib.infer.end_to_end import EndToEndBackend
    from voice_lib.infer.multilora import LoraBank
    from serving.synthesis import ServingError, encode_audio, phoneme_chunks
    from voice_lib.data.features import FeatureConfig
    from voice_lib.model.checkpoints import SHIPPED_BASE, load_base

    base_dir = args.base or SHIPPED_BASE
    feature_config = FeatureConfig(**json.loads((base_dir / "config.json").read_text())["feature_config"])
    no_bank = LoraBank([], {})  # run_batch activates a bank; with no MultiLoraLinear in the model it is a no-op
    folders = sorted(p for p in args.voices_dir.iterdir() if (p / "adapter_config.json").exists())
    speakers = {p.name: torch.from_numpy(np.load(p / "speaker_embedding.npy").astype(np.float32)).reshape(-1) for p in folders}
    started = time.monotonic()
    bundles: dict[str, EndToEndBackend] = {}
    lock = threading.Lock()
    peft_model = None
    if args.mode == "copies":
        for p in folders:
            merged = PeftModel.from_pretrained(load_base(base_dir), str(p)).merge_and_unload().eval()
            bundles[p.name] = EndToEndBackend(p.name, merged, {}, feature_config, str(p))
    else:
        peft_model = PeftModel.from_pretrained(load_base(base_dir), str(folders[0]), adapter_name=folders[0].name)
        for p in folders[1:]:
            peft_model.load_adapter(str(p), adapter_name=p.name)
        peft_model.eval()
        shared = EndToEndBackend("swap", peft_model.get_base_model(), {}, feature_config, "swap")
        bundles = {p.name: shared for p in folders}
    load_seconds = time.monotonic() - started
    print(f"baseline {args.mode}: {len(folders)} voices loaded in {load_seconds:.1f} s", flush=True)

    app = FastAPI(title=f"baseline-{args.mode}")

    def synthesize(voice_id: str, chunks: list[list[int]]) -> list:
        outputs = []
        for ids in chunks:
            job = SynthesisJob(ids, 1.0, bundles[voice_id], no_bank, 0, speakers[voice_id])
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
            chunks = phoneme_chunks(body.text, "auto")
        except ServingError as exc:
            raise HTTPException(exc.status, exc.message) from None
        if args.mode == "swap":
            with lock:  # one global model: switch the adapter, then synthesise, one request at a time
                peft_model.set_adapter(body.voice_id)
                outputs = synthesize(body.voice_id, chunks)
        else:
            outputs = synthesize(body.voice_id, chunks)
        audio = np.concatenate([o.audio for o in outputs])
        wav, media_type = encode_audio(audio, outputs[0].sample_rate, "wav")
        return Response(wav, media_type=media_type, headers={"X-Voice-Variant": args.mode})

    @app.get("/livez")
    def livez() -> dict:
        return {"status": "ok"}

    @app.get("/status")
    def status() -> dict:
        return {"mode": args.mode, "voices": sorted(bundles), "load_seconds": load_seconds,
                "torch_threads": torch.get_num_threads()}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
