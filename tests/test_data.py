"""Datasets: strict reading, rendering masks, skips, preference schemas, the resumable cursor, rewards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cookbook.datasets.cursor import DataCursor
from cookbook.datasets.load import load_dataset, load_rows
from cookbook.datasets.preferences import SkipRow, normalize_preference_row, render_pair_with_reason
from cookbook.datasets.render import (
    align_to_targets,
    datum_stats,
    datum_weights_list,
    policy_datum,
    render_prompt,
    render_sft_with_reason,
    stop_token_ids,
)
from cookbook.datasets.rows import resolve_dataset
from cookbook.errors import DataError, UserError
from cookbook.models import build_tokenizer
from cookbook.recipes.rewards import exact_match, load_reward_fn
from conftest import prompt_and_answers


def datum_tokens(datum) -> list[int]:
    """The full token sequence of a pre-shifted datum (model_input + the last target)."""
    return datum.model_input.to_ints() + datum.loss_fn_inputs["target_tokens"].tolist()[-1:]


def render_sft(row, tokenizer, max_seq_len, train_on_what="all_assistant_messages"):
    return render_sft_with_reason(row, tokenizer, max_seq_len, train_on_what)[0]


def render_pair(chosen, rejected, tokenizer, max_seq_len):
    return render_pair_with_reason(chosen, rejected, tokenizer, max_seq_len)[0]


BAD = Path(__file__).parent / "data" / "bad"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def trained_text(tok, datum) -> str:
    """Decode the target tokens whose weight is > 0."""
    targets = datum.loss_fn_inputs["target_tokens"].tolist()
    return tok.decode([t for t, w in zip(targets, datum_weights_list(datum)) if w > 0])


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CONV = [
    {"role": "system", "content": "Add."},
    {"role": "user", "content": "3+4="},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "10+5="},
    {"role": "assistant", "content": "15"},
]


# ----------------------------------------------------------------------------------------------------------------
# SFT rendering
# ----------------------------------------------------------------------------------------------------------------


def test_sft_masks_exactly_the_assistant_tokens(tok):
    d = render_sft({"messages": CONV}, tok, 512)
    tokens = datum_tokens(d)
    assert d.model_input.to_ints() == tokens[:-1]
    assert d.loss_fn_inputs["target_tokens"].tolist() == tokens[1:]
    assert d.loss_fn_inputs["weights"].dtype == "float32"
    assert set(datum_weights_list(d)) == {0.0, 1.0}
    assert trained_text(tok, d) == "7<|im_end|>15<|im_end|>"
    # every trained position is inside an assistant turn: the rendering ends with the last trained token
    assert tok.decode(tokens).endswith("<|im_start|>assistant\n15<|im_end|>")
    assert datum_stats(d) == (len(tokens) - 1, len("7") + 1 + len("15") + 1)


def test_last_assistant_message_mode(tok):
    d = render_sft({"messages": CONV}, tok, 512, "last_assistant_message")
    assert trained_text(tok, d) == "15<|im_end|>"


@pytest.mark.parametrize("override, mode, expected", [
    ({"weight": 0}, "all_assistant_messages", "15<|im_end|>"),
    ({"trainable": False}, "all_assistant_messages", "15<|im_end|>"),
    ({"trainable": True}, "last_assistant_message", "7<|im_end|>15<|im_end|>"),
    ({"weight": 1}, "last_assistant_message", "7<|im_end|>15<|im_end|>"),
])
def test_per_message_weight_and_trainable_override(tok, override, mode, expected):
    msgs = [dict(m) for m in CONV]
    msgs[2].update(override)
    assert trained_text(tok, render_sft({"messages": msgs}, tok, 512, mode)) == expected


def test_nothing_trainable_and_too_long_are_skipped(tok):
    msgs = [dict(m) for m in CONV]
    msgs[2]["weight"] = 0
    msgs[4]["trainable"] = False
    assert render_sft({"messages": msgs}, tok, 512) is None
    assert render_sft({"messages": CONV}, tok, 20) is None


def test_template_without_generation_tags_gives_the_same_mask(tok):
    plain = build_tokenizer()
    plain.chat_template = (tok.chat_template.replace("{%- generation %}", "").replace("{%- endgeneration %}", ""))
    a = render_sft({"messages": CONV}, tok, 512)
    b = render_sft({"messages": CONV}, plain, 512)
    assert datum_tokens(a) == datum_tokens(b) and datum_weights_list(a) == datum_weights_list(b)


@pytest.mark.parametrize("template", ["generation tags", "plain"])
@pytest.mark.parametrize("mode", ["all_assistant_messages", "last_assistant_message"])
def test_a_dataset_renders_in_batches_exactly_as_row_by_row(tok, tmp_path, monkeypatch, template, mode):
    """load_dataset renders SFT rows many per template call; every item and skip must be what rendering each row
    alone gives, across chunk boundaries and with either kind of template."""
    tokenizer = build_tokenizer()
    if template == "plain":  # no {% generation %} tags: the prefix-difference fallback, per conversation
        tokenizer.chat_template = tok.chat_template.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    off = [dict(m) for m in CONV]
    off[2]["weight"], off[4]["trainable"] = 0, False
    rows = [{"messages": CONV}, {"messages": CONV[:3]}, {"messages": off},
            {"messages": [{"role": "user", "content": "9" * 80}, {"role": "assistant", "content": "2"}]},
            {"messages": [dict(m, weight=1) if m["role"] == "assistant" else m for m in CONV]}] * 3
    path = write_jsonl(tmp_path / "mix.jsonl", rows)
    monkeypatch.setattr("cookbook.datasets.load.RENDER_CHUNK_ROWS", 4)  # chunks of 4, 4, 4, 3 rows
    ds = load_dataset(str(path), "sft", tokenizer, max_seq_len=80, train_on_what=mode)
    alone = [render_sft_with_reason(row, tokenizer, 80, mode) for row in rows]
    assert [reason for _, reason in alone].count(None) == 9  # a mix: 3 rows too long, 3 with nothing to train
    assert ds.valid == [item is not None for item, _ in alone]
    for got, (want, _) in zip(ds.items, alone):
        if want is not None:
            assert datum_tokens(got) == datum_tokens(want)
            assert datum_weights_list(got) == datum_weights_list(want)
    assert ds.skipped == {"too_long": 3, "nothing_to_train": 3}


def test_a_template_error_in_a_batch_names_its_row(tok, tmp_path):
    """A template that renders earlier turns differently once later turns are added (here: it prints the message
    count first) cannot locate assistant tokens in a conversation with two assistant turns; the error names that row
    (line 2, after a row that renders fine), as row-by-row rendering did."""
    tokenizer = build_tokenizer()
    plain = tok.chat_template.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    tokenizer.chat_template = "{{ messages | length }}" + plain
    single = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]
    path = write_jsonl(tmp_path / "odd.jsonl", [{"messages": single}, {"messages": CONV}, {"messages": CONV}])
    with pytest.raises(DataError, match=rf"^{path}:2: The tokenizer's chat template renders earlier turns"):
        load_dataset(str(path), "sft", tokenizer, max_seq_len=512)


def test_over_length_rows_skipped_and_counted(tok, tmp_path):
    short = {"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}
    long = {"messages": [{"role": "user", "content": "9" * 80}, {"role": "assistant", "content": "2"}]}
    none = {"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2", "weight": 0}]}
    path = write_jsonl(tmp_path / "mix.jsonl", [short, long, short, none, long])
    ds = load_dataset(str(path), "sft", tok, max_seq_len=40)
    assert ds.skipped == {"too_long": 2, "nothing_to_train": 1}
    assert ds.valid == [True, False, True, False, False]
    assert ds.num_items == 2 and ds.num_loss_tokens == 4


def test_all_rows_over_length_is_a_data_error(tok):
    with pytest.raises(DataError, match=r"No trainable rows in .*all_too_long\.jsonl.*too_long: 3") as e:
        load_dataset(str(BAD / "all_too_long.jsonl"), "sft", tok, max_seq_len=512)
    assert "max_seq_len" in str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# Bad files
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kind, line, words", [
    ("malformed_json.jsonl", "sft", 3, "malformed JSON"),
    ("missing_messages.jsonl", "sft", 2, "missing `messages`"),
    ("wrong_role.jsonl", "sft", 3, "role 'bot'"),
    ("content_not_string.jsonl", "sft", 2, "must be a string"),
    ("bad_preference.jsonl", "preference", 2, "no preference schema"),
])
def test_bad_file_names_file_and_line(name, kind, line, words):
    with pytest.raises(DataError) as e:
        load_rows(BAD / name, kind)
    msg = str(e.value)
    assert f"{name}:{line}:" in msg and words in msg and "Fix:" in msg


def test_empty_file():
    with pytest.raises(DataError, match=r"No rows in .*empty\.jsonl.*Fix:"):
        load_rows(BAD / "empty.jsonl", "sft")


def test_unknown_kind_is_refused_before_the_file_is_read():
    with pytest.raises(ValueError, match=r"kind must be one of \('sft', 'grpo', 'preference'\), got 'bogus'"):
        load_rows(BAD / "empty.jsonl", "bogus")


def test_resolve_dataset(tmp_path):
    assert resolve_dataset("bundled:sft_arith_train").name == "sft_arith_train.jsonl"
    with pytest.raises(DataError, match="bundled:sft_arith_train"):
        resolve_dataset("bundled:nope")
    with pytest.raises(DataError, match=r"missing\.jsonl does not exist.*Fix:"):
        resolve_dataset(str(tmp_path / "missing.jsonl"))


# Bundled toy data: each family's splits, read here with plain json (not through the cookbook.datasets readers).
DATA = Path(__file__).resolve().parents[1] / "cookbook" / "datasets" / "bundled"
FAMILIES = {"sft_arith": "sft", "grpo_arith": "grpo", "pref": "preference"}
SPLITS = ("train", "val", "eval")


def _bundled(name: str) -> list[tuple[str, list[str]]]:
    return [prompt_and_answers(json.loads(line)) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]


def _unordered(prompt: str) -> frozenset:
    a, b = prompt.rstrip("=").split("+")
    return frozenset((int(a), int(b)))


def test_bundled_files_are_the_generator_output(tmp_path, monkeypatch):
    """`scripts/make_toy_data.py` is deterministic and the shipped files are exactly what it writes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_toy_data", DATA.parents[2] / "scripts" / "make_toy_data.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    monkeypatch.setattr(gen, "DATA", tmp_path)
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    gen.make_bundled(0)
    written = sorted(p.name for p in tmp_path.glob("*.jsonl"))
    assert written == sorted(p.name for p in DATA.glob("*.jsonl"))
    for name in written:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_bundled_splits_are_disjoint_and_answers_are_sums():
    seen_eval: set = set()
    for family in FAMILIES:
        rows = {split: _bundled(f"{family}_{split}") for split in SPLITS}
        prompts = {split: {p for p, _ in rows[split]} for split in SPLITS}
        pairs = {split: {_unordered(p) for p in prompts[split]} for split in SPLITS}
        assert [len(rows[s]) for s in SPLITS] == [len(prompts[s]) for s in SPLITS]  # no prompt twice in a file
        # GRPO's default run is one pass over its file: 2,000 of the 8,000 training problems.
        assert [len(prompts[s]) for s in SPLITS] == [2000 if family == "grpo_arith" else 8000, 1000, 1000]
        # Disjoint in the prompt, and even in the unordered pair (a+b vs b+a).
        for x, y in [("train", "eval"), ("train", "val"), ("val", "eval")]:
            assert not pairs[x] & pairs[y], f"{family}: {x} and {y} share {sorted(pairs[x] & pairs[y])[:3]}"
        if family != "grpo_arith":
            assert len(set().union(*pairs.values())) == 5050  # together: every unordered pair of 0..99 once
        else:
            assert prompts["train"] <= {p for p, _ in _bundled("sft_arith_train")}
        for split in SPLITS:
            for prompt, answers in rows[split]:
                a, b = (int(x) for x in prompt.rstrip("=").split("+"))
                assert prompt == f"{a:02d}+{b:02d}=" and answers[0] == f"{a + b:03d}", (family, prompt, answers)
                if family == "pref":  # a wrong sum, same format
                    assert len(answers[1]) == 3 and answers[1] != answers[0] and int(answers[1]) <= 198, answers
        seen_eval |= prompts["eval"]
    # The three families hold out the same problems, so no recipe trains on another's eval prompts either.
    assert len(seen_eval) == 1000


def test_eval_sets_are_disjoint_from_the_warm_start_data():
    """Every recipe's default eval set is disjoint from its training set and from the data GRPO's warm start
    (`warmstart:arith`) is trained on."""
    from cookbook.config import RECIPES
    from cookbook.runs.warmstart import WARMSTART_TASKS

    settings = dict(o.split("=", 1) for o in WARMSTART_TASKS["arith"])
    assert settings["recipe.eval_dataset"] == "null"  # the warm start reads no held-out rows either
    warm = {_unordered(p) for p, _ in _bundled(settings["recipe.dataset"].removeprefix("bundled:"))}
    for name, cls in RECIPES.items():
        cfg = cls()
        train = {_unordered(p) for p, _ in _bundled(cfg.dataset.removeprefix("bundled:"))}
        held_out = {_unordered(p) for p, _ in _bundled(cfg.eval_dataset.removeprefix("bundled:"))}
        assert cfg.eval_dataset.endswith("_eval") and held_out, name
        assert not held_out & train and not held_out & warm, name


def test_bundled_datasets_load(tok):
    for family, kind in FAMILIES.items():
        for split in ("val", "eval"):  # the train files are read by every recipe run
            ds = load_dataset(f"bundled:{family}_{split}", kind, tok, 512, max_completion_tokens=8)
            assert ds.num_items == len(ds) == 1000 and not ds.skipped
    rows = load_rows(resolve_dataset("bundled:grpo_arith_train"), "grpo")
    assert all(exact_match(r["ground_truth"], r) == 1.0 for r in rows)
    schemas = {("chosen" in r) * "a" + ("samples" in r) * "b" + ("input" in r) * "c"
               for r in load_rows(resolve_dataset("bundled:pref_train"), "preference")}
    assert schemas == {"a", "b", "c"}


# ----------------------------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------------------------


def test_grpo_prompt_and_policy_datum(tok):
    prompt = render_prompt(CONV, tok)  # trailing assistant turn stripped
    assert tok.decode(prompt).endswith("<|im_start|>user\n10+5=<|im_end|>\n<|im_start|>assistant\n")
    stops = stop_token_ids(tok)
    assert stops == [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    completion = tok.encode("15", add_special_tokens=False) + [stops[0]]
    d = policy_datum(prompt, completion)
    assert datum_tokens(d) == prompt + completion
    assert trained_text(tok, d) == "15<|im_end|>"
    aligned = align_to_targets(len(prompt), [-0.1, -0.2, -0.3])
    assert len(aligned) == d.model_input.length and aligned[-3:] == [-0.1, -0.2, -0.3]


def test_grpo_dataset_skips_prompts_without_room(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "1+1="}], "ground_truth": "2"},
            {"messages": [{"role": "user", "content": "x" * 60}], "ground_truth": "2"}]
    ds = load_dataset(str(write_jsonl(tmp_path / "g.jsonl", rows)), "grpo", tok, 40, max_completion_tokens=8)
    assert ds.valid == [True, False] and ds.skipped == {"too_long": 1}


# ----------------------------------------------------------------------------------------------------------------
# Preferences
# ----------------------------------------------------------------------------------------------------------------

PROMPT = [{"role": "user", "content": "3+4="}]
GOOD = {"role": "assistant", "content": "7"}
WRONG = {"role": "assistant", "content": "12"}


@pytest.mark.parametrize("row", [
    {"chosen": {"messages": PROMPT + [GOOD]}, "rejected": {"messages": PROMPT + [WRONG]}},
    {"prompt": "3+4=", "chosen": "7", "rejected": "12"},
    {"samples": [{"messages": PROMPT + [WRONG], "evals": {"score": 0.0}}, {"messages": PROMPT + [GOOD], "score": 1.0}]},
    {"input": "3+4=", "preferred_output": [GOOD], "non_preferred_output": [WRONG]},
    {"input": {"messages": PROMPT}, "preferred_output": GOOD, "non_preferred_output": "12"},
])
def test_preference_schemas_normalize_to_the_same_pair(row):
    assert normalize_preference_row(row, "f.jsonl:1") == (PROMPT + [GOOD], PROMPT + [WRONG])


def test_preference_errors_and_skips():
    with pytest.raises(DataError, match=r"f\.jsonl:4: has `chosen` but no `rejected`"):
        normalize_preference_row({"chosen": "a"}, "f.jsonl:4")
    with pytest.raises(DataError, match=r"f\.jsonl:5: .*no preference schema"):
        normalize_preference_row({"question": "a"}, "f.jsonl:5")
    with pytest.raises(DataError, match=r"f\.jsonl:6: .*score"):
        normalize_preference_row({"samples": [{"text": "a"}, {"text": "b"}]}, "f.jsonl:6")
    with pytest.raises(SkipRow):
        normalize_preference_row({"samples": [{"text": "a", "score": 1}, {"text": "b", "score": 1}]}, "f:1")


def test_render_pair_masks_only_the_response(tok):
    c, r = render_pair(PROMPT + [GOOD], PROMPT + [WRONG], tok, 512)
    assert trained_text(tok, c) == "7<|im_end|>" and trained_text(tok, r) == "12<|im_end|>"
    # a shared earlier assistant turn is context, not response
    history = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]
    c, r = render_pair(history + PROMPT + [GOOD], history + PROMPT + [WRONG], tok, 512)
    assert trained_text(tok, c) == "7<|im_end|>" and trained_text(tok, r) == "12<|im_end|>"
    # raw text: the tokens after the common prefix
    c, r = render_pair("3+4=7", "3+4=12", tok, 512)
    assert trained_text(tok, c) == "7" and trained_text(tok, r) == "12"
    assert render_pair(PROMPT + [GOOD], PROMPT + [WRONG], tok, 10) is None
    assert render_pair(PROMPT + [GOOD], PROMPT + [GOOD], tok, 512) is None


def test_preference_dataset_counts_skips(tok, tmp_path):
    rows = [{"chosen": {"messages": PROMPT + [GOOD]}, "rejected": {"messages": PROMPT + [WRONG]}},
            {"samples": [{"text": "a", "score": 1}, {"text": "b", "score": 1}]},
            {"prompt": "9" * 100, "chosen": "1", "rejected": "2"}]
    ds = load_dataset(str(write_jsonl(tmp_path / "p.jsonl", rows)), "preference", tok, 60)
    assert ds.valid == [True, False, False] and ds.skipped == {"tied_scores": 1, "too_long": 1}


@pytest.mark.parametrize("template", ["generation tags", "plain"])
def test_a_preference_dataset_renders_in_batches_exactly_as_row_by_row(tok, tmp_path, monkeypatch, template):
    """Preference rows render all their conversations in one template call per chunk; every pair and skip must be
    what rendering each row alone gives: conversations (with a shared earlier assistant turn), raw text, tied scores,
    identical sides, too long, across chunk boundaries and with either kind of template."""
    tokenizer = build_tokenizer()
    if template == "plain":
        tokenizer.chat_template = tok.chat_template.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    history = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]
    rows = [{"chosen": {"messages": PROMPT + [GOOD]}, "rejected": {"messages": PROMPT + [WRONG]}},
            {"prompt": "3+4=", "chosen": "7", "rejected": "12"},
            {"chosen": {"text": "3+4=7"}, "rejected": {"text": "3+4=12"}},
            {"samples": [{"text": "a", "score": 1}, {"text": "b", "score": 1}]},
            {"chosen": {"messages": history + PROMPT + [GOOD]}, "rejected": {"messages": history + PROMPT + [WRONG]}},
            {"chosen": {"messages": PROMPT + [GOOD]}, "rejected": {"messages": PROMPT + [GOOD]}},
            {"prompt": "9" * 100, "chosen": "1", "rejected": "2"}] * 2
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    monkeypatch.setattr("cookbook.datasets.load.RENDER_CHUNK_ROWS", 3)
    ds = load_dataset(str(path), "preference", tokenizer, max_seq_len=60)
    alone = []
    for i, row in enumerate(rows):
        try:
            alone.append(render_pair_with_reason(*normalize_preference_row(row, f"row {i}"), tokenizer, 60))
        except SkipRow as skip:
            alone.append((None, skip.reason))
    assert ds.valid == [pair is not None for pair, _ in alone] == [True, True, True, False, True, False, False] * 2
    for got, (want, _) in zip(ds.items, alone):
        for got_side, want_side in zip(got or (), want or ()):
            assert datum_tokens(got_side) == datum_tokens(want_side)
            assert datum_weights_list(got_side) == datum_weights_list(want_side)
    assert ds.skipped == {"tied_scores": 2, "identical": 2, "too_long": 2}


def test_a_template_error_in_a_preference_batch_names_its_row(tok, tmp_path):
    """As for SFT: a conversation whose assistant tokens cannot be located fails with the line of its row."""
    tokenizer = build_tokenizer()
    plain = tok.chat_template.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    tokenizer.chat_template = "{{ messages | length }}" + plain
    history = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]
    rows = [{"prompt": "3+4=", "chosen": "7", "rejected": "12"},
            {"chosen": {"messages": history + PROMPT + [GOOD]}, "rejected": {"messages": history + PROMPT + [WRONG]}}]
    path = write_jsonl(tmp_path / "odd.jsonl", rows)
    with pytest.raises(DataError, match=rf"^{path}:2: The tokenizer's chat template renders earlier turns"):
        load_dataset(str(path), "preference", tokenizer, max_seq_len=512)


# ----------------------------------------------------------------------------------------------------------------
# Cursor
# ----------------------------------------------------------------------------------------------------------------


def drain(cursor: DataCursor, n: int):
    out = []
    while True:
        b = cursor.next_batch(n)
        if not b.indices:
            return out
        out.append((b.indices, b.epoch, cursor.position))


@pytest.mark.parametrize("valid", [None, [i % 3 != 1 for i in range(11)]])
def test_cursor_resume_yields_the_uninterrupted_sequence(valid):
    kw = dict(num_rows=11, epochs=3, shuffle=True, seed=5, valid=valid)
    full = drain(DataCursor(**kw), 4)
    for cut in range(len(full) + 1):
        first = DataCursor(**kw)
        head = [(b.indices, b.epoch, first.position) for b in (first.next_batch(4) for _ in range(cut))]
        state = json.loads(json.dumps(first.state_dict()))
        resumed = DataCursor(**kw)
        resumed.load_state_dict(state)
        assert head + drain(resumed, 4) == full, cut
    # every epoch visits each usable row once, batches never span epochs, orders differ between epochs
    for e in range(3):
        rows = [i for idx, ep, _ in full if ep == e for i in idx]
        assert sorted(rows) == [i for i in range(11) if valid is None or valid[i]]
    orders = [[i for idx, ep, _ in full if ep == e for i in idx] for e in range(3)]
    assert orders[0] != orders[1]
    assert full[-1][2] == 33  # position counts raw rows, skipped ones included


def test_cursor_position_counts_skipped_rows_and_validates_state():
    c = DataCursor(6, epochs=1, shuffle=False, valid=[True, False, False, True, True, True])
    assert c.next_batch(2) == ([0, 3], 0) and c.position == 4
    assert c.count_batches(2) == 1 and c.position == 4
    with pytest.raises(DataError, match="seed"):
        DataCursor(6, seed=1).load_state_dict(DataCursor(6, seed=2).state_dict())
    more = DataCursor(6, epochs=2)
    more.load_state_dict({**DataCursor(6, epochs=1).state_dict(), "position": 6})  # extending epochs is fine
    assert more.epoch == 1 and len(more.next_batch(10).indices) == 6 and more.exhausted


# ----------------------------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------------------------


def test_exact_match():
    row = {"ground_truth": 7}
    assert exact_match(" 7 ", row) == 1.0
    assert exact_match("7<|im_end|>junk", row) == 1.0
    assert exact_match("77", row) == 0.0
    with pytest.raises(UserError, match="ground_truth"):
        exact_match("7", {})


def test_load_reward_fn():
    assert load_reward_fn("cookbook.recipes.rewards:exact_match") is exact_match
    for spec, words in [("nocolon", "import path"), ("no_such_mod_xyz:f", "cannot import"),
                        ("cookbook.recipes.rewards:nope", "no attribute"), ("cookbook.recipes.rewards:END_OF_TURN", "not a function"),
                        ("cookbook.recipes.rewards:load_reward_fn", "two arguments")]:
        with pytest.raises(UserError, match="recipe.reward_fn") as e:
            load_reward_fn(spec)
        assert words in str(e.value)
