"""Admission control: how much speech may wait for the synthesis queue, and how much of it one tenant may hold.

The batcher's queue is unbounded by itself: a spike from one tenant made every request wait behind it, which
timed out other tenants' requests and (while the breaker judged wall time) tripped every canary. Before a
request's chunks are queued, ``Admission.admit`` checks, in queued **audio seconds** (estimated from the
phonemes: what the work actually costs, where a request count would treat "Hi." and 1,000 characters alike):

- the tenant's requests in progress: at most ``serving.max_concurrent_per_tenant`` (429 ``too_many_concurrent``,
  ``Retry-After: 1``), and at most ``serving.max_tenant_queue_share`` of the queue bound (429 as well), so one
  tenant can never fill the queue for the others;
- everyone's queued speech: at most ``serving.max_queued_audio_seconds`` (503 ``overloaded`` with
  ``Retry-After``), beyond which a request would only wait past its timeout.

A request alone is always admitted (one longer than the bound must still run on an idle server). The ticket
is released when the answer is complete (the last chunk of a stream), whatever happened.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from serving.synthesis import ServingError

# Read speech runs at about 12 phones per second; with the pauses and stress marks among the ids this
# overestimates a little, which errs on the side of admitting less.
SECONDS_PER_PHONEME = 0.08


def estimated_audio_seconds(chunks: Sequence[Sequence[int]], speed: float = 1.0) -> float:
    """The speech a request's phoneme chunks will make, in seconds (``speed`` > 1 is faster, so shorter)."""
    return sum(len(c) for c in chunks) * SECONDS_PER_PHONEME / max(speed, 0.1)


@dataclass
class Ticket:
    """One admitted request's share of the queue; ``release()`` once its answer is complete (idempotent)."""

    admission: "Admission"
    tenant: str
    seconds: float
    released: bool = field(default=False)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission._release(self)


class Admission:
    """Thread-safe counters of admitted work, overall and per tenant."""

    def __init__(self, max_queued_audio_seconds: float, max_concurrent_per_tenant: int,
                 max_tenant_queue_share: float = 0.5) -> None:
        self.max_seconds = max_queued_audio_seconds
        self.max_per_tenant = max_concurrent_per_tenant
        self.tenant_share = max_tenant_queue_share
        self._lock = threading.Lock()
        self.queued_seconds = 0.0
        self._tenants: dict[str, list[float]] = {}  # tenant -> [requests in progress, their audio seconds]
        self.refused = {"too_many_concurrent": 0, "overloaded": 0}

    def admit(self, tenant: str, seconds: float) -> Ticket:
        """A ticket for ``seconds`` of speech, or ServingError 429/503 with Retry-After (module docstring)."""
        with self._lock:
            count, held = self._tenants.get(tenant, (0, 0.0))
            tenant_limit = self.max_seconds * self.tenant_share
            if count >= self.max_per_tenant or (count and held + seconds > tenant_limit):
                self.refused["too_many_concurrent"] += 1
                raise ServingError(429, "too_many_concurrent",
                                   f"tenant {tenant!r} has {int(count)} requests ({held:.0f} s of speech) in progress; "
                                   f"the limit is {self.max_per_tenant} requests or {tenant_limit:.0f} s: retry when "
                                   "one has finished", {"Retry-After": "1"})
            if self.queued_seconds and self.queued_seconds + seconds > self.max_seconds:
                self.refused["overloaded"] += 1
                wait = max(1, math.ceil(min(30.0, self.queued_seconds / max(self.max_seconds, 1.0) * 5)))
                raise ServingError(503, "overloaded",
                                   f"the server has {self.queued_seconds:.0f} s of speech queued (limit "
                                   f"{self.max_seconds:.0f} s); retry in {wait} s or on another replica",
                                   {"Retry-After": str(wait)})
            self._tenants[tenant] = [count + 1, held + seconds]
            self.queued_seconds += seconds
        return Ticket(self, tenant, seconds)

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            self.queued_seconds = max(0.0, self.queued_seconds - ticket.seconds)
            count, held = self._tenants.get(ticket.tenant, (1, ticket.seconds))
            if count <= 1:
                self._tenants.pop(ticket.tenant, None)
            else:
                self._tenants[ticket.tenant] = [count - 1, max(0.0, held - ticket.seconds)]

    def in_progress(self, tenant: str) -> int:
        with self._lock:
            return int(self._tenants.get(tenant, (0, 0.0))[0])
