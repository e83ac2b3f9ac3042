"""The dataset kinds (sft | grpo | preference): how each one checks a row and renders it into a training item.

`KINDS` is the one place a kind is looked up; loading and validation go through it, so a new kind is one entry here.
Items: SFT → Datum; GRPO → prompt token list; preference → (chosen Datum, rejected Datum).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from cookbook.datasets.preferences import (SkipRow, normalize_preference_row, render_pair_with_reason,
                                          renders_conversations)
from cookbook.datasets.render import TOO_LONG, assistant_spans_many, datum_stats, render_prompt, render_sft_with_reason
from cookbook.datasets.rows import strip_trailing_assistant, validate_chat_row
from cookbook.errors import DataError


@dataclass(frozen=True)
class RenderSettings:
    """What a kind's renderer may need; each kind reads only its own fields."""

    tokenizer: Any
    max_seq_len: Optional[int]
    train_on_what: str
    max_completion_tokens: int  # GRPO: room kept after the prompt for the sampled completion


@dataclass(frozen=True)
class DatasetKind:
    """The functions that differ between kinds of dataset; everything else about loading is shared."""

    check_row: Callable[[dict, str], None]  # (row, "file:line"): a malformed row → DataError
    render_row: Callable[[dict, str, RenderSettings], tuple[Any, Optional[str]]]  # (item, None) | (None, reason)
    count_tokens: Callable[[Any], tuple[int, int]]  # item → (tokens, loss tokens)
    usable_row_needs: str  # ends "… and contain <this>." in the error when every row was skipped
    # Many rows at once, the same results as `render_row` on each, faster (optional). A DataError from it sends the
    # rows back through `render_row` one by one, so that the error names its row.
    render_rows: Optional[Callable[[list[dict], RenderSettings], list[tuple[Any, Optional[str]]]]] = None


# ----------------------------------------------------------------------------------------------------------------
# SFT
# ----------------------------------------------------------------------------------------------------------------


def _check_sft_row(row: dict, where: str) -> None:
    if not any(m["role"] == "assistant" for m in validate_chat_row(row, where)):
        raise DataError(f"{where}: no assistant message, so there is nothing to train on. "
                        "Fix: add the assistant reply, or drop the row.")


def _render_sft_row(row: dict, where: str, settings: RenderSettings):
    return render_sft_with_reason(row, settings.tokenizer, settings.max_seq_len, settings.train_on_what)


def _render_sft_rows(rows: list[dict], settings: RenderSettings):
    rendered = assistant_spans_many([row["messages"] for row in rows], settings.tokenizer)
    return [render_sft_with_reason(row, settings.tokenizer, settings.max_seq_len, settings.train_on_what, one)
            for row, one in zip(rows, rendered)]


# ----------------------------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------------------------


def _check_grpo_row(row: dict, where: str) -> None:
    if not strip_trailing_assistant(validate_chat_row(row, where)):
        raise DataError(f"{where}: only assistant messages; GRPO needs a prompt. Fix: add a user message.")


def _render_grpo_row(row: dict, where: str, settings: RenderSettings):
    prompt = render_prompt(row["messages"], settings.tokenizer)
    if settings.max_seq_len is not None and len(prompt) + settings.max_completion_tokens > settings.max_seq_len:
        return None, TOO_LONG
    return prompt, None


def _count_prompt_tokens(prompt: list[int]) -> tuple[int, int]:
    return len(prompt), 0  # a prompt carries no loss; its completions are trained on later


# ----------------------------------------------------------------------------------------------------------------
# Preference
# ----------------------------------------------------------------------------------------------------------------


def _check_preference_row(row: dict, where: str) -> None:
    try:
        normalize_preference_row(row, where)
    except SkipRow:
        pass  # well-formed; `load_dataset` counts it as skipped


def _render_preference_row(row: dict, where: str, settings: RenderSettings):
    try:
        chosen, rejected = normalize_preference_row(row, where)
    except SkipRow as skip:
        return None, skip.reason
    return render_pair_with_reason(chosen, rejected, settings.tokenizer, settings.max_seq_len)


def _render_preference_rows(rows: list[dict], settings: RenderSettings):
    pairs: list = []  # (chosen, rejected), or the reason a row yields no pair
    for row in rows:
        try:
            pairs.append(normalize_preference_row(row, "a preference row"))  # checked already: a DataError is a bug
        except SkipRow as skip:
            pairs.append(skip.reason)
    chat = [pair for pair in pairs if isinstance(pair, tuple) and renders_conversations(*pair)]
    spans = iter(assistant_spans_many([side for pair in chat for side in pair], settings.tokenizer))
    out = []
    for pair in pairs:
        if isinstance(pair, str):
            out.append((None, pair))
            continue
        rendered = (next(spans), next(spans)) if renders_conversations(*pair) else None
        out.append(render_pair_with_reason(*pair, settings.tokenizer, settings.max_seq_len, rendered))
    return out


def _count_pair_tokens(pair) -> tuple[int, int]:
    stats = [datum_stats(datum) for datum in pair]
    return sum(tokens for tokens, _ in stats), sum(loss for _, loss in stats)


KINDS: dict[str, DatasetKind] = {
    "sft": DatasetKind(_check_sft_row, _render_sft_row, datum_stats, "assistant messages to train on",
                       _render_sft_rows),
    "grpo": DatasetKind(_check_grpo_row, _render_grpo_row, _count_prompt_tokens, "a prompt"),
    "preference": DatasetKind(_check_preference_row, _render_preference_row, _count_pair_tokens,
                              "chosen and rejected responses that differ", _render_preference_rows),
}


def dataset_kind(name: str) -> DatasetKind:
    """The entry for `name`; an unknown kind is a programming error (recipes name their kind), hence ValueError."""
    if name not in KINDS:
        raise ValueError(f"kind must be one of {tuple(KINDS)}, got {name!r}")
    return KINDS[name]
