"""Foundations every layer uses: settings, storage, databases, MLflow tracking, hashing."""
