"""The micro-batcher's pipeline: the next batch's model pass runs while the previous batch's rows still render.

The first test runs the real stages on a tiny end-to-end base (serving_stack.tiny_base) with LoRA voices:
the server's VoicePool (its infer lock and vocoder threads), the engine's model stage and WORLD rendering,
with batch 1's rendering held back until batch 2's model pass has begun. Without pipelining batch 2's model
pass would start only after batch 1's last row, so the hold would time out and the order assertion fail.
The second test drives the batcher with plain callables to pin its failure isolation and in-flight bound.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from serving_stack import TEXT, make_adapter, phoneme_ids, tiny_base

from serving.batcher import MicroBatcher
from serving.engine import SynthesisError, SynthesisJob, run_batch
from serving.pool import VoicePool
from voice_lib.core.config import Settings
from voice_lib.data.features import FeatureConfig
from voice_lib.infer.end_to_end import EndToEndBackend
from voice_lib.infer.multilora import AdapterWeights, LoraBank, install

pytestmark = pytest.mark.timeout(120)
HOLD_SECONDS = 10.0  # how long batch 1's rows wait for batch 2's model pass before giving up


def _voices(tmp_path: Path):
    """A job factory over a tiny base with voices a1, a2 and a broken (NaN) adapter."""
    base = tiny_base()
    folders = {key: make_adapter(base, tmp_path / key, seed, scale=scale)
               for key, seed, scale in (("a1", 1, 0.3), ("a2", 2, 0.3), ("nan", 3, math.nan))}
    shapes = install(base)
    bank = LoraBank([(key, AdapterWeights.load(f)) for key, f in folders.items()], shapes)
    backend = EndToEndBackend("sha", base, shapes, FeatureConfig(), "test")
    speakers = {key: torch.from_numpy(np.load(f / "speaker_embedding.npy")) for key, f in folders.items()}
    return lambda key, text=TEXT: SynthesisJob(phoneme_ids(text), 1.0, backend, bank, bank.slot(key), speakers[key])


def test_the_next_batch_runs_the_model_while_the_previous_batch_renders(tmp_path: Path, monkeypatch) -> None:
    job = _voices(tmp_path)
    long_text = "Good morning to you all, and welcome."
    # What the unpipelined engine gives for the three batches the batcher will make (max_size 2, one job cancelled).
    expected = [*run_batch([job("a1")]), *run_batch([job("a2"), job("nan")]), *run_batch([job("a1", long_text)])]
    expected_audio = {name: expected[i][1].audio for name, i in (("a1", 0), ("long", -1))}
    expected_audio["a2"] = next(out.audio for i, out in expected[1:3] if i == 0)

    events: list[tuple[str, int, float]] = []  # (what, model pass number, when)
    second_pass = threading.Event()
    predict, render = EndToEndBackend.predict, EndToEndBackend.render

    pass_of_row: dict[int, int] = {}

    def recorded_predict(self, rows, bank):
        number = sum(what == "predict" for what, _, _ in events) + 1
        events.append(("predict", number, time.monotonic()))
        pass_of_row.update({id(row): number for row in rows})
        if number == 2:
            second_pass.set()
        return predict(self, rows, bank)

    def held_render(self, row, features):
        number = pass_of_row[id(row)]
        if number == 1:  # batch 1's rows: a slow rendering, still going when batch 2 is ready for the model
            second_pass.wait(HOLD_SECONDS)
        audio = render(self, row, features)
        events.append(("rendered", number, time.monotonic()))
        return audio

    monkeypatch.setattr(EndToEndBackend, "predict", recorded_predict)
    monkeypatch.setattr(EndToEndBackend, "render", held_render)
    pool = VoicePool(Settings(home=tmp_path / "home", mlflow_tracking_uri="http://127.0.0.1:9"))
    batcher = MicroBatcher(pool.predict_batch, pool.vocoder, max_size=2, max_wait_ms=50)
    gone = batcher.submit_future(job("a2"))
    futures = [batcher.submit_future(job(key, text))
               for key, text in (("a1", TEXT), ("a2", TEXT), ("nan", TEXT), ("a1", long_text))]
    gone.cancel()  # a request that left before its batch: skipped, never synthesised
    started = time.monotonic()
    batcher.start()
    assert batcher.stop(timeout=60)  # stop() drains: every queued and in-flight job is finished when it returns
    stopped = time.monotonic()
    pool.close()

    assert all(f.done() for f in futures) and gone.cancelled()
    assert max(t for what, _, t in events if what == "rendered") <= stopped
    first_rendered = max(t for what, n, t in events if what == "rendered" and n == 1)
    second_started = next(t for what, n, t in events if what == "predict" and n == 2)
    assert second_started < first_rendered, "batch 2's model pass waited for batch 1's rendering"
    assert first_rendered - started < HOLD_SECONDS  # and so batch 1's rows never had to give up waiting
    # Every row still arrives, with exactly the audio the unpipelined engine gives it; the broken voice fails alone.
    results = [f.exception() or f.result() for f in futures]
    for got, name in zip((results[0], results[1], results[3]), ("a1", "a2", "long")):
        assert np.array_equal(got.audio, expected_audio[name]), name
    assert isinstance(results[2], SynthesisError)
    assert batcher.batches == 3 and batcher.items == 4 and batcher.in_flight == 0 and batcher.rendering == 0


def test_failures_stay_in_their_batch_or_row_and_in_flight_batches_are_bounded() -> None:
    in_flight_seen: list[int] = []
    lock = threading.Lock()
    batcher: MicroBatcher

    def predict(jobs):
        if "fail the pass" in jobs:
            raise RuntimeError("model pass failed")
        return [ValueError(f"bad input {j}") if j == "bad input" else (lambda j=j: rendered(j)) for j in jobs]

    def rendered(job):
        with lock:
            in_flight_seen.append(batcher.in_flight)
        time.sleep(0.02)  # long enough that later batches pile up behind the pipeline's bound
        if job == "bad row":
            raise SynthesisError("non-finite features")
        return job.upper()

    with ThreadPoolExecutor(2, thread_name_prefix="vocoder") as vocoder:
        batcher = MicroBatcher(predict, vocoder, max_size=2, max_wait_ms=0, max_in_flight=2)
        jobs = ["a", "b", "fail the pass", "c", "bad row", "d", "bad input", "e", *[f"x{i}" for i in range(12)]]
        futures: list[Future] = [batcher.submit_future(j) for j in jobs]
        batcher.start()
        assert batcher.stop(timeout=30)

    outcome = {j: (f.exception() or f.result()) for j, f in zip(jobs, futures)}
    assert outcome["a"] == "A" and outcome["b"] == "B" and outcome["d"] == "D" and outcome["e"] == "E"
    # A failed model pass fails its own batch ("fail the pass" and "c") and nothing else.
    assert str(outcome["fail the pass"]) == str(outcome["c"]) == "model pass failed"
    assert isinstance(outcome["bad row"], SynthesisError) and isinstance(outcome["bad input"], ValueError)
    assert all(outcome[f"x{i}"] == f"X{i}" for i in range(12))
    assert in_flight_seen and max(in_flight_seen) <= 2  # never more than the bound between collection and rendering
    assert batcher.in_flight == 0 and batcher.rendering == 0
