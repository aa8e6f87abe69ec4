"""The request audit log: one row per synthesis request, written off the request path.

``AuditLog.record(...)`` only puts the row on a queue; a daemon thread writes batches (up to 200 rows or
0.5 s) in one transaction each. If the database is down the batch is retried with backoff while new rows
wait in a bounded queue (the oldest are dropped and counted in ``dropped``): the request path never blocks
and never fails because of auditing. ``close()`` flushes everything before returning.

No row can stop the log: ``record`` makes every string field storable (lone surrogates and NUL replaced by
U+FFFD, truncated to its column), and a batch refused for anything but a lost connection is split until the
rows that fail alone are found; those are set aside (``rejected``, logged and exported as
``voiceops_audit_rejected_total``) and the rest are written. Only connection errors are retried.

SQLite (default, WAL + busy timeout so the server and a reader share the file) and PostgreSQL
(``postgresql+psycopg://user@host/db``; ``postgresql://`` is taken to mean psycopg 3) are supported.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    TypeDecorator,
    delete,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from voice_lib.core.db import make_engine

log = logging.getLogger(__name__)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC on both sides (SQLite stores no zone: values are normalised to UTC first)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        value = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


metadata = MetaData()
audit_log = Table(
    "audit_log", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("ts", UTCDateTime(), nullable=False),
    Column("request_id", String(64)),
    Column("tenant", String(64)),
    Column("voice_id", String(64)),
    Column("version", String(32)),
    Column("variant", String(16)),
    Column("characters", Integer),
    Column("latency_ms", Float),  # wall time of the whole request: what the caller waited, queue included
    # Synthesis compute milliseconds of the request (queue wait excluded; None when nothing was synthesised):
    # what canary_promotion's p95 rule judges, as the server's breaker does, so a flood by another tenant that
    # makes every variant wait is no fault of the canary. Added to older tables by create_or_upgrade.
    Column("compute_ms", Float, nullable=True),
    # Synthesis compute seconds per audio second (None for requests that produced no audio): what
    # canary_promotion compares between variants, since a canary may speak the same text longer.
    Column("rtf", Float, nullable=True),
    Column("status", Integer, nullable=False),
    Column("error", String(200), nullable=True),
    Index("ix_audit_log_ts", "ts"),
    Index("ix_audit_log_voice_variant_ts", "voice_id", "variant", "ts"),
)
FIELDS = frozenset(c.name for c in audit_log.columns) - {"id"}
# Column name -> its length, for every string column (what record() must fit a value into).
_STRING_LENGTHS = {c.name: c.type.length for c in audit_log.columns if isinstance(c.type, String)}
_STOP = object()
# Errors that say the database (or the way to it) is unavailable, not that the rows are bad: the batch is
# kept and retried. Anything else is the rows' fault (an encoding error, a NUL PostgreSQL refuses, a value
# out of range) and retrying the same rows would fail for ever.
_TRANSIENT = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError, sa_exc.TimeoutError,
              ConnectionError, TimeoutError)


def storable_text(value: object, limit: int) -> str:
    """``value`` as text every database stores: lone surrogates and NUL become U+FFFD, at most ``limit`` chars.

    A valid surrogate pair (as ``json.loads`` may leave in a str) is joined into its character first."""
    text_value = value if isinstance(value, str) else str(value)
    if not text_value.isascii():
        text_value = text_value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text_value.replace("\x00", "\ufffd")[:limit]


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, _TRANSIENT)


def create_or_upgrade(engine) -> list[str]:  # noqa: ANN001
    """Create the audit table, or add the columns a table written by an older server lacks.

    Only nullable columns are ever added (old rows keep NULL), so this is safe on a live table and idempotent;
    returns the names of the columns it added."""
    metadata.create_all(engine)
    present = {c["name"] for c in inspect(engine).get_columns(audit_log.name)}
    added = []
    with engine.begin() as conn:
        for column in audit_log.columns:
            if column.name not in present:
                kind = column.type.compile(dialect=engine.dialect)
                conn.execute(text(f"ALTER TABLE {audit_log.name} ADD COLUMN {column.name} {kind}"))
                added.append(column.name)
    if added:
        log.info("audit log: added column(s) %s to an older audit_log table", ", ".join(added))
    return added


class _Flush:
    def __init__(self) -> None:
        self.done = threading.Event()


class AuditLog:
    """One audit table. ``record`` is safe to call from any thread and never blocks."""

    def __init__(self, url: str, *, batch_size: int = 200, batch_seconds: float = 0.5,
                 max_queue: int = 100_000, max_backoff_seconds: float = 30.0, retention_days: float | None = None,
                 purge_every_seconds: float = 6 * 3600.0) -> None:
        self.url = url
        # Retention runs in the writer thread while it is idle: serving.audit_retention_days was configured but
        # nothing ever deleted a row. Every replica purges; the DELETE is idempotent, so that is harmless.
        self.retention_days, self.purge_every_seconds = retention_days, purge_every_seconds
        self._next_purge = time.monotonic() + min(60.0, purge_every_seconds)
        self.purged = 0
        self.engine = make_engine(url)
        self.batch_size, self.batch_seconds = batch_size, batch_seconds
        self.max_queue, self.max_backoff_seconds = max_queue, max_backoff_seconds
        self.dropped = 0  # rows lost to a full queue (DB down for long), to close()'s timeout or after close
        self.rejected = 0  # rows the database refused on their own (set aside so that the others are written)
        self.written = self.write_errors = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._counter_lock = threading.Lock()
        self._stopping = threading.Event()
        self._abandon = threading.Event()  # close() timed out: count what is left as dropped and exit
        self._closed = False
        self._table_ready = False
        try:
            create_or_upgrade(self.engine)
            self._table_ready = True
        except Exception as exc:  # noqa: BLE001 - the server starts without its audit DB; the writer retries
            log.error("audit log %s: cannot create the table yet (%s); rows will be retried", self._safe_url, exc)
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, settings) -> "AuditLog":  # noqa: ANN001
        return cls(settings.resolved_audit_url, retention_days=settings.serving.audit_retention_days)

    @property
    def _safe_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    # --- request path ---------------------------------------------------------------------------

    def record(self, **fields: Any) -> None:
        """Queue one row (fields: see ``FIELDS``; ``ts`` defaults to now). Never blocks, never raises on I/O."""
        unknown = fields.keys() - FIELDS
        if unknown:
            raise TypeError(f"unknown audit fields: {sorted(unknown)}")
        if self._closed:
            self._count_drop()
            return
        fields.setdefault("ts", datetime.now(timezone.utc))
        fields = {name: None for name in FIELDS} | fields  # one key set per batch, whichever fields a caller gave
        for name, limit in _STRING_LENGTHS.items():
            if fields[name] is not None:
                fields[name] = storable_text(fields[name], limit)
        self._queue.put(fields)
        while self._queue.qsize() > self.max_queue:  # drop the oldest, never the caller's time
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, dict):
                self._count_drop()
            else:  # a control marker (flush/stop): keep it
                self._queue.put(item)
                break

    def _count_drop(self, n: int = 1) -> None:
        with self._counter_lock:
            self.dropped += n

    # --- writer thread --------------------------------------------------------------------------

    def _run(self) -> None:
        stop = False
        while not stop:
            batch: list[dict] = []
            markers: list[_Flush] = []
            if self._abandon.is_set():
                break
            try:
                item = self._queue.get(timeout=min(1.0, max(0.05, self.purge_every_seconds)))
            except queue.Empty:
                self._purge_if_due()
                continue
            deadline = time.monotonic() + self.batch_seconds
            while True:
                if item is _STOP:
                    stop = True
                    break
                if isinstance(item, _Flush):
                    markers.append(item)
                    break
                batch.append(item)
                if len(batch) >= self.batch_size:
                    break
                remaining = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write_with_retry(batch)
            for marker in markers:
                marker.done.set()
        # Rows that raced close() (recorded just as it ran) still get written.
        late: list[dict] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, dict):
                late.append(item)
            elif isinstance(item, _Flush):
                item.done.set()
        if self._abandon.is_set():
            return self._count_drop(len(late))
        for start in range(0, len(late), self.batch_size):
            self._write_with_retry(late[start:start + self.batch_size])

    def _write_with_retry(self, batch: list[dict]) -> None:
        """Write ``batch``: retry while the database is unreachable, split it when some rows are refused."""
        backoff = 0.5
        while True:
            if self._abandon.is_set():
                return self._count_drop(len(batch))
            try:
                self._insert(batch)
                return
            except Exception as exc:  # noqa: BLE001 - sorted below: retried, or split into the rows that fit
                self.write_errors += 1
                if not _is_transient(exc):
                    return self._write_splitting(batch, exc)
                log.warning("audit log %s: writing %d rows failed (%s); retrying in %.1f s",
                            self._safe_url, len(batch), exc, backoff)
                if self._stopping.is_set():  # shutting down: keep trying until close()'s timeout
                    time.sleep(0.5)
                else:
                    self._stopping.wait(backoff)  # close() cuts a long backoff short
                    backoff = min(backoff * 2, self.max_backoff_seconds)

    def _insert(self, batch: list[dict]) -> None:
        if not self._table_ready:
            create_or_upgrade(self.engine)
            self._table_ready = True
        with self.engine.begin() as conn:
            conn.execute(insert(audit_log), batch)
        self.written += len(batch)

    def _write_splitting(self, batch: list[dict], error: BaseException) -> None:
        """The database refused ``batch`` for its data: write each half on its own, down to single rows."""
        if len(batch) == 1:
            with self._counter_lock:
                self.rejected += 1
            row = batch[0]
            log.error("audit log %s: row set aside, the database refuses it (%s): request_id=%r status=%r",
                      self._safe_url, str(error).splitlines()[0][:200], row.get("request_id"), row.get("status"))
            return
        middle = len(batch) // 2
        for half in (batch[:middle], batch[middle:]):
            self._write_with_retry(half)

    def _purge_if_due(self) -> None:
        if not self.retention_days or time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + self.purge_every_seconds
        try:
            deleted = self.purge_older_than(self.retention_days)
        except Exception as exc:  # noqa: BLE001 - the database is away: the next round tries again
            log.warning("audit log %s: retention purge failed (%s)", self._safe_url, type(exc).__name__)
            return
        self.purged += deleted
        if deleted:
            log.info("audit log: deleted %d rows older than %g days (serving.audit_retention_days)", deleted,
                     self.retention_days)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row recorded before this call is written. False on timeout."""
        marker = _Flush()
        self._queue.put(marker)
        return marker.done.wait(timeout)

    def close(self, timeout: float = 10.0) -> bool:
        """Write every queued row, stop the writer and dispose of the engine. False if rows were left."""
        if self._closed:
            return True
        self._closed = True
        self._stopping.set()
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("audit log %s: rows still unwritten after %.0f s at shutdown; they are dropped",
                      self._safe_url, timeout)
            self._abandon.set()
            return False
        self.engine.dispose()
        return True

    # --- retention and counts --------------------------------------------------------------------

    def purge_older_than(self, days: float) -> int:
        """Delete rows older than ``days`` (the retention job); returns how many were deleted."""
        cutoff = datetime.now(timezone.utc) - timedelta(days=days)
        with self.engine.begin() as conn:
            return conn.execute(delete(audit_log).where(audit_log.c.ts < cutoff)).rowcount

    def count(self, since: datetime | None = None, until: datetime | None = None, **filters: Any) -> int:
        """Rows matching every ``column=value`` filter, with ``since <= ts < until`` if given."""
        unknown = filters.keys() - FIELDS
        if unknown:
            raise TypeError(f"unknown audit fields: {sorted(unknown)}")
        query = select(func.count()).select_from(audit_log)
        for name, value in filters.items():
            query = query.where(audit_log.c[name] == value)
        if since is not None:
            query = query.where(audit_log.c.ts >= since)
        if until is not None:
            query = query.where(audit_log.c.ts < until)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())
