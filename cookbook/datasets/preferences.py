"""Preference pairs (DPO / ORPO): the three row schemas, normalized to one (chosen, rejected) pair, and rendering.

Accepted rows (one per JSONL line):

(a) ``{"chosen": S, "rejected": S}`` where a side S is ``{"messages": [...]}``, ``{"text": "..."}``, a message list,
    or a string. An optional ``"prompt"`` (string = one user message, or a message list) is prepended to both
    sides; with a prompt, a string side is the assistant reply.
(b) ``{"samples": [{"messages" | "text": ..., "score": x} or {..., "evals": {"score": x}}, ...]}``: the first
    highest-scored sample is chosen, the first lowest-scored rejected; all scores equal → row skipped (counted).
(c) OpenAI style ``{"input": str | [messages] | {"messages": [...]}, "preferred_output": O,
    "non_preferred_output": O}`` with O a message list, one message, or a string (the assistant reply).

`normalize_preference_row` returns ``(chosen, rejected)``: two full conversations (message lists), or two strings
for raw-text rows. Rendering masks only the response: for conversations, the assistant messages after the
messages both sides share; for raw text, the tokens after the common token prefix. (The reference implementation
sums from the common token prefix to the end of the sequence and ignores the mask; here the mask is the truth.)
"""

from __future__ import annotations

from typing import Any, Optional, Union

from cookbook.datasets.render import NOTHING_TO_TRAIN, make_datum, render_messages, skip_reason
from cookbook.datasets.rows import validate_messages
from cookbook.errors import DataError

Side = Union[list, str]
TIED_SCORES = "tied_scores"
IDENTICAL = "identical"

SCHEMAS_HELP = ("(a) {\"chosen\": {\"messages\": [...]}, \"rejected\": {\"messages\": [...]}} (or {\"text\": ...}); "
                "(b) {\"samples\": [{\"messages\": [...], \"score\": 1.0}, {\"messages\": [...], \"score\": 0.0}]}; "
                "(c) {\"input\": {\"messages\": [...]}, \"preferred_output\": [{\"role\": \"assistant\", ...}], "
                "\"non_preferred_output\": [...]}")


class SkipRow(Exception):
    """A well-formed row that yields no pair (e.g. all samples scored equally); counted, not fatal."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _prompt(value: Any, where: str, key: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, dict) and "messages" in value:
        return validate_messages(value["messages"], where, f"{key}.messages")
    return validate_messages(value, where, key)


def _side(value: Any, where: str, key: str, prompt: Optional[list[dict]]) -> Side:
    if isinstance(value, dict) and "messages" in value:
        msgs = validate_messages(value["messages"], where, f"{key}.messages")
    elif isinstance(value, dict) and "text" in value:
        if not isinstance(value["text"], str):
            raise DataError(f"{where}: {key}.text must be a string. Fix: write the text as a JSON string.")
        if prompt is None:
            return value["text"]
        msgs = [{"role": "assistant", "content": value["text"]}]
    elif isinstance(value, dict) and "role" in value:
        msgs = validate_messages([value], where, key)
    elif isinstance(value, list):
        msgs = validate_messages(value, where, key)
    elif isinstance(value, str):
        if prompt is None:
            return value
        msgs = [{"role": "assistant", "content": value}]
    else:
        raise DataError(f"{where}: {key} must be {{\"messages\": [...]}}, {{\"text\": ...}}, a message list or a "
                        f"string; got {type(value).__name__}. Fix: see the accepted schemas: {SCHEMAS_HELP}.")
    return (prompt or []) + msgs


def _score(sample: dict, where: str, k: int) -> float:
    score = sample.get("score")
    if score is None and isinstance(sample.get("evals"), dict):
        score = sample["evals"].get("score")
    if not isinstance(score, (int, float)) or isinstance(score, bool):
        raise DataError(f"{where}: samples[{k}] has no numeric `score` (or `evals.score`). "
                        "Fix: give every sample a score, e.g. 1.0 for good and 0.0 for bad.")
    return float(score)


def normalize_preference_row(row: dict, where: str) -> tuple[Side, Side]:
    """(chosen, rejected) for any of the three schemas; malformed → DataError naming `where` (file:line)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object. Fix: use one of {SCHEMAS_HELP}.")
    if "chosen" in row or "rejected" in row:
        if "chosen" not in row or "rejected" not in row:
            missing = "rejected" if "chosen" in row else "chosen"
            raise DataError(f"{where}: has `{'chosen' if missing == 'rejected' else 'rejected'}` but no `{missing}`. "
                            "Fix: every pair needs both a chosen and a rejected response.")
        prompt = _prompt(row["prompt"], where, "prompt") if "prompt" in row else None
        chosen = _side(row["chosen"], where, "chosen", prompt)
        rejected = _side(row["rejected"], where, "rejected", prompt)
    elif "samples" in row:
        samples = row["samples"]
        if not isinstance(samples, list) or len(samples) < 2 or not all(isinstance(s, dict) for s in samples):
            raise DataError(f"{where}: `samples` must be a list of at least 2 objects. "
                            "Fix: give at least one better and one worse scored sample.")
        scores = [_score(s, where, k) for k, s in enumerate(samples)]
        sides = [_side(s, where, f"samples[{k}]", None) for k, s in enumerate(samples)]
        hi, lo = max(scores), min(scores)
        if hi == lo:
            raise SkipRow(TIED_SCORES)
        chosen, rejected = sides[scores.index(hi)], sides[scores.index(lo)]
    elif "input" in row or "preferred_output" in row or "non_preferred_output" in row:
        for key in ("input", "preferred_output", "non_preferred_output"):
            if key not in row:
                raise DataError(f"{where}: OpenAI-style row without `{key}`. "
                                "Fix: give input, preferred_output and non_preferred_output.")
        prompt = _prompt(row["input"], where, "input")
        chosen = _side(row["preferred_output"], where, "preferred_output", prompt)
        rejected = _side(row["non_preferred_output"], where, "non_preferred_output", prompt)
    else:
        raise DataError(f"{where}: row matches no preference schema (keys: {', '.join(sorted(row)) or 'none'}). "
                        f"Fix: use one of {SCHEMAS_HELP}.")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(f"{where}: one side is raw text and the other a conversation. "
                        "Fix: give both sides as messages, or both as text.")
    return chosen, rejected


def _shared_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _render_text_pair(chosen: str, rejected: str, tokenizer):
    c = list(tokenizer.encode(chosen, add_special_tokens=False))
    r = list(tokenizer.encode(rejected, add_special_tokens=False))
    k = _shared_prefix(c, r)
    return (c, [0.0] * k + [1.0] * (len(c) - k)), (r, [0.0] * k + [1.0] * (len(r) - k))


def renders_conversations(chosen: Side, rejected: Side) -> bool:
    """Whether `render_pair_with_reason` renders this pair through the chat template (else: text, or identical)."""
    return not isinstance(chosen, str) and chosen != rejected


def render_pair_with_reason(chosen: Side, rejected: Side, tokenizer, max_seq_len: Optional[int], rendered=None):
    """((chosen datum, rejected datum), None), or (None, skip reason): too long, nothing to train, identical.
    `rendered`: both conversations' `assistant_spans` when already computed (`assistant_spans_many`)."""
    if chosen == rejected:
        return None, IDENTICAL
    if renders_conversations(chosen, rejected):
        k = _shared_prefix([(m["role"], m["content"]) for m in chosen], [(m["role"], m["content"]) for m in rejected])
        sides = tuple(render_messages(msgs, tokenizer, "all_assistant_messages", first_trainable_message=k,
                                      rendered=one) for msgs, one in zip((chosen, rejected), rendered or (None, None)))
    else:
        sides = _render_text_pair(chosen, rejected, tokenizer)
    reasons = [skip_reason(tokens, mask, max_seq_len) for tokens, mask in sides]
    for reason in reasons:
        if reason and reason != NOTHING_TO_TRAIN:
            return None, reason
    if any(reasons):
        return None, NOTHING_TO_TRAIN
    return tuple(make_datum(tokens, mask) for tokens, mask in sides), None
