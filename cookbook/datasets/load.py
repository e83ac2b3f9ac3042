"""Datasets: strict JSONL reading and chat rendering into pre-shifted `tinker.Datum`s (the cursor: `cookbook.datasets.cursor`).

Row schemas (one JSON object per line; blank lines are skipped):

- SFT: ``{"messages": [{"role", "content", optional "weight": 0|1 or "trainable": bool}, ...]}``
- GRPO: ``{"messages": [...], "ground_truth": ...}`` (trailing assistant turns are stripped before sampling)
- preference (DPO/ORPO): three schemas, see `cookbook.datasets.preferences`.

Datums are pre-shifted: ``model_input = tokens[:-1]``, ``target_tokens = tokens[1:]``, ``weights = mask[1:]``.
Weights stay raw 0/1 (1 = a token the loss trains on); how a loss is scaled (per token, per sequence, by the server
or the client) is decided in one place, `cookbook.recipes.losses`, from the normalization mode.

Loss masks come from the tokenizer's chat template: ``{% generation %}`` tags give the assistant tokens (content and
the closing end-of-turn token). Templates without them fall back to prefix-difference rendering.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from cookbook.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
KINDS = ("sft", "grpo", "preference")
TRAIN_ON = ("all_assistant_messages", "last_assistant_message")
DATA_DIR = Path(__file__).resolve().parent / "bundled"

# Skip reasons (keys of `Dataset.skipped`).
TOO_LONG = "too_long"
NOTHING_TO_TRAIN = "nothing_to_train"


# ----------------------------------------------------------------------------------------------------------------
# Files and rows
# ----------------------------------------------------------------------------------------------------------------


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


def _where(path: Path, line: int) -> str:
    return f"{path}:{line}"


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
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
            raise DataError(f"{_where(path, lineno)}: malformed JSON ({e.msg} at column {e.colno}). "
                            "Fix: each line must be one complete JSON object (JSONL); check quotes, commas and "
                            "brackets on that line.") from None
        if not isinstance(obj, dict):
            raise DataError(f"{_where(path, lineno)}: expected a JSON object, got {type(obj).__name__}. "
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


def load_rows(path: str | Path, kind: str) -> list[dict]:
    """Read and validate a JSONL dataset of `kind` (sft | grpo | preference). Any problem → DataError with file:line."""
    return [row for _, row in _load_rows(Path(path), kind)]


def _load_rows(path: Path, kind: str) -> list[tuple[int, dict]]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    rows = read_jsonl(path)
    for lineno, row in rows:
        where = _where(path, lineno)
        if kind == "preference":
            from cookbook.datasets.preferences import normalize_preference_row, SkipRow
            try:
                normalize_preference_row(row, where)
            except SkipRow:
                pass
            continue
        if "messages" not in row:
            raise DataError(f"{where}: missing `messages` (keys present: {', '.join(sorted(row)) or 'none'}). "
                            "Fix: every row needs \"messages\": [{\"role\": ..., \"content\": ...}, ...].")
        validate_messages(row["messages"], where)
        if kind == "sft" and not any(m["role"] == "assistant" for m in row["messages"]):
            raise DataError(f"{where}: no assistant message, so there is nothing to train on. "
                            "Fix: add the assistant reply, or drop the row.")
        if kind == "grpo" and not strip_trailing_assistant(row["messages"]):
            raise DataError(f"{where}: only assistant messages; GRPO needs a prompt. Fix: add a user message.")
    return rows


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


def datum_tokens(datum) -> list[int]:
    """The full token sequence of a pre-shifted datum (model_input + the last target)."""
    targets = datum.loss_fn_inputs["target_tokens"].tolist()
    return datum.model_input.to_ints() + targets[-1:]


def datum_weights_list(datum) -> list[float]:
    return [float(w) for w in datum.loss_fn_inputs["weights"].tolist()]


def datum_stats(datum) -> tuple[int, int]:
    """(model-input tokens, loss tokens = targets with weight > 0)."""
    return datum.model_input.length, sum(1 for w in datum_weights_list(datum) if w > 0)


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
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    tokens = list(out["input_ids"])
    amask = list(out.get("assistant_masks") or [])
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
                    first_trainable_message: int = 0) -> tuple[list[int], list[float]]:
    """Tokens and a 0/1 mask over them: 1 on the trained assistant messages (content + end-of-turn token).

    Defaults come from `train_on_what`; a message's own `weight` (0/1) or `trainable` (bool) overrides.
    Messages before `first_trainable_message` never train (used for preference pairs' shared prefix).
    The rendering is cut after the last trained token (trailing untrained tokens carry no loss).
    """
    if train_on_what not in TRAIN_ON:
        raise ValueError(f"train_on_what must be one of {TRAIN_ON}, got {train_on_what!r}")
    tokens, spans = assistant_spans(messages, tokenizer)
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


def _check(tokens, mask, max_seq_len: Optional[int]) -> Optional[str]:
    """Skip reason for a rendered sequence, or None. Only target positions (mask[1:]) can carry loss."""
    if max_seq_len is not None and len(tokens) > max_seq_len:
        return TOO_LONG
    if len(tokens) < 2 or not any(mask[1:]):
        return NOTHING_TO_TRAIN
    return None


def render_sft_with_reason(row: dict, tokenizer, max_seq_len: Optional[int],
                           train_on_what: str = "all_assistant_messages"):
    """(datum, None), or (None, skip reason) when the row is over `max_seq_len` tokens or trains on nothing."""
    tokens, mask = render_messages(row["messages"], tokenizer, train_on_what)
    reason = _check(tokens, mask, max_seq_len)
    return (None, reason) if reason else (make_datum(tokens, mask), None)


def render_sft(row: dict, tokenizer, max_seq_len: Optional[int], train_on_what: str = "all_assistant_messages"):
    """One SFT datum for a row, or None when skipped (too long, or nothing trainable). See `datum_stats`."""
    return render_sft_with_reason(row, tokenizer, max_seq_len, train_on_what)[0]


# ----------------------------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------------------------


def strip_trailing_assistant(messages: list[dict]) -> list[dict]:
    out = list(messages)
    while out and out[-1]["role"] == "assistant":
        out.pop()
    return out


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


# ----------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------


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


def _no_trainable(path: Path, n: int, skipped: Counter, what: str) -> DataError:
    skips = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))
    return DataError(f"No trainable rows in {path}: all {n} rows were skipped ({skips}). Fix: make sure rows fit "
                     f"recipe.max_seq_len (or raise it) and contain {what}.")


def load_dataset(spec: str | Path, kind: str, tokenizer, max_seq_len: Optional[int] = None, *,
                 train_on_what: str = "all_assistant_messages", max_completion_tokens: int = 0,
                 max_rows: Optional[int] = None) -> Dataset:
    """Resolve, read, validate and render a dataset. Nothing usable left → DataError naming the file.

    `max_seq_len` bounds the rendered length (GRPO: prompt + `max_completion_tokens`); `max_rows` keeps the first N.
    """
    path = resolve_dataset(str(spec))
    raw = _load_rows(path, kind)
    if max_rows is not None:
        raw = raw[:max_rows]
    items: list[Any] = []
    skipped: Counter = Counter()
    n_tok = n_loss = 0
    for lineno, row in raw:
        where = _where(path, lineno)
        try:
            if kind == "sft":
                item, reason = render_sft_with_reason(row, tokenizer, max_seq_len, train_on_what)
                if item is not None:
                    a, b = datum_stats(item)
                    n_tok, n_loss = n_tok + a, n_loss + b
            elif kind == "grpo":
                item = render_prompt(row["messages"], tokenizer)
                reason = None
                if max_seq_len is not None and len(item) + max_completion_tokens > max_seq_len:
                    item, reason = None, TOO_LONG
                else:
                    n_tok += len(item)
            else:
                from cookbook.datasets.preferences import normalize_preference_row, render_pair_with_reason, SkipRow
                try:
                    chosen, rejected = normalize_preference_row(row, where)
                    item, reason = render_pair_with_reason(chosen, rejected, tokenizer, max_seq_len)
                except SkipRow as s:
                    item, reason = None, s.reason
                if item is not None:
                    for d in item:
                        a, b = datum_stats(d)
                        n_tok, n_loss = n_tok + a, n_loss + b
        except DataError as e:
            msg = str(e)
            raise DataError(msg if msg.startswith(str(path)) else f"{where}: {msg}") from None
        if reason:
            skipped[reason] += 1
        items.append(item)
    if not any(it is not None for it in items):
        what = {"sft": "assistant messages to train on", "grpo": "a prompt",
                "preference": "chosen and rejected responses that differ"}[kind]
        raise _no_trainable(path, len(raw), skipped, what)
    return Dataset(path=path, kind=kind, rows=[r for _, r in raw], items=items, lines=[n for n, _ in raw],
                   skipped=dict(skipped), num_tokens=n_tok, num_loss_tokens=n_loss)
