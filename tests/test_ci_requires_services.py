"""On CI a missing PostgreSQL, Redis or Chromium fails its tests; on a laptop they skip, saying why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PROBE = '''
from conftest import skip_unless_required

def test_needs_a_service():
    skip_unless_required("PostgreSQL is not reachable at 127.0.0.1:1 (probe)")
'''


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_probe.py").write_text(PROBE)
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "VOICEOPS_REQUIRE_SERVICES")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           str(tmp_path / "test_probe.py")], env={**base, "PYTHONPATH": f"{TESTS}{os.pathsep}{base.get('PYTHONPATH', '')}", **env},
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_a_missing_service_skips_on_a_laptop_and_fails_on_ci(tmp_path):
    laptop = _run(tmp_path)
    assert laptop.returncode == 0 and "1 skipped" in laptop.stdout and "127.0.0.1:1" in laptop.stdout, laptop.stdout
    for env in ({"VOICEOPS_REQUIRE_SERVICES": "1"}, {"CI": "true"}):
        ci = _run(tmp_path, **env)
        assert ci.returncode == 1 and "1 failed" in ci.stdout, (env, ci.stdout)
        assert "required here" in ci.stdout and "127.0.0.1:1" in ci.stdout, ci.stdout
