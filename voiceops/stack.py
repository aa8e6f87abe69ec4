"""Start, stop and report the embedded MLflow + Airflow stack as plain local processes (no Docker).

Each service runs detached (its own session, so it survives the CLI and can be stopped as one process
group) with output in ``<home>/logs/<name>.log`` and its pid in ``<home>/run/<name>.pid``.
Configuration comes only from ``Settings``; child environments are built from it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, SecretStr
from rich.console import Console

from voice_lib.core import airflow as core_airflow
from voice_lib.core.config import Settings
from voice_lib.core.tracking import mlflow_is_healthy

SERVICES = ("mlflow", "airflow", "server")
# What each service's command line contains, to tell our process from a recycled pid.
_PROCESS_MARKER = {"mlflow": "mlflow", "airflow": "airflow", "server": "voiceops serve"}
STOP_GRACE_SECONDS = 20.0
console = Console(stderr=True)


class StackError(RuntimeError):
    """A stack service could not be started, reached or stopped."""


@dataclass
class ServiceStatus:
    name: str
    url: str
    pid: int | None
    running: bool
    healthy: bool
    detail: str


def _pid_file(settings: Settings, name: str) -> Path:
    return settings.home / "run" / f"{name}.pid"


def _log_file(settings: Settings, name: str) -> Path:
    return settings.log_dir / f"{name}.log"


def _airflow_home(settings: Settings) -> Path:
    return settings.home / "airflow"


def _read_pid(settings: Settings, name: str) -> int | None:
    try:
        return int(_pid_file(settings, name).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int, name: str) -> bool:
    """True if pid is a live (non-zombie) process that is really our service, not a recycled pid."""
    try:
        # Reap it if it is our own exited child, otherwise it lingers as a zombie that "exists".
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # PermissionError: a recycled pid of another user
        return False
    proc = Path(f"/proc/{pid}")
    if not proc.exists():  # not Linux: the kill(0) check is all we have
        return True
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError):
        return False
    return state != "Z" and _PROCESS_MARKER.get(name, name) in cmdline


def _group_alive(pgid: int) -> bool:
    try:
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR matches what uvicorn does, so TIME_WAIT leftovers of a stopped server don't count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _log_tail(settings: Settings, name: str, lines: int = 20) -> str:
    try:
        with _log_file(settings, name).open(errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines))
    except FileNotFoundError:
        return "(no log file)"


def _venv_bin() -> Path:
    # Not resolved: in a venv, sys.executable is a symlink inside <venv>/bin, which is what we want.
    return Path(sys.executable).parent


def _executable(name: str) -> str:
    candidate = _venv_bin() / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise StackError(f"'{name}' is not installed in {_venv_bin()}; install voiceops with its extras.")
    return found


def settings_env(settings: Settings) -> dict[str, str]:
    """VOICEOPS_* variables reproducing ``settings`` in a child process (nested groups as JSON)."""
    env: dict[str, str] = {}
    for field in type(settings).model_fields:
        value = getattr(settings, field)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, BaseModel):
            value = value.model_dump_json()
        elif isinstance(value, bool):
            value = str(value).lower()
        env[f"VOICEOPS_{field.upper()}"] = str(value)
    return env


def _base_env(settings: Settings) -> dict[str, str]:
    # Inherit the basics (HOME, LANG, proxies...) but drop ambient VOICEOPS_/AIRFLOW settings: the
    # stack must run with exactly what Settings says, not whatever the calling shell exported.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VOICEOPS_", "AIRFLOW__")) and k not in ("AIRFLOW_HOME", "AIRFLOW_CONFIG")
    }
    env.update(settings_env(settings))
    # Airflow standalone launches `airflow scheduler` etc. by name, and tasks shell out to tools.
    env["PATH"] = os.pathsep.join([str(_venv_bin()), env.get("PATH", os.defpath)])
    env["PYTHONUNBUFFERED"] = "1"  # log lines reach <name>.log as they happen
    if settings.s3_endpoint_url:
        env["MLFLOW_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    if settings.s3_access_key_id and settings.s3_secret_access_key:
        env["AWS_ACCESS_KEY_ID"] = settings.s3_access_key_id.get_secret_value()
        env["AWS_SECRET_ACCESS_KEY"] = settings.s3_secret_access_key.get_secret_value()
        env["AWS_DEFAULT_REGION"] = settings.s3_region
    return env


def mlflow_env(settings: Settings) -> dict[str, str]:
    env = _base_env(settings)
    # The server-side job runner (a huey consumer for GenAI jobs) is an extra process we never use.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env


def airflow_env(settings: Settings) -> dict[str, str]:
    """Environment for every `airflow` command of the local stack (standalone, `dags test`, tests)."""
    home = _airflow_home(settings)
    api = service_url(settings, "airflow")
    log_port = settings.airflow_port + 713 if settings.airflow_port < 64000 else settings.airflow_port - 2000
    env = _base_env(settings)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(settings.dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(settings.plugins_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": "voiceops.airflow_sqlite.SYNC_CONNECT_ARGS",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC": "voiceops.airflow_sqlite.ASYNC_CONNECT_ARGS",
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{settings.airflow_username}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(_passwords_file(settings)),
            "AIRFLOW__API__HOST": settings.airflow_host,
            "AIRFLOW__API__PORT": str(settings.airflow_port),
            "AIRFLOW__API__BASE_URL": api,
            # Task processes report back over the Execution API; its default assumes localhost:8080.
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
            # Onboarding dags are triggered through the API; a paused dag would queue runs forever.
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            # The default 5 min rescan makes a freshly added dag invisible for too long in development.
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            # LocalExecutor pre-forks one ~130 MB worker per slot; the default 32 is wasted memory here.
            "AIRFLOW__CORE__PARALLELISM": str(settings.airflow_parallelism),
            # Log servers default to fixed ports 8793/8794; moving them with the API port (same values
            # for 8080) lets a second stack (tests, another home) run beside the first one.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(log_port),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(log_port + 1),
        }
    )
    secret = home / "jwt-secret.txt"
    if secret.exists():
        # One persisted key for every component and every `airflow` command: tokens stay valid across
        # restarts, and Airflow's own generated key (16 bytes) is below the HS512 recommendation.
        env["AIRFLOW__API_AUTH__JWT_SECRET"] = secret.read_text().strip()
    return env


def postgres_sqlalchemy_urls(url: str) -> tuple[str, str]:
    """(sync, async) SQLAlchemy URLs on psycopg 3 for a postgresql:// URL (any driver suffix is replaced).

    Airflow 3.3 derives its async engine URL as postgresql+asyncpg://, a driver we don't install;
    psycopg 3 (already our Postgres driver) does both sync and async.
    """
    scheme, rest = url.split("://", 1)
    if scheme.split("+", 1)[0] not in ("postgresql", "postgres"):
        raise StackError(f"Not a PostgreSQL URL: {url!r}")
    return f"postgresql+psycopg://{rest}", f"postgresql+psycopg_async://{rest}"


def airflow_celery_env(
    settings: Settings,
    *,
    database_url: str,
    broker_url: str,
    queue: str = "default",
    result_backend: str | None = None,
) -> dict[str, str]:
    """``airflow_env`` for the production shape: PostgreSQL metadata and CeleryExecutor on a broker.

    For running the components separately (`airflow api-server`, `scheduler`, `dag-processor`,
    `celery worker --queues <queue>`), not `standalone`. Tasks go to ``queue`` unless they name another;
    Celery results default to the metadata database (``db+postgresql+psycopg://...``).
    """
    sync_url, async_url = postgres_sqlalchemy_urls(database_url)
    env = airflow_env(settings)
    for sqlite_only in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC"):
        env.pop(sqlite_only)  # psycopg takes no `timeout`
    env.update(
        {
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sync_url,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": async_url,
            "AIRFLOW__CELERY__BROKER_URL": broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": result_backend or f"db+{sync_url}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(settings.airflow_parallelism),
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": queue,
            "AIRFLOW__API__WORKERS": "1",
        }
    )
    return env


def _passwords_file(settings: Settings) -> Path:
    return _airflow_home(settings) / "simple_auth_manager_passwords.json.generated"


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)  # O_CREAT's mode is ignored when the file already existed


def airflow_password(settings: Settings, create: bool = False) -> str:
    """settings.airflow_password, else the generated one kept in <home>/airflow/admin-password.txt."""
    try:
        return core_airflow.airflow_password(settings)
    except core_airflow.AirflowError as exc:
        if not create:
            raise StackError(str(exc)) from None
    password = secrets.token_urlsafe(18)
    _write_private(core_airflow.password_file(settings), password + "\n")
    return password


@dataclass
class AirflowLogin:
    """How a person logs in to the local Airflow UI: the user, and where the password is."""

    url: str
    username: str
    password: str | None  # None: not generated yet (``up`` writes it)
    source: str  # the setting or file the password comes from


def airflow_login(settings: Settings) -> AirflowLogin:
    url = service_url(settings, "airflow")
    if settings.airflow_password is not None:
        return AirflowLogin(url, settings.airflow_username, settings.airflow_password.get_secret_value(),
                            "VOICEOPS_AIRFLOW_PASSWORD")
    path = core_airflow.password_file(settings)
    password = path.read_text().strip() if path.exists() else None
    return AirflowLogin(url, settings.airflow_username, password, str(path))


def _prepare_airflow(settings: Settings) -> None:
    # The Simple auth manager only generates random passwords for users missing from its passwords
    # file, so pre-writing {user: password} gives us a fixed, known admin login.
    password = airflow_password(settings, create=True)
    if not (_airflow_home(settings) / "jwt-secret.txt").exists():
        _write_private(_airflow_home(settings) / "jwt-secret.txt", secrets.token_urlsafe(64) + "\n")
    _write_private(_passwords_file(settings), json.dumps({settings.airflow_username: password}) + "\n")
    for folder in (settings.dags_folder, settings.plugins_folder):
        folder.mkdir(parents=True, exist_ok=True)


def _sqlite_write_ahead_log(path: Path) -> None:
    """Put Airflow's SQLite database in WAL mode, which stays in the file (our own SQLite engines' pragmas,
    voice_lib.core.db): readers such as the API server's GETs then no longer wait behind the scheduler's
    writes. `airflow db migrate` creates its tables in the file made here."""
    from sqlalchemy.exc import OperationalError

    from voice_lib.core.db import make_engine

    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect():
            pass
    except OperationalError as exc:  # another process holds it: Airflow runs as before, only slower under load
        console.print(f"[yellow]airflow.db stays in its journal mode ({exc})[/]")
    finally:
        engine.dispose()


def service_url(settings: Settings, name: str) -> str:
    host, port = {
        "mlflow": (settings.mlflow_host, settings.mlflow_port),
        "airflow": (settings.airflow_host, settings.airflow_port),
        "server": (settings.serving.host, settings.serving.port),
    }[name]
    # A wildcard bind address is not something a client can connect to.
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"


def _mlflow_command(settings: Settings) -> list[str]:
    # MLflow >= 3.5 rejects unknown Host headers (DNS-rebinding guard); name every way we address it.
    hosts = {"localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*", "[::1]:*"}
    for url in (settings.mlflow_tracking_uri, service_url(settings, "mlflow")):
        netloc = urlsplit(url).netloc
        if netloc:
            hosts.update({netloc, f"{netloc.rsplit(':', 1)[0]}:*"})
    return [
        _executable("mlflow"), "server",
        "--backend-store-uri", settings.resolved_mlflow_backend_store_uri,
        "--artifacts-destination", settings.resolved_mlflow_artifacts_destination,
        "--serve-artifacts",
        "--host", settings.mlflow_host,
        "--port", str(settings.mlflow_port),
        "--workers", "1",  # each uvicorn worker costs ~250 MB and one is plenty for a dev stack
        "--allowed-hosts", ",".join(sorted(hosts)),
    ]  # fmt: skip


def _launch_spec(settings: Settings, name: str) -> tuple[list[str], dict[str, str], str, int]:
    if name == "mlflow":
        dest = settings.resolved_mlflow_artifacts_destination
        if "://" not in dest:
            Path(dest).mkdir(parents=True, exist_ok=True)
        return _mlflow_command(settings), mlflow_env(settings), settings.mlflow_host, settings.mlflow_port
    if name == "server":
        cmd = [_executable("voiceops"), "serve", "--port", str(settings.serving.port), "--host", settings.serving.host]
        return cmd, _base_env(settings), settings.serving.host, settings.serving.port
    _prepare_airflow(settings)
    _sqlite_write_ahead_log(_airflow_home(settings) / "airflow.db")  # standalone's metadata is SQLite (airflow_env)
    cmd = [_executable("airflow"), "standalone"]
    return cmd, airflow_env(settings), settings.airflow_host, settings.airflow_port


def _probe(name: str, url: str) -> tuple[bool, str]:
    """(healthy, detail) from the service's health endpoint."""
    if name == "mlflow":
        return (True, "ok") if mlflow_is_healthy(url, timeout=3.0) else (False, "/health gave no 200 answer within 3 s")
    path = "/livez" if name == "server" else "/api/v2/monitor/health"
    try:
        resp = httpx.get(url + path, timeout=3.0)
    except httpx.HTTPError as exc:
        return False, f"no answer ({type(exc).__name__})"
    if resp.status_code != 200:
        return False, f"{path} returned HTTP {resp.status_code}"
    if name == "server":
        return True, "ok"
    try:
        report = resp.json()
    except ValueError:
        return False, "health answer is not JSON"
    # The triggerer only matters for deferrable tasks, so it does not gate readiness.
    parts = {c: (report.get(c) or {}).get("status") for c in ("metadatabase", "scheduler", "dag_processor")}
    bad = {c: s for c, s in parts.items() if s != "healthy"}
    return not bad, "ok" if not bad else ", ".join(f"{c}={s}" for c, s in bad.items())


def _status_one(settings: Settings, name: str) -> ServiceStatus:
    url = service_url(settings, name)
    pid = _read_pid(settings, name)
    running = pid is not None and _alive(pid, name)
    healthy, detail = _probe(name, url)
    if healthy and not running:
        detail = "served by a process voiceops did not start"
    elif pid is not None and not running:
        detail = f"stale pid file (pid {pid} is gone)"
    return ServiceStatus(name, url, pid if running else None, running, healthy, detail)


def status(settings: Settings) -> list[ServiceStatus]:
    return [_status_one(settings, name) for name in SERVICES]


def _start(settings: Settings, name: str) -> int:
    cmd, env, host, port = _launch_spec(settings, name)
    if not _port_free(host, port):
        raise StackError(f"{name}: port {host}:{port} is taken by another program; pick another port "
                         f"(VOICEOPS_{name.upper()}_PORT) or stop that program.")  # fmt: skip
    log = _log_file(settings, name)
    log.parent.mkdir(parents=True, exist_ok=True)
    _pid_file(settings, name).parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        fh.write(f"\n===== voiceops: starting {name} at {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode())
        fh.flush()
        # A new session makes the service the leader of its own process group, so `down` can stop it
        # together with every worker it forked, and Ctrl-C in the calling shell does not reach it.
        proc = subprocess.Popen(
            cmd, env=env, cwd=settings.home, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    _pid_file(settings, name).write_text(f"{proc.pid}\n")
    return proc.pid


def _wait_healthy(settings: Settings, name: str, pid: int, started: float, deadline: float) -> ServiceStatus:
    url = service_url(settings, name)
    with console.status(f"[bold]{name}[/]: waiting for {url} ..."):
        while True:
            healthy, detail = _probe(name, url)
            if healthy:
                console.print(f"[green]✓[/] {name} healthy at {url} (pid {pid}, {time.monotonic() - started:.1f}s)")
                return ServiceStatus(name, url, pid, True, True, detail)
            if not _alive(pid, name):
                _pid_file(settings, name).unlink(missing_ok=True)
                raise StackError(f"{name} exited during startup. Last lines of {_log_file(settings, name)}:\n"
                                 f"{_log_tail(settings, name)}")  # fmt: skip
            if time.monotonic() > deadline:
                raise StackError(
                    f"{name} (pid {pid}) not healthy after {deadline - started:.0f}s ({detail}); it is left "
                    f"running, stop it with `down`. Last lines of {_log_file(settings, name)}:\n"
                    f"{_log_tail(settings, name)}"
                )
            time.sleep(1.0)


def up(settings: Settings, services: tuple[str, ...] = SERVICES, wait: bool = True, timeout: float = 120) -> dict:
    """Start the named services unless already healthy; returns {name: ServiceStatus}."""
    unknown = set(services) - set(SERVICES)
    if unknown:
        raise StackError(f"Unknown service(s) {sorted(unknown)}; choose from {list(SERVICES)}.")
    settings.home.mkdir(parents=True, exist_ok=True)
    result: dict[str, ServiceStatus] = {}
    pending: dict[str, int] = {}
    started = time.monotonic()
    # Launch everything first and wait afterwards, so the services boot in parallel.
    for name in services:
        current = _status_one(settings, name)
        if current.healthy:
            console.print(f"[green]✓[/] {name} already up at {current.url} ({current.detail})")
            result[name] = current
            continue
        if current.running:  # an earlier `up --no-wait` is still booting: don't start a second copy
            pending[name] = current.pid  # type: ignore[assignment]
            continue
        _pid_file(settings, name).unlink(missing_ok=True)  # stale
        pending[name] = _start(settings, name)
        console.print(f"[cyan]→[/] {name} started (pid {pending[name]}), log {_log_file(settings, name)}")
    for name, pid in pending.items():
        if wait:
            result[name] = _wait_healthy(settings, name, pid, started, started + timeout)
        else:
            result[name] = ServiceStatus(name, service_url(settings, name), pid, True, False, "starting")
    return result


def _stop_group(pgid: int) -> None:
    # Services are started with start_new_session, so the pid is also the group id: signalling the
    # group reaches every worker (uvicorn workers, scheduler, LocalExecutor slots) in one go.
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _group_alive(pgid):
            return


def down(settings: Settings) -> list[str]:
    """Stop every service voiceops started; returns the names that were running."""
    stopped = []
    for name in SERVICES:
        pid = _read_pid(settings, name)
        if pid is not None and _alive(pid, name):
            _stop_group(pid)
            stopped.append(name)
            console.print(f"[yellow]■[/] {name} stopped (pid {pid})")
        _pid_file(settings, name).unlink(missing_ok=True)
    return stopped


def airflow_api_token(settings: Settings, url: str | None = None) -> str:
    """A JWT for the Airflow REST API (send as `Authorization: Bearer <token>`)."""
    try:
        return core_airflow.api_token(settings, url)
    except core_airflow.AirflowError as exc:
        raise StackError(str(exc)) from None
