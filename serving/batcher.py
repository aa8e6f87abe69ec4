"""Asyncio front, one worker thread behind: dynamic micro-batching of synthesis jobs.

Request handlers ``await batcher.submit(job)``. The worker thread takes the first queued job, then keeps
collecting until it has ``batch_max_size`` jobs or ``batch_max_wait_ms`` have passed since that first
one, and hands the batch to ``run_batch`` (VoicePool.run_batch: one model pass over every voice in the
batch thanks to multi-LoRA, then vocoding item by item). Each result is delivered to its request as
soon as that item is vocoded, so the first item of a batch does not wait for the last.

The waiting is bounded by ``batch_max_wait_ms`` only when the server is idle; under load the queue is
never empty and batches fill at once. Jobs whose request was cancelled (client gone, request timeout)
before the batch starts are skipped. Futures are ``concurrent.futures.Future`` because they are completed
from the worker thread; ``asyncio.wrap_future`` makes them awaitable and propagates cancellation.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)
RunBatch = Callable[[Sequence[Any]], Iterable[tuple[int, Any]]]
_STOP = object()


class BatcherClosed(RuntimeError):
    """The server is shutting down and takes no new work."""


class MicroBatcher:
    def __init__(self, run_batch: RunBatch, max_size: int = 8, max_wait_ms: float = 10.0,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.run_batch = run_batch
        self.max_size = max(1, max_size)
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self.on_batch = on_batch  # e.g. the batch-size histogram
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.items = 0
        self.max_seen = 0

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
        """Refuse new jobs, finish every queued one, stop the worker. False if it did not finish in time."""
        self._closed = True
        self._queue.put(_STOP)
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _collect(self, first: Any) -> tuple[list[tuple[Any, Future]], bool]:
        batch, stop = [first], False
        deadline = time.monotonic() + self.max_wait
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
                    return
                continue
            if first is _STOP:
                stop = True
                continue
            batch, saw_stop = self._collect(first)
            stop = stop or saw_stop
            live = [(job, fut) for job, fut in batch if fut.set_running_or_notify_cancel()]
            if not live:
                continue
            self.batches += 1
            self.items += len(live)
            self.max_seen = max(self.max_seen, len(live))
            if self.on_batch is not None:
                self.on_batch(len(live))
            futures = [fut for _, fut in live]
            done: set[int] = set()
            try:
                for index, result in self.run_batch([job for job, _ in live]):
                    done.add(index)
                    if isinstance(result, BaseException):
                        futures[index].set_exception(result)
                    else:
                        futures[index].set_result(result)
            except Exception as exc:
                log.exception("synthesis batch failed")
                for index, fut in enumerate(futures):
                    if index not in done:
                        fut.set_exception(exc)
            for index, fut in enumerate(futures):
                if index not in done and not fut.done():
                    fut.set_exception(RuntimeError("the batch ended without a result for this item"))
