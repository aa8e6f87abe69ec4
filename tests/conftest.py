"""Shared fixtures: real servers on loopback (S3 via moto's server mode, MLflow) and generated voices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from voice_lib.core.config import Settings

VENV_BIN = Path(sys.executable).parent


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("voiceops fault scenarios")
    group.addoption("--mlflow-outage-seconds", type=float, default=20.0,
                    help="how long tests/test_faults.py keeps MLflow down (benchmarks/faults.py: 120)")
    group.addoption("--full-faults", action="store_true",
                    help="also run the fault scenarios that take minutes (benchmarks/faults.py sets it)")
    group.addoption("--fault-report", default=None, help="append the fault scenarios' figures to this JSON-lines file")


def report_fault(request: pytest.FixtureRequest, scenario: str, passed: bool, **figures) -> None:
    """A fault scenario's figures: printed, and appended to --fault-report (benchmarks/faults.py's table)."""
    line = json.dumps({"scenario": scenario, "passed": passed, **figures})
    print(line)
    path = request.config.getoption("--fault-report")
    if path:
        with open(path, "a") as fh:
            fh.write(line + "\n")


# Gates a 30-step fine-tune passes. Platform tests carry a voice through onboarding to a registered candidate; the
# default gates are tested in tests/test_gates.py and measured by benchmarks/voice_quality.py.
RELAXED_GATES = {"min_speaker_similarity": 0.0, "min_similarity_gain_over_base": -1.0, "max_wer_gap_over_real": 1.0,
                 "min_pesq": 1.0, "min_stoi": 0.0, "max_bad_output_rate": 1.0, "max_rtf": 5.0, "min_p808_mos": 1.0,
                 "max_p808_gap_below_real": 4.0, "max_p808_drop_below_production": 4.0}
# The two measured choices of a two-stage adaptation pinned (one reference voice, one rendering): they cost ~35 s
# of Whisper per onboarding and platform tests do not look at them. tests/test_voice_e2e.py onboards with the
# defaults, and tests/test_two_stage.py tests the choices.
PINNED_MODEL = {"source_voices": ["flite-awb"], "synthesis": "source_filter"}


def platform_settings(settings: Settings) -> Settings:
    """``settings`` with RELAXED_GATES and PINNED_MODEL."""
    return settings.model_copy(update={"eval": settings.eval.model_copy(update=RELAXED_GATES),
                                       "model": settings.model.model_copy(update=PINNED_MODEL)})


def services_required() -> bool:
    """True on a machine that must have PostgreSQL, Redis and Chromium: CI (``CI=true``, set by every CI
    service) or ``VOICEOPS_REQUIRE_SERVICES=1`` (set by .ci/run)."""
    return os.environ.get("VOICEOPS_REQUIRE_SERVICES") == "1" or os.environ.get("CI", "").lower() == "true"


def skip_unless_required(reason: str) -> None:
    """Skip a test whose service is missing, saying why; where the service is required, fail instead, so a
    broken CI machine cannot turn the database, broker or browser tests into silent skips."""
    if services_required():
        pytest.fail(f"{reason} (required here: CI=true or VOICEOPS_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def datasets_from_temp_folders_may_be_onboarded(tmp_path_factory):
    """Onboarding reads only under its ingest roots (voice_lib.data.staging.allowed_source); the suite's
    datasets are generated in pytest's temporary folders, so those are a root for every Settings() the tests
    build (and, through settings_env, for the Airflow and worker processes they start). Tests of the roots
    themselves set ``ingest.allowed_roots`` explicitly."""
    key = "VOICEOPS_INGEST__ALLOWED_ROOTS"
    previous = os.environ.get(key)
    os.environ[key] = json.dumps([str(tmp_path_factory.getbasetemp().resolve())])
    yield
    if previous is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = previous


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(what: str, check, timeout: float = 240.0, every: float = 2.0):
    """``check()``'s first truthy value, polled every ``every`` s; TimeoutError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> str:
    """A real S3-protocol HTTP server (moto in server mode) in its own process."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/moto-api/")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, uniquely named bucket on the S3 server."""
    import boto3

    name = f"voiceops-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket=name)
    return name


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Embedded default settings in a private home; MLflow points nowhere unless a test starts it."""
    return Settings(home=tmp_path / "home", mlflow_tracking_uri="http://127.0.0.1:9")


@pytest.fixture
def s3_settings(tmp_path, s3_endpoint, s3_bucket) -> Settings:
    return Settings(
        home=tmp_path / "home", storage_uri=f"s3://{s3_bucket}/store", intake_uri=f"s3://{s3_bucket}/incoming",
        s3_endpoint_url=s3_endpoint, s3_access_key_id="test", s3_secret_access_key="test",
        mlflow_tracking_uri="http://127.0.0.1:9",
    )


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real MLflow tracking server (SQLite registry, served artifacts) started like `voiceops up` does."""
    from voiceops import stack

    home = tmp_path_factory.mktemp("mlflow-home")
    port = free_port()
    cfg = Settings(home=home, mlflow_port=port, mlflow_tracking_uri=f"http://127.0.0.1:{port}")
    stack.up(cfg, services=("mlflow",), timeout=120)
    try:
        yield cfg.mlflow_tracking_uri
    finally:
        stack.down(cfg)


# --- generated voices (real speech from offline engines) -----------------------------------------

@pytest.fixture(scope="session")
def voices_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("voices")


@pytest.fixture(scope="session")
def clean_voice(voices_dir) -> Path:
    """~70 s of one speaker (flite slt) with a metadata.csv: the set that should pass QC."""
    from voice_lib.data.corpus import make_voice_dataset

    return make_voice_dataset(voices_dir / "clean-slt", "flite-slt", 70, seed=1, layout="metadata")


@pytest.fixture(scope="session")
def short_voice(voices_dir) -> Path:
    from voice_lib.data.corpus import make_voice_dataset

    return make_voice_dataset(voices_dir / "short-slt", "flite-slt", 20, seed=2, layout="txt")


@pytest.fixture(scope="session")
def mixed_voice(voices_dir) -> Path:
    """45 s of flite slt plus 35 s of flite awb in one folder: two speakers, one metadata.csv."""
    from voice_lib.data.corpus import make_voice_dataset

    root = voices_dir / "mixed"
    make_voice_dataset(root / "a", "flite-slt", 45, seed=3, layout="txt")
    make_voice_dataset(root / "b", "flite-awb", 35, seed=4, layout="txt")
    return root
