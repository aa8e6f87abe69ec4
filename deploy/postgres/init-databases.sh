#!/usr/bin/env bash
# Runs once, when the postgres volume is created (the image runs /docker-entrypoint-initdb.d/*.sh as the
# superuser): one role and one database each for Airflow's metadata (also the Celery result backend),
# MLflow's registry/tracking store, and the model server's request audit log.
# Passwords come from the environment (docker-compose.yml passes them from .env); none are stored here.
# To add a database to an existing volume, run the same statements by hand with psql.
set -euo pipefail

create_db() {
    local name="$1" password="$2"
    echo "postgres-init: creating role and database ${name}"
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
        --set=name="$name" --set=password="$password" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'name', :'password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'name') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'name', :'name')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'name') \gexec
SQL
}

create_db airflow "${AIRFLOW_DB_PASSWORD:?set AIRFLOW_DB_PASSWORD in .env}"
create_db mlflow "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD in .env}"
create_db audit "${AUDIT_DB_PASSWORD:?set AUDIT_DB_PASSWORD in .env}"
