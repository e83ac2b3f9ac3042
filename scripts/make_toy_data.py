"""Write the bundled toy datasets (`cookbook/data/*.jsonl`) and the bad-input corpus (`tests/data/bad/`).

    python scripts/make_toy_data.py            # deterministic: same seed → byte-identical files

Task family: single-digit addition "a+b=" → "c" (100 distinct problems), so an SFT warm start helps GRPO and
the preference sets rank the correct sum over a wrong one.

Evaluation files cover all 100 problems once (in seeded order) and are written as separate rows; they are *not*
disjoint from training in (a, b): the task has only 100 problems, and measured on local-tiny a model trained on 85
of them reaches ~0.7 on the 15 unseen ones (no algorithmic generalization from an addition table), which would
make a learning check measure something else. The preference eval set uses wrong answers drawn with another
seed than training, so its pairs are new.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "cookbook" / "data"
BAD = ROOT / "tests" / "data" / "bad"
PAIRS = [(a, b) for a in range(10) for b in range(10)]


def dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def write(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"{path.relative_to(ROOT)}: {len(rows)} rows, {path.stat().st_size / 1024:.1f} KB")


def user(a: int, b: int) -> dict:
    return {"role": "user", "content": f"{a}+{b}="}


def assistant(text) -> dict:
    return {"role": "assistant", "content": str(text)}


def sft_row(a, b):
    return {"messages": [user(a, b), assistant(a + b)]}


def grpo_row(a, b):
    return {"messages": [user(a, b)], "ground_truth": str(a + b)}


def wrong(rng: random.Random, a: int, b: int) -> int:
    return rng.choice([c for c in range(19) if c != a + b])


def pref_row(rng: random.Random, a: int, b: int, schema: str) -> dict:
    good, bad = a + b, wrong(rng, a, b)
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


def shuffled(rng: random.Random, items: list) -> list:
    items = list(items)
    rng.shuffle(items)
    return items


def make_bundled(seed: int) -> None:
    rng = random.Random(seed)
    write(DATA / "sft_arith_train.jsonl", [sft_row(a, b) for a, b in shuffled(rng, PAIRS * 20)])
    write(DATA / "sft_arith_eval.jsonl", [sft_row(a, b) for a, b in shuffled(rng, PAIRS)])
    write(DATA / "grpo_arith_train.jsonl", [grpo_row(a, b) for a, b in shuffled(rng, PAIRS * 2)])
    write(DATA / "grpo_arith_eval.jsonl", [grpo_row(a, b) for a, b in shuffled(rng, PAIRS)])
    train_rng, eval_rng = random.Random(seed + 1), random.Random(seed + 2)
    write(DATA / "pref_train.jsonl",
          [pref_row(train_rng, a, b, schema_for(i)) for i, (a, b) in enumerate(shuffled(rng, PAIRS * 4))])
    write(DATA / "pref_eval.jsonl",
          [pref_row(eval_rng, a, b, schema_for(i)) for i, (a, b) in enumerate(shuffled(rng, PAIRS))])


def make_bad() -> None:
    """Each file has exactly one problem, on a known line (the tests assert file name and line number)."""
    ok = dumps(sft_row(3, 4))
    files = {
        # line 3 is not valid JSON (line 2 is blank: line numbers count every line)
        "malformed_json.jsonl": f"{ok}\n\n{{\"messages\": [{{\"role\": \"user\", \"content\": \"1+1=\"}}\n{ok}\n",
        # line 2 has no messages
        "missing_messages.jsonl": f"{ok}\n{dumps({'prompt': '1+1=', 'completion': '2'})}\n",
        # line 3 uses role "bot"
        "wrong_role.jsonl": f"{ok}\n{ok}\n{dumps({'messages': [user(1, 1), {'role': 'bot', 'content': '2'}]})}\n",
        # line 2: content is a number
        "content_not_string.jsonl": f"{ok}\n{dumps({'messages': [user(1, 1), {'role': 'assistant', 'content': 2}]})}\n",
        "empty.jsonl": "\n  \n",
        # every row is far over any test max_seq_len (and local-tiny's 512 context)
        "all_too_long.jsonl": "".join(dumps({"messages": [{"role": "user", "content": "9" * 600},
                                                          assistant("1" * 50)]}) + "\n" for _ in range(3)),
        # line 2 matches no preference schema
        "bad_preference.jsonl": f"{dumps(pref_row(random.Random(0), 1, 2, 'a'))}\n{dumps({'prompt': 'x', 'answer': 'y'})}\n",
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
