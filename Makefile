# VoiceOps: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: setup sysdeps venv test test-fast demo bench up down status lint clean audit

setup: sysdeps venv

sysdeps:
	@scripts/install-system-deps.sh

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 (or run make PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned to the CPU build (2.13.0); a looser pin pulls a multi-GB CUDA build.
	$(BIN)/pip install -q -e '.[airflow,training,serving,dev]'
	# resemblyzer's metadata asks for the old `webrtcvad`, which needs pkg_resources at import;
	# webrtcvad-wheels (a dependency above) provides the same module.
	$(BIN)/pip install -q --no-deps 'resemblyzer==0.1.4'
	rm -f $(VENV)/.installed-* && touch $@

test: setup lint
	$(BIN)/python -m pytest -q -ra --durations=15

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

# Known vulnerabilities of every installed package, from PyPI's advisory data (needs the network, so it is
# not part of `make test`). It passes only when nothing new appears: each --ignore-vuln is justified in
# docs/security.md (tests/test_security.py checks), and --strict fails on a package that could not be
# audited. The list comes from `pip freeze` with local version labels dropped (torch 2.13.0+cpu is audited
# as torch 2.13.0, the same source; PyPI does not list +cpu builds) and without the editable voiceops itself.
audit: setup
	$(BIN)/pip freeze --exclude-editable > $(VENV)/audit-requirements.txt
	sed -i -E 's/\+[A-Za-z0-9.]+$$//' $(VENV)/audit-requirements.txt
	$(BIN)/pip-audit --progress-spinner off --strict --no-deps --disable-pip -r $(VENV)/audit-requirements.txt
