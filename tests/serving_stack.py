"""A real model server on a real MLflow, on tiny models: shared by the serving, fuzzing, fault and soak tests.

The base is random (d_model 64, one layer each side) with the feature statistics of a real WORLD analysis,
so outputs are buzzy but real audio; voices are random LoRA adapters of it registered in MLflow exactly as
training registers them. ``ServerStack.start()`` runs ``voiceops serve`` in a subprocess and can be called
again after a kill (same home, same audit database).
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import torch
from conftest import free_port

from voice_lib.core.config import Settings
from voice_lib.data.datasets import feature_matrix
from voice_lib.data.features import ClipFeatures, FeatureConfig, world_analysis
from voice_lib.data.text import SYMBOLS, phonemes_to_ids, phonemize
from voice_lib.model.checkpoints import lora_model, save_base
from voice_lib.model.network import ModelConfig, VoiceModel
from voice_lib.release.registry import Registry

SECRET = "webhook-test-secret"
TEXT = "Hello there."
REPO = Path(__file__).resolve().parent.parent


def tiny_base(seed: int = 0) -> VoiceModel:
    """Random weights, but feature statistics of a real WORLD analysis so outputs sound like (buzzy) audio."""
    sr = 16000
    t = np.arange(sr) / sr
    phase = 2 * np.pi * np.cumsum(140 + 20 * np.sin(2 * np.pi * 1.5 * t)) / sr
    x = (sum(np.sin(k * phase) / k for k in range(1, 20)) * 0.1 * (0.6 + 0.4 * np.sin(6 * np.pi * t))).astype(np.float32)
    m = feature_matrix(ClipFeatures([], np.zeros(1, np.int32), *world_analysis(x, FeatureConfig(f0_method="dio")), "k"))
    torch.manual_seed(seed)
    model = VoiceModel(ModelConfig(d_model=64, ffn_dim=128, encoder_layers=1, decoder_layers=1, n_symbols=len(SYMBOLS)))
    model.feature_mean.copy_(torch.from_numpy(m.mean(0)))
    model.feature_std.copy_(torch.from_numpy(np.maximum(m.std(0), 1e-3) * 0.3))
    return model.eval()


def make_adapter(base: VoiceModel, out: Path, seed: int, scale: float = 0.3, meta: dict | None = None) -> Path:
    """A peft LoRA (rank 4) of ``base`` with random lora_B (scale NaN: a broken adapter), saved like training does."""
    peft_model = lora_model(copy.deepcopy(base), rank=4)  # peft injects into the model it wraps: use a copy
    g = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data = torch.full(p.shape, float("nan")) if math.isnan(scale) else torch.randn(p.shape, generator=g) * scale
    peft_model.save_pretrained(str(out))
    np.save(out / "speaker_embedding.npy", np.random.default_rng(seed).standard_normal(256).astype(np.float32))
    (out / "voice.json").write_text(json.dumps({"seed": seed, **(meta or {})}))
    return out


def phoneme_ids(text: str) -> list[int]:
    return phonemes_to_ids(phonemize(text, "en"))


class ServerStack:
    """Voices ``a`` (and ``b``) in MLflow, tenant keys, and a ``voiceops serve`` process over them."""

    def __init__(self, mlflow_server: str, home: Path, env: dict[str, str] | None = None) -> None:
        from serving.tenants import TenantDirectory
        from voice_lib.core.hashing import sha256_file

        self.home, self.work = home, home / "work"
        self.settings = Settings(home=home, mlflow_tracking_uri=mlflow_server)
        self.registry = Registry(self.settings)
        self.base = tiny_base()
        self.base_dir = save_base(self.base, home / "base", {"feature_config": {"sample_rate": 16000}}).parent
        # The base is given by folder (serving.base_dir, sha256-checked): Registry refuses the name voice-base for now.
        self.lineage = {"base_model": "voice-base", "base_version": "shipped",
                        "base_sha256": sha256_file(self.base_dir / "model.safetensors"),
                        "data_sha256": "d" * 64, "code_version": "test", "lora_rank": "4"}
        suffix = uuid.uuid4().hex[:8]
        self.a, self.b = f"srv-a-{suffix}", f"srv-b-{suffix}"
        tenants = TenantDirectory(self.settings.resolved_tenants_file)
        self.keys = {"acme": tenants.create_key("acme", [self.a], can_force_variant=True, rate_per_minute=1_000_000)[0],
                     "globex": tenants.create_key("globex", [self.b], rate_per_minute=1_000_000)[0],
                     "ops": tenants.create_key("ops", ["*"], admin=True, rate_per_minute=1_000_000)[0],
                     "slow": tenants.create_key("slow", [self.a], rate_per_minute=2)[0]}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "VOICEOPS_HOME": str(home), "VOICEOPS_MLFLOW_TRACKING_URI": mlflow_server,
                    "VOICEOPS_SERVING__POLL_SECONDS": "1", "VOICEOPS_SERVING__BREAKER_MIN_REQUESTS": "8",
                    "VOICEOPS_SERVING__BREAKER_MAX_P95_MS": "60000", "VOICEOPS_SERVING__WEBHOOK_SECRET": SECRET,
                    "VOICEOPS_SERVING__MAX_TEXT_CHARS": "300", "VOICEOPS_SERVING__BATCH_MAX_WAIT_MS": "20",
                    "VOICEOPS_SERVING__BASE_DIR": str(self.base_dir), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                    **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log_path = home / "server.log"

    # --- registry -----------------------------------------------------------------------------------

    def register(self, voice_id: str, seed: int, scale: float = 0.3) -> str:
        from voice_lib.core.tracking import experiment_id, mlflow_client

        folder = make_adapter(self.base, self.work / f"{voice_id}-{seed}", seed, scale,
                              {"base_sha256": self.lineage["base_sha256"], "base_version": self.lineage["base_version"]})
        client = mlflow_client(self.settings)
        run_id = client.create_run(experiment_id(client, f"voice-{voice_id}")).info.run_id
        client.log_artifacts(run_id, str(folder), "voice")
        # gates_passed: these versions stand for ones that passed onboarding's gates (promote wants it)
        tags = {**self.lineage, "gates_passed": "true", "training_key": f"{voice_id}-{seed}-{uuid.uuid4().hex[:6]}"}
        return self.registry.register(f"voice-{voice_id}", run_id, "voice", tags).version

    def publish_default_voices(self, canary_weight: int = 30) -> None:
        """a: v1 production, v2 canary at ``canary_weight``; b: v1 production."""
        for voice_id, seeds in ((self.a, (1, 2)), (self.b, (3,))):
            for seed in seeds:
                self.register(voice_id, seed)
            self.registry.promote(f"voice-{voice_id}", 1)
        self.registry.set_canary(f"voice-{self.a}", 2, canary_weight)

    # --- the server process -------------------------------------------------------------------------

    def start(self, timeout: float = 150, need_canary: bool = True) -> None:
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "voiceops.cli", "serve", "--port", str(self.port)],
                                         cwd=self.home, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, self.log_path.read_text()[-3000:]
            try:
                voices = self.status().get("voices", {})
                if self.a in voices and (voices[self.a]["canary"] or not need_canary) and self.b in voices:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    # --- client helpers -----------------------------------------------------------------------------

    def auth(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[key]}"}

    def tts(self, key: str = "acme", client: httpx.Client | None = None, **body) -> httpx.Response:
        body = {"text": TEXT, "voice_id": self.a, **body}
        return (client or httpx).post(f"{self.url}/v1/tts", json=body, timeout=60, headers=self.auth(key))

    def status(self) -> dict:
        return httpx.get(f"{self.url}/v1/admin/status", headers=self.auth("ops"), timeout=10).json()

    def wait(self, what: str, check, timeout: float = 30.0) -> float:
        started = time.monotonic()
        while not check():
            assert time.monotonic() - started < timeout, f"timed out waiting for {what}: {self.status()}"
            time.sleep(0.2)
        return time.monotonic() - started


@contextmanager
def running_stack(mlflow_server: str, home: Path, env: dict[str, str] | None = None,
                  canary_weight: int = 30) -> Iterator[ServerStack]:
    stack = ServerStack(mlflow_server, home, env)
    try:
        stack.publish_default_voices(canary_weight)
        stack.start()
        yield stack
    finally:
        stack.stop()


def chunked_post(url: str, path: str, headers: dict[str, str], chunks: int, chunk_bytes: int = 65_536) -> tuple[int, dict]:
    """POST a chunked body (no Content-Length) of ``chunks`` chunks over a raw socket, never sending its end.

    Returns the status and the JSON body of the answer. Before the fix the server waited for the rest of a
    body it would hold in memory whole; now it answers 413 once the bytes it received pass the limit."""
    import http.client
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=20) as sock:
        head = [f"POST {path} HTTP/1.1", f"Host: {where.netloc}", "Transfer-Encoding: chunked",
                "Content-Type: application/json", *(f"{k}: {v}" for k, v in headers.items())]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        piece = b'{"text": "' + b"a" * (chunk_bytes - 10)
        try:
            for _ in range(chunks):
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the server answered and stopped reading (or closed): what the test wants
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        return answer.status, json.loads(answer.read())
