"""Evaluation hooks: held-out exact match by greedy sampling (SFT, GRPO; GRPO also the mean reward of sampled
completions), preference accuracy (DPO, ORPO). The loop calls them at step 0 and at the end (and every
`eval_interval` steps), so each run's baseline is measured the same way as its result."""

from __future__ import annotations

from typing import Any, Callable, Optional

from cookbook.client.session import Session
from cookbook.datasets.load import load_rows
from cookbook.datasets.render import render_prompt, stop_token_ids
from cookbook.datasets.rows import resolve_dataset, strip_trailing_assistant


def _target(row: dict[str, Any]) -> str:
    if "ground_truth" in row:
        return str(row["ground_truth"])
    assistant = [m for m in row["messages"] if m["role"] == "assistant"]
    return assistant[-1]["content"] if assistant else ""


def exact_match_eval(session: Session, spec: str, kind: str, max_rows: int, max_tokens: int,
                     reward_fn: Optional[Callable[[str, dict], float]] = None, reward_samples: int = 0,
                     temperature: float = 1.0, top_p: float = 1.0) -> Callable[[Any], dict[str, float]]:
    """`eval/exact_match`: greedy completions from the deployment (after syncing the current weights) compared with
    the row's ground_truth or last assistant message, stripped. With `reward_fn` and `reward_samples` > 0, also
    `eval/reward`: the mean reward of that many completions per prompt sampled as in training (temperature, top_p),
    i.e. what the policy earns on prompts it never trained on."""
    from cookbook.recipes.rewards import exact_match

    rows = load_rows(resolve_dataset(spec), kind)[:max_rows]
    tokenizer = session.tokenizer
    prompts = [render_prompt(strip_trailing_assistant(r["messages"]), tokenizer) for r in rows]
    stops = stop_token_ids(tokenizer)

    def texts(groups: list) -> list[list[str]]:
        return [[tokenizer.decode(c.tokens, skip_special_tokens=True) for c in g] for g in groups]

    def evaluate(loop: Any) -> dict[str, float]:
        loop.ensure_deployment_current()
        greedy = texts(session.sampler.sample_many(prompts, n=1, max_tokens=max_tokens, temperature=0.0,
                                                   stop_token_ids=stops, seed=0))
        hits = [exact_match(g[0], {"ground_truth": _target(r)}) for g, r in zip(greedy, rows)]
        metrics = {"eval/exact_match": sum(hits) / max(len(hits), 1), "eval/rows": len(rows)}
        if reward_fn is not None and reward_samples > 0:
            # A fixed seed: every evaluation of a run draws the same random streams, so changes come from weights.
            sampled = texts(session.sampler.sample_many(prompts, n=reward_samples, max_tokens=max_tokens,
                                                        temperature=temperature, top_p=top_p, stop_token_ids=stops,
                                                        seed=1))
            rewards = [float(reward_fn(t, r)) for g, r in zip(sampled, rows) for t in g]
            metrics["eval/reward"] = sum(rewards) / max(len(rewards), 1)
        return metrics

    return evaluate


def pair_logprobs(client: Any, pairs: list[tuple[Any, Any]], batch_pairs: int = 64) -> list[tuple[float, float]]:
    """Per pair (Σ chosen, Σ rejected) response-token logprobs from `forward` (never accumulates gradients)."""
    out: list[tuple[float, float]] = []
    for start in range(0, len(pairs), batch_pairs):
        datums = [d for pair in pairs[start:start + batch_pairs] for d in pair]
        out += pair_sums(datums, client.forward(datums, "cross_entropy"))
    return out


def pair_sums(datums: list[Any], result: Any) -> list[tuple[float, float]]:
    """(Σ chosen, Σ rejected) response-token logprobs of pairs laid out [c0, r0, c1, r1, ...], from a forward."""
    from cookbook.recipes.losses import sequence_logprob

    sums = [float(sequence_logprob(o["logprobs"].to_torch(), d.loss_fn_inputs["weights"].to_torch()))
            for d, o in zip(datums, result.loss_fn_outputs)]
    return list(zip(sums[0::2], sums[1::2]))


def mean_logprobs(client: Any, pairs: list[tuple[Any, Any]], batch_pairs: int = 64) -> list[tuple[float, float]]:
    """Per pair (mean chosen, mean rejected) response-token logprobs (ORPO's preference score)."""
    sums = pair_logprobs(client, pairs, batch_pairs)
    counts = [(float((c.loss_fn_inputs["weights"].to_torch() > 0).sum()),
               float((r.loss_fn_inputs["weights"].to_torch() > 0).sum())) for c, r in pairs]
    return [(sc / max(nc, 1.0), sr / max(nr, 1.0)) for (sc, sr), (nc, nr) in zip(sums, counts)]


def preference_eval(session: Session, pairs: list[tuple[Any, Any]]) -> Callable[[Any], dict[str, float]]:
    """Held-out preference accuracy, the same for DPO and ORPO: the fraction of pairs whose chosen response the
    policy gives a higher mean per-token logprob than the rejected one (`eval/margin`: the mean difference).

    Why not DPO's implicit reward β·[(π_c − ref_c) − (π_r − ref_r)]: at step 0 the policy is the reference,
    every margin is 0 and that accuracy is 0 by construction, so it cannot serve as a baseline. The policy's own ranking
    is measurable before training and is what a user of the trained model gets."""

    def evaluate(loop: Any) -> dict[str, float]:
        margins = [c - r for c, r in mean_logprobs(session.policy, pairs)]
        return {"eval/preference_accuracy": sum(m > 0 for m in margins) / max(len(margins), 1),
                "eval/margin": sum(margins) / max(len(margins), 1), "eval/pairs": len(pairs)}

    return evaluate
