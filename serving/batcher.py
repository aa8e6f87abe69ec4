"""Asyncio front, one worker thread behind: dynamic micro-batching of synthesis jobs, pipelined with rendering.

Request handlers ``await batcher.submit(job)``. The worker thread takes the first queued job, then keeps
collecting until it has ``batch_max_size`` jobs or ``batch_max_wait_ms`` have passed since that first
one, and runs the batch's model stage (``predict``: VoicePool.predict_batch, one model pass over every voice
in the batch thanks to multi-LoRA). That gives each job a pending rendering (or its error); the worker hands
the renderings to the vocoder pool (``renderer``) and goes on to collect and predict the next batch while
they run. Each result is delivered to its request as soon as that row is rendered, so the first item of a
batch does not wait for the last, and the model pass of batch N+1 does not wait for batch N's last vocode.

In-flight work is bounded by ``max_in_flight`` batches (default 2) between the end of collection and the
last rendered row: a batch takes a slot before its model pass and frees it when its last row is rendered.
Two is the smallest bound that keeps both stages busy: while batch N renders, batch N+1 runs the model and
then queues its rows behind N's on the vocoder pool (first in, first out), so whichever stage is slower
never waits for the other. A deeper pipeline cannot add throughput (the model pass is serialized and the
two stages share the same cores) and would only hold more feature matrices in memory and make each row
wait longer behind other batches' rows; one slot reproduces the unpipelined server. Under overload the
excess waits in the queue, where admission control (serving/admission.py) bounds it, not in memory here.

The waiting is bounded by ``batch_max_wait_ms`` only when the server is idle; under load the queue is
never empty and batches fill at once. Jobs whose request was cancelled (client gone, request timeout)
before the batch starts are skipped. A failing row fails its own job only; a failing model pass fails its
batch's jobs only. Futures are ``concurrent.futures.Future`` because they are completed from the worker
and vocoder threads; ``asyncio.wrap_future`` makes them awaitable and propagates cancellation.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from typing import Any

from voice_lib.infer.core import SynthesisError

log = logging.getLogger(__name__)
# The model stage: per job, a callable that renders its result (run on ``renderer``), or the job's error.
Predict = Callable[[Sequence[Any]], Sequence[Callable[[], Any] | BaseException]]
_STOP = object()


class BatcherClosed(RuntimeError):
    """The server is shutting down and takes no new work."""


class _Rendering:
    """One batch past its model pass: delivers each row's result and says when its last row is done."""

    def __init__(self, futures: list[Future], row_done: Callable[[], None], batch_done: Callable[[], None]) -> None:
        self.futures = futures
        self._left = len(futures)
        self._lock = threading.Lock()
        self._row_done, self._batch_done = row_done, batch_done

    def finish(self, index: int, result: Any = None, error: BaseException | None = None) -> None:
        if error is not None:
            self.futures[index].set_exception(error)
        else:
            self.futures[index].set_result(result)
        with self._lock:
            self._left -= 1
            last = self._left == 0
        self._row_done()
        if last:
            self._batch_done()

    def render(self, index: int, pending: Callable[[], Any]) -> None:
        """On a vocoder thread: one row's rendering; its failure is its own."""
        try:
            result = pending()
        except Exception as exc:  # noqa: BLE001 - delivered to this row's request
            if not isinstance(exc, SynthesisError):
                log.warning("rendering a batch row failed: %s", exc)
            self.finish(index, error=exc)
            return
        self.finish(index, result)


class MicroBatcher:
    def __init__(self, predict: Predict, renderer: Executor, max_size: int = 8, max_wait_ms: float = 10.0,
                 on_batch: Callable[[int], None] | None = None, max_in_flight: int = 2) -> None:
        self.predict = predict
        self.renderer = renderer
        self.max_size = max(1, max_size)
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self.on_batch = on_batch  # e.g. the batch-size histogram
        self.max_in_flight = max(1, max_in_flight)
        self._slots = threading.BoundedSemaphore(self.max_in_flight)  # see the module docstring
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._count_lock = threading.Lock()
        self.batches = 0
        self.items = 0
        self.max_seen = 0
        self.in_flight = 0  # batches between collection and their last rendered row (at most max_in_flight)
        self.rendering = 0  # rows of those batches not rendered yet (in the model pass, queued or on a vocoder)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="synthesis-batcher", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def submit_future(self, job: Any) -> Future:
        if self._closed:
            raise BatcherClosed("the server is shutting down")
        future: Future = Future()
        self._queue.put((job, future))
        return future

    def submit(self, job: Any) -> asyncio.Future[Any]:
        """Queue ``job`` now (BatcherClosed if shutting down); await the result (item exceptions raise there).

        Must be called from the event loop thread.
        """
        return asyncio.wrap_future(self.submit_future(job))

    def stop(self, timeout: float = 30.0) -> bool:
        """Refuse new jobs, finish every queued and in-flight one, stop the worker. False if not done in time."""
        self._closed = True
        self._queue.put(_STOP)
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _collect(self, first: Any, taken_at: float) -> tuple[list[tuple[Any, Future]], bool]:
        batch, stop = [first], False
        deadline = taken_at + self.max_wait  # time spent waiting for a slot counts: take what is queued then
        while len(batch) < self.max_size:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop = True  # finish this batch and whatever is still queued, then exit
                break
            batch.append(item)
        return batch, stop

    def _work(self) -> None:
        stop = False
        while True:
            try:
                first = self._queue.get(timeout=0.5) if not stop else self._queue.get_nowait()
            except queue.Empty:
                if stop:
                    break
                continue
            if first is _STOP:
                stop = True
                continue
            taken_at = time.monotonic()
            self._slots.acquire()  # at most max_in_flight batches past collection
            batch, saw_stop = self._collect(first, taken_at)
            stop = stop or saw_stop
            live = [(job, fut) for job, fut in batch if fut.set_running_or_notify_cancel()]
            if live:
                self._start(live)
            else:
                self._slots.release()
        for _ in range(self.max_in_flight):  # drain: wait until every in-flight batch has rendered its last row
            self._slots.acquire()

    def _row_rendered(self) -> None:
        with self._count_lock:
            self.rendering -= 1

    def _batch_rendered(self) -> None:
        with self._count_lock:
            self.in_flight -= 1
        self._slots.release()

    def _start(self, live: list[tuple[Any, Future]]) -> None:
        """The model stage of one batch on this thread, then its renderings handed to the vocoder pool."""
        self.batches += 1
        self.items += len(live)
        self.max_seen = max(self.max_seen, len(live))
        with self._count_lock:
            self.in_flight += 1
            self.rendering += len(live)
        if self.on_batch is not None:
            self.on_batch(len(live))
        batch = _Rendering([fut for _, fut in live], self._row_rendered, self._batch_rendered)
        try:
            pending = list(self.predict([job for job, _ in live]))
            if len(pending) != len(live):
                raise RuntimeError(f"the model stage gave {len(pending)} results for a batch of {len(live)}")
        except Exception as exc:  # noqa: BLE001 - the batch's jobs fail; the worker and other batches go on
            log.exception("synthesis batch failed")
            for index in range(len(live)):
                batch.finish(index, error=exc)
            return
        for index, item in enumerate(pending):
            if isinstance(item, BaseException):
                batch.finish(index, error=item)
                continue
            try:
                self.renderer.submit(batch.render, index, item)
            except RuntimeError as exc:  # the vocoder pool is shut down: this row cannot render
                batch.finish(index, error=exc)
