"""Release: the registry (the only writer), rollout analysis, registration, loading registered models."""
