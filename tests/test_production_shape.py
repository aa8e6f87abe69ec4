"""The production shape, natively: MLflow on PostgreSQL + S3, Airflow on PostgreSQL with a CeleryExecutor
on Redis and a real Celery worker, every component its own process, onboarding the fixture voice end to end.

Each run gets its own PostgreSQL databases, its own Redis database number and its own Celery queue, and
gives them all back (databases dropped, Redis DB flushed, process groups killed) even when it fails.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port, platform_settings, skip_unless_required
from rich.console import Console

from voice_lib.core.config import Settings

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
PG_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
REDIS_START = f"redis-server --daemonize yes --bind {REDIS_HOST} --port {REDIS_PORT}"
CLAIM_KEY = "voiceops-test:claimed-by"
BUDGET_SECONDS = 330  # the whole test, so the run has what start-up left of it
STOP_GRACE_SECONDS = 20.0


def _pg_admin():
    try:
        import psycopg
    except ImportError:
        skip_unless_required("psycopg is not installed: pip install -e '.[dev]'")
    try:
        return psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True,
                               connect_timeout=3)
    except psycopg.OperationalError as exc:
        skip_unless_required(f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT} ({exc}); start it with: {PG_START}")


def _claim_redis_db(token: str):
    """A Redis client on an empty database number nobody else claimed (0 is left to people)."""
    try:
        import redis
    except ImportError:
        skip_unless_required("the redis client is not installed: pip install -e '.[dev]'")
    try:
        redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        skip_unless_required(f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT} ({exc}); start it with: {REDIS_START}")
    numbers = list(range(1, 16))
    random.shuffle(numbers)
    for number in numbers:
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=number, socket_connect_timeout=3)
        if client.set(CLAIM_KEY, token, nx=True, ex=3600):
            if client.dbsize() == 1:  # only our claim: the DB was empty, and now it is ours
                return client, number
            client.delete(CLAIM_KEY)  # someone's data without a claim: not ours to use, or to flush
    pytest.skip("No free Redis database number (1-15) to run the Celery broker on")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class Components:
    """Airflow components as separate processes, each the leader of its own process group."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def start(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.log(name).open("wb") as fh:
            self.procs[name] = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=fh,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self, name: str, lines: int = 40) -> str:
        try:
            return "\n".join(self.log(name).read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def tails(self, lines: int = 25) -> str:
        return "\n".join(f"----- {name} -----\n{self.tail(name, lines)}" for name in self.procs)

    def check_running(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.tail(name, 60)}")

    def stop_all(self) -> None:
        """SIGTERM every group at once, SIGKILL what is left after the grace period; reap the leaders."""
        for sig, grace in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, 5.0)):
            for proc in self.procs.values():
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                for proc in self.procs.values():
                    proc.poll()  # reap the leader, or its zombie keeps the group "alive"
                if not any(_group_alive(proc.pid) for proc in self.procs.values()):
                    break
                time.sleep(0.2)
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


def _wait(what: str, check, deadline: float, components: Components, interval: float = 1.0):
    last = None
    while time.monotonic() < deadline:
        components.check_running()
        try:
            last = check()
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            last = exc
        else:
            if last is True or (last and not isinstance(last, (str, Exception))):
                return last
        time.sleep(interval)
    raise AssertionError(f"{what} not reached in time (last: {last!r})\n{components.tails()}")


def _task_log_tails(airflow_home: Path, lines: int = 30) -> str:
    out = []
    for path in sorted((airflow_home / "logs").rglob("attempt=*.log")):
        text = path.read_text(errors="replace")
        if "error" in text.lower():
            out.append(f"----- {path.relative_to(airflow_home)} -----\n" + "\n".join(text.splitlines()[-lines:]))
    return "\n".join(out[-6:])


@dataclass
class Shape:
    """A running production shape: what the tests need of it."""

    settings: Settings
    components: Components
    env: dict[str, str]  # the Airflow components' environment (a replacement worker starts with it)
    headers: dict[str, str]  # Airflow API auth
    queue: str
    airflow_db: str
    mlflow_db: str
    redis_client: Any
    redis_db: int
    started: float
    migrated: float
    ready: float
    deadline: float

    @property
    def airflow_home(self) -> Path:
        return self.settings.home / "airflow"

    def worker_command(self) -> list[str]:
        from voiceops import stack

        return [stack._executable("airflow"), "celery", "worker", "--queues", self.queue, "--celery-hostname",
                f"{self.queue}-{len(self.components.procs)}@%h", "--concurrency", str(self.settings.airflow_parallelism),
                "--skip-serve-logs", "--without-mingle", "--without-gossip"]


@contextmanager
def production_shape(tmp_path: Path, s3_endpoint: str, s3_bucket: str, budget: float,
                     airflow_overrides: dict[str, str] | None = None) -> Iterator[Shape]:
    """MLflow on PostgreSQL + S3 and Airflow on PostgreSQL + Celery/Redis, up and with voice_onboarding unpaused;
    everything given back on exit (process groups, databases, the Redis DB)."""
    pytest.importorskip("airflow.providers.celery", reason="install the airflow extra: pip install -e '.[airflow]'")
    import psycopg

    from voiceops import stack

    started = time.monotonic()
    deadline = started + budget
    token = uuid.uuid4().hex[:10]
    admin = _pg_admin()
    try:
        redis_client, redis_db = _claim_redis_db(token)
    except BaseException:  # skipped: nothing of ours exists yet but this connection
        admin.close()
        raise
    airflow_db, mlflow_db = f"voiceops_airflow_{token}", f"voiceops_mlflow_{token}"
    queue = f"voiceops-{token}"
    pg_url = f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}"

    settings = platform_settings(Settings(  # the gates and choices of tests/test_dag.py: a 30-step tune must pass
        home=tmp_path / "home",
        storage_uri=f"s3://{s3_bucket}/store", s3_endpoint_url=s3_endpoint,
        s3_access_key_id="test", s3_secret_access_key="test",
        mlflow_port=free_port(), mlflow_backend_store_uri=f"{pg_url}/{mlflow_db}",
        mlflow_artifacts_destination=f"s3://{s3_bucket}/mlflow",
        airflow_port=free_port(), airflow_parallelism=2,
    ))
    components = Components(settings.log_dir)
    try:
        for db in (airflow_db, mlflow_db):
            admin.execute(f'CREATE DATABASE "{db}"')
        # MLflow the way `voiceops up` starts it, here on PostgreSQL + S3; it boots while Airflow migrates.
        stack.up(settings, services=("mlflow",), wait=False)

        stack._prepare_airflow(settings)  # admin password + shared JWT secret, as `voiceops up` writes them
        env = stack.airflow_celery_env(settings, database_url=f"{pg_url}/{airflow_db}",
                                       broker_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}", queue=queue)
        env.update(airflow_overrides or {})
        airflow = stack._executable("airflow")
        migrate = subprocess.run([airflow, "db", "migrate"], check=False, env=env, cwd=settings.home,
                                 capture_output=True, text=True, timeout=300)
        assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]
        migrated = time.monotonic()

        for name in ("api-server", "scheduler", "dag-processor"):
            components.start(name, [airflow, name], env, settings.home)
        shape = Shape(settings, components, env, {}, queue, airflow_db, mlflow_db, redis_client, redis_db,
                      started, migrated, 0.0, deadline)
        components.start("celery-worker", shape.worker_command(), env, settings.home)

        stack.up(settings, services=("mlflow",), timeout=max(30.0, deadline - time.monotonic()))
        api = settings.airflow_url
        def airflow_healthy():
            healthy, detail = stack._probe("airflow", api)
            return healthy or detail

        _wait("Airflow healthy (metadatabase, scheduler, dag_processor)", airflow_healthy, deadline, components)
        shape.headers = {"Authorization": f"Bearer {stack.airflow_api_token(settings)}"}
        _wait("voice_onboarding parsed and unpaused",
              lambda: httpx.get(f"{api}/api/v2/dags/voice_onboarding", headers=shape.headers, timeout=5)
              .json().get("is_paused") is False, deadline, components)
        shape.ready = time.monotonic()
        yield shape
    finally:
        components.stop_all()
        stack.down(settings)
        for db in (airflow_db, mlflow_db):
            try:
                admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            except psycopg.Error as exc:  # keep cleaning up; report it below
                print(f"could not drop {db}: {exc}")
        admin.close()
        if redis_client.get(CLAIM_KEY) == token.encode():
            redis_client.flushdb()  # only our database number
        redis_client.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_onboarding_on_the_production_shape(tmp_path, s3_endpoint, s3_bucket, clean_voice):
    import boto3
    import psycopg
    from mlflow import MlflowClient

    from voice_lib.core.storage import artifact_store
    from voiceops.airflow_client import trigger_and_follow

    voice_id = "prod-slt"
    with production_shape(tmp_path, s3_endpoint, s3_bucket, BUDGET_SECONDS) as shape:
        settings, components, headers, queue = shape.settings, shape.components, shape.headers, shape.queue
        airflow_home, api, deadline = shape.airflow_home, settings.airflow_url, shape.deadline
        started, migrated, ready = shape.started, shape.migrated, shape.ready
        airflow_db, mlflow_db, redis_client, redis_db = shape.airflow_db, shape.mlflow_db, shape.redis_client, shape.redis_db
        console = Console(stderr=True)

        conf = {"voice_id": voice_id, "data_uri": str(clean_voice), "language": "en", "min_speech_seconds": 60,
                "shards": 2, "lora_rank": 4, "train_steps": 30}
        state = trigger_and_follow(settings, "voice_onboarding", conf, console,
                                   timeout=max(60.0, deadline - time.monotonic()))
        finished = time.monotonic()
        assert state == "success", (f"run ended {state}\n{_task_log_tails(airflow_home)}\n{components.tails()}")
        components.check_running()

        # --- Airflow: metadata in PostgreSQL, every task on our queue, run by the Celery worker ---------
        assert not (airflow_home / "airflow.db").exists()
        runs = httpx.get(f"{api}/api/v2/dags/voice_onboarding/dagRuns", headers=headers, timeout=10).json()
        run_id = runs["dag_runs"][0]["dag_run_id"]
        tis = httpx.get(f"{api}/api/v2/dags/voice_onboarding/dagRuns/{run_id}/taskInstances", headers=headers,
                        timeout=10).json()["task_instances"]
        ran = [ti for ti in tis if ti["state"] == "success"]
        assert {"ingest", "qc_shard", "qc_report", "features_shard", "features_manifest", "train", "evaluate",
                "register"} <= {ti["task_id"] for ti in ran}
        assert all(ti["state"] in ("success", "skipped") for ti in tis), [(t["task_id"], t["state"]) for t in tis]
        assert {ti["queue"] for ti in ran} == {queue}
        with psycopg.connect(f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{airflow_db}") as conn:
            rows = conn.execute("SELECT task_id, state, queue FROM task_instance WHERE dag_id = 'voice_onboarding'"
                                ).fetchall()
            assert {r[2] for r in rows if r[1] == "success"} == {queue} and len(rows) == len(tis)
            # The worker wrote each task's Celery result to the result backend (this database).
            celery_done = conn.execute("SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'").fetchone()[0]
        assert celery_done >= len(ran), (celery_done, len(ran))
        worker_log = components.log("celery-worker").read_text(errors="replace")
        for task_id in {ti["task_id"] for ti in ran}:
            assert f"task_id='{task_id}'" in worker_log, f"{task_id} not in the worker log:\n{worker_log[-3000:]}"
        assert redis_client.exists(f"_kombu.binding.{queue}"), "the broker queue is not in our Redis DB"

        # --- MLflow: registry tables in PostgreSQL, the candidate alias, artifacts in the moto bucket -----
        with psycopg.connect(f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{mlflow_db}") as conn:
            versions = conn.execute("SELECT count(*) FROM model_versions WHERE name = %s",
                                    (f"voice-{voice_id}",)).fetchone()[0]
            alias = conn.execute("SELECT version FROM registered_model_aliases WHERE name = %s AND alias = %s",
                                 (f"voice-{voice_id}", "candidate")).fetchone()
        assert versions >= 1 and alias is not None
        client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
        candidate = client.get_model_version_by_alias(f"voice-{voice_id}", "candidate")
        assert str(candidate.version) == str(alias[0])
        s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="test",
                          aws_secret_access_key="test")
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix="mlflow/")
                for o in page.get("Contents", [])]
        assert keys, "no MLflow artifacts in the bucket"
        assert any(candidate.run_id in k for k in keys), (candidate.run_id, keys[:20])
        assert any(k.endswith("report.html") for k in keys), keys[:20]

        # --- VoiceOps storage on the same S3 server --------------------------------------------------------
        store = artifact_store(settings)
        assert store.uri.startswith("s3://")
        assert any(k.endswith("/manifest.json") for k in store.list(f"voices/{voice_id}"))

        print(f"production shape: migrate {migrated - started:.0f} s, components ready {ready - migrated:.0f} s, "
              f"onboarding run {finished - ready:.0f} s, total {time.monotonic() - started:.0f} s "
              f"({len(ran)} task instances on Celery queue {queue}, Redis DB {redis_db})")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_celery_worker_killed_mid_training_is_retried_and_resumes_from_the_checkpoint(
        tmp_path, s3_endpoint, s3_bucket, clean_voice, request):
    """The Airflow worker (its whole process group) SIGKILLed while `train` runs; a replacement worker with an
    empty local cache joins; the scheduler finds the task without heartbeats, retries it, and the retry
    resumes from the step checkpoint in the artifact store. About 4 minutes: `make bench` (faults) runs it."""
    if not request.config.getoption("--full-faults"):
        pytest.skip("a 4-minute scenario with a real Airflow: benchmarks/faults.py runs it (--full-faults)")
    import contextlib
    import threading

    import psutil
    from conftest import report_fault

    from voice_lib.core.storage import artifact_store
    from voice_lib.release.registry import Registry
    from voiceops.airflow_client import trigger_and_follow

    voice_id, steps = "killed-worker", 150  # checkpoints at steps 50 and 100
    # A task whose worker died stops heartbeating: found after 20 s here (the default is 300 s).
    overrides = {"AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
                 "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5"}
    with production_shape(tmp_path, s3_endpoint, s3_bucket, 800, overrides) as shape:
        settings, components, api = shape.settings, shape.components, shape.settings.airflow_url
        store = artifact_store(settings)
        conf = {"voice_id": voice_id, "data_uri": str(clean_voice), "language": "en", "min_speech_seconds": 60,
                "shards": 2, "lora_rank": 4, "train_steps": steps}
        outcome: dict[str, str] = {}
        follower = threading.Thread(target=lambda: outcome.update(state=trigger_and_follow(
            settings, "voice_onboarding", conf, Console(stderr=True), timeout=shape.deadline - time.monotonic())))
        follower.start()

        def checkpoint_in_store():
            return [k for k in store.list(f"voices/{voice_id}/checkpoints") if k.endswith(".pt")]

        _wait("the first training checkpoint in the artifact store", checkpoint_in_store, shape.deadline,
              components, interval=0.5)
        worker = components.procs.pop("celery-worker")
        # The machine dies: the worker and everything under it. (Airflow's task supervisor starts the task
        # process in a session of its own, so killing the worker's process group alone leaves it running.)
        leader = psutil.Process(worker.pid)
        tree = [leader, *leader.children(recursive=True)]
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        worker.wait(10)
        _, alive = psutil.wait_procs(tree, timeout=20)
        assert not alive, alive
        killed_at = time.monotonic()
        replacement = {**shape.env, "VOICEOPS_HOME": str(tmp_path / "worker-2")}  # another machine: no local cache
        components.start("celery-worker-2", shape.worker_command(), replacement, settings.home)

        follower.join(max(1.0, shape.deadline - time.monotonic()))
        assert outcome.get("state") == "success", (f"run ended {outcome}\n{_task_log_tails(shape.airflow_home)}\n"
                                                   f"{components.tails()}")
        finished = time.monotonic()
        runs = httpx.get(f"{api}/api/v2/dags/voice_onboarding/dagRuns", headers=shape.headers, timeout=10).json()
        run_id = runs["dag_runs"][0]["dag_run_id"]
        base = f"{api}/api/v2/dags/voice_onboarding/dagRuns/{run_id}/taskInstances/train"
        train = httpx.get(base, headers=shape.headers, timeout=10).json()
        assert train["state"] == "success" and train["try_number"] == 2, train
        result = httpx.get(f"{base}/xcomEntries/return_value", headers=shape.headers, timeout=10).json()["value"]
        result = json.loads(result) if isinstance(result, str) else result
        assert result["resumed_from_step"] in (50, 100) and result["steps_trained"] == steps, result
        retry_log = next(shape.airflow_home.glob(f"logs/dag_id=voice_onboarding/run_id={run_id}/task_id=train/"
                                                 "attempt=2.log")).read_text(errors="replace")
        assert "fetched checkpoint" in retry_log and "resumed from" in retry_log, retry_log[-3000:]
        assert "celery-worker-2" in components.procs and "task_id='train'" in components.log("celery-worker-2").read_text(
            errors="replace")
        versions = Registry(settings)._versions(f"voice-{voice_id}")
        assert len(versions) == 1, [v.version for v in versions]  # one version, however many tries
        report_fault(request, "airflow worker killed mid-training", True, resumed_from_step=result["resumed_from_step"],
                     steps_trained=result["steps_trained"], train_tries=train["try_number"],
                     seconds_from_kill_to_run_success=round(finished - killed_at, 1), versions_registered=len(versions))
