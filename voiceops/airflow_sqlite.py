"""Connection arguments for Airflow's own SQLite metadata database (the embedded default).

Airflow imports these by dotted path (``AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS``, see ``stack.airflow_env``).
sqlite3's default 5 s busy timeout is shorter than the scheduler's write transactions on a loaded 2-core
machine: the API server then answered "Database error" (HTTP 500) to a dag-run trigger in CI. Kept in a module
of its own so Airflow's settings import nothing else of ours.
"""

SYNC_CONNECT_ARGS: dict = {"timeout": 30}
ASYNC_CONNECT_ARGS: dict = {"timeout": 30}
