"""The composition root above voice_lib and serving: the CLI, the embedded stack, the Airflow client, the demo."""
