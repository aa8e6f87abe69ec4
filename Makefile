# VoiceOps: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
LOCKS  := requirements.lock requirements-dev.lock
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCKS) | sha1sum | cut -c1-12)

.PHONY: setup sysdeps venv test test-fast demo bench up down status lint clean audit

setup: sysdeps venv

sysdeps:
	@scripts/install-system-deps.sh

venv: $(STAMP)

# Exactly the hashed lock files (scripts/lock.py writes them from pyproject.toml; deploy/Dockerfile installs
# the same requirements.lock): every package pinned, every file checked against its sha256, nothing resolved
# (--no-deps: the locks are the whole closure, resemblyzer included without its stale `webrtcvad` requirement).
# torch is the CPU build 2.13.0+cpu, from pip's find-links on this machine kind (elsewhere: make
# PIP_EXTRA='--extra-index-url https://download.pytorch.org/whl/cpu'). Then voiceops itself, editable, built
# with the locked setuptools.
$(STAMP): pyproject.toml $(LOCKS)
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 (or run make PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-deps --require-hashes $(PIP_EXTRA) -r requirements.lock -r requirements-dev.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-* && touch $@

test: setup lint
	$(BIN)/python -m pytest -q -ra --durations=40

# Layer contracts (pyproject's [tool.importlinter]) and the errors ruff finds without opinions on style.
lint: venv
	$(BIN)/lint-imports
	$(BIN)/ruff check --select F,E9 voice_lib voiceops serving dags plugins tests benchmarks

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

demo: setup
	$(BIN)/voiceops demo

up: setup
	$(BIN)/voiceops up

down:
	$(BIN)/voiceops down

status:
	$(BIN)/voiceops status

clean:
	rm -rf .voiceops .pytest_cache .hypothesis

bench: setup
	$(BIN)/voiceops bench all

# Known vulnerabilities of every package in the lock files, from PyPI's advisory data (needs the network, so
# it is not part of `make test`): scripts/audit.py runs pip-audit on the locked pins (local labels dropped:
# torch 2.13.0+cpu is audited as torch 2.13.0, the same source) and fails on a known vulnerability that is not
# ignored. Each --ignore-vuln is justified in docs/security.md (tests/test_security.py checks). A package the
# advisory database gives no answer for is reported as NOT AUDITED, never as clean, and when nothing could be
# audited it says the database is unreachable; AUDIT_STRICT=1 also fails on those.
audit: setup
	$(BIN)/python scripts/audit.py --pip-audit $(BIN)/pip-audit $(if $(AUDIT_STRICT),--strict)
