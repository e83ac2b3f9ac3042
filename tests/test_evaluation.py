"""Held-out evaluation at step 0 and at the end: logged by the shared loop, shown by the report.

The step-0 value of a real run is checked against the base model scored here, in-process with torch: it must be
the model before any update, on the same held-out pairs, with the same metric as at the end.
"""

from __future__ import annotations

import json

import torch

from conftest import REPO, prompt_and_answers, run_cli
from cookbook.runs.rundir import read_jsonl
from cookbook import report

ROWS = 40


def eval_pairs(n: int) -> list[tuple[str, str, str]]:
    """(prompt, chosen answer, rejected answer) of the first bundled held-out pairs, read with plain json."""
    out = []
    for line in (REPO / "cookbook" / "datasets" / "bundled" / "pref_eval.jsonl").read_text().splitlines()[:n]:
        prompt, answers = prompt_and_answers(json.loads(line))
        out.append((prompt, answers[0], answers[-1]))  # the best and the worst
    return out


def base_model_preferences(pairs) -> tuple[float, float]:
    """(accuracy, mean margin) of local-tiny's own mean per-token logprob of the answer + end-of-turn token."""
    from cookbook.models import build_tokenizer, load_model

    tok, model = build_tokenizer(), load_model("local-tiny", seed=0)

    @torch.no_grad()
    def mean_logprob(prompt: str, answer: str) -> float:
        context = tok.encode(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
        target = tok.encode(f"{answer}<|im_end|>", add_special_tokens=False)
        logits = model(input_ids=torch.tensor([context + target])).logits[0].float()
        lps = torch.log_softmax(logits[len(context) - 1:-1], -1).gather(-1, torch.tensor(target)[:, None])
        return float(lps.mean())

    margins = [mean_logprob(p, c) - mean_logprob(p, r) for p, c, r in pairs]
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


def test_a_run_logs_its_held_out_baseline_at_step_0_and_its_result_at_the_end(tmp_path):
    run_dir = tmp_path / "run"
    # Trained on the (smaller) validation pairs only to start faster; evaluated on the default held-out pairs.
    result = run_cli("+recipe=orpo", "max_steps=2", "recipe.batch_size=4", "recipe.dataset=bundled:pref_val",
                     f"recipe.max_eval_rows={ROWS}", f"log_path={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    evals = [m for m in metrics if "eval/preference_accuracy" in m]
    assert [m["step"] for m in evals] == [0, 2]
    assert metrics[0] is evals[0] and metrics[-1] is evals[-1]  # the baseline comes before the first step
    assert all(m["eval/pairs"] == ROWS for m in evals)

    accuracy, margin = base_model_preferences(eval_pairs(ROWS))
    assert evals[0]["eval/preference_accuracy"] == accuracy
    assert abs(evals[0]["eval/margin"] - margin) < 1e-4
    assert evals[1]["eval/margin"] != evals[0]["eval/margin"]  # the end is measured on the updated weights
    # The run's closing line puts the two side by side.
    assert (f"eval/preference_accuracy {accuracy:.3f} (step 0) -> {evals[1]['eval/preference_accuracy']:.3f} "
            f"(step 2)") in result.stdout


def test_report_shows_held_out_metrics_at_step_0_and_at_the_end(tmp_path):
    job = tmp_path / "run"
    job.mkdir()
    (job / "status.json").write_text(json.dumps({"status": "ok", "final_metrics": {"steps": 4}}))
    records = [{"step": 0, "eval/exact_match": 0.125, "eval/rows": 8}, {"step": 1, "train/loss": 2.0},
               {"step": 4, "train/loss": 1.0}, {"step": 4, "eval/exact_match": 0.875, "eval/rows": 8}]
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    markdown, _ = report.write_report(job)
    assert "| run | eval/exact_match | 0.125 | 0.875 (step 4) | +0.75 |" in markdown
    assert "eval/rows |" not in markdown.split("Held-out")[1]  # counts are not results

    # A run without a step-0 evaluation (an older run) gets no such section.
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[1:]))
    assert "Held-out" not in report.write_report(job)[0]
