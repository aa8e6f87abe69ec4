"""The server's HTTP routes, one router per audience: synthesis (tenants), admin (admin keys, the MLflow
webhook) and probes (unauthenticated). serving/app.py mounts them over one ``Services`` dependency."""
