"""Dataset files and rows: resolving a dataset name, strict JSONL reading with line numbers, chat message checks.

Row schemas (one JSON object per line; blank lines are skipped):

- SFT: ``{"messages": [{"role", "content", optional "weight": 0|1 or "trainable": bool}, ...]}``
- GRPO: ``{"messages": [...], "ground_truth": ...}`` (trailing assistant turns are stripped before sampling)
- preference (DPO/ORPO): three schemas, see `cookbook.datasets.preferences`.

Which checks apply to which kind of dataset is decided in `cookbook.datasets.kinds`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cookbook.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
DATA_DIR = Path(__file__).resolve().parent / "bundled"


def resolve_dataset(spec: str) -> Path:
    """`bundled:<name>` → the JSONL shipped in `cookbook/datasets/bundled/`; anything else is a path. Missing → DataError."""
    if spec.startswith("bundled:"):
        name = spec[len("bundled:"):]
        path = DATA_DIR / f"{name}.jsonl"
        if not path.is_file():
            available = sorted(p.stem for p in DATA_DIR.glob("*.jsonl"))
            raise DataError(f"Bundled dataset '{name}' does not exist (looked for {path}). "
                            f"Fix: use one of {', '.join('bundled:' + a for a in available)}, or a path to a JSONL file.")
        return path
    path = Path(spec).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"Dataset file {path} {what} (resolved to {path.resolve()}). "
                        "Fix: point recipe.dataset (or recipe.eval_dataset) at an existing JSONL file, "
                        "or use bundled:<name>.")
    return path


def row_location(path: Path, line: int) -> str:
    """`file:line`, the prefix of every error about one row, so the user can jump straight to it."""
    return f"{path}:{line}"


def read_numbered_rows(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line. Malformed JSON, a non-object, or no rows → DataError."""
    path = Path(path)
    out: list[tuple[int, dict]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}). Fix: save the dataset as UTF-8 JSONL.") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{row_location(path, lineno)}: malformed JSON ({e.msg} at column {e.colno}). "
                            "Fix: each line must be one complete JSON object (JSONL); check quotes, commas and "
                            "brackets on that line.") from None
        if not isinstance(obj, dict):
            raise DataError(f"{row_location(path, lineno)}: expected a JSON object, got {type(obj).__name__}. "
                            "Fix: write one object per line, e.g. {\"messages\": [...]}.")
        out.append((lineno, obj))
    if not out:
        raise DataError(f"No rows in {path}: the file is empty. Fix: add one JSON object per line, "
                        "or point the recipe at another dataset.")
    return out


def validate_messages(messages: Any, where: str, key: str = "messages") -> list[dict]:
    """Check a chat message list; returns it. Problems → DataError naming `where` (file:line)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `{key}` must be a non-empty list of {{\"role\", \"content\"}} objects, got "
                        f"{type(messages).__name__ if not isinstance(messages, list) else 'an empty list'}. "
                        "Fix: e.g. [{\"role\": \"user\", \"content\": \"3+4=\"}, {\"role\": \"assistant\", \"content\": \"7\"}].")
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: {key}[{k}] is {type(msg).__name__}, not an object. "
                            "Fix: each message is {\"role\": ..., \"content\": ...}.")
        role = msg.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: {key}[{k}] has role {role!r}. Fix: use one of {', '.join(ROLES)}.")
        if not isinstance(msg.get("content"), str):
            got = "missing" if "content" not in msg else type(msg["content"]).__name__
            raise DataError(f"{where}: {key}[{k}] content is {got}; it must be a string. "
                            "Fix: write the message text as a JSON string (multimodal content parts are not supported).")
        if "weight" in msg and msg["weight"] not in (0, 1):
            raise DataError(f"{where}: {key}[{k}] weight is {msg['weight']!r}. Fix: use 0 (no loss) or 1 (train).")
        if "trainable" in msg and not isinstance(msg["trainable"], bool):
            raise DataError(f"{where}: {key}[{k}] trainable is {msg['trainable']!r}. Fix: use true or false.")
        if role != "assistant" and (msg.get("weight") == 1 or msg.get("trainable") is True):
            raise DataError(f"{where}: {key}[{k}] is a {role} message marked trainable; only assistant messages "
                            "carry loss. Fix: remove its weight/trainable or set it to 0/false.")
    return messages


def validate_chat_row(row: dict, where: str) -> list[dict]:
    """The row's checked `messages` (SFT and GRPO rows); missing or malformed → DataError naming `where`."""
    if "messages" not in row:
        raise DataError(f"{where}: missing `messages` (keys present: {', '.join(sorted(row)) or 'none'}). "
                        "Fix: every row needs \"messages\": [{\"role\": ..., \"content\": ...}, ...].")
    return validate_messages(row["messages"], where)


def strip_trailing_assistant(messages: list[dict]) -> list[dict]:
    """The conversation up to its last non-assistant turn: the prompt a GRPO row or an eval samples from."""
    out = list(messages)
    while out and out[-1]["role"] == "assistant":
        out.pop()
    return out
