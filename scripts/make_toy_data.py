"""Write the bundled toy datasets (`cookbook/datasets/bundled/*.jsonl`) and the bad-input corpus (`tests/data/bad/`).

    python scripts/make_toy_data.py            # deterministic: same seed → byte-identical files

Task family: two-digit addition with fixed-width numbers, "07+35=" → "042" (0 <= a, b <= 99: 10,000 problems), so a
model can only score on problems it never saw by learning to add, not by remembering a table. Fixed width because
local-tiny learns it reliably: with unpadded numbers ("7+35=" → "42") the same recipe reached 0.93-0.99 held-out
exact match on some seeds and stayed under 0.6 on others within the same number of steps (the digits it must
align move around), which would make a learning proof a coin toss.

Splits, disjoint in the prompt (a test re-checks this on the written files):
- eval (~1,000 problems): what the learning proofs and every recipe's `eval_dataset` score. Used for nothing else.
- val (~1,000 problems): what the recipe defaults were chosen on (scripts/learning_curves.py --split val), so the
  proofs do not score the rows the hyperparameters were tuned on.
- train (the other 8,000): every training file, and the SFT warm start GRPO begins from (`warmstart:arith`). GRPO's
  file holds the first 2,000 of them: its default run is one pass of ~100 steps (16 prompts a step, plus refills).
The split is by unordered pair {a, b}: "12+34=" and "34+12=" always land in the same split, so commutativity cannot
leak an eval answer into training.

Preference pairs reject a wrong sum drawn uniformly from the other values (000-198), in the same format, so the
two responses differ only in value. Harder negatives were tried on the val split and cost DPO from random init more
steps than the learning suite's budget: with one digit changed it still ranked the units digit right only 61 % of
the time after 500 steps (0.86-0.91 held-out accuracy overall), and with a carry error (10 or 100 off) it reached
~0.7 after 200 steps.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "cookbook" / "datasets" / "bundled"
BAD = ROOT / "tests" / "data" / "bad"
MAX_OPERAND = 99
EVAL_PROBLEMS = VAL_PROBLEMS = 1000
GRPO_TRAIN_PROBLEMS = 2000


def dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def write(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"{path.relative_to(ROOT)}: {len(rows)} rows, {path.stat().st_size / 1024:.1f} KB")


def user(a: int, b: int) -> dict:
    return {"role": "user", "content": f"{a:02d}+{b:02d}="}


def answer(a: int, b: int) -> str:
    return f"{a + b:03d}"


def assistant(text) -> dict:
    return {"role": "assistant", "content": str(text)}


def sft_row(a, b):
    return {"messages": [user(a, b), assistant(answer(a, b))]}


def grpo_row(a, b):
    return {"messages": [user(a, b)], "ground_truth": answer(a, b)}


def wrong(rng: random.Random, a: int, b: int) -> str:
    """A wrong sum: any other value two two-digit numbers can add up to, in the same three-digit format."""
    return f"{rng.choice([c for c in range(2 * MAX_OPERAND + 1) if c != a + b]):03d}"


def pref_row(rng: random.Random, a: int, b: int, schema: str) -> dict:
    good, bad = answer(a, b), wrong(rng, a, b)
    if schema == "a":
        return {"chosen": {"messages": [user(a, b), assistant(good)]},
                "rejected": {"messages": [user(a, b), assistant(bad)]}}
    if schema == "b":
        samples = [{"messages": [user(a, b), assistant(good)], "score": 1.0},
                   {"messages": [user(a, b), assistant(bad)], "evals": {"score": 0.0}}]
        rng.shuffle(samples)
        return {"samples": samples}
    return {"input": {"messages": [user(a, b)]}, "preferred_output": [assistant(good)],
            "non_preferred_output": [assistant(bad)]}


def schema_for(i: int) -> str:
    return "b" if i % 20 == 7 else "c" if i % 20 == 13 else "a"  # ~5 % each of (b) and (c)


def split_problems(rng: random.Random) -> dict[str, list[tuple[int, int]]]:
    """Ordered problems per split; both orders of an unordered pair go to the same split. A pair that would overfill
    eval or val (by one) goes to the next split, so those hold exactly EVAL_PROBLEMS and VAL_PROBLEMS problems."""
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(a, MAX_OPERAND + 1)]
    rng.shuffle(pairs)
    caps = {"eval": EVAL_PROBLEMS, "val": VAL_PROBLEMS, "train": 10**9}
    splits: dict[str, list[tuple[int, int]]] = {name: [] for name in caps}
    for a, b in pairs:
        problems = [(a, b)] if a == b else [(a, b), (b, a)]
        name = next(n for n in caps if len(splits[n]) + len(problems) <= caps[n])
        splits[name] += problems
    for problems in splits.values():
        rng.shuffle(problems)  # row order within a file: no pair's two orders next to each other
    return splits


def make_bundled(seed: int) -> None:
    rng = random.Random(seed)
    splits = split_problems(rng)
    for name, problems in splits.items():
        write(DATA / f"sft_arith_{name}.jsonl", [sft_row(a, b) for a, b in problems])
        grpo = problems[:GRPO_TRAIN_PROBLEMS] if name == "train" else problems
        write(DATA / f"grpo_arith_{name}.jsonl", [grpo_row(a, b) for a, b in grpo])
        pair_rng = random.Random(f"{seed}-pref-{name}")  # wrong answers: their own stream per split
        write(DATA / f"pref_{name}.jsonl",
              [pref_row(pair_rng, a, b, schema_for(i)) for i, (a, b) in enumerate(problems)])


def make_bad() -> None:
    """Each file has exactly one problem, on a known line (the tests assert file name and line number). Literal rows:
    the corpus does not change when the toy task does."""
    def plain(a: int, b: int) -> dict:
        return {"role": "user", "content": f"{a}+{b}="}

    def conv(a: int, b: int, reply) -> dict:
        return {"messages": [plain(a, b), reply]}

    ok = dumps(conv(3, 4, assistant(7)))
    pair = {"chosen": conv(1, 2, assistant(3)), "rejected": conv(1, 2, assistant(13))}
    files = {
        # line 3 is not valid JSON (line 2 is blank: line numbers count every line)
        "malformed_json.jsonl": f"{ok}\n\n{{\"messages\": [{{\"role\": \"user\", \"content\": \"1+1=\"}}\n{ok}\n",
        # line 2 has no messages
        "missing_messages.jsonl": f"{ok}\n{dumps({'prompt': '1+1=', 'completion': '2'})}\n",
        # line 3 uses role "bot"
        "wrong_role.jsonl": f"{ok}\n{ok}\n{dumps(conv(1, 1, {'role': 'bot', 'content': '2'}))}\n",
        # line 2: content is a number
        "content_not_string.jsonl": f"{ok}\n{dumps(conv(1, 1, {'role': 'assistant', 'content': 2}))}\n",
        "empty.jsonl": "\n  \n",
        # every row is far over any test max_seq_len (and local-tiny's 512 context)
        "all_too_long.jsonl": "".join(dumps({"messages": [{"role": "user", "content": "9" * 600},
                                                          assistant("1" * 50)]}) + "\n" for _ in range(3)),
        # line 2 matches no preference schema
        "bad_preference.jsonl": f"{dumps(pair)}\n{dumps({'prompt': 'x', 'answer': 'y'})}\n",
    }
    BAD.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (BAD / name).write_text(text, encoding="utf-8")
        print(f"{(BAD / name).relative_to(ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_bundled(args.seed)
    make_bad()


if __name__ == "__main__":
    main()
