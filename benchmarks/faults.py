"""Fault scenarios at full length, with a pass/fail line each (the issue's 2-minute MLflow outage included).

Runs the scenario tests (tests/test_faults.py: misbehaving canaries, MLflow down, server killed mid-stream;
tests/test_faults_onboarding.py: S3 down during onboarding, the training process killed;
tests/test_production_shape.py: a Celery worker of a real Airflow killed mid-training) through pytest with
``--mlflow-outage-seconds 120 --full-faults`` and collects the figures each scenario reports. `make test`
runs the same scenarios with a 20 s outage and without the real-Airflow one (about 4 minutes).

    .venv/bin/python benchmarks/faults.py [--outage-seconds 120]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, load_note, machine_facts, table, verdict, write_results

TESTS = ["tests/test_faults.py", "tests/test_faults_onboarding.py",
         "tests/test_production_shape.py::test_a_celery_worker_killed_mid_training_is_retried_and_resumes_from_the_checkpoint"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage-seconds", type=float, default=120.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    facts = machine_facts()
    print(load_note(facts))
    with tempfile.TemporaryDirectory() as tmp:
        report, junit = Path(tmp) / "faults.jsonl", Path(tmp) / "junit.xml"
        started = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *TESTS,
                              "--mlflow-outage-seconds", str(args.outage_seconds), "--full-faults", "--fault-report", str(report),
                              f"--junitxml={junit}"], cwd=ROOT, capture_output=True, text=True)
        seconds = time.monotonic() - started
        scenarios = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
        outcomes = _junit_outcomes(junit)
    print(table(["scenario", "result", "figures"],
                [[s["scenario"], verdict(s["passed"]),
                  ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("scenario", "passed", "reason"))[:150]]
                 for s in scenarios]))
    print(table(["test", "outcome"], sorted(outcomes.items())))
    failed = [t for t, o in outcomes.items() if o != "passed"]
    for test in failed:
        print(f"FAIL  {test}")
    if run.returncode != 0:
        print(run.stdout[-4000:])
    path = write_results("faults", {"machine": facts, "outage_seconds": args.outage_seconds, "scenarios": scenarios,
                                    "tests": outcomes, "seconds": round(seconds, 1), "passed": run.returncode == 0},
                         False, args.out)
    print(f"{verdict(run.returncode == 0)}  all fault scenarios ({seconds:.0f} s); wrote {path}")
    return run.returncode


def _junit_outcomes(path: Path) -> dict[str, str]:
    import xml.etree.ElementTree as ET

    if not path.exists():
        return {}
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcomes[name] = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
    return outcomes


if __name__ == "__main__":
    sys.exit(main())
