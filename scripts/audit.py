"""`make audit`: known vulnerabilities of every package in the lock files, said plainly when they cannot be checked.

    python scripts/audit.py --pip-audit .venv/bin/pip-audit [--ignore-vuln ID ...] [--strict]

The pins of requirements.lock and requirements-dev.lock (local version labels dropped: torch 2.13.0+cpu is
audited as torch 2.13.0, the same source; PyPI does not list +cpu builds) go to pip-audit, which asks PyPI's
advisory data about each. The verdict:

- a known vulnerability in a package that was audited (and not ignored) fails, exit 1;
- a package the advisory database gave no answer for is listed as NOT AUDITED, never counted as clean; when
  nothing at all could be audited the report says the advisory database is unreachable from this machine;
- only ``--strict`` (``make audit AUDIT_STRICT=1``) also fails on packages that could not be audited.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCKS = (ROOT / "requirements.lock", ROOT / "requirements-dev.lock")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s+\\]+)", re.M)


def locked_pins(paths: tuple[Path, ...] = LOCKS) -> list[str]:
    """``name==version`` of every locked package, local labels dropped."""
    return sorted({f"{m[1]}=={m[2]}" for path in paths for m in _PIN.finditer(path.read_text())})


def verdict(report: dict, strict: bool = False) -> tuple[list[str], int]:
    """The lines to print and the exit code for pip-audit's JSON report (module docstring)."""
    deps = report.get("dependencies", [])
    skipped = [d for d in deps if d.get("skip_reason")]
    audited = [d for d in deps if not d.get("skip_reason")]
    vulnerable = [d for d in audited if d.get("vulns")]
    lines = [f"audited {len(audited)} of {len(deps)} locked packages against the advisory database"]
    for dep in vulnerable:
        for vuln in dep["vulns"]:
            fixes = ", ".join(vuln.get("fix_versions") or []) or "none yet"
            lines.append(f"VULNERABLE {dep['name']} {dep['version']}: {vuln['id']} (fixed in: {fixes})")
    if skipped and not audited:
        lines.append(f"NOTHING WAS AUDITED: the advisory database answered for none of the {len(deps)} packages "
                     "(from this machine PyPI's per-release data and OSV cannot be reached). This is no pass: "
                     "run `make audit` where pypi.org is fully reachable.")
    elif skipped:
        lines.append(f"NOT AUDITED ({len(skipped)}): " + ", ".join(d["name"] for d in skipped))
    if not vulnerable:
        lines.append("no known vulnerability in the packages that were audited" if audited else
                     "no vulnerability could be checked")
    failed = bool(vulnerable) or (strict and bool(skipped))
    return lines, 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pip-audit", default="pip-audit", help="the pip-audit executable")
    parser.add_argument("--ignore-vuln", action="append", default=[], help="a justified id (docs/security.md)")
    parser.add_argument("--strict", action="store_true", help="also fail on packages that could not be audited")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        pins, out = Path(scratch) / "pins.txt", Path(scratch) / "report.json"
        pins.write_text("\n".join(locked_pins()) + "\n")
        cmd = [args.pip_audit, "--progress-spinner", "off", "--no-deps", "--disable-pip", "-r", str(pins),
               "-f", "json", "-o", str(out), *[f"--ignore-vuln={v}" for v in args.ignore_vuln]]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if not out.exists() or not out.read_text().strip():
            sys.exit(f"pip-audit gave no report (exit {run.returncode}):\n{run.stderr[-3000:]}")
        lines, code = verdict(json.loads(out.read_text()), args.strict)
    print("\n".join(lines))
    sys.exit(code)


if __name__ == "__main__":
    main()
