"""API keys, tenants, per-key rate limits and the stable routing hash of the model server.

The tenants file (``settings.resolved_tenants_file``) is JSON::

    {"keys": [{"key_id": "k_...", "key_sha256": "<hex>", "tenant": "acme", "voices": ["alice"] | ["*"],
               "admin": false, "can_force_variant": false, "rate_per_minute": 600 | null, "created": "..."}]}

Keys are never stored in clear. There is no server secret to build an HMAC with, so the file holds the
SHA-256 of each key; that is safe because keys are 32 random bytes (``vo_`` + urlsafe token), which no
dictionary or brute-force attack can reach. The file is written atomically with mode 0600; writers
(the ``voiceops keys`` CLI) serialise through a lock file, and servers pick changes up without restart.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from voice_lib.core.config import Settings, validate_voice_id
from voice_lib.core.storage import write_bytes_atomic

log = logging.getLogger(__name__)

KEY_PREFIX = "vo_"
ALL_VOICES = "*"
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MAX_KEY_LENGTH = 256  # anything longer is not one of ours; don't hash megabytes from a header


@dataclass(frozen=True)
class Tenant:
    """What one API key may do. ``voices`` is a tuple of voice ids, or ``("*",)`` for every voice."""

    tenant: str
    key_id: str
    voices: tuple[str, ...]
    admin: bool = False
    can_force_variant: bool = False
    rate_per_minute: int | None = None  # None: the server's default (settings.serving.rate_limit_per_minute)
    created: str | None = field(default=None, compare=False)

    def may_use(self, voice_id: str) -> bool:
        """True if this key may synthesise with ``voice_id`` (admin rights do not widen the voice list)."""
        return ALL_VOICES in self.voices or voice_id in self.voices


def _hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def _tenant_from_entry(entry: dict) -> Tenant:
    voices = entry["voices"]
    if not isinstance(voices, list) or not all(isinstance(v, str) for v in voices):
        raise ValueError("voices must be a list of strings")
    rate = entry.get("rate_per_minute")
    if rate is not None and (not isinstance(rate, int) or rate <= 0):
        raise ValueError("rate_per_minute must be a positive integer or null")
    return Tenant(tenant=str(entry["tenant"]), key_id=str(entry["key_id"]), voices=tuple(voices),
                  admin=bool(entry.get("admin", False)), can_force_variant=bool(entry.get("can_force_variant", False)),
                  rate_per_minute=rate, created=entry.get("created"))


class TenantDirectory:
    """The API keys of one tenants file. Thread-safe; reloads the file when it changes on disk."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._signature: tuple | None = None
        self._entries: list[tuple[str, Tenant]] = []  # (key_sha256, tenant)

    @classmethod
    def from_settings(cls, settings: Settings) -> "TenantDirectory":
        return cls(settings.resolved_tenants_file)

    # --- reading --------------------------------------------------------------------------------

    def _file_signature(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        # The inode changes on every atomic replace, so coarse mtimes cannot hide an update.
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _reload_if_changed(self) -> None:
        signature = self._file_signature()
        with self._lock:
            if signature == self._signature:
                return
            if signature is None:
                self._entries, self._signature = [], None
                return
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                raw_entries = data["keys"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # A half-edited file must not lock every tenant out: keep the last good keys.
                log.error("tenants file %s is unreadable (%s); keeping the %d keys loaded before",
                          self.path, exc, len(self._entries))
                self._signature = signature
                return
            entries = []
            for i, entry in enumerate(raw_entries):
                try:
                    digest = str(entry["key_sha256"]).lower()
                    if len(digest) != 64:
                        raise ValueError("key_sha256 is not a SHA-256 hex digest")
                    entries.append((digest, _tenant_from_entry(entry)))
                except (KeyError, ValueError, TypeError) as exc:
                    log.error("tenants file %s: entry %d ignored: %s", self.path, i, exc)
            if os.stat(self.path).st_mode & 0o077:
                log.warning("tenants file %s is readable by other users; chmod 600 it", self.path)
            self._entries, self._signature = entries, signature

    def authenticate(self, api_key: str | None) -> Tenant | None:
        """The tenant of ``api_key``, or None. Compares against every stored hash in constant time."""
        self._reload_if_changed()
        if not api_key or len(api_key) > _MAX_KEY_LENGTH or not api_key.startswith(KEY_PREFIX):
            return None
        digest = _hash_key(api_key)
        found = None
        with self._lock:
            entries = self._entries
        for stored, tenant in entries:  # no early exit: the time does not depend on which entry matched
            if hmac.compare_digest(digest, stored):
                found = tenant
        return found

    def list(self) -> list[Tenant]:
        self._reload_if_changed()
        with self._lock:
            return [tenant for _, tenant in self._entries]

    # --- writing (the CLI) ----------------------------------------------------------------------

    @contextmanager
    def _edit(self) -> Iterator[list[dict]]:
        """Read-modify-write the file under an exclusive lock, replacing it atomically (mode 0600)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self.path.exists():
                data = json.loads(self.path.read_text(encoding="utf-8"))
            else:
                data = {"keys": []}
            yield data["keys"]
            write_bytes_atomic(self.path, (json.dumps(data, indent=2) + "\n").encode("utf-8"), mode=0o600)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._reload_if_changed()

    def create_key(self, tenant: str, voices: list[str] | tuple[str, ...], admin: bool = False,
                   can_force_variant: bool = False, rate_per_minute: int | None = None) -> tuple[str, Tenant]:
        """Create a key; returns ``(api_key, Tenant)``. The clear key exists only in this return value."""
        if not TENANT_PATTERN.fullmatch(tenant or ""):
            raise ValueError(f"tenant {tenant!r} is invalid: use 1-64 letters, digits, '.', '_' or '-'.")
        voices = [v.strip() for v in voices if v.strip()]
        if not voices:
            raise ValueError("give at least one voice id, or '*' for every voice.")
        if ALL_VOICES in voices:
            voices = [ALL_VOICES]
        else:
            voices = sorted({validate_voice_id(v) for v in voices})
        if rate_per_minute is not None and rate_per_minute <= 0:
            raise ValueError("rate_per_minute must be a positive number of requests per minute.")
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        entry = {"key_id": "k_" + secrets.token_hex(8), "key_sha256": _hash_key(api_key), "tenant": tenant,
                 "voices": voices, "admin": bool(admin), "can_force_variant": bool(can_force_variant),
                 "rate_per_minute": rate_per_minute,
                 "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        with self._edit() as keys:
            keys.append(entry)
        return api_key, _tenant_from_entry(entry)

    def revoke(self, key_id: str) -> bool:
        """Delete a key. True if it existed. Servers stop accepting it at their next request."""
        with self._edit() as keys:
            kept = [k for k in keys if k.get("key_id") != key_id]
            removed = len(kept) != len(keys)
            keys[:] = kept
        return removed


# A key may spend this many seconds of its allowance at once (at least BURST_FLOOR requests, never more than its
# rate per minute). A bucket holding a whole minute let one key fire 600 maximum-length requests in one instant.
BURST_SECONDS = 5.0
BURST_FLOOR = 10


def burst_capacity(rate_per_minute: int, burst_seconds: float = BURST_SECONDS) -> float:
    """Tokens a key's bucket holds when full: ``burst_seconds`` of its rate, within [BURST_FLOOR, rate]."""
    return float(min(rate_per_minute, max(BURST_FLOOR, math.ceil(rate_per_minute * burst_seconds / 60.0))))


class RateLimiter:
    """Token bucket per key id: refilled continuously at the rate per minute, holding ``burst_capacity`` tokens.

    The buckets live in this process: with N server replicas a key gets N times its limit (behind a
    load balancer that spreads keys evenly), unless the buckets move to a shared store such as Redis.
    A rate of 0 or less disables limiting for that call.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000,
                 burst_seconds: float = BURST_SECONDS) -> None:
        self._clock = clock
        self.burst_seconds = burst_seconds
        self._lock = threading.Lock()
        self._buckets: dict[str, list[float]] = {}  # key_id -> [tokens, last_refill]
        self._max_keys = max_keys

    def allow(self, key_id: str, rate_per_minute: int) -> tuple[bool, float]:
        """``(True, 0.0)`` if the request may go ahead, else ``(False, seconds until a token is back)``."""
        if rate_per_minute <= 0:
            return True, 0.0
        capacity = burst_capacity(rate_per_minute, self.burst_seconds)
        per_second = rate_per_minute / 60.0
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key_id)
            if bucket is None:
                if len(self._buckets) >= self._max_keys:
                    self._prune(now)
                bucket = self._buckets[key_id] = [capacity, now]
            tokens = min(capacity, bucket[0] + (now - bucket[1]) * per_second)  # a lowered rate caps at once
            bucket[1] = now
            if tokens >= 1.0:
                bucket[0] = tokens - 1.0
                return True, 0.0
            bucket[0] = tokens
            return False, (1.0 - tokens) / per_second

    def _prune(self, now: float) -> None:
        # Forget buckets idle for over a minute: any rate has refilled them completely by then (a full bucket
        # holds at most a minute's allowance).
        for key_id in [k for k, (_, last) in self._buckets.items() if now - last > 60.0]:
            del self._buckets[key_id]


def stable_bucket(value: str) -> int:
    """0..99 from SHA-256: the same in every process and replica (Python's ``hash()`` is salted)."""
    return int.from_bytes(hashlib.sha256(value.encode("utf-8")).digest()[:8], "big") % 100
