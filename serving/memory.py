"""Keep a long-running server's resident memory flat on glibc (Linux).

Measured with an earlier version of benchmarks/soak.py: with glibc's defaults the server's RSS rose 8% over a
10-minute soak, in steps, with no Python-level leak behind it (``--glibc-defaults`` repeats it): requests of varying
length allocate and free tensors of varying size from several threads (batcher, registry poller, warm-up),
glibc gives each thread its own arena (up to 8 per core) and keeps freed pages in them. Two standard
mitigations, both no-ops where glibc is not the allocator:

- ``limit_arenas(n)``: ``mallopt(M_ARENA_MAX, n)`` before the worker threads start (what the
  ``MALLOC_ARENA_MAX`` environment variable does, set from settings instead of the environment);
- ``trim_heap()``: ``malloc_trim(0)``, returning every whole free page of every arena to the OS (not only
  at the heap's top: tests/test_serving_support.py frees a fragmented 200 MB heap with it); the pool
  calls it on the poll after a version swap (the old snapshot is gone by then) and every
  ``serving.heap_trim_seconds`` otherwise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from functools import lru_cache

log = logging.getLogger(__name__)
_M_ARENA_MAX = -8  # glibc malloc.h


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None  # glibc only


def limit_arenas(count: int) -> bool:
    """Cap glibc's malloc arenas (0 leaves the default). True if applied."""
    libc = _libc()
    if count <= 0 or libc is None:
        return False
    ok = bool(libc.mallopt(_M_ARENA_MAX, count))
    log.info("malloc arenas capped at %d: %s", count, "ok" if ok else "refused by libc")
    return ok


def trim_heap() -> bool:
    """Give free heap pages back to the OS. True if memory was released."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
