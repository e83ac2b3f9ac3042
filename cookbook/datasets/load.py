"""Loading a dataset: resolve the name, read the rows, check and render each one by its kind.

Files and row schemas: `cookbook.datasets.rows`; datums and masks: `cookbook.datasets.render`; the per-kind checks
and renderers: `cookbook.datasets.kinds`; the cursor that walks a loaded dataset: `cookbook.datasets.cursor`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cookbook.datasets.kinds import RenderSettings, dataset_kind
from cookbook.datasets.rows import read_numbered_rows, resolve_dataset, row_location
from cookbook.errors import DataError

RENDER_CHUNK_ROWS = 1024  # rows rendered per batched template call (bounds the memory of one call)


@dataclass
class Dataset:
    """A loaded dataset: `items[i]` is the rendered form of raw row `rows[i]`, or None if that row was skipped.

    Items: SFT → Datum; GRPO → prompt token list; preference → (chosen Datum, rejected Datum).
    The cursor walks raw rows (skipped ones included), so positions survive resume even with skips.
    """

    path: Path
    kind: str
    rows: list[dict]
    items: list[Any]
    lines: list[int] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    num_tokens: int = 0
    num_loss_tokens: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def valid(self) -> list[bool]:
        return [it is not None for it in self.items]

    @property
    def num_items(self) -> int:
        return sum(self.valid)

    def summary(self) -> str:
        skips = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (f"{self.path.name}: {len(self.rows)} rows, {self.num_items} usable (skipped {skips}), "
                f"{self.num_tokens} tokens, {self.num_loss_tokens} loss tokens")


def load_rows(path: str | Path, kind: str) -> list[dict]:
    """Read and validate a JSONL dataset of `kind` (sft | grpo | preference). Any problem → DataError with file:line."""
    return [row for _, row in _read_checked_rows(Path(path), kind)]


def _read_checked_rows(path: Path, kind: str) -> list[tuple[int, dict]]:
    check_row = dataset_kind(kind).check_row
    rows = read_numbered_rows(path)
    for lineno, row in rows:
        check_row(row, row_location(path, lineno))
    return rows


def _no_trainable(path: Path, n: int, skipped: Counter, what: str) -> DataError:
    skips = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))
    return DataError(f"No trainable rows in {path}: all {n} rows were skipped ({skips}). Fix: make sure rows fit "
                     f"recipe.max_seq_len (or raise it) and contain {what}.")


def _render_chunk(rendering, chunk: list[tuple[int, dict]], path: Path, settings: RenderSettings) -> list:
    if rendering.render_rows is not None:
        try:
            return rendering.render_rows([row for _, row in chunk], settings)
        except DataError:
            pass  # rendered again row by row, so that the error names its row
    out = []
    for lineno, row in chunk:
        where = row_location(path, lineno)
        try:
            out.append(rendering.render_row(row, where, settings))
        except DataError as e:
            # Every rendering error names a row: checks already give file:line, template problems get it here.
            msg = str(e)
            raise DataError(msg if msg.startswith(str(path)) else f"{where}: {msg}") from None
    return out


def load_dataset(spec: str | Path, kind: str, tokenizer, max_seq_len: Optional[int] = None, *,
                 train_on_what: str = "all_assistant_messages", max_completion_tokens: int = 0,
                 max_rows: Optional[int] = None) -> Dataset:
    """Resolve, read, validate and render a dataset. Nothing usable left → DataError naming the file.

    `max_seq_len` bounds the rendered length (GRPO: prompt + `max_completion_tokens`); `max_rows` keeps the first N.
    """
    path = resolve_dataset(str(spec))
    raw = _read_checked_rows(path, kind)
    if max_rows is not None:
        raw = raw[:max_rows]
    rendering = dataset_kind(kind)
    settings = RenderSettings(tokenizer, max_seq_len, train_on_what, max_completion_tokens)
    items: list[Any] = []
    skipped: Counter = Counter()
    n_tok = n_loss = 0
    for start in range(0, len(raw), RENDER_CHUNK_ROWS):
        for item, reason in _render_chunk(rendering, raw[start:start + RENDER_CHUNK_ROWS], path, settings):
            if item is not None:
                tokens, loss_tokens = rendering.count_tokens(item)
                n_tok, n_loss = n_tok + tokens, n_loss + loss_tokens
            if reason:
                skipped[reason] += 1
            items.append(item)
    if not any(it is not None for it in items):
        raise _no_trainable(path, len(raw), skipped, rendering.usable_row_needs)
    return Dataset(path=path, kind=kind, rows=[r for _, r in raw], items=items, lines=[n for n, _ in raw],
                   skipped=dict(skipped), num_tokens=n_tok, num_loss_tokens=n_loss)
