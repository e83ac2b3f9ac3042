"""Rendering chat messages into pre-shifted `tinker.Datum`s, and the token helpers sampling needs.

Datums are pre-shifted: ``model_input = tokens[:-1]``, ``target_tokens = tokens[1:]``, ``weights = mask[1:]``.
Weights stay raw 0/1 (1 = a token the loss trains on); how a loss is scaled (per token, per sequence, by the server
or the client) is decided in one place, `cookbook.recipes.losses`, from the normalization mode.

Loss masks come from the tokenizer's chat template: ``{% generation %}`` tags give the assistant tokens (content and
the closing end-of-turn token). Templates without them fall back to prefix-difference rendering.
"""

from __future__ import annotations

from typing import Optional, Sequence

from cookbook.datasets.rows import strip_trailing_assistant
from cookbook.errors import DataError

TRAIN_ON = ("all_assistant_messages", "last_assistant_message")

# Skip reasons (keys of `Dataset.skipped`).
TOO_LONG = "too_long"
NOTHING_TO_TRAIN = "nothing_to_train"


# ----------------------------------------------------------------------------------------------------------------
# Datums
# ----------------------------------------------------------------------------------------------------------------


def make_datum(tokens: Sequence[int], mask: Sequence[float]):
    """A pre-shifted datum: model_input = tokens[:-1], target_tokens = tokens[1:], weights = mask[1:] (float32)."""
    import numpy as np
    import tinker

    if len(tokens) != len(mask) or len(tokens) < 2:
        raise ValueError(f"make_datum needs >= 2 tokens and a mask of the same length (got {len(tokens)}, {len(mask)})")
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints([int(t) for t in tokens[:-1]]),
        loss_fn_inputs={
            "target_tokens": tinker.TensorData.from_numpy(np.asarray(tokens[1:], dtype=np.int64)),
            "weights": tinker.TensorData.from_numpy(np.asarray(mask[1:], dtype=np.float32)),
        },
    )


def datum_weights_list(datum) -> list[float]:
    return [float(w) for w in datum.loss_fn_inputs["weights"].tolist()]


def datum_stats(datum) -> tuple[int, int]:
    """(model-input tokens, loss tokens = targets with weight > 0)."""
    return datum.model_input.length, sum(1 for w in datum_weights_list(datum) if w > 0)


def skip_reason(tokens, mask, max_seq_len: Optional[int]) -> Optional[str]:
    """Skip reason for a rendered sequence, or None. Only target positions (mask[1:]) can carry loss."""
    if max_seq_len is not None and len(tokens) > max_seq_len:
        return TOO_LONG
    if len(tokens) < 2 or not any(mask[1:]):
        return NOTHING_TO_TRAIN
    return None


# ----------------------------------------------------------------------------------------------------------------
# Chat rendering and loss masks
# ----------------------------------------------------------------------------------------------------------------


def _chat_ids(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=False)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def assistant_spans(messages: list[dict], tokenizer) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Render `messages`; return (tokens, [(message index, start, end)]) for each assistant message's tokens.

    Spans cover the assistant content and its end-of-turn token, as marked by the template's `{% generation %}`.
    """
    return assistant_spans_many([messages], tokenizer)[0]


def assistant_spans_many(conversations: list[list[dict]],
                         tokenizer) -> list[tuple[list[int], list[tuple[int, int, int]]]]:
    """`assistant_spans` of each conversation, from one batched template call (half the time of a call each: the
    tokenizer encodes the whole batch at once)."""
    if not conversations:
        return []
    out = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    masks = out.get("assistant_masks") or [[] for _ in conversations]
    return [_spans(messages, list(ids), list(mask), tokenizer)
            for messages, ids, mask in zip(conversations, out["input_ids"], masks)]


def _spans(messages, tokens, amask, tokenizer) -> tuple[list[int], list[tuple[int, int, int]]]:
    asst = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    runs: list[tuple[int, int]] = []
    for t, m in enumerate(amask):
        if m and (t == 0 or not amask[t - 1]):
            runs.append((t, t + 1))
        elif m:
            runs[-1] = (runs[-1][0], t + 1)
    if len(runs) == len(asst) and (asst or not any(amask)):
        return tokens, [(i, s, e) for i, (s, e) in zip(asst, runs)]
    return tokens, _prefix_diff_spans(messages, tokenizer, tokens, asst)


def _prefix_diff_spans(messages, tokenizer, tokens, asst) -> list[tuple[int, int, int]]:
    """Fallback for templates without generation tags: each assistant message's tokens are what its turn adds to
    the rendering of the conversation before it (with a generation prompt), up to its end-of-turn token."""
    stops = set(stop_token_ids(tokenizer))
    spans = []
    for i in asst:
        start = len(_chat_ids(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        upto = _chat_ids(tokenizer, messages[: i + 1])
        if upto != tokens[: len(upto)] or start > len(upto):
            raise DataError("The tokenizer's chat template renders earlier turns differently once later turns are "
                            "added, so assistant tokens cannot be located. Fix: use a template with "
                            "{% generation %} tags (or the embedded tokenizer).")
        end = len(upto)
        while end > start and upto[end - 1] not in stops:
            end -= 1
        spans.append((i, start, end if end > start else len(upto)))
    return spans


def _message_trains(msg: dict, default: bool) -> bool:
    if "weight" in msg:
        return msg["weight"] == 1
    if "trainable" in msg:
        return bool(msg["trainable"])
    return default


def render_messages(messages: list[dict], tokenizer, train_on_what: str = "all_assistant_messages",
                    first_trainable_message: int = 0, rendered=None) -> tuple[list[int], list[float]]:
    """Tokens and a 0/1 mask over them: 1 on the trained assistant messages (content + end-of-turn token).

    Defaults come from `train_on_what`; a message's own `weight` (0/1) or `trainable` (bool) overrides.
    Messages before `first_trainable_message` never train (used for preference pairs' shared prefix).
    The rendering is cut after the last trained token (trailing untrained tokens carry no loss).
    `rendered`: the conversation's `assistant_spans` (tokens, spans) when already computed (`assistant_spans_many`).
    """
    if train_on_what not in TRAIN_ON:
        raise ValueError(f"train_on_what must be one of {TRAIN_ON}, got {train_on_what!r}")
    tokens, spans = rendered or assistant_spans(messages, tokenizer)
    mask = [0.0] * len(tokens)
    last = spans[-1][0] if spans else -1
    for i, start, end in spans:
        default = train_on_what == "all_assistant_messages" or i == last
        if i >= first_trainable_message and _message_trains(messages[i], default):
            mask[start:end] = [1.0] * (end - start)
    if any(mask):
        cut = max(t for t, m in enumerate(mask) if m) + 1
        tokens, mask = tokens[:cut], mask[:cut]
    return tokens, mask


def render_sft_with_reason(row: dict, tokenizer, max_seq_len: Optional[int],
                           train_on_what: str = "all_assistant_messages", rendered=None):
    """(datum, None), or (None, skip reason) when the row is over `max_seq_len` tokens or trains on nothing.
    `rendered`: as for `render_messages`."""
    tokens, mask = render_messages(row["messages"], tokenizer, train_on_what, rendered=rendered)
    reason = skip_reason(tokens, mask, max_seq_len)
    return (None, reason) if reason else (make_datum(tokens, mask), None)


# ----------------------------------------------------------------------------------------------------------------
# Sampling (GRPO and evals)
# ----------------------------------------------------------------------------------------------------------------


def render_prompt(messages: list[dict], tokenizer) -> list[int]:
    """Prompt tokens for sampling: trailing assistant turns stripped, generation prompt appended."""
    return _chat_ids(tokenizer, strip_trailing_assistant(messages), add_generation_prompt=True)


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end a completion: `<|im_end|>` (when the vocabulary has it) and eos."""
    ids = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for tok in ("<|im_end|>", getattr(tokenizer, "eos_token", None)):
        if tok is None:
            continue
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != unk and tid not in ids:
            ids.append(tid)
    return ids


def policy_datum(prompt_tokens: Sequence[int], completion_tokens: Sequence[int]):
    """Datum for a sampled completion: weights are 1 exactly on the completion's target positions."""
    if not completion_tokens:
        raise ValueError("policy_datum needs at least one completion token")
    tokens = list(prompt_tokens) + list(completion_tokens)
    mask = [0.0] * len(prompt_tokens) + [1.0] * len(completion_tokens)
    return make_datum(tokens, mask)


def align_to_targets(prompt_len: int, completion_values: Sequence[float], fill: float = 0.0) -> list[float]:
    """Per-completion-token values (e.g. sampling logprobs) laid out on a `policy_datum`'s target positions."""
    return [fill] * (prompt_len - 1) + [float(v) for v in completion_values]
