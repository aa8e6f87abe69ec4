"""Pipelines: the onboarding, evaluation, nightly and intake steps the DAGs and the CLI call."""
