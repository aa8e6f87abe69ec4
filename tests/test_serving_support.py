"""Support pieces of the model server: API keys and tenants, rate limits, routing hash, audit log, metrics."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import skip_unless_required

from serving.audit import AuditLog
from serving.metrics import HISTOGRAMS, METRIC_NAMES, METRIC_SERIES, ServerMetrics
from serving.tenants import RateLimiter, Tenant, TenantDirectory, stable_bucket
from voice_lib.release.rollout import AuditSource, WindowStats

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


# --- tenants ----------------------------------------------------------------------------------------

def test_keys_are_stored_hashed_in_a_private_file(tmp_path):
    directory = TenantDirectory(tmp_path / "home" / "tenants.json")
    api_key, tenant = directory.create_key("acme", ["alice", "bob"], rate_per_minute=60)
    assert api_key.startswith("vo_") and len(api_key) >= 40
    text = directory.path.read_text()
    assert api_key not in text and api_key[3:] not in text
    entry = json.loads(text)["keys"][0]
    assert entry["key_id"] == tenant.key_id and entry["tenant"] == "acme" and entry["voices"] == ["alice", "bob"]
    assert len(entry["key_sha256"]) == 64 and entry["rate_per_minute"] == 60 and entry["created"]
    assert stat.S_IMODE(directory.path.stat().st_mode) == 0o600
    assert not list(directory.path.parent.glob(".tenants.json.*"))  # no leftovers of the atomic write


def test_authenticate_good_bad_and_revoked_keys(tmp_path):
    directory = TenantDirectory(tmp_path / "tenants.json")
    assert directory.authenticate("vo_anything") is None  # no file yet
    key_a, tenant_a = directory.create_key("acme", ["alice"], admin=True, can_force_variant=True)
    key_b, tenant_b = directory.create_key("globex", ["*"])
    assert directory.authenticate(key_a) == tenant_a and tenant_a.admin and tenant_a.can_force_variant
    assert directory.authenticate(key_b) == tenant_b and not tenant_b.admin
    for bad in (None, "", key_a[:-1] + ("A" if key_a[-1] != "A" else "B"), key_a[3:], "vo_" + "x" * 5000):
        assert directory.authenticate(bad) is None
    assert directory.revoke(tenant_a.key_id) is True
    assert directory.revoke(tenant_a.key_id) is False
    assert directory.authenticate(key_a) is None
    assert directory.authenticate(key_b) == tenant_b
    assert [t.key_id for t in directory.list()] == [tenant_b.key_id]
    with pytest.raises(ValueError):
        directory.create_key("acme", ["Not A Voice"])
    with pytest.raises(ValueError):
        directory.create_key("bad tenant", ["alice"])


def test_keys_changed_on_disk_are_picked_up_without_restart(tmp_path):
    path = tmp_path / "tenants.json"
    server = TenantDirectory(path)
    key_1, _ = TenantDirectory(path).create_key("acme", ["alice"])  # another process (the CLI) writes
    assert server.authenticate(key_1) is not None
    key_2, tenant_2 = TenantDirectory(path).create_key("acme", ["bob"])
    assert server.authenticate(key_2) == tenant_2
    TenantDirectory(path).revoke(tenant_2.key_id)
    assert server.authenticate(key_2) is None
    # A broken hand edit keeps the last good keys instead of locking everyone out.
    path.write_text("{not json")
    assert server.authenticate(key_1) is not None


def test_may_use():
    scoped = Tenant(tenant="acme", key_id="k_1", voices=("alice", "bob"))
    assert scoped.may_use("alice") and scoped.may_use("bob") and not scoped.may_use("carol")
    admin = Tenant(tenant="ops", key_id="k_2", voices=("alice",), admin=True)
    assert not admin.may_use("carol")  # admin rights do not widen the voice list
    assert Tenant(tenant="any", key_id="k_3", voices=("*",)).may_use("carol")


# --- rate limits -------------------------------------------------------------------------------------

def test_rate_limiter_allows_the_burst_then_refuses_then_refills():
    now = [1000.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert all(limiter.allow("k_a", 60)[0] for _ in range(10))  # a burst of 10 (5 s of 60/min, at least 10)
    allowed, retry_after = limiter.allow("k_a", 60)
    assert not allowed and 0.9 <= retry_after <= 1.0  # 60/min: one token per second
    assert limiter.allow("k_b", 60) == (True, 0.0)  # buckets are per key
    now[0] += 0.5
    allowed, retry_after = limiter.allow("k_a", 60)
    assert not allowed and 0.4 <= retry_after <= 0.5
    now[0] += 0.5
    assert limiter.allow("k_a", 60)[0] and not limiter.allow("k_a", 60)[0]
    now[0] += 3600
    assert sum(limiter.allow("k_a", 60)[0] for _ in range(100)) == 10  # refills to the burst, not beyond
    for _ in range(50):  # over a minute at the rate, a key still gets its rate
        now[0] += 1.0
        assert limiter.allow("k_a", 60)[0]


def test_one_key_cannot_fire_a_minutes_allowance_at_once():
    """Regression: the bucket held a full minute, so a 600/min key could send 600 long requests in one instant."""
    limiter = RateLimiter(clock=lambda: 0.0)
    assert sum(limiter.allow("k", 600)[0] for _ in range(600)) == 50  # 5 s of 600/min
    assert sum(limiter.allow("k2", 2)[0] for _ in range(5)) == 2  # never more than the rate per minute
    assert sum(limiter.allow("k3", 100_000)[0] for _ in range(20_000)) == 8334  # 5 s of it


def test_rate_limiter_is_thread_safe():
    limiter = RateLimiter(clock=lambda: 0.0)
    results = []

    def hammer():
        results.extend(limiter.allow("k", 1200)[0] for _ in range(50))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results) == 100 and len(results) == 200


# --- routing hash ------------------------------------------------------------------------------------

def test_stable_bucket_is_the_same_in_other_processes():
    ids = [f"user-{i}" for i in range(200)] + ["vo_someapikey", "", "ünïcode"]
    code = ("import json, sys; from serving.tenants import stable_bucket; "
            "print(json.dumps([stable_bucket(v) for v in json.load(sys.stdin)]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(ids), capture_output=True, text=True,
                         env=env, cwd=REPO, check=True, timeout=60).stdout
    assert json.loads(out) == [stable_bucket(v) for v in ids]
    assert stable_bucket("user-1") == int.from_bytes(__import__("hashlib").sha256(b"user-1").digest()[:8], "big") % 100


def test_stable_bucket_is_roughly_uniform():
    counts = [0] * 100
    for i in range(10_000):
        counts[stable_bucket(f"user-{i}")] += 1
    assert all(0 <= b < 100 for b in (stable_bucket(str(i)) for i in range(100)))
    chi2 = sum((c - 100) ** 2 / 100 for c in counts)
    assert chi2 < 148.2, chi2  # 99 degrees of freedom, p = 0.001
    assert sum(counts[:10]) == pytest.approx(1000, abs=150)  # a 10% canary gets ~10% of users


# --- audit log ---------------------------------------------------------------------------------------

def _row(i: int = 0, **over) -> dict:
    row = dict(request_id=f"r{i}", tenant="acme", voice_id="alice", version="3", variant="production",
               characters=40, latency_ms=float(i % 100), status=200, error=None)
    row.update(over)
    return row


def test_audit_records_off_the_request_thread(tmp_path):
    import sqlite3

    db = tmp_path / "audit.db"
    audit = AuditLog(f"sqlite:///{db}")
    try:
        blocker = sqlite3.connect(db, timeout=30)
        blocker.execute("BEGIN EXCLUSIVE")  # the database is locked: a synchronous write would wait
        start = time.perf_counter()
        for i in range(100):
            audit.record(**_row(i))
        assert time.perf_counter() - start < 0.5
        time.sleep(0.8)  # past the batch window: the writer is now waiting for the lock, the caller is not
        assert audit.written == 0 and audit.count() == 0
        blocker.rollback()
        blocker.close()
        assert audit.flush(timeout=20)
        assert audit.count() == 100 and audit.count(status=200, voice_id="alice") == 100
        assert audit.written == 100 and audit.dropped == 0
        with pytest.raises(TypeError):
            audit.record(nonsense=1)
    finally:
        assert audit.close()


def test_audit_close_loses_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    audit = AuditLog(url)
    for i in range(5000):
        audit.record(**_row(i))
    assert audit.close(timeout=30)
    reader = AuditLog(url)
    try:
        assert reader.count() == 5000
        assert reader.count(request_id="r4999") == 1
    finally:
        reader.close()


def _round_trip(audit: AuditLog) -> None:
    now = datetime.now(timezone.utc)
    for i in range(1, 101):  # successful canary requests computed in 1..100 ms, each after 3 s in the queue
        audit.record(**_row(i, variant="canary", latency_ms=3000.0 + i, compute_ms=float(i)))
    for i in range(5):
        audit.record(**_row(i, variant="canary", status=500, latency_ms=5000.0, error="model crashed " * 50))
    for i in range(10):  # rate-limited: requests, but neither errors nor syntheses
        audit.record(**_row(i, variant="canary", status=429, latency_ms=0.1))
    for i in range(20):
        audit.record(**_row(i, ts=now - timedelta(days=200)))
    audit.record(**_row(0, ts=(now - timedelta(days=1)).replace(tzinfo=None)))  # naive = UTC
    assert audit.flush(timeout=30)
    assert audit.count() == 136
    assert audit.count(variant="canary", status=500) == 5
    assert audit.count(since=now - timedelta(days=2)) == 116
    # canary_promotion's view of the same rows (voice_lib.release.rollout.AuditSource)
    source, since, until = AuditSource(audit.url), (now - timedelta(minutes=5)).timestamp(), time.time() + 60
    stats = source.window("alice", "canary", since, until)
    assert stats.requests == 115 and stats.errors == 5 and stats.error_rate == pytest.approx(5 / 115)
    # Compute time, nearest rank over the 100 successful ones (429s and 500s are not timed); the queue wait in
    # latency_ms (another tenant's flood) is no property of the canary and is not judged.
    assert stats.p95_latency_ms == 95.0 and stats.p95_missing is None
    assert source.window("bob", "canary", since, until) == WindowStats(0, 0, None, None)
    assert audit.purge_older_than(180) == 20
    assert audit.count() == 116 and audit.purge_older_than(180) == 0
    with audit.engine.connect() as conn:
        from sqlalchemy import select

        from serving.audit import audit_log

        row = conn.execute(select(audit_log).where(audit_log.c.status == 500).limit(1)).one()
    assert row.ts.tzinfo is not None and len(row.error) == 200


def test_audit_purge_and_window_stats_sqlite(tmp_path):
    audit = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}")
    try:
        _round_trip(audit)
    finally:
        audit.close()


def test_audit_database_down_never_blocks_and_drops_oldest():
    audit = AuditLog("postgresql+psycopg://postgres@127.0.0.1:1/nowhere", max_queue=50)  # nothing listens
    start = time.perf_counter()
    for i in range(1000):
        audit.record(**_row(i))
    assert time.perf_counter() - start < 0.5
    assert audit.pending <= 50
    assert audit.dropped >= 1000 - 200 - 50  # at most one batch in the writer's hands
    assert audit.close(timeout=1) is False  # gives up at the timeout instead of hanging the shutdown
    audit._thread.join(5)
    assert not audit._thread.is_alive() and audit.dropped == 1000 and audit.written == 0


@pytest.fixture
def pg_database():
    """A uniquely named database on the local PostgreSQL, dropped afterwards."""
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        admin.connect().close()
    except Exception as exc:  # noqa: BLE001
        admin.dispose()
        skip_unless_required(f"PostgreSQL at 127.0.0.1:5432 is not reachable ({type(exc).__name__}): start it with "
                    "'pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start'")
    name = f"voiceops_test_{uuid.uuid4().hex[:12]}"

    def create():
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))

    try:
        yield name, create, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_audit_on_postgresql(pg_database):
    name, create, url = pg_database
    create()
    audit = AuditLog(url)
    try:
        _round_trip(audit)
        for i in range(1000):
            audit.record(**_row(i))
    finally:
        assert audit.close(timeout=30)
    reader = AuditLog(url.replace("postgresql+psycopg://", "postgresql://"))  # plain URL means psycopg 3
    try:
        assert reader.count() == 1116
    finally:
        reader.close()


def test_audit_recovers_when_the_database_comes_back(pg_database):
    name, create, url = pg_database
    audit = AuditLog(url)  # the database does not exist yet: the server must start anyway
    try:
        for i in range(30):
            audit.record(**_row(i))
        time.sleep(0.8)
        assert audit.write_errors >= 1 and audit.written == 0
        assert audit.rejected == 0  # a connection error is retried, never taken for bad rows
        create()
        assert audit.flush(timeout=20)
        assert audit.count() == 30 and audit.dropped == 0 and audit.rejected == 0
    finally:
        audit.close(timeout=10)


# Strings that once stopped the audit writer for good (a lone surrogate breaks the UTF-8 encode on every
# driver, a NUL breaks PostgreSQL's text), with what the table must hold instead.
HOSTILE_AUDIT_STRINGS = {
    "\ud800": "\ufffd", "x\udfffy": "x\ufffdy", "a\x00b": "a\ufffdb", "\x00": "\ufffd",
    "\ud83d\ude00": "\U0001f600",  # a valid surrogate pair, as json.loads leaves it, is joined
    "\x1b[31m\u202e": "\x1b[31m\u202e",  # storable as it is: kept (terminals are the log reader's concern)
}


@pytest.fixture(params=["sqlite", "postgresql"])
def audit_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'audit.db'}"
        return
    name, create, url = request.getfixturevalue("pg_database")
    create()
    yield url


def test_hostile_strings_in_every_audit_field_never_stop_the_log(audit_url):
    from serving.audit import _STRING_LENGTHS

    audit = AuditLog(audit_url)
    try:
        expected = {}
        for field, limit in _STRING_LENGTHS.items():
            for i, (hostile, stored) in enumerate(HOSTILE_AUDIT_STRINGS.items()):
                request_id = f"{field}-{i}"
                audit.record(**_row(0) | {"request_id": request_id, field: hostile})
                expected[request_id] = (field, stored)
            audit.record(**_row(0) | {"request_id": f"{field}-long", field: "\ud800" * (limit + 50)})
        for i in range(10):  # rows after the hostile ones are written too, promptly
            audit.record(**_row(i, request_id=f"after-{i}"))
        assert audit.flush(timeout=15), "the audit writer is stuck on a hostile row"
        assert audit.rejected == 0 and audit.dropped == 0
        assert audit.count(request_id="after-9") == 1
        with audit.engine.connect() as conn:
            from sqlalchemy import select

            from serving.audit import audit_log

            rows = [r._asdict() for r in conn.execute(select(audit_log))]
        assert len(rows) == len(expected) + len(_STRING_LENGTHS) + 10
        by_marker = {}
        for row in rows:
            for field in _STRING_LENGTHS:
                value = row[field] or ""
                assert "\x00" not in value and len(value) <= _STRING_LENGTHS[field], (field, value)
            by_marker.setdefault(row["request_id"], row)
        for request_id, (field, stored) in expected.items():
            if field == "request_id":
                assert stored in by_marker, (request_id, stored)
            else:
                assert by_marker[request_id][field] == stored, (request_id, field)
        long_rows = [r for r in rows if r["voice_id"] and len(r["voice_id"]) == 64]
        assert long_rows and set(long_rows[0]["voice_id"]) == {"\ufffd"}
    finally:
        assert audit.close(timeout=10)


def test_rows_the_database_refuses_are_set_aside_and_the_rest_written(audit_url):
    audit = AuditLog(audit_url)
    try:
        for i in range(150):
            # An integer no column holds: a data error that no sanitising of strings prevents.
            audit.record(**_row(i, characters=2**70 if i in (7, 120) else 40))
        assert audit.flush(timeout=15)
        assert audit.count() == 148 and audit.rejected == 2 and audit.dropped == 0
        assert audit.count(request_id="r7") == 0 and audit.count(request_id="r8") == 1
        metrics = ServerMetrics(audit=audit)
        assert b"voiceops_audit_rejected_total 2.0" in metrics.render()[0]
    finally:
        assert audit.close(timeout=10)


def test_audit_retention_runs_by_itself(tmp_path):
    """Regression: serving.audit_retention_days was configured, but nothing ever purged."""
    from voice_lib.core.config import Settings

    settings = Settings(home=tmp_path, serving={"audit_retention_days": 30})
    audit = AuditLog.from_settings(settings)
    assert audit.retention_days == 30 and audit.purge_every_seconds == 6 * 3600.0
    audit.close()
    audit = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}", retention_days=30, purge_every_seconds=0.2)
    try:
        now = datetime.now(timezone.utc)
        for i in range(10):
            audit.record(**_row(i, ts=now - timedelta(days=45)))
        for i in range(5):
            audit.record(**_row(100 + i, ts=now - timedelta(days=2)))
        assert audit.flush(timeout=10)
        deadline = time.monotonic() + 10
        while audit.count() != 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert audit.count() == 5 and audit.purged == 10
    finally:
        audit.close()


# --- metrics -----------------------------------------------------------------------------------------

def test_metrics_render_every_name():
    from prometheus_client.parser import text_string_to_metric_families

    class FakeAudit:
        dropped = 7
        rejected = 3

    metrics = ServerMetrics(audit=FakeAudit())
    second = ServerMetrics()  # a second app in the same process must not collide
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    for name in METRIC_NAMES:
        assert f"# TYPE {name} " in body.decode(), name

    metrics.observe_request("alice", "3", "canary", 200, 0.12, rtf=0.05, first_chunk_seconds=0.03, compute_ms=40.0)
    metrics.observe_bad_audio("alice", "3", "canary", "silent")
    metrics.batch_size.observe(4)
    metrics.frontend_cache_hit_ratio.set(0.5)
    metrics.adapters_loaded.set(2)
    metrics.set_release("alice", 10, breaker_open=True)
    metrics.rollbacks.labels("alice", "error_rate").inc()
    samples = {s.name: s for fam in text_string_to_metric_families(metrics.render()[0].decode()) for s in fam.samples}
    for name in METRIC_NAMES:
        assert (f"{name}_count" if name in HISTOGRAMS else name) in samples, name
    assert set(samples) & METRIC_SERIES >= {f"{h}_bucket" for h in HISTOGRAMS}
    assert samples["voiceops_audit_dropped_total"].value == 7
    assert samples["voiceops_audit_rejected_total"].value == 3
    assert samples["voiceops_resident_memory_bytes"].value > 10 * 2**20
    assert samples["voiceops_requests_total"].labels == {"voice": "alice", "version": "3", "variant": "canary",
                                                         "status": "200"}
    assert samples["voiceops_breaker_open"].value == 1
    assert b"alice" not in second.render()[0]


# --- CLI ---------------------------------------------------------------------------------------------

def _voiceops(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEOPS_")}
    env["VOICEOPS_HOME"] = str(tmp_path / "home")
    return subprocess.run([sys.executable, "-m", "voiceops.cli", "keys", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)


def test_keys_cli_round_trip(tmp_path):
    created = _voiceops(tmp_path, "create", "--tenant", "acme", "--voices", "alice,bob", "--can-force-variant",
                        "--rate", "120")
    assert created.returncode == 0, created.stderr
    api_key = created.stdout.strip()
    assert api_key.startswith("vo_") and "\n" not in api_key  # the key alone on stdout

    listed = _voiceops(tmp_path, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)
    assert entry["tenant"] == "acme" and entry["voices"] == ["alice", "bob"] and entry["rate_per_minute"] == 120
    assert entry["can_force_variant"] and not entry["admin"] and api_key not in listed.stdout

    path = tmp_path / "home" / "tenants.json"
    assert api_key not in path.read_text() and stat.S_IMODE(path.stat().st_mode) == 0o600
    tenant = TenantDirectory(path).authenticate(api_key)
    assert tenant is not None and tenant.key_id == entry["key_id"]

    assert _voiceops(tmp_path, "create", "--tenant", "acme", "--voices", "Bad Voice").returncode == 2
    assert _voiceops(tmp_path, "revoke", entry["key_id"]).returncode == 0
    assert _voiceops(tmp_path, "revoke", entry["key_id"]).returncode == 1
    assert TenantDirectory(path).authenticate(api_key) is None
    assert json.loads(_voiceops(tmp_path, "list", "--json").stdout) == []


_FRAGMENTED_HEAP = r"""
import ctypes, sys
from serving.memory import _libc, limit_arenas, trim_heap

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

libc = _libc()
if libc is None:
    print("not glibc"); sys.exit(3)
assert limit_arenas(2) and not limit_arenas(0)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
# 200 MB of 4 KiB blocks, then all but every 64th freed: the pages are free but not at the heap's top, so
# glibc keeps them (what a server's mixed-size tensors do over hours).
blocks = [libc.malloc(4096) for _ in range(50_000)]
for b in blocks:
    ctypes.memset(b, 1, 4096)
for i, b in enumerate(blocks):
    if i % 64:
        libc.free(b)
held = rss_mb()
trim_heap()
print(held, rss_mb())
"""


def test_trim_heap_returns_freed_pages_to_the_os():
    run = subprocess.run([sys.executable, "-c", _FRAGMENTED_HEAP], capture_output=True, text=True, timeout=60)
    if run.returncode == 3:
        pytest.skip("the C library is not glibc: serving/memory.py is a no-op there")
    assert run.returncode == 0, run.stderr
    held, trimmed = map(float, run.stdout.split())
    assert held - trimmed > 150, f"RSS {held:.0f} MB -> {trimmed:.0f} MB after malloc_trim"


_DEAD_REGISTRY = r"""
import sys, time
from mlflow import MlflowClient
from serving.registry_reader import bound_registry_requests
from voice_lib.core.config import ServingSettings

serving = ServingSettings()
bound_registry_requests(serving.registry_request_retries, serving.registry_request_timeout_seconds)
started = time.monotonic()
try:
    MlflowClient(tracking_uri=f"http://127.0.0.1:{sys.argv[1]}").search_registered_models()
except Exception as exc:  # MlflowException after its retries
    print(round(time.monotonic() - started, 2), type(exc).__name__)
"""


def test_a_registry_that_went_away_fails_a_server_request_in_seconds():
    """Not MLflow's default of 7 retries with exponential backoff (over two minutes): a reload must fail fast
    so readiness reports the outage (the MLflow-outage fault scenario found the reload hanging)."""
    from conftest import free_port

    run = subprocess.run([sys.executable, "-c", _DEAD_REGISTRY, str(free_port())], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.strip(), run.stderr[-2000:]
    seconds = float(run.stdout.split()[0])
    assert seconds < 15, f"a request to a dead MLflow took {seconds} s"


def _upgrade_round_trip(url: str) -> None:
    """An audit table written by a server from before the rtf and compute_ms columns gets them on start, old
    rows kept, and canary_promotion's audit source reads the median RTF and the p95 compute time from it; before
    the upgrade it says the compute time is missing rather than judging wall time."""
    from sqlalchemy import MetaData, Table, insert, inspect

    from serving.audit import audit_log
    from voice_lib.core.db import make_engine

    engine = make_engine(url)
    old = Table("audit_log", MetaData(), *[c._copy() for c in audit_log.columns if c.name not in ("rtf", "compute_ms")])
    old.create(engine)
    with engine.begin() as conn:
        conn.execute(insert(old), [_row(0, variant="canary", latency_ms=100.0, ts=datetime.now(timezone.utc))])
    since, until = time.time() - 60, time.time() + 60
    before = AuditSource(url).window("alice", "canary", since, until)
    assert before.rtf is None and before.p95_latency_ms is None  # not upgraded yet: no RTF, no compute time
    assert "no compute_ms column" in before.p95_missing
    audit = AuditLog(url)
    for i, rtf in enumerate([0.02, 0.03, 0.04, 0.9, None]):  # one outlier; a failed request has no audio
        audit.record(**_row(i, variant="canary", latency_ms=50.0, rtf=rtf, compute_ms=10.0 * (i + 1) if rtf else None,
                            status=200 if rtf is not None else 500))
    audit.record(**_row(9, variant="canary", status=404))  # a row recorded without an rtf
    assert audit.close(timeout=10)
    stats = AuditSource(url).window("alice", "canary", since, until)
    assert stats.requests == 7 and stats.errors == 1  # the old row is still there
    assert stats.rtf == pytest.approx(0.03)  # nearest-rank median of 0.02, 0.03, 0.04, 0.9: not moved by the outlier
    assert stats.p95_latency_ms == 40.0  # the old row (no compute time) is left out, not taken as zero
    assert AuditLog(url).close()  # a second start finds nothing to add
    assert {"rtf", "compute_ms"} <= {c["name"] for c in inspect(engine).get_columns("audit_log")}
    engine.dispose()


def test_audit_table_of_an_older_server_is_upgraded_in_place_sqlite(tmp_path):
    _upgrade_round_trip(f"sqlite:///{tmp_path / 'audit.db'}")


def test_audit_table_of_an_older_server_is_upgraded_in_place_postgresql(pg_database):
    name, create, url = pg_database
    create()
    _upgrade_round_trip(url)
