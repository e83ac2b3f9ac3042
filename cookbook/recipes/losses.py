"""Client-side losses for `forward_backward_custom` (tinker 0.23), plus GRPO advantages.

A tinker 0.23 custom loss is ``loss_fn(data, logprobs_list) -> (loss, metrics)``: ``data`` are the datums sent,
``logprobs_list[i]`` is a 1-D tensor of the target-token logprobs of datum i (length T_i, requires grad). The SDK
backpropagates ``loss`` on the client and sends ``weights = -dloss/dlogprobs`` to the server's linear
cross-entropy, so the gradient the trainer accumulates is exactly ``d loss / d params``. Only ``target_tokens`` and
``weights`` may travel in the datums, so per-datum extras (advantages, old/reference logprobs) live in the closure
that each factory below builds.

Normalization: one loss, one scaling
-------------------------------------
Every loss has a *normalized value* L_norm (the quantity we mean to minimize):

    loss  | unit    | L_norm
    ------+---------+------------------------------------------------------------------
    SFT   | token   | sum_t(-lp_t * w_t) / sum_t w_t                       (token mean over the call)
    GRPO  | token   | sum over active tokens of per_token / #active tokens  (token mean)
    DPO   | pair    | mean over pairs of -log sigmoid(beta * margin)
    ORPO  | pair    | mean over pairs of [sft_c + lambda * or]

`optim_step(grad_accumulation_normalization=mode)` divides the accumulated gradient by a count N_mode that the
server takes from the backward datums (whose weights are -dloss/dlogprobs):

    mode              | server divides by (N_mode)                         | the loss returns
    ------------------+----------------------------------------------------+-------------------------------
    None / "none"     | 1                                                  | L_norm
    "num_loss_tokens" | tokens with non-zero weight (= loss tokens)        | L_norm * N_tokens
    "num_sequences"   | sequences with a non-zero weight                   | L_norm * N_sequences

so that ``loss / N_mode == L_norm`` in every mode and the effective gradient is identical whatever the user
configures. For SFT/GRPO with num_loss_tokens this is simply the raw masked token sum; for DPO/ORPO with
num_sequences it is ``2 * sum over pairs`` (both sides of a pair count). The counts are those of the datums of *one call*: the equality is exact when a
step makes one ``forward_backward_custom`` call (what the recipes do); with several calls per step the raw modes
average over the whole step while None sums the per-call values.

The server counts a token when its backward weight (= -gradient) is non-zero. A masked token can have an exactly
zero gradient (a GRPO token whose PPO clip is active with kl_beta = 0, an advantage of 0, an ORPO average clamped
at -50, the rejected side of ORPO with lambda = 0), which would silently shrink the server's count. Each loss
therefore adds a *count anchor* ``1e-30 * sum(mask * (lp - lp.detach()))``: value 0, gradient 1e-30 on every masked
token (representable in float32, invisible next to any real gradient), so the server counts exactly the masked
tokens / sequences the loss scaled for.

Factories take ``raw_sum`` (= `RecipeConfig.raw_sum`) and, to pick the count, ``normalization``
(= `RecipeConfig.normalization`). ``raw_sum=True`` without ``normalization`` means the loss's natural server mode:
"num_loss_tokens" for SFT/GRPO, "num_sequences" for DPO/ORPO.

Datum weights are the raw 0/1 masks written by `cookbook.datasets.load`; the scaling lives here, never in the data.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

LossFn = Callable[[list, list], tuple[torch.Tensor, dict[str, float]]]

_MODES = (None, "num_loss_tokens", "num_sequences")
LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------


def datum_weights(datum, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The datum's `weights` as a 1-D tensor (dtype/device of `like` when given)."""
    w = datum.loss_fn_inputs["weights"].to_torch().reshape(-1)
    if like is not None:
        w = w.to(dtype=like.dtype, device=like.device)
    return w


def sequence_logprob(logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum of the logprobs of the tokens whose weight is > 0 (the response tokens). Differentiable."""
    weights = torch.as_tensor(weights, device=logprobs.device).reshape(-1)
    mask = (weights > 0).to(logprobs.dtype)
    return (logprobs.reshape(-1) * mask).sum()


def sequence_mean_logprob(logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean logprob over the tokens whose weight is > 0 (0 when there are none)."""
    weights = torch.as_tensor(weights, device=logprobs.device).reshape(-1)
    mask = (weights > 0).to(logprobs.dtype)
    return (logprobs.reshape(-1) * mask).sum() / mask.sum().clamp(min=1.0)


def resolve_mode(raw_sum: bool, normalization: Optional[str], natural: str) -> Optional[str]:
    """The server normalization mode the loss must scale for (None = the loss normalizes itself)."""
    if normalization == "none":
        normalization = None
    if normalization not in _MODES:
        raise ValueError(f"unknown normalization {normalization!r}; use one of {_MODES}")
    if normalization is not None and not raw_sum:
        raise ValueError(f"normalization={normalization!r} means the server normalizes, so raw_sum must be True")
    if raw_sum and normalization is None:
        return natural
    return normalization


def _scale(mode: Optional[str], n_units: float, n_tokens: float, n_sequences: float) -> float:
    """Factor turning a sum over `n_units` units into the value to return (see the module docstring)."""
    n_units = max(n_units, 1.0)
    if mode is None:
        return 1.0 / n_units
    if mode == "num_loss_tokens":
        return n_tokens / n_units
    return n_sequences / n_units


COUNT_ANCHOR = 1e-30


def _anchor(lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero-valued term whose gradient is COUNT_ANCHOR on every masked token (see the module docstring)."""
    return COUNT_ANCHOR * ((lp.reshape(-1) - lp.detach().reshape(-1)) * (mask.reshape(-1) > 0).to(lp.dtype)).sum()


def _f(x: torch.Tensor | float) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def _as_tensor(values, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(-1)


# ----------------------------------------------------------------------------------------------------------------
# SFT
# ----------------------------------------------------------------------------------------------------------------


def sft_loss_fn(raw_sum: bool = False, normalization: Optional[str] = None) -> LossFn:
    """Weighted cross-entropy. L_norm = sum(-lp * w) / sum(w) over the datums of the call."""
    mode = resolve_mode(raw_sum, normalization, "num_loss_tokens")

    def loss_fn(data, logprobs_list):
        total = logprobs_list[0].new_zeros(())
        anchor = logprobs_list[0].new_zeros(())
        w_sum, n_tok, n_seq = 0.0, 0.0, 0.0
        for datum, lp in zip(data, logprobs_list, strict=True):
            w = datum_weights(datum, lp)
            total = total + (-lp.reshape(-1) * w).sum()
            anchor = anchor + _anchor(lp, w)
            w_sum += float(w.sum())
            nz = float((w != 0).sum())
            n_tok += nz
            n_seq += 1.0 if nz > 0 else 0.0
        loss = total * _scale(mode, w_sum, n_tok, n_seq) + anchor
        return loss, {"sft_loss": _f(total) / max(w_sum, 1.0), "loss_tokens": n_tok, "sequences": n_seq}

    return loss_fn


def scale_weights_for_builtin_ce(datums: Sequence, normalization: Optional[str]) -> list:
    """Datums whose weights make the server's built-in `cross_entropy` equal `sft_loss_fn` for that mode.

    The built-in loss is sum(-lp * w) and the server then divides by N_mode, so weights are multiplied by
    N_mode / sum(w). Use it to train SFT with one `forward_backward` request instead of the two of a custom loss.
    In numpy, not torch: it runs in the driver on every SFT step, and per-tensor torch calls on 64 short rows cost
    ~1.6 ms of CPU a step that the trainer's compute would otherwise use (~0.4 ms this way).
    """
    import numpy as np
    import tinker

    mode = None if normalization in (None, "none") else normalization
    ws = [d.loss_fn_inputs["weights"].to_numpy().reshape(-1).astype(np.float32, copy=False) for d in datums]
    nonzero = [int(np.count_nonzero(w)) for w in ws]
    factor = np.float32(_scale(mode, float(sum(w.sum(dtype=np.float64) for w in ws)), float(sum(nonzero)),
                               float(sum(1 for n in nonzero if n))))
    out = []
    for d, w in zip(datums, ws):
        inputs = dict(d.loss_fn_inputs)
        inputs["weights"] = tinker.TensorData.from_numpy(w * factor)
        out.append(tinker.Datum(model_input=d.model_input, loss_fn_inputs=inputs))
    return out


# ----------------------------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------------------------


def group_advantages(rewards: Sequence[float]) -> Optional[list[float]]:
    """Group z-score ``(r - mean) / (std_unbiased + 1e-8)``; None when the group has no signal (drop it).

    A group whose rewards are all equal (or a group of one) gives no learning signal: returns None.
    """
    r = [float(x) for x in rewards]
    if len(r) < 2 or len(set(r)) <= 1 or not all(math.isfinite(x) for x in r):
        return None
    mean = sum(r) / len(r)
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / (len(r) - 1))
    if std < 1e-8:
        return None
    return [(x - mean) / (std + 1e-8) for x in r]


def grpo_loss_fn(
    advantages: Sequence[float],
    old_logprobs: Optional[Sequence[Sequence[float]]],
    inference_logprobs: Sequence[Sequence[float]],
    ref_logprobs: Optional[Sequence[Sequence[float]]],
    masks: Optional[Sequence[Sequence[float]]] = None,
    eps_clip: float = 0.2,
    eps_clip_high: Optional[float] = None,
    tis_cap: float = 5.0,
    kl_beta: float = 0.0,
    raw_sum: bool = True,
    normalization: Optional[str] = None,
) -> LossFn:
    """PPO-clipped policy-gradient loss with truncated importance sampling and a k3 KL penalty.

    Per datum i (all sequences aligned with its target tokens, length T_i; ``masks[i]`` marks completion tokens,
    None = the datum weights > 0; ``advantages[i]`` is one scalar per completion). ``old_logprobs=None`` anchors
    on the current policy (old = lp detached: ratio 1 with the policy-gradient slope, TIS between the current
    policy and the sampler), which is exact for one optimizer step per batch and saves the old-policy forward:

        ratio     = exp(clamp(lp - old, -20, 20));   clipped = clamp(ratio, 1 - eps_clip, 1 + (eps_clip_high or eps_clip))
        tis       = clamp(exp(clamp(old - inf, -20, 20)), 0, tis_cap)       (constant; 1 off the mask)
        kl        = exp(ref - lp) - (ref - lp) - 1                            (only when kl_beta > 0)
        per_token = max(-ratio * A, -clipped * A) * tis + kl_beta * kl
        L_norm    = sum over active tokens of per_token / #active tokens
    """
    high = eps_clip if eps_clip_high is None else eps_clip_high
    mode = resolve_mode(raw_sum, normalization, "num_loss_tokens")
    if kl_beta > 0 and ref_logprobs is None:
        raise ValueError("grpo_loss_fn: kl_beta > 0 needs ref_logprobs")
    n = len(advantages)
    for name, seq in (("old_logprobs", old_logprobs), ("inference_logprobs", inference_logprobs),
                      ("ref_logprobs", ref_logprobs), ("masks", masks)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"grpo_loss_fn: {name} has {len(seq)} entries for {n} advantages")

    def loss_fn(data, logprobs_list):
        if len(data) != n:
            raise ValueError(f"grpo_loss_fn built for {n} datums, called with {len(data)}")
        total = logprobs_list[0].new_zeros(())
        anchor = logprobs_list[0].new_zeros(())
        n_tok = n_seq = 0.0
        clip_n = ratio_s = kl_s = tis_s = tis_capped = 0.0
        for i, (datum, lp) in enumerate(zip(data, logprobs_list, strict=True)):
            lp = lp.reshape(-1)
            mask = (_as_tensor(masks[i], lp) if masks is not None else datum_weights(datum, lp)) > 0
            m = mask.to(lp.dtype)
            n_active = float(m.sum())
            anchor = anchor + _anchor(lp, m)  # also keeps every logprob in the graph (the SDK needs a grad)
            if n_active == 0:
                continue
            old = lp.detach() if old_logprobs is None else _as_tensor(old_logprobs[i], lp)
            inf = _as_tensor(inference_logprobs[i], lp)
            if not (old.numel() == inf.numel() == lp.numel() == m.numel()):
                raise ValueError(f"grpo_loss_fn: datum {i} has mismatched lengths "
                                 f"(logprobs {lp.numel()}, old {old.numel()}, inference {inf.numel()}, mask {m.numel()})")
            adv = float(advantages[i])
            ratio = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
            clipped = torch.clamp(ratio, 1.0 - eps_clip, 1.0 + high)
            pg = torch.maximum(-ratio * adv, -clipped * adv)
            raw_tis = torch.exp(torch.clamp(old - inf, -20.0, 20.0))
            tis = torch.where(mask, torch.clamp(raw_tis, 0.0, tis_cap), torch.ones_like(raw_tis))
            per_token = pg * tis
            if kl_beta > 0:
                ref = _as_tensor(ref_logprobs[i], lp)
                d = ref - lp
                kl = torch.exp(d) - d - 1.0
                per_token = per_token + kl_beta * kl
                kl_s += float((kl.detach() * m).sum())
            total = total + (per_token * m).sum()
            n_tok += n_active
            n_seq += 1.0
            with torch.no_grad():
                clip_n += float((((-clipped * adv) > (-ratio * adv)) & mask).sum())
                ratio_s += float((ratio * m).sum())
                tis_s += float((tis * m).sum())
                tis_capped += float(((raw_tis > tis_cap) & mask).sum())
        loss = total * _scale(mode, n_tok, n_tok, n_seq) + anchor
        d = max(n_tok, 1.0)
        metrics = {
            "pg_loss": _f(total) / d,
            "ppo_clip_frac": clip_n / d,
            "ratio_mean": ratio_s / d,
            "kl": kl_s / d,
            "tis_weight_mean": tis_s / d,
            "tis_capped_frac": tis_capped / d,
            "active_tokens": n_tok,
            "active_sequences": n_seq,
        }
        return loss, metrics

    return loss_fn


# ----------------------------------------------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------------------------------------------


def _pairs(data, logprobs_list, name: str):
    if len(data) % 2:
        raise ValueError(f"{name}: datums must be laid out [c0, r0, c1, r1, ...]; got an odd count {len(data)}")
    for k in range(0, len(data), 2):
        yield k // 2, (data[k], logprobs_list[k]), (data[k + 1], logprobs_list[k + 1])


def dpo_loss_fn(
    ref_chosen_logps: Sequence[float],
    ref_rejected_logps: Sequence[float],
    beta: float,
    raw_sum: bool = False,
    normalization: Optional[str] = None,
) -> LossFn:
    """DPO over a batch laid out [c0, r0, c1, r1, ...].

    Sequence logps are sums over response tokens (datum weights > 0) -- the mask is honoured, unlike the reference
    implementation. ``ref_*_logps[p]`` are the reference model's sequence logps (see `sequence_logprob`).
    margin = (pi_c - ref_c) - (pi_r - ref_r); loss_pair = -log sigmoid(beta * margin); L_norm = mean over pairs.
    """
    mode = resolve_mode(raw_sum, normalization, "num_sequences")
    n_pairs = len(ref_chosen_logps)
    if len(ref_rejected_logps) != n_pairs:
        raise ValueError("dpo_loss_fn: ref_chosen_logps and ref_rejected_logps differ in length")

    def loss_fn(data, logprobs_list):
        if len(data) != 2 * n_pairs:
            raise ValueError(f"dpo_loss_fn built for {n_pairs} pairs ({2 * n_pairs} datums), got {len(data)} datums")
        total = logprobs_list[0].new_zeros(())
        anchor = logprobs_list[0].new_zeros(())
        n_tok = 0.0
        margins, chosen_r, rejected_r = [], [], []
        for p, (dc, lpc), (dr, lpr) in _pairs(data, logprobs_list, "dpo_loss_fn"):
            wc, wr = datum_weights(dc, lpc), datum_weights(dr, lpr)
            pi_c, pi_r = sequence_logprob(lpc, wc), sequence_logprob(lpr, wr)
            c = pi_c - float(ref_chosen_logps[p])
            r = pi_r - float(ref_rejected_logps[p])
            margin = c - r
            total = total + torch.nn.functional.softplus(-beta * margin)
            anchor = anchor + _anchor(lpc, wc) + _anchor(lpr, wr)
            n_tok += float((wc > 0).sum() + (wr > 0).sum())
            margins.append(_f(margin))
            chosen_r.append(beta * _f(c))
            rejected_r.append(beta * _f(r))
        loss = total * _scale(mode, n_pairs, n_tok, 2.0 * n_pairs) + anchor
        d = max(n_pairs, 1)
        metrics = {
            "dpo_loss": _f(total) / d,
            "margin": sum(margins) / d,
            "accuracy": sum(1.0 for m in margins if m > 0) / d,
            "chosen_reward": sum(chosen_r) / d,
            "rejected_reward": sum(rejected_r) / d,
            "pairs": float(n_pairs),
        }
        return loss, metrics

    return loss_fn


# ----------------------------------------------------------------------------------------------------------------
# ORPO
# ----------------------------------------------------------------------------------------------------------------


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012); finite values and gradients for x < 0."""
    x = torch.as_tensor(x)
    near = x > -LN2
    # Feed each branch only inputs it handles well, so the unused branch of `where` cannot produce inf/nan grads.
    x_near = torch.where(near, x, torch.full_like(x, -LN2))
    x_far = torch.where(near, torch.full_like(x, -LN2), x)
    return torch.where(near, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def log_odds(avg_logprob: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(avg_logprob), after clamping the average to [-50, -1e-6]."""
    a = torch.clamp(avg_logprob, -50.0, -1e-6)
    return a - log1mexp(a)


def orpo_loss_fn(orpo_lambda: float, raw_sum: bool = False, normalization: Optional[str] = None) -> LossFn:
    """ORPO over a batch laid out [c0, r0, c1, r1, ...]; no reference model.

    Per pair: avg_x = mean logprob over the response tokens (weights > 0) of side x;
    sft = -avg_c; or = -log sigmoid(log_odds(avg_c) - log_odds(avg_r)); pair = sft + lambda * or.
    L_norm = mean over pairs (the reference returns the sum, which ties the step size to the batch size).
    """
    mode = resolve_mode(raw_sum, normalization, "num_sequences")

    def loss_fn(data, logprobs_list):
        n_pairs = len(data) // 2
        total = logprobs_list[0].new_zeros(())
        anchor = logprobs_list[0].new_zeros(())
        n_tok = 0.0
        sft_s = or_s = lor_s = acc = 0.0
        for _, (dc, lpc), (dr, lpr) in _pairs(data, logprobs_list, "orpo_loss_fn"):
            wc, wr = datum_weights(dc, lpc), datum_weights(dr, lpr)
            avg_c, avg_r = sequence_mean_logprob(lpc, wc), sequence_mean_logprob(lpr, wr)
            sft = -avg_c
            lor = log_odds(avg_c) - log_odds(avg_r)
            or_term = torch.nn.functional.softplus(-lor)
            total = total + sft + orpo_lambda * or_term
            anchor = anchor + _anchor(lpc, wc) + _anchor(lpr, wr)
            n_tok += float((wc > 0).sum() + (wr > 0).sum())
            sft_s += _f(sft)
            or_s += _f(or_term)
            lor_s += _f(lor)
            acc += 1.0 if _f(lor) > 0 else 0.0
        loss = total * _scale(mode, n_pairs, n_tok, 2.0 * n_pairs) + anchor
        d = max(n_pairs, 1)
        metrics = {
            "orpo_loss": _f(total) / d,
            "sft_loss": sft_s / d,
            "or_loss": or_s / d,
            "log_odds_ratio": lor_s / d,
            "accuracy": acc / d,
            "pairs": float(n_pairs),
        }
        return loss, metrics

    return loss_fn
