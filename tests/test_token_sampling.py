"""The next-token rule shared by the deployment and the trainer's sampling sessions.

The rule is checked against expectations computed here from the distribution itself (ranking, masses above each
token and renormalisation written out in the test); the last tests check that both servers sample by it.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from cookbook.local.token_sampling import pick_tokens, row_rng

# A small known distribution over 6 tokens, deliberately not sorted by token id.
PROBS = [0.0499, 0.30, 0.10, 0.40, 0.15, 0.0001]
DRAWS = 4000


def _logits(probs: list[float], rows: int) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]] * rows, dtype=torch.float32)


def _pick(probs, *, rows=DRAWS, temperature=1.0, top_p=1.0, top_k=0, seed=0):
    rngs = [random.Random(seed * 100_000 + i) for i in range(rows)]
    return pick_tokens(_logits(probs, rows), [temperature] * rows, [top_p] * rows, [top_k] * rows, rngs)


def _kept_by_top_p(probs: list[float], top_p: float) -> dict[int, float]:
    """By hand: rank tokens by probability; a token stays when the mass ranked above it is below top_p."""
    kept, above = {}, 0.0
    for token in sorted(range(len(probs)), key=lambda t: -probs[t]):
        if above < top_p:
            kept[token] = probs[token]
        above += probs[token]
    total = sum(kept.values())
    return {t: p / total for t, p in kept.items()}


@pytest.mark.parametrize("top_p", [0.35, 0.5, 0.75, 0.9, 0.99])
def test_top_p_keeps_tokens_whose_preceding_mass_is_below_top_p(top_p):
    expected = _kept_by_top_p(PROBS, top_p)
    picked = _pick(PROBS, top_p=top_p)
    counts = Counter(picked.tokens.tolist())
    assert set(counts) == set(expected)
    for token, p in expected.items():
        assert counts[token] / DRAWS == pytest.approx(p, abs=0.03)
    for token, slp in zip(picked.tokens.tolist(), picked.sampling_logprobs.tolist()):
        assert slp == pytest.approx(math.log(expected[token]), abs=1e-5)


def test_top_p_boundary_drops_the_token_whose_preceding_mass_equals_top_p():
    # Uniform over 4: each token's probability is exactly 0.25 in float32, so the masses above the ranks are exactly
    # 0, 0.25, 0.5, 0.75. With top_p = 0.5 the third-ranked token has exactly top_p above it, and is dropped.
    picked = _pick([0.25] * 4, top_p=0.5)
    assert len(set(picked.tokens.tolist())) == 2
    assert picked.sampling_logprobs.tolist() == pytest.approx([math.log(0.5)] * DRAWS, abs=1e-6)


def test_top_p_always_keeps_the_most_probable_token():
    picked = _pick(PROBS, rows=50, top_p=1e-6)
    assert set(picked.tokens.tolist()) == {3}
    assert picked.sampling_logprobs.tolist() == pytest.approx([0.0] * 50, abs=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_top_k_keeps_the_k_most_probable(top_k):
    ranked = sorted(range(len(PROBS)), key=lambda t: -PROBS[t])[:top_k]
    total = sum(PROBS[t] for t in ranked)
    picked = _pick(PROBS, top_k=top_k)
    assert set(picked.tokens.tolist()) == set(ranked)
    for token, slp in zip(picked.tokens.tolist(), picked.sampling_logprobs.tolist()):
        assert slp == pytest.approx(math.log(PROBS[token] / total), abs=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_scales_the_sampling_distribution(temperature):
    scaled = [p ** (1 / temperature) for p in PROBS]  # softmax(log p / T) = p^(1/T) / sum
    expected = [s / sum(scaled) for s in scaled]
    picked = _pick(PROBS, temperature=temperature)
    counts = Counter(picked.tokens.tolist())
    for token, p in enumerate(expected):
        assert counts[token] / DRAWS == pytest.approx(p, abs=0.03)
    for token, slp, lp in zip(picked.tokens.tolist(), picked.sampling_logprobs.tolist(), picked.logprobs.tolist()):
        assert slp == pytest.approx(math.log(expected[token]), abs=1e-5)
        assert lp == pytest.approx(math.log(PROBS[token] / sum(PROBS)), abs=1e-5)  # the model's, at temperature 1


def test_greedy_takes_the_argmax_reports_its_temperature_1_logprob_and_a_sampling_logprob_of_0():
    logits = torch.tensor([[0.3, 2.5, -1.0, 2.4], [5.0, 1.0, 0.0, -3.0]])
    picked = pick_tokens(logits, [0.0, 0.0], [0.5, 1.0], [0, 2], [random.Random(1), random.Random(2)])
    assert picked.tokens.tolist() == [1, 0]
    for row, token in enumerate([1, 0]):
        values = logits[row].double().tolist()
        log_z = math.log(sum(math.exp(v) for v in values))
        assert picked.logprobs[row].item() == pytest.approx(values[token] - log_z, abs=1e-6)
    assert picked.sampling_logprobs.tolist() == [0.0, 0.0]


def test_every_row_draws_once_per_pick_even_when_greedy():
    # So a sequence's later samples do not depend on whether earlier steps were greedy.
    rng = random.Random(7)
    pick_tokens(_logits(PROBS, 1), [0.0], [1.0], [0], [rng])
    reference = random.Random(7)
    reference.random()
    assert rng.random() == reference.random()


def test_same_seeds_give_the_same_tokens_and_logprobs():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0)) * 3

    def run():
        return pick_tokens(logits, [0.7] * 8, [0.9] * 8, [20] * 8, [row_rng(100 + i) for i in range(8)])

    a, b = run(), run()
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.sampling_logprobs, b.sampling_logprobs)


def test_a_rows_pick_depends_on_its_own_seed_not_its_batch():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 3
    together = pick_tokens(logits, [1.0] * 6, [1.0] * 6, [0] * 6, [row_rng(i) for i in range(6)])
    for i in range(6):
        alone = pick_tokens(logits[i:i + 1], [1.0], [1.0], [0], [row_rng(i)])
        assert alone.tokens.item() == together.tokens[i].item()
        assert alone.sampling_logprobs.item() == pytest.approx(together.sampling_logprobs[i].item(), abs=1e-6)


def test_an_unseeded_rng_is_not_reproducible():
    assert row_rng(None).random() != row_rng(None).random()
    assert row_rng(5).random() == random.Random(5).random()


# -- both servers use the rule ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def micro():
    from cookbook.models import load_model, load_tokenizer

    return load_model("local-micro", seed=0).eval(), load_tokenizer("local-micro")


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 0.8, 20), (0.0, 1.0, 0)])
def test_trainer_sampling_session_samples_like_the_deployment(micro, temperature, top_p, top_k):
    from cookbook.local.sampling import Engine, SeqRequest
    from cookbook.local.trainer.sampling import SamplingSession

    model, tokenizer = micro
    prompt, n, seed = [10, 20, 30, 40], 3, 5
    session = SamplingSession("s", model, "local-micro", None, tokenizer)
    got = session.sample({"prompt": {"chunks": [{"tokens": prompt}]}, "num_samples": n,
                          "sampling_params": {"max_tokens": 20, "temperature": temperature, "top_p": top_p,
                                              "top_k": top_k, "seed": seed}})["sequences"]
    # The deployment gives choice i of a seeded request the seed `seed + i`.
    seqs = [SeqRequest(prompt=prompt, max_tokens=20, temperature=temperature, top_p=top_p, top_k=top_k,
                       seed=seed + i, stop_ids=frozenset(session.eos_ids)) for i in range(n)]
    Engine(model, tokenizer).generate(seqs)
    for mine, theirs in zip(got, seqs):
        assert mine["tokens"] == theirs.tokens
        assert mine["logprobs"] == pytest.approx(theirs.sampling_logprobs, abs=1e-5)
    if temperature == 0:
        assert all(lp == 0.0 for s in got for lp in s["logprobs"])


def test_trainer_sampling_session_rejects_a_top_p_that_keeps_nothing(micro):
    from cookbook.local.trainer.losses import UserRequestError
    from cookbook.local.trainer.sampling import SamplingSession

    model, tokenizer = micro
    session = SamplingSession("s", model, "local-micro", None, tokenizer)
    with pytest.raises(UserRequestError, match="top_p"):
        session.sample({"prompt": {"chunks": [{"tokens": [1, 2]}]}, "sampling_params": {"top_p": 0.0}})
