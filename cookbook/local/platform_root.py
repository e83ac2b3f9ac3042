"""Where the embedded platform keeps trainer storage: one root per user, like an account's storage on Fireworks.

Every run's trainer jobs store their checkpoints under `<root>/jobs/<job_id>/`, so a later run (a resume, a
`resume_from=<other_run>:<name>`, a GRPO warm start from an SFT run) can load any earlier job's checkpoint with a
`cross_job://<job>/<name>` path. Set COOKBOOK_PLATFORM_ROOT to move it (tests point it at a temporary directory).
"""

import os
from pathlib import Path


def storage_root() -> Path:
    root = os.environ.get("COOKBOOK_PLATFORM_ROOT") or Path.home() / ".cache" / "cookbook" / "platform"
    return Path(root).expanduser().resolve()
