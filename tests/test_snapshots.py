"""Sampler snapshot encodings (cookbook.local.snapshots): every delta encoding rebuilds the new weights bit for bit,
including the elements a difference cannot carry; the compact encoding is at most half a base's bytes after one
optimizer step at the default learning rate; a base snapshot written from linked static files loads with
`from_pretrained`; a delta refuses weights it was not made for and bytes that were changed."""

from __future__ import annotations

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from cookbook import models
from cookbook.local import snapshots
from cookbook.local.snapshots import SnapshotMismatch

import pytest


def bits_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(snapshots._bits(a[k].contiguous()).equal(snapshots._bits(b[k].contiguous()))
                                    for k in a)


def adam_step(model, lr: float = 3e-4, steps: int = 1) -> None:
    """What the trainer does (its AdamW settings: betas 0.9/0.95, eps 1e-12, no weight decay)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 250, (4, 24), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def state_of(model) -> dict:
    return {k: v.detach().clone() for k, v in snapshots.canonical_state(model).items()}


def awkward_pair() -> tuple[dict, dict]:
    """Old/new tensors a plain `old + (new - old)` cannot reproduce: sign flips, huge jumps, NaN, inf, -0.0, values
    next to zero; plus bf16, and an integer tensor (XOR path), and a tensor that did not change."""
    g = torch.Generator().manual_seed(1)
    old = torch.randn(1000, generator=g)
    new = old + 1e-4 * torch.randn(1000, generator=g)
    new[:10] = -old[:10]  # sign flips
    new[10:20] = old[10:20] * 1e6
    new[20], new[21], new[22], new[23] = float("nan"), float("inf"), -0.0, 1e-40
    old[23] = 0.0
    old_bf, new_bf = old.to(torch.bfloat16), new.to(torch.bfloat16)
    ints_old = torch.arange(50, dtype=torch.long)
    ints_new = ints_old.clone()
    ints_new[::7] += 1000
    still = torch.ones(3, 4)
    return ({"f32": old.reshape(10, 100), "bf16": old_bf, "ints": ints_old, "still": still},
            {"f32": new.reshape(10, 100), "bf16": new_bf, "ints": ints_new, "still": still.clone()})


@pytest.mark.parametrize("encoding", snapshots.DELTA_ENCODINGS)
def test_every_delta_encoding_rebuilds_the_new_weights_bit_for_bit(tmp_path, encoding):
    old, new = awkward_pair()
    snapshots.write_delta(tmp_path / "d", new, old, "prev", "next", encoding)
    manifest = snapshots.read_manifest(tmp_path / "d")
    if encoding == "copy":
        with safe_open(tmp_path / "d" / snapshots.COPY_FILE, "pt") as f:
            stored = set(f.keys())
    else:
        stored = set(manifest["tensors"])
    assert stored == {"f32", "bf16", "ints"}  # the unchanged tensor is left out
    assert bits_equal(snapshots.apply_snapshot(tmp_path / "d", old, "prev"), new)

    model = models.load_model("local-micro")
    before = state_of(model)
    adam_step(model, steps=3)
    after = state_of(model)
    snapshots.write_delta(tmp_path / "m", after, before, "b", "m", encoding)
    rebuilt = snapshots.apply_snapshot(tmp_path / "m", before, "b")
    assert bits_equal(rebuilt, after) and not bits_equal(before, after)


def test_compact_delta_after_one_step_at_the_default_rate_is_at_most_half_a_base(tmp_path):
    model = models.load_model("local-tiny")
    snapshots.write_base(tmp_path / "base", model, models.load_tokenizer("local-tiny"), "base")
    before = state_of(model)
    adam_step(model, lr=3e-4)  # GRPO's default learning rate
    snapshots.write_delta(tmp_path / "diff", state_of(model), before, "base", "diff", "diff")
    snapshots.write_delta(tmp_path / "copy", state_of(model), before, "base", "copy", "copy")
    base_bytes = (tmp_path / "base" / snapshots.WEIGHTS_FILE).stat().st_size
    diff_bytes = (tmp_path / "diff" / snapshots.DELTA_FILE).stat().st_size
    copy_bytes = (tmp_path / "copy" / snapshots.COPY_FILE).stat().st_size
    assert diff_bytes <= 0.5 * base_bytes, (diff_bytes, base_bytes)
    assert copy_bytes > 0.95 * base_bytes  # every weight moved: copy holds them all


def test_base_from_linked_static_files_loads_with_from_pretrained(tmp_path):
    model, tokenizer = models.load_model("local-micro"), models.load_tokenizer("local-micro")
    static = snapshots.static_files(model, tokenizer, tmp_path / "static")
    adam_step(model)
    for name in ("one", "two"):
        snapshots.write_base(tmp_path / name, model, tokenizer, name, static_dir=static)
    reference = tmp_path / "reference"
    models.save_model_dir(model, tokenizer, reference)
    for name in ("one", "two"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        assert bits_equal(snapshots.canonical_state(loaded), snapshots.canonical_state(model))
        # the same files save_pretrained writes, with the same contents
        assert {p.name for p in reference.iterdir()} == {p.name for p in (tmp_path / name).iterdir()} - {"snapshot.json"}
        for p in reference.iterdir():
            if p.suffix != ".safetensors":
                assert p.read_bytes() == (tmp_path / name / p.name).read_bytes(), p.name


@pytest.mark.parametrize("encoding", snapshots.DELTA_ENCODINGS)
def test_a_delta_refuses_other_weights_and_changed_bytes(tmp_path, encoding):
    old, new = awkward_pair()
    snapshots.write_delta(tmp_path / "d", new, old, "prev", "next", encoding)
    with pytest.raises(SnapshotMismatch, match="applies to snapshot 'prev'"):
        snapshots.apply_snapshot(tmp_path / "d", old, "another")
    other = {**old, "f32": old["f32"] + 1.0}
    if encoding == "diff":  # a copy does not read the old values; the predecessor check is what guards it
        with pytest.raises(SnapshotMismatch, match="checksum"):
            snapshots.apply_snapshot(tmp_path / "d", other, "prev")
    snapshots.damage(tmp_path / "d")
    with pytest.raises(Exception):
        snapshots.apply_snapshot(tmp_path / "d", old, "prev")
