"""The trainer service's built-in RL losses and its loss-token count, against formulas written here.

Driven over HTTP by the official SDK (tinker underneath), like a recipe drives it:
- `importance_sampling` and `ppo`: the loss the service reports is compared with the formula evaluated in plain
  Python (`math.exp`, `min`) on the logprobs it returned, and the weights after one optimizer step with an
  independent torch model stepped by autograd of the same formula;
- gradient-accumulation normalization for RL losses: `num_loss_tokens` divides by the tokens with a non-zero
  advantage and `num_sequences` by the sequences with one, counted here from the inputs;
- a custom loss (`forward_backward_custom`: the SDK sends weights = -dLoss/dlogprobs to the built-in
  cross-entropy) in `num_loss_tokens` and `num_sequences` mode, against torch autograd of the loss divided by the
  count of tokens (sequences) the loss actually depends on.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from tinker import types

from fireworks.training.sdk import FiretitanServiceClient

from cookbook import models
from cookbook.local import snapshots
from trainer_harness import start_trainer

BASE = "local-micro"
SEED = 0
# eps = 1 makes Adam's first update g / (|g| + 1) ~ g: linear in the gradient, so dividing it by the wrong count shows
# (with a small eps the first Adam step is ~ lr * sign(g) and hides the scale).
LR, EPS, WD = 1.0, 1.0, 0.01
LENGTH = 12  # one length for all sequences: the service and the reference see the same batch layout


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    with start_trainer(tmp_path_factory.mktemp("jobs"), "job-losses", BASE, seed=SEED) as t:
        yield t


def new_client(trainer):
    return FiretitanServiceClient(base_url=trainer.base_url, api_key=trainer.api_key).create_training_client(
        base_model=BASE)


def sequences(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(LENGTH + 1)] for _ in range(n)]


def rl_inputs(seqs, seed: int) -> tuple[list[list[float]], list[list[float]]]:
    """Sampling logprobs and advantages. Advantages are zero on a prompt prefix, on the whole of one sequence and on
    a few scattered tokens, so tokens, sequences and loss tokens are three different counts."""
    rng = random.Random(seed)
    old = [[rng.uniform(-6.5, -4.5) for _ in range(LENGTH)] for _ in seqs]  # near log(1/vocab): ratios ~ 0.4..3
    adv = []
    for i, _ in enumerate(seqs):
        a = rng.choice([-1.5, -0.5, 0.7, 1.2])
        row = [0.0] * 4 + [a if rng.random() > 0.2 else 0.0 for _ in range(LENGTH - 4)]
        adv.append([0.0] * LENGTH if i == 1 else row)
    return old, adv


def rl_datum(seq, old, adv):
    return types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]),
                       loss_fn_inputs={"target_tokens": seq[1:], "logprobs": old, "advantages": adv})


def is_loss_math(lps, old, adv) -> float:
    return -sum(math.exp(lp - o) * a for row in zip(lps, old, adv) for lp, o, a in zip(*row))


def ppo_loss_math(lps, old, adv, low, high) -> float:
    total = 0.0
    for row in zip(lps, old, adv):
        for lp, o, a in zip(*row):
            ratio = math.exp(lp - o)
            total -= min(ratio * a, min(max(ratio, low), high) * a)
    return total


def count(adv_or_grad, mode: str) -> float:
    """What the service must divide by, counted from the inputs: tokens or sequences carrying a gradient."""
    if mode == "num_loss_tokens":
        return float(sum(1 for row in adv_or_grad for x in row if x != 0))
    return float(sum(1 for row in adv_or_grad if any(x != 0 for x in row)))


def reference_step(seqs, loss_of_logprobs, divisor: float) -> dict[str, torch.Tensor]:
    """An independent model from the same seed, one AdamW step on autograd of loss / divisor."""
    ref = models.load_model(BASE, seed=SEED)
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, betas=(0.9, 0.95), eps=EPS, weight_decay=WD)
    ids = torch.tensor([s[:-1] for s in seqs])
    logits = ref(input_ids=ids).logits.float()
    lps = torch.log_softmax(logits, -1).gather(-1, torch.tensor([s[1:] for s in seqs])[..., None])[..., 0]
    (loss_of_logprobs(lps) / divisor).backward()
    opt.step()
    return snapshots.canonical_state(ref)


def weights_of(trainer, tc, name) -> dict[str, torch.Tensor]:
    res = tc.save_weights_for_sampler_ext(name, "base")
    return snapshots.apply_snapshot(trainer.store / "sampler" / res.snapshot_name, None, None)


def states_close(a, b, atol=2e-6) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


def check_update(got, seqs, loss, divisor: float, others: list[float]) -> None:
    """The service's weights equal the reference stepped with loss / divisor, and not with any other count."""
    expected = reference_step(seqs, loss, divisor)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=2e-6, rtol=0, msg=k)
    for other in others:
        assert not states_close(got, reference_step(seqs, loss, other)), f"also matches divisor {other}"


def adam():
    return types.AdamParams(learning_rate=LR, beta1=0.9, beta2=0.95, eps=EPS, weight_decay=WD)


# -------------------------------------------------------------------------------------------------------------
CASES = [("importance_sampling", None, "num_loss_tokens", 1), ("importance_sampling", None, "num_sequences", 2),
         ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}, "num_loss_tokens", 3),
         ("ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.3}, "num_sequences", 4)]


@pytest.mark.parametrize("loss_fn, config, mode, seed", CASES)
def test_rl_loss_value_count_and_update_match_independent_formulas(trainer, loss_fn, config, mode, seed):
    seqs = sequences(4, seed=seed)
    old, adv = rl_inputs(seqs, seed=seed)
    data = [rl_datum(s, o, a) for s, o, a in zip(seqs, old, adv)]
    tc = new_client(trainer)

    # The loss the service computes, against the formula on the logprobs it returned (no update yet).
    out = tc.forward(data, loss_fn, config).result()
    lps = [list(o["logprobs"].data) for o in out.loss_fn_outputs]
    if loss_fn == "ppo":
        low, high = config["clip_low_threshold"], config["clip_high_threshold"]
        ratios = [math.exp(lp - o) for row in zip(lps, old) for lp, o in zip(*row)]
        assert any(r < low for r in ratios) and any(r > high for r in ratios)  # both clips are exercised
        expected = ppo_loss_math(lps, old, adv, low, high)
    else:
        expected = is_loss_math(lps, old, adv)
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5, abs=1e-5)

    # One update, normalized by the count of tokens (sequences) with a non-zero advantage.
    divisor = count(adv, mode)
    tc.forward_backward(data, loss_fn, config).result()
    tc.optim_step(adam(), grad_accumulation_normalization=mode).result()
    old_t, adv_t = torch.tensor(old), torch.tensor(adv)

    def loss(lp):
        ratio = torch.exp(lp - old_t)
        if loss_fn == "importance_sampling":
            return -(ratio * adv_t).sum()
        low, high = config["clip_low_threshold"], config["clip_high_threshold"]
        return -torch.minimum(ratio * adv_t, ratio.clamp(low, high) * adv_t).sum()

    others = [float(len(seqs) * LENGTH), count(adv, "num_sequences" if mode == "num_loss_tokens" else
                                              "num_loss_tokens")]
    check_update(weights_of(trainer, tc, f"{loss_fn}-{mode}"), seqs, loss, divisor, others)


@pytest.mark.parametrize("mode", ["num_loss_tokens", "num_sequences"])
def test_custom_loss_is_normalized_by_the_tokens_it_depends_on(trainer, mode):
    seqs = sequences(4, seed=7)
    # The loss depends on the masked tokens only; the third sequence not at all.
    mask = [[0.0] * 3 + [1.0] * 9, [0.0] * 6 + [1.0] * 6, [0.0] * LENGTH, [1.0] * 5 + [0.0] * 7]
    mask_t = torch.tensor(mask)

    def loss_of(lp: torch.Tensor) -> torch.Tensor:  # per-sequence masked sums, a non-linear loss of them
        sums = (lp * mask_t).sum(-1)
        return ((0.05 * sums) ** 2 - sums).sum()

    def loss_fn(data, lps):
        loss = loss_of(torch.stack(lps))
        return loss, {"custom:sum": float(loss.detach())}

    tc = new_client(trainer)
    data = [types.Datum(model_input=types.ModelInput.from_ints(s[:-1]), loss_fn_inputs={"target_tokens": s[1:]})
            for s in seqs]
    lps_at_start = [list(o["logprobs"].data) for o in tc.forward(data, "cross_entropy").result().loss_fn_outputs]
    res = tc.forward_backward_custom(data, loss_fn).result()
    tc.optim_step(adam(), grad_accumulation_normalization=mode).result()
    divisor = count(mask, mode)  # 9 + 6 + 5 tokens, or 3 sequences
    assert divisor == (20.0 if mode == "num_loss_tokens" else 3.0)
    check_update(weights_of(trainer, tc, f"custom-{mode}"), seqs, loss_of, divisor,
                 [float(len(seqs) * LENGTH), count(mask, "num_sequences" if mode == "num_loss_tokens" else
                                                   "num_loss_tokens")])
    assert res.metrics["custom:sum"] == pytest.approx(float(loss_of(torch.tensor(lps_at_start))), rel=1e-5)
