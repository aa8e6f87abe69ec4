#!/usr/bin/env bash
# One-shot Airflow set-up for docker-compose.yml (service airflow-init): migrate the metadata database
# and write the Simple auth manager's passwords file, so the admin login is the one set in .env
# (VOICEOPS_AIRFLOW_USERNAME / VOICEOPS_AIRFLOW_PASSWORD) instead of a random generated one.
# Safe to run on every `docker compose up`: both steps are idempotent.
set -euo pipefail

: "${VOICEOPS_AIRFLOW_PASSWORD:?set VOICEOPS_AIRFLOW_PASSWORD in .env}"
: "${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:?}"

airflow db migrate

python - <<'PY'
import json
import os
from pathlib import Path

path = Path(os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
path.parent.mkdir(parents=True, exist_ok=True)
user = os.environ.get("VOICEOPS_AIRFLOW_USERNAME", "admin")
tmp = path.with_suffix(".tmp")
tmp.write_text(json.dumps({user: os.environ["VOICEOPS_AIRFLOW_PASSWORD"]}) + "\n")
tmp.chmod(0o600)
tmp.replace(path)
print(f"airflow-init: metadata database migrated; login {user!r} written to {path}")
PY
