"""Client-side losses against independent plain-python formulas, in every normalization mode.

For each mode we simulate what the trainer does: the SDK sends weights = -dloss/dlogprobs, the server counts
tokens (num_loss_tokens) or sequences (num_sequences) with a non-zero weight and divides the gradient by it at
optim_step. So `loss / N_server` and `grad / N_server` must equal the normalized expectation and its gradient
(finite differences of the reference formula, float64) whatever the mode.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import tinker
import torch

from cookbook.recipes.losses import (
    dpo_loss_fn,
    group_advantages,
    grpo_loss_fn,
    log1mexp,
    log_odds,
    orpo_loss_fn,
    scale_weights_for_builtin_ce,
    sequence_logprob,
    sft_loss_fn,
)

MODES = [None, "num_loss_tokens", "num_sequences"]


def datum(weights):
    n = len(weights)
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(list(range(n))),
        loss_fn_inputs={"target_tokens": tinker.TensorData(data=list(range(1, n + 1)), dtype="int64", shape=[n]),
                        "weights": tinker.TensorData(data=[float(w) for w in weights], dtype="float32", shape=[n])},
    )


def random_masks(rng, n, lo=3, hi=9, prompt=True):
    """0/1 masks: a prompt of zeros then a response of ones (like rendered data), random lengths."""
    out = []
    for _ in range(n):
        p = rng.randint(1, 4) if prompt else 0
        r = rng.randint(lo, hi)
        out.append([0.0] * p + [1.0] * r)
    return out


def random_lps(rng, masks, lo=-4.0, hi=-0.05):
    return [[rng.uniform(lo, hi) for _ in m] for m in masks]


def run(loss_fn, data, lps):
    """(loss, grads, metrics) like the SDK computes them, in float64."""
    tensors = [torch.tensor(lp, dtype=torch.float64, requires_grad=True) for lp in lps]
    loss, metrics = loss_fn(data, tensors)
    loss.backward()
    return float(loss.detach()), [t.grad.detach().numpy().copy() for t in tensors], metrics


def server_count(mode, grads):
    if mode is None:
        return 1.0
    if mode == "num_loss_tokens":
        return float(sum(int((g != 0).sum()) for g in grads))
    return float(sum(1 for g in grads if (g != 0).any()))


def fd_grad(f, lps, h=1e-6):
    """Central finite differences of a plain-python function of the nested logprob lists."""
    grads = []
    for i, seq in enumerate(lps):
        g = []
        for t in range(len(seq)):
            plus = [list(s) for s in lps]
            minus = [list(s) for s in lps]
            plus[i][t] += h
            minus[i][t] -= h
            g.append((f(plus) - f(minus)) / (2 * h))
        grads.append(np.array(g))
    return grads


def check(loss_fn_for_mode, expected, data, lps):
    want = expected(lps)
    want_grad = fd_grad(expected, lps)
    for mode in MODES:
        loss, grads, _ = run(loss_fn_for_mode(mode), data, lps)
        n = server_count(mode, grads)
        assert loss / n == pytest.approx(want, rel=1e-9, abs=1e-9), mode
        for g, w in zip(grads, want_grad):
            np.testing.assert_allclose(g / n, w, atol=1e-6, rtol=0, err_msg=str(mode))


# ----------------------------------------------------------------------------------------------------------------


def test_sft_matches_weighted_mean_in_every_mode():
    rng = random.Random(0)
    masks = random_masks(rng, 5)
    masks[2][0] = 1.0  # a trained token right at the start
    data = [datum(m) for m in masks]
    lps = random_lps(rng, masks)

    def expected(lps):
        num = sum(-lp * w for lp_s, m in zip(lps, masks) for lp, w in zip(lp_s, m))
        return num / sum(sum(m) for m in masks)

    check(lambda mode: sft_loss_fn(raw_sum=mode is not None, normalization=mode), expected, data, lps)


def test_sft_raw_sum_default_is_plain_token_sum():
    rng = random.Random(1)
    masks = random_masks(rng, 3)
    lps = random_lps(rng, masks)
    loss, _, metrics = run(sft_loss_fn(raw_sum=True), [datum(m) for m in masks], lps)
    assert loss == pytest.approx(sum(-lp * w for s, m in zip(lps, masks) for lp, w in zip(s, m)))
    assert metrics["loss_tokens"] == sum(sum(m) for m in masks)


def test_builtin_ce_weights_match_custom_loss():
    rng = random.Random(2)
    masks = random_masks(rng, 4)
    data = [datum(m) for m in masks]
    lps = random_lps(rng, masks)
    for mode in MODES:
        scaled = scale_weights_for_builtin_ce(data, mode)
        builtin = sum(-lp * w for s, d in zip(lps, scaled) for lp, w in zip(s, d.loss_fn_inputs["weights"].tolist()))
        custom, _, _ = run(sft_loss_fn(raw_sum=mode is not None, normalization=mode), data, lps)
        assert builtin == pytest.approx(custom, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------


def grpo_reference(lps, *, adv, old, inf, ref, masks, eps, eps_high, cap, beta):
    total, n = 0.0, 0
    for i, seq in enumerate(lps):
        for t, lp in enumerate(seq):
            if masks[i][t] <= 0:
                continue
            ratio = math.exp(min(max(lp - old[i][t], -20.0), 20.0))
            clipped = min(max(ratio, 1 - eps), 1 + eps_high)
            w = min(max(math.exp(min(max(old[i][t] - inf[i][t], -20.0), 20.0)), 0.0), cap)
            per = max(-ratio * adv[i], -clipped * adv[i]) * w
            if beta > 0:
                d = ref[i][t] - lp
                per += beta * (math.exp(d) - d - 1)
            total += per
            n += 1
    return total / n


@pytest.mark.parametrize("kl_beta", [0.0, 0.05])
def test_grpo_matches_reference_formula_in_every_mode(kl_beta):
    rng = random.Random(3)
    masks = random_masks(rng, 6)
    data = [datum(m) for m in masks]
    lps = random_lps(rng, masks)
    # old policy near the current one, some tokens beyond the clip range on both sides, TIS weights above the cap
    old = [[lp + rng.choice([rng.uniform(-0.1, 0.1), rng.uniform(-0.6, -0.35), rng.uniform(0.35, 0.6)]) for lp in s]
           for s in lps]
    inf = [[o + rng.choice([rng.uniform(-0.3, 0.3), -2.5]) for o in s] for s in old]
    ref = [[lp + rng.uniform(-0.5, 0.5) for lp in s] for s in lps]
    adv = group_advantages([rng.choice([0.0, 1.0, 0.5]) for _ in masks] + [0.0, 1.0])[: len(masks)]
    kw = dict(adv=adv, old=old, inf=inf, ref=ref, masks=masks, eps=0.2, eps_high=0.28, cap=5.0, beta=kl_beta)

    def make(mode):
        return grpo_loss_fn(adv, old, inf, ref if kl_beta else None, masks, eps_clip=0.2, eps_clip_high=0.28,
                            tis_cap=5.0, kl_beta=kl_beta, raw_sum=mode is not None, normalization=mode)

    check(make, lambda x: grpo_reference(x, **kw), data, lps)
    _, _, metrics = run(make(None), data, lps)
    assert 0 < metrics["ppo_clip_frac"] < 1
    assert metrics["active_tokens"] == sum(sum(m) for m in masks)
    assert metrics["tis_capped_frac"] > 0
    assert (metrics["kl"] > 0) == (kl_beta > 0)


def test_grpo_masks_default_to_datum_weights_and_skip_empty_datums():
    rng = random.Random(4)
    masks = random_masks(rng, 3) + [[0.0, 0.0, 0.0]]
    lps = random_lps(rng, masks)
    adv = [1.0, -0.5, 0.3, 2.0]
    a = grpo_loss_fn(adv, lps, lps, None, masks)
    b = grpo_loss_fn(adv, lps, lps, None, None)
    la, ga, ma = run(a, [datum(m) for m in masks], lps)
    lb, gb, mb = run(b, [datum(m) for m in masks], lps)
    assert la == pytest.approx(lb) and ma["active_sequences"] == 3
    # on-policy (old = current): ratio 1, loss = -sum(A * tokens)
    assert la == pytest.approx(-sum(adv[i] * sum(masks[i]) for i in range(4)))
    assert not gb[3].any()


def test_grpo_without_old_logprobs_anchors_on_the_current_policy():
    rng = random.Random(8)
    masks = random_masks(rng, 4)
    data = [datum(m) for m in masks]
    lps = random_lps(rng, masks)
    inf = [[lp + rng.uniform(-0.5, 0.5) for lp in s] for s in lps]
    adv = [1.0, -1.0, 0.5, -0.5]
    for mode in MODES:
        kw = dict(raw_sum=mode is not None, normalization=mode, kl_beta=0.0)
        implicit = run(grpo_loss_fn(adv, None, inf, None, masks, **kw), data, lps)
        explicit = run(grpo_loss_fn(adv, lps, inf, None, masks, **kw), data, lps)
        assert implicit[0] == pytest.approx(explicit[0])
        for a, b in zip(implicit[1], explicit[1]):
            np.testing.assert_allclose(a, b, atol=1e-12)
        assert implicit[2]["ratio_mean"] == pytest.approx(1.0)


def test_group_advantages():
    assert group_advantages([1.0, 1.0, 1.0]) is None
    assert group_advantages([0.0]) is None
    adv = group_advantages([1.0, 0.0, 0.0, 1.0])
    std = np.std([1, 0, 0, 1], ddof=1)
    assert adv == pytest.approx([0.5 / (std + 1e-8), -0.5 / (std + 1e-8)] * 1 + [-0.5 / (std + 1e-8), 0.5 / (std + 1e-8)])
    assert sum(adv) == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------------


def pair_batch(rng, n_pairs):
    masks = random_masks(rng, 2 * n_pairs)
    return masks, [datum(m) for m in masks], random_lps(rng, masks)


def seq_sum(lp, mask):
    return sum(x for x, m in zip(lp, mask) if m > 0)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def test_dpo_matches_reference_formula_in_every_mode():
    rng = random.Random(5)
    n = 4
    masks, data, lps = pair_batch(rng, n)
    ref_c = [rng.uniform(-20, -2) for _ in range(n)]
    ref_r = [rng.uniform(-20, -2) for _ in range(n)]
    beta = 0.1

    def expected(lps):
        total = 0.0
        for p in range(n):
            m = (seq_sum(lps[2 * p], masks[2 * p]) - ref_c[p]) - (seq_sum(lps[2 * p + 1], masks[2 * p + 1]) - ref_r[p])
            total += -log_sigmoid(beta * m)
        return total / n

    check(lambda mode: dpo_loss_fn(ref_c, ref_r, beta, raw_sum=mode is not None, normalization=mode),
          expected, data, lps)
    _, grads, metrics = run(dpo_loss_fn(ref_c, ref_r, beta), data, lps)
    assert metrics["dpo_loss"] == pytest.approx(expected(lps))
    margins = [(seq_sum(lps[2 * p], masks[2 * p]) - ref_c[p]) - (seq_sum(lps[2 * p + 1], masks[2 * p + 1]) - ref_r[p])
               for p in range(n)]
    assert metrics["margin"] == pytest.approx(sum(margins) / n)
    assert metrics["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / n)
    assert metrics["chosen_reward"] == pytest.approx(
        beta * sum(seq_sum(lps[2 * p], masks[2 * p]) - ref_c[p] for p in range(n)) / n)
    # prompt tokens (mask 0) get no gradient: the mask is honoured
    for g, m in zip(grads, masks):
        assert not any(g[t] for t in range(len(m)) if m[t] == 0)


def test_dpo_raw_num_sequences_is_twice_the_pair_sum():
    rng = random.Random(6)
    _, data, lps = pair_batch(rng, 3)
    ref = [-5.0, -6.0, -7.0]
    mean_loss, _, _ = run(dpo_loss_fn(ref, ref, 0.1), data, lps)
    raw, _, _ = run(dpo_loss_fn(ref, ref, 0.1, raw_sum=True), data, lps)
    assert raw == pytest.approx(2 * 3 * mean_loss)


def orpo_reference(lps, masks, lam):
    def l1me(x):
        return math.log(-math.expm1(x)) if x > -math.log(2) else math.log1p(-math.exp(x))

    def lo(avg):
        a = min(max(avg, -50.0), -1e-6)
        return a - l1me(a)

    total = 0.0
    n = len(lps) // 2
    for p in range(n):
        c, r = lps[2 * p], lps[2 * p + 1]
        mc, mr = masks[2 * p], masks[2 * p + 1]
        avg_c = seq_sum(c, mc) / sum(1 for m in mc if m > 0)
        avg_r = seq_sum(r, mr) / sum(1 for m in mr if m > 0)
        total += -avg_c + lam * -log_sigmoid(lo(avg_c) - lo(avg_r))
    return total / n


@pytest.mark.parametrize("lam", [1.0, 0.0])
def test_orpo_matches_reference_formula_in_every_mode(lam):
    rng = random.Random(7)
    masks, data, lps = pair_batch(rng, 4)
    check(lambda mode: orpo_loss_fn(lam, raw_sum=mode is not None, normalization=mode),
          lambda x: orpo_reference(x, masks, lam), data, lps)
    _, _, metrics = run(orpo_loss_fn(lam), data, lps)
    assert set(metrics) >= {"sft_loss", "or_loss", "log_odds_ratio", "accuracy"}


def test_log1mexp_stable_at_extremes():
    x = torch.tensor([-1e-30, -1e-12, -1e-6, -0.5, -math.log(2), -1.0, -30.0, -50.0, -700.0, -1e5],
                     dtype=torch.float64, requires_grad=True)
    y = log1mexp(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    for xi, yi in zip(x.tolist(), y.tolist()):
        # asymptotics: log(1 - e^x) ~ log(-x) as x -> 0-, ~ -e^x as x -> -inf; exact formula in between
        if xi > -1e-6:
            want = math.log(-xi)
        elif xi < -30:
            want = -math.exp(xi)
        else:
            want = math.log(-math.expm1(xi)) if xi > -0.5 else math.log1p(-math.exp(xi))
        assert yi == pytest.approx(want, rel=1e-6, abs=1e-300), xi
    x32 = torch.tensor([-1e-7, -1e-3, -60.0, -1e4], dtype=torch.float32, requires_grad=True)
    lo = log_odds(x32)
    lo.sum().backward()
    assert torch.isfinite(lo).all() and torch.isfinite(x32.grad).all()


def test_orpo_extreme_logprobs_give_finite_loss_and_grads():
    masks = [[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]]
    data = [datum(m) for m in masks]
    for lps in ([[0.0, 0.0, 0.0], [-1e4, -1e4, -1e4]], [[0.0, -1e-9, -1e-12], [0.0, 0.0, 0.0]]):
        loss, grads, _ = run(orpo_loss_fn(1.0), data, lps)
        assert math.isfinite(loss) and all(np.isfinite(g).all() for g in grads)


def test_sequence_logprob_uses_mask():
    lp = torch.tensor([-1.0, -2.0, -3.0])
    assert float(sequence_logprob(lp, torch.tensor([0.0, 1.0, 1.0]))) == -5.0


def test_inconsistent_mode_rejected():
    with pytest.raises(ValueError):
        sft_loss_fn(raw_sum=False, normalization="num_loss_tokens")
    with pytest.raises(ValueError):
        dpo_loss_fn([0.0], [0.0], 0.1, raw_sum=True, normalization="bogus")
