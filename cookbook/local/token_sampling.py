"""Next-token sampling, shared by the deployment's decode loop and the trainer service's tinker sampling sessions.

One rule for both, so a request samples the same way from either server:

- temperature <= 0 is greedy: the argmax of the raw logits;
- otherwise the logits are divided by the temperature, then top-k keeps the k highest (0 or less: all), then top-p
  keeps the smallest most-probable prefix whose mass reaches top_p: a token stays when the mass of the tokens ranked
  above it is still below top_p, so the most probable token always stays;
- each row draws one uniform number from its own `random.Random` per step and inverts the CDF of what is left, so a
  row's samples depend only on its own seed.

Two logprobs come back per token: `logprobs`, the model's log-softmax at temperature 1 (what the trainer's forward
computes for the same tokens), and `sampling_logprobs`, the log-probability under the distribution actually sampled
from (the behaviour policy an importance-sampling loss needs): 0 for a greedy pick, which is certain.
"""

from __future__ import annotations

import os
import random
from typing import NamedTuple, Sequence

import torch


class PickedTokens(NamedTuple):
    tokens: torch.Tensor  # (B,) token ids
    logprobs: torch.Tensor  # (B,) log-softmax of the logits at temperature 1
    sampling_logprobs: torch.Tensor  # (B,) log-probability under the sampled distribution; 0 when greedy


def row_rng(seed: int | None) -> random.Random:
    """A row's random source: reproducible from `seed`, else seeded by the OS (never by the global RNGs)."""
    return random.Random(seed) if seed is not None else random.Random(os.urandom(8))


def pick_tokens(logits: torch.Tensor, temperatures: Sequence[float] | torch.Tensor,
                top_ps: Sequence[float] | torch.Tensor, top_ks: Sequence[int],
                rngs: Sequence[random.Random]) -> PickedTokens:
    """Pick one token per row of `logits` (B, V, float32) with that row's temperature, top_p, top_k and rng.

    Every row draws from its rng on every call, greedy or not, so a row's stream of draws does not depend on the
    settings it is sampled with.
    """
    temps = torch.as_tensor(temperatures, device=logits.device)
    top_ps = torch.as_tensor(top_ps, device=logits.device)
    greedy = temps <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temps), temps)[:, None]
    if any(k > 0 for k in top_ks):
        V = scaled.shape[-1]
        ks = torch.tensor([k if 0 < k < V else V for k in top_ks], device=scaled.device)
        kth = scaled.sort(-1, descending=True).values.gather(1, (ks - 1)[:, None])
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, -1)
    nucleus = top_ps < 1
    if bool(nucleus.any()):
        sp, idx = probs.sort(-1, descending=True)
        drop = (sp.cumsum(-1) - sp) >= top_ps[:, None]
        sp = sp.masked_fill(drop, 0.0)
        kept = torch.zeros_like(probs).scatter(1, idx, sp)
        # Only the rows that asked for it: renormalising changes the last bits, and a row's numbers must not depend
        # on the other rows it is sampled with.
        probs = torch.where(nucleus[:, None], kept / kept.sum(-1, keepdim=True), probs)
    u = torch.tensor([r.random() for r in rngs], device=probs.device, dtype=probs.dtype)
    cdf = probs.cumsum(-1)
    tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=probs.shape[-1] - 1)[:, 0]
    # Guard against landing on a zero-probability token through float rounding at the CDF's edge.
    zero = probs.gather(1, tok[:, None])[:, 0] <= 0
    tok = torch.where(zero, probs.argmax(-1), tok)
    tok = torch.where(greedy, logits.argmax(-1), tok)
    sampling_lp = torch.log(probs.gather(1, tok[:, None])[:, 0])
    sampling_lp = torch.where(greedy, torch.zeros_like(sampling_lp), sampling_lp)
    logprobs = torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0]
    return PickedTokens(tok, logprobs, sampling_lp)
