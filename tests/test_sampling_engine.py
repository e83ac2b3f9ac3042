"""The deployment's decode engine (cookbook.local.sampling, cookbook.local.decoder), in process.

A sequence decodes to the same tokens and logprobs, bit for bit, alone or among others of any lengths, admitted
together or while others are halfway through; its logprobs are the model's own forward's; the batcher admits a
request while others decode; a weight swap never lands in the middle of a sequence.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import torch

from cookbook.local.sampling import Batcher, Engine, SeqRequest
from cookbook.local.snapshots import canonical_state, load_state_into
from cookbook.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return load_model("local-tiny", seed=0), load_tokenizer("local-tiny")


def request(prompt_len: int, max_tokens: int, seed: int, **kw) -> SeqRequest:
    rng = random.Random(seed)
    return SeqRequest(prompt=[rng.randrange(256) for _ in range(prompt_len)], max_tokens=max_tokens, seed=seed, **kw)


def outputs(s: SeqRequest) -> tuple:
    return s.tokens, s.logprobs, s.sampling_logprobs, s.prompt_logprobs, s.finish_reason


def others(count: int, seed: int) -> list[SeqRequest]:
    """Neighbours of every shape: short and long prompts (attention spans of 64 to 256 positions), short and long
    completions, other sampling settings, echo."""
    rng = random.Random(seed)
    return [request(rng.choice([1, 5, 17, 40, 90, 150]), rng.choice([1, 3, 20, 60]), 1000 + i,
                    temperature=rng.choice([0.0, 0.7, 1.0]), top_p=rng.choice([1.0, 0.9]),
                    top_k=rng.choice([0, 20]), echo=rng.random() < 0.3) for i in range(count)]


def test_a_sequence_decodes_bit_for_bit_the_same_alone_and_among_others(tiny):
    model, tokenizer = tiny
    target = dict(prompt_len=23, max_tokens=40, seed=7, echo=True)
    alone = request(**target)
    Engine(model, tokenizer).generate([alone])
    assert len(alone.tokens) == 40

    together = request(**target)  # admitted with 40 others, in the middle of them
    crowd = others(40, seed=1)
    Engine(model, tokenizer).generate(crowd[:20] + [together] + crowd[20:])
    assert outputs(together) == outputs(alone)

    late = request(**target)  # admitted while 63 others are part-way through, into a busy chunk
    engine, crowd = Engine(model, tokenizer), others(70, seed=2)
    for s in crowd[:63]:
        engine.admit(s)
    for _ in range(4):
        engine.step()
    engine.generate([late] + crowd[63:])
    assert outputs(late) == outputs(alone)


def test_samples_of_one_prompt_decode_as_if_each_ran_alone(tiny):
    """A request's n samples share one prefill (the others get a copy of its cache): each equals its seed alone."""
    model, tokenizer = tiny
    prompt = request(37, 1, 7).prompt

    def sample(seed: int, echo: bool = False) -> SeqRequest:
        return SeqRequest(prompt=list(prompt), max_tokens=30, seed=seed, echo=echo)

    group = [sample(seed, echo=seed == 2) for seed in (1, 2, 3, 4)] + others(5, seed=3)
    Engine(model, tokenizer).generate(group)
    for s in group[:4]:
        alone = sample(s.seed, s.echo)
        Engine(model, tokenizer).generate([alone])
        assert outputs(s) == outputs(alone)
    assert len({tuple(s.tokens) for s in group[:4]}) > 1  # different seeds, different samples


def test_logprobs_are_the_models_own_forward(tiny):
    model, tokenizer = tiny
    seqs = [request(31, 24, 3, echo=True), request(5, 30, 4, temperature=0.8), request(120, 10, 5)]
    Engine(model, tokenizer).generate(seqs)
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s.prompt + s.tokens])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            reference = logp[:-1].gather(1, ids[0, 1:, None])[:, 0]
            n = len(s.prompt)
            torch.testing.assert_close(torch.tensor(s.logprobs), reference[n - 1:], atol=1e-5, rtol=0)
            if s.echo:
                torch.testing.assert_close(torch.tensor(s.prompt_logprobs), reference[:n - 1], atol=1e-5, rtol=0)


def test_the_context_bounds_a_completion_and_max_tokens_zero_echoes_only(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    full = request(engine.max_positions - 3, 50, 1)
    echo_only = request(12, 0, 2, echo=True)
    nothing = request(12, 0, 3)
    engine.generate([full, echo_only, nothing])
    assert len(full.tokens) == 3 and full.finish_reason == "length"
    assert echo_only.tokens == [] and len(echo_only.prompt_logprobs) == 11
    assert nothing.tokens == [] and nothing.finish_reason == "length"


def run_batcher(batcher: Batcher, jobs):
    """Submit `jobs` ((delay before submitting, seqs)) concurrently; the seqs in the order their requests finished."""
    order = []

    async def one(delay, seqs):
        await asyncio.sleep(delay)
        await batcher.submit(seqs)
        order.append(seqs)

    async def main():
        await asyncio.gather(*(one(d, s) for d, s in jobs))

    asyncio.run(main())
    return order


def test_the_batcher_admits_a_request_while_another_decodes(tiny):
    model, tokenizer = tiny
    batcher = Batcher(Engine(model, tokenizer))
    long, short = [request(10, 400, 1)], [request(10, 5, 2)]
    order = run_batcher(batcher, [(0.0, long), (0.2, short)])
    assert order == [short, long]  # the short one did not wait for the long one to finish
    assert short[0].batch_size == 2 and short[0].queue_s < 0.2
    reference = request(10, 5, 2)
    Engine(model, tokenizer).generate([reference])
    assert outputs(short[0]) == outputs(reference)


def test_a_weight_swap_never_lands_inside_a_sequence(tiny):
    model, tokenizer = tiny
    old_state = {k: v.clone() for k, v in canonical_state(model).items()}
    new_state = canonical_state(load_model("local-tiny", seed=1))
    try:
        engine = Engine(model, tokenizer)
        batcher = Batcher(engine)
        before, after = [request(10, 300, 1)], [request(10, 300, 1)]
        swapped = threading.Event()

        def swap_later():
            time.sleep(0.2)  # the first request is decoding by now
            batcher.swap(lambda: load_state_into(model, new_state))
            swapped.set()

        threading.Thread(target=swap_later, daemon=True).start()
        run_batcher(batcher, [(0.0, before), (0.3, after)])
        assert swapped.is_set()
        expected_old, expected_new = request(10, 300, 1), request(10, 300, 1)
        Engine(model, tokenizer).generate([expected_new])
        load_state_into(model, old_state)
        Engine(model, tokenizer).generate([expected_old])
        assert outputs(before[0]) == outputs(expected_old)  # all of it on the old weights
        assert outputs(after[0]) == outputs(expected_new)  # all of it on the new ones
    finally:
        load_state_into(model, old_state)
