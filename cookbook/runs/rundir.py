"""The run directory: resolved config, attempts history, status file, and crash-safe file writes.

Everything a run writes goes through `redact` so API keys from the environment never reach a file.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

SECRET_ENV_VARS = ("FIREWORKS_API_KEY", "WANDB_API_KEY", "TINKER_API_KEY", "HF_TOKEN")


def redact(text: str) -> str:
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, f"<{name}>")
    return text


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + rename, so readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(redact(text))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line with a single O_APPEND write + fsync: a crash leaves either the whole line or none."""
    line = (redact(json.dumps(record, default=str, allow_nan=False)) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # After a torn last line (no newline) start on a fresh line, or this record would be glued onto the torn
        # one and be unreadable too.
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file, ignoring a torn last line (from a crash in the middle of an append)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def prepare_run_dir(log_path: Path, config_yaml: str, overrides: list[str]) -> int:
    """Create the run directory, keep every attempt's config, and return this attempt's number."""
    log_path.mkdir(parents=True, exist_ok=True)
    attempt = len(read_jsonl(log_path / "attempts.jsonl")) + 1
    attempt_dir = log_path / "attempts" / str(attempt)
    attempt_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(attempt_dir / "config.yaml", config_yaml)
    atomic_write_text(log_path / "config.yaml", config_yaml)
    append_jsonl(log_path / "attempts.jsonl", {
        "attempt": attempt, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "overrides": overrides,
        "argv": sys.argv[1:], "pid": os.getpid(), "host": socket.gethostname()})
    return attempt


def write_status(log_path: Path, status: dict[str, Any]) -> None:
    atomic_write_text(Path(log_path) / "status.json", json.dumps(status, indent=2, default=str) + "\n")


def read_status(log_path: Path) -> dict[str, Any] | None:
    path = Path(log_path) / "status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def storage_root() -> Path:
    """Where the embedded platform keeps trainer storage, one root per user like an account's storage on Fireworks:
    every run's trainer jobs keep their checkpoints under `<root>/jobs/<job_id>/`, so a later run (a resume, a
    `resume_from=<other_run>:<name>`, a GRPO warm start) can load any earlier job's checkpoint with a
    `cross_job://<job>/<name>` path; cached warm starts live under `<root>/warmstart/`. Set COOKBOOK_PLATFORM_ROOT to
    move it (tests point it at a temporary directory)."""
    root = os.environ.get("COOKBOOK_PLATFORM_ROOT") or Path.home() / ".cache" / "cookbook" / "platform"
    return Path(root).expanduser().resolve()
