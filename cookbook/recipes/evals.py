"""Evaluation hooks: held-out exact match by greedy sampling (SFT, GRPO), preference accuracy (DPO, ORPO)."""

from __future__ import annotations

from typing import Any, Callable, Optional

from cookbook.data import load_rows, render_prompt, resolve_dataset, stop_token_ids, strip_trailing_assistant


def _target(row: dict[str, Any]) -> str:
    if "ground_truth" in row:
        return str(row["ground_truth"])
    assistant = [m for m in row["messages"] if m["role"] == "assistant"]
    return assistant[-1]["content"] if assistant else ""


def exact_match_eval(session: Any, spec: str, kind: str, max_rows: int, max_tokens: int,
                     reward_fn: Optional[Callable[[str, dict], float]] = None) -> Callable[[Any], dict[str, float]]:
    """Greedy completions from the deployment after syncing the current weights; mean reward (default: exact match
    of the stripped completion against the row's last assistant message or ground_truth)."""
    from cookbook.rewards import exact_match

    rows = load_rows(resolve_dataset(spec), kind)[:max_rows]
    tokenizer = session.tokenizer
    prompts = [render_prompt(strip_trailing_assistant(r["messages"]), tokenizer) for r in rows]
    stops = stop_token_ids(tokenizer)
    score = reward_fn or (lambda text, row: exact_match(text, {"ground_truth": _target(row)}))

    def evaluate(loop: Any) -> dict[str, float]:
        loop.ensure_deployment_current()
        groups = session.sampler.sample_many(prompts, n=1, max_tokens=max_tokens, temperature=0.0,
                                             stop_token_ids=stops, seed=0)
        texts = [tokenizer.decode(g[0].tokens, skip_special_tokens=True) for g in groups]
        scores = [score(t, r) for t, r in zip(texts, rows)]
        return {"eval/exact_match": sum(scores) / max(len(scores), 1), "eval/rows": len(rows)}

    return evaluate


def sequence_logprobs(client: Any, pairs: list[tuple[Any, Any]], batch_pairs: int = 64) -> list[tuple[float, float]]:
    """Per pair (Σ chosen, Σ rejected) response-token logprobs from `forward` (never accumulates gradients)."""
    from cookbook.losses import sequence_logprob

    out: list[tuple[float, float]] = []
    for start in range(0, len(pairs), batch_pairs):
        datums = [d for pair in pairs[start:start + batch_pairs] for d in pair]
        result = client.forward(datums, "cross_entropy")
        sums = [float(sequence_logprob(o["logprobs"].to_torch(), d.loss_fn_inputs["weights"].to_torch()))
                for d, o in zip(datums, result.loss_fn_outputs)]
        out += list(zip(sums[0::2], sums[1::2]))
    return out


def mean_logprobs(client: Any, pairs: list[tuple[Any, Any]], batch_pairs: int = 64) -> list[tuple[float, float]]:
    """Per pair (mean chosen, mean rejected) response-token logprobs (ORPO's preference score)."""
    sums = sequence_logprobs(client, pairs, batch_pairs)
    counts = [(float((c.loss_fn_inputs["weights"].to_torch() > 0).sum()),
               float((r.loss_fn_inputs["weights"].to_torch() > 0).sum())) for c, r in pairs]
    return [(sc / max(nc, 1.0), sr / max(nr, 1.0)) for (sc, sr), (nc, nr) in zip(sums, counts)]


def preference_eval(session: Any, pairs: list[tuple[Any, Any]], reference: Optional[list[tuple[float, float]]],
                    beta: float = 1.0) -> Callable[[Any], dict[str, float]]:
    """Held-out preference accuracy: DPO's implicit reward margin (with reference logprobs) or, without a reference,
    ORPO's length-normalized logprob margin."""

    def evaluate(loop: Any) -> dict[str, float]:
        if reference is not None:
            policy = sequence_logprobs(session.policy, pairs)
            margins = [(pc - rc) - (pr - rr) for (pc, pr), (rc, rr) in zip(policy, reference)]
            margins = [beta * m for m in margins]
        else:
            margins = [c - r for c, r in mean_logprobs(session.policy, pairs)]
        return {"eval/preference_accuracy": sum(m > 0 for m in margins) / max(len(margins), 1),
                "eval/margin": sum(margins) / max(len(margins), 1), "eval/pairs": len(pairs)}

    return evaluate
