"""tinker's JSON datums (`model_input` chunks, `loss_fn_inputs` as TensorData) → tensors, and the built-in losses.

Every loss is a plain sum over tokens of all datums (no normalization): gradient-accumulation normalization happens
at `optim_step`. `count_loss_tokens` says which tokens count for `num_loss_tokens` / `num_sequences`: tokens with a
non-zero weight (CE) or a non-zero advantage (RL losses), i.e. tokens that actually carry gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class UserRequestError(Exception):
    """A bad request from the client; reported as `{"error", "category": "user"}` and the service keeps going."""


_DTYPES = {"int64": torch.int64, "float32": torch.float32}
_INT_KEYS = {"target_tokens"}


@dataclass
class Datum:
    tokens: list[int]
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


def decode_tensor(name: str, td: dict) -> torch.Tensor:
    if not isinstance(td, dict) or "data" not in td:
        raise UserRequestError(f"loss_fn_inputs[{name!r}] is not a TensorData object")
    dtype = _DTYPES.get(td.get("dtype", "float32"))
    if dtype is None:
        raise UserRequestError(f"loss_fn_inputs[{name!r}] has unsupported dtype {td.get('dtype')!r}")
    shape = td.get("shape")
    try:
        data = torch.tensor(td["data"], dtype=dtype)
        if td.get("sparse_crow_indices") is not None:  # CSR: data holds only the non-zeros
            crow = torch.tensor(td["sparse_crow_indices"], dtype=torch.int64)
            col = torch.tensor(td["sparse_col_indices"], dtype=torch.int64)
            data = torch.sparse_csr_tensor(crow, col, data, size=tuple(shape)).to_dense()
        elif shape is not None:
            data = data.reshape(shape)
    except (RuntimeError, TypeError, ValueError) as e:
        raise UserRequestError(f"loss_fn_inputs[{name!r}] is malformed: {e}") from None
    return data


def parse_datums(raw: object, vocab: int, max_len: int) -> list[Datum]:
    if not isinstance(raw, list) or not raw:
        raise UserRequestError("`data` must be a non-empty list of datums")
    out = []
    for i, d in enumerate(raw):
        if not isinstance(d, dict) or not isinstance(d.get("model_input"), dict):
            raise UserRequestError(f"datum {i}: missing `model_input`")
        tokens: list[int] = []
        for chunk in d["model_input"].get("chunks", []):
            if not isinstance(chunk, dict) or chunk.get("type", "encoded_text") != "encoded_text":
                raise UserRequestError(f"datum {i}: only encoded_text chunks are supported by the local trainer")
            toks = chunk.get("tokens")
            if not isinstance(toks, list) or not all(isinstance(t, int) for t in toks):
                raise UserRequestError(f"datum {i}: chunk tokens must be a list of ints")
            tokens.extend(toks)
        if not tokens:
            raise UserRequestError(f"datum {i}: empty model_input")
        if len(tokens) > max_len:
            raise UserRequestError(f"datum {i}: {len(tokens)} tokens exceeds the max context length {max_len}")
        bad = [t for t in tokens if t < 0 or t >= vocab]
        if bad:
            raise UserRequestError(f"datum {i}: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        lfi = d.get("loss_fn_inputs", {})
        if not isinstance(lfi, dict):
            raise UserRequestError(f"datum {i}: `loss_fn_inputs` must be an object")
        inputs = {k: decode_tensor(k, v).reshape(-1) for k, v in lfi.items()}
        for k, v in inputs.items():
            if v.numel() != len(tokens):
                raise UserRequestError(f"datum {i}: loss_fn_inputs[{k!r}] has {v.numel()} values for {len(tokens)} tokens")
        tt = inputs.get("target_tokens")
        if tt is not None:
            inputs["target_tokens"] = tt = tt.long()
            if len(tt) and (int(tt.min()) < 0 or int(tt.max()) >= vocab):
                raise UserRequestError(f"datum {i}: target token outside the vocabulary [0, {vocab})")
        out.append(Datum(tokens, {k: (v if k in _INT_KEYS else v.float()) for k, v in inputs.items()}))
    return out


LOSSES = ("cross_entropy", "importance_sampling", "ppo")


def check_loss(loss_fn: object, data: list[Datum]) -> None:
    if loss_fn not in LOSSES:
        raise UserRequestError(f"unsupported loss_fn {loss_fn!r}; the local trainer implements {', '.join(LOSSES)}")
    need = {"cross_entropy": ["target_tokens"], "importance_sampling": ["target_tokens", "logprobs", "advantages"],
            "ppo": ["target_tokens", "logprobs", "advantages"]}[loss_fn]
    for i, d in enumerate(data):
        missing = [k for k in need if k not in d.inputs]
        if missing:
            raise UserRequestError(f"datum {i}: loss {loss_fn} needs loss_fn_inputs {missing}")


def datum_loss(loss_fn: str, d: Datum, logprobs: torch.Tensor, config: dict | None) -> torch.Tensor:
    """Summed loss of one datum given its target logprobs (with graph)."""
    if loss_fn == "cross_entropy":
        w = d.inputs.get("weights")
        return -(logprobs.sum() if w is None else (logprobs * w).sum())
    ratio = torch.exp(logprobs - d.inputs["logprobs"])
    adv = d.inputs["advantages"]
    if loss_fn == "importance_sampling":
        return -(ratio * adv).sum()
    config = config or {}
    low = float(config.get("clip_low_threshold", 0.8))
    high = float(config.get("clip_high_threshold", 1.2))
    return -torch.minimum(ratio * adv, ratio.clamp(low, high) * adv).sum()


def count_loss_tokens(loss_fn: str, d: Datum) -> int:
    key = "weights" if loss_fn == "cross_entropy" else "advantages"
    v = d.inputs.get(key)
    return len(d.tokens) if v is None else int((v != 0).sum())
