"""Names derived from config values, shared by launchers and dry runs."""

import re


def deployment_id_for(base_model: str) -> str:
    """Deployment id derived from the base model: the last path segment, lowercased, `[a-z0-9-]`, ≤ 63 chars."""
    leaf = base_model.rstrip("/").rsplit("/", 1)[-1].lower()
    return (re.sub(r"[^a-z0-9-]+", "-", leaf).strip("-") or "model")[:50] + "-cookbook"
