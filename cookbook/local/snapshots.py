"""Sampler snapshot format: what the trainer exports and the local deployment hot-loads.

A snapshot is a directory `<store>/sampler/<identity>/` with a `snapshot.json` manifest:

- `base`: a normal HF-loadable model directory (safetensors + config + tokenizer), so the same directory is also
  what promotion copies. `{"kind": "base", "identity": ...}`. The config and tokenizer files never change within a
  trainer, so a writer may hard-link them from a directory written once (`static_files`) and write only the weights.
- `delta`: only the tensors that changed since the previous snapshot, in one of two encodings (manifest
  `encoding`). Both name their predecessor (`previous_snapshot_identity`), so a delta is only ever applied to the
  weights it was made from.
  `copy`: the changed tensors as they are, in `delta.safetensors`. The cheaper path when the deployment reads the
  file on the trainer's machine, which is what the embedded trainer writes by default (its `--delta-encoding`).
  `diff`: compact, for bytes that travel, in `delta.bin`. A floating-point tensor is stored as its difference
  `new - old` in its own dtype: for the small steps an optimizer takes, `new` and `old` lie within a factor of two of
  each other, so the subtraction is exact (Sterbenz) and `old + diff` gives `new` bit for bit; the elements where it
  does not (a sign change, a large jump, NaN, -0.0) are listed as exceptions with their exact new bits (the writer
  checks every element). Other dtypes store the XOR of the bit patterns. The result is split into byte planes
  (every element's byte 0, then byte 1, ...), each zlib-compressed when a sample of it compresses. A difference
  rather than an XOR because Adam's first step moves every weight by almost exactly the learning rate: the
  differences are nearly one value, while the XOR of the bit patterns looks random in its low bytes (after one step
  at the default learning rate: ~0.16 of the base's bytes instead of ~0.65). The manifest holds each tensor's byte
  ranges, dtype/shape and an adler32 checksum of the rebuilt tensor, so applying a delta onto the wrong weights
  fails loudly instead of silently.

States are "canonical": `canonical_state(model)` drops tied duplicates (e.g. `lm_head.weight` tied to the embedding),
matching what `save_pretrained` writes. Load a state into a model with `load_state_into`.
LoRA models export merged full weights as a `base` (a LoRA sampler save is always promotable).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Any

import torch

MANIFEST = "snapshot.json"
DELTA_FILE = "delta.bin"  # a `diff` delta
COPY_FILE = "delta.safetensors"  # a `copy` delta
WEIGHTS_FILE = "model.safetensors"
_COMPRESSION = "diff-byteplanes-zlib-v4"
DELTA_ENCODINGS = ("diff", "copy")
# A plane is compressed when zlib shrinks a sample of it below this fraction (random bytes do not shrink at all).
_COMPRESS_BELOW = 0.9
_SAMPLE_BYTES = 1 << 14


class SnapshotMismatch(Exception):
    """A delta does not apply to the given weights (wrong predecessor or checksum failure)."""


def canonical_state(model) -> dict[str, torch.Tensor]:
    """Detached state dict without tied duplicates (first occurrence of each storage wins)."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach()
    return out


def load_state_into(model, state: dict[str, torch.Tensor]) -> None:
    """Copy a canonical state into `model` in place; only tied duplicates may be missing."""
    live = model.state_dict(keep_vars=True)
    unexpected = [k for k in state if k not in live]
    missing = [k for k in canonical_state(model) if k not in state]
    if missing or unexpected:
        raise SnapshotMismatch(f"state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, value in state.items():
            target = live[name]
            if target.shape != value.shape:
                raise SnapshotMismatch(f"{name}: shape {list(value.shape)} does not fit {list(target.shape)}")
            if target.data_ptr() != value.data_ptr():  # a tensor of the model itself needs no copy
                target.copy_(value)


def copy_state(state: dict[str, torch.Tensor], into: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of `state`, reusing the tensors of `into` where they fit."""
    out = {}
    for name, value in state.items():
        buffer = into.get(name)
        if buffer is not None and buffer.shape == value.shape and buffer.dtype == value.dtype:
            out[name] = buffer.copy_(value)
        else:
            out[name] = value.detach().clone()
    return out


def _checksum(t: torch.Tensor) -> int:
    return zlib.adler32(t.contiguous().view(torch.uint8).numpy().tobytes()) if t.numel() else 1


def _atomic_dir(final: Path):
    """Return a fresh temp dir next to `final`; `_commit` renames it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _commit(tmp: Path, final: Path) -> None:
    if final.exists():  # re-export under the same identity replaces the old one
        shutil.rmtree(final)
    os.replace(tmp, final)


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def static_files(model, tokenizer, directory) -> Path:
    """Write once what every base snapshot of `model` holds besides its weights (config, generation config,
    tokenizer): exactly the files `save_pretrained` writes, minus the weights."""
    from cookbook.models import save_model_dir

    final = Path(directory)
    if (final / "config.json").is_file():
        return final
    tmp = _atomic_dir(final)
    try:
        save_model_dir(model, tokenizer, tmp)
        for weights in tmp.glob("*.safetensors*"):
            weights.unlink()
        _commit(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not supported
        shutil.copyfile(source, target)


def write_base(directory, model, tokenizer, identity: str, extra: dict | None = None,
               static_dir: Path | None = None) -> Path:
    """An HF-loadable snapshot of `model`. With `static_dir` (from `static_files`) its config and tokenizer files are
    linked from there and only the weights are written."""
    from safetensors.torch import save_file

    from cookbook.models import save_model_dir

    final = Path(directory)
    tmp = _atomic_dir(final)
    try:
        if static_dir is None:
            save_model_dir(model, tokenizer, tmp)
        else:
            for source in Path(static_dir).iterdir():
                _link_or_copy(source, tmp / source.name)
            state = {k: v.contiguous() for k, v in canonical_state(model).items()}
            save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        _write_manifest(tmp, {"kind": "base", "identity": identity, **(extra or {})})
        _commit(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _difference(new: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(what `_reconstruct` adds to `old`, exception indices, their exact values) for flat tensors `new`, `old`."""
    if not new.is_floating_point():
        return _bits(new) ^ _bits(old), _NO_INDICES, new[:0]
    diff = new - old
    wrong = _bits(old + diff) != _bits(new)
    indices = wrong.nonzero()[:, 0]
    if len(indices):
        diff[indices] = 0
    return diff, indices, new[indices]


def _reconstruct(old: torch.Tensor, diff: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    if not old.is_floating_point():
        return (_bits(old) ^ diff).view(old.dtype)
    new = old + diff
    new[indices] = values
    return new


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of `t` as same-width integers (so comparisons see -0.0 and NaN payloads)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


_NO_INDICES = torch.zeros(0, dtype=torch.long)


def _pack(data: bytes) -> tuple[bytes, str]:
    """zlib when a sample of `data` shrinks, raw otherwise (compressing random bytes only costs time)."""
    sample = data[:_SAMPLE_BYTES]
    if sample and len(zlib.compress(sample, 1)) < _COMPRESS_BELOW * len(sample):
        return zlib.compress(data, 1), "zlib"
    return data, "raw"


def _planes(t: torch.Tensor) -> list[bytes]:
    """Byte planes of flat tensor `t`: byte 0 of every element, then byte 1, ..."""
    width = t.element_size()
    return [bytes(p.numpy()) for p in t.contiguous().view(torch.uint8).reshape(-1, width).t().contiguous()]


def write_delta(directory, state: dict[str, torch.Tensor], previous_state: dict[str, torch.Tensor],
                previous_identity: str, identity: str, encoding: str = "diff") -> Path:
    """A delta from `previous_state` to `state`: `diff` (compact, for bytes that travel) or `copy` (the changed
    tensors as they are, in a safetensors file: the cheaper path when the reader is on the same machine)."""
    from safetensors.torch import save_file

    if encoding not in DELTA_ENCODINGS:
        raise ValueError(f"delta encoding must be one of {DELTA_ENCODINGS}, got {encoding!r}")
    if set(state) != set(previous_state):
        raise ValueError("delta needs the same tensor names in both states")
    changed = {}
    for name, new in state.items():
        old = previous_state[name]
        if new.shape != old.shape or new.dtype != old.dtype:
            raise ValueError(f"tensor {name} changed shape/dtype; write a base snapshot instead")
        if not torch.equal(_bits(new), _bits(old)):  # unchanged tensors are left out
            changed[name] = new.detach().contiguous()
    final = Path(directory)
    tmp = _atomic_dir(final)
    manifest = {"kind": "delta", "identity": identity, "previous_snapshot_identity": previous_identity,
                "encoding": encoding}
    try:
        if encoding == "copy":
            save_file(changed, tmp / COPY_FILE, metadata={"format": "pt"})
        else:
            manifest.update(compression=_COMPRESSION, checksum_format="adler32",
                            tensors=_write_diffs(tmp / DELTA_FILE, changed, previous_state))
        _write_manifest(tmp, manifest)
        _commit(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_diffs(path: Path, changed: dict[str, torch.Tensor], previous_state: dict[str, torch.Tensor]) -> dict:
    tensors: dict[str, Any] = {}
    with open(path, "wb") as f:
        offset = 0

        def put(blob: bytes, codec: str) -> list:
            nonlocal offset
            f.write(blob)
            offset += len(blob)
            return [offset - len(blob), len(blob), codec]

        for name, new in changed.items():
            diff, indices, values = _difference(new.reshape(-1), previous_state[name].detach().reshape(-1))
            tensors[name] = {"dtype": str(new.dtype).removeprefix("torch."), "shape": list(new.shape),
                             "checksum": _checksum(new), "planes": [put(*_pack(plane)) for plane in _planes(diff)],
                             "exceptions": [put(*_pack(bytes(indices.numpy()))),
                                            put(bytes(_bits(values).numpy()), "raw")]}
    return tensors


def read_manifest(directory) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no sampler snapshot at {directory} (missing {MANIFEST})")
    return json.loads(path.read_text())


def _load_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {directory}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return state


def apply_snapshot(directory, current_state: dict[str, torch.Tensor] | None,
                   current_identity: str | None) -> dict[str, torch.Tensor]:
    """The weights after loading the snapshot at `directory` (the input state is not modified)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest["kind"] == "base":
        return _load_safetensors_dir(directory)
    if manifest["kind"] != "delta":
        raise SnapshotMismatch(f"unknown snapshot kind {manifest['kind']!r}")
    previous = manifest["previous_snapshot_identity"]
    if current_state is None or current_identity != previous:
        raise SnapshotMismatch(f"delta {manifest['identity']!r} applies to snapshot {previous!r}, "
                               f"but the current weights are {current_identity!r}")
    if manifest.get("encoding") == "copy":
        changed = _load_safetensors_dir(directory)
        for name, new in changed.items():
            if name not in current_state or current_state[name].shape != new.shape:
                raise SnapshotMismatch(f"delta {manifest['identity']!r} holds tensor {name!r} {list(new.shape)}, "
                                       "which the current weights lack or shape differently")
        return {**current_state, **changed}
    if manifest.get("compression") != _COMPRESSION:
        raise SnapshotMismatch(f"delta {manifest['identity']!r} is in format {manifest.get('compression')!r}; this "
                               f"platform reads {_COMPRESSION!r}")
    out = dict(current_state)
    blob_file = (directory / DELTA_FILE).read_bytes()

    def take(start: int, length: int, codec: str) -> bytes:
        blob = blob_file[start:start + length]
        return zlib.decompress(blob) if codec == "zlib" else blob

    for name, info in manifest["tensors"].items():
        if name not in current_state:
            raise SnapshotMismatch(f"delta names tensor {name!r} that the current weights lack")
        old = current_state[name].detach().contiguous().reshape(-1)
        width, ints = old.element_size(), _bits(old).dtype
        raw = b"".join(take(*plane) for plane in info["planes"])
        if len(raw) != old.numel() * width:
            raise SnapshotMismatch(f"delta for {name!r} has the wrong size")
        diff = _from_bytes(raw, torch.uint8).reshape(width, -1).t().contiguous().view(ints).reshape(-1)
        diff = diff.view(old.dtype) if old.is_floating_point() else diff
        indices = _from_bytes(take(*info["exceptions"][0]), torch.long)
        values = _from_bytes(take(*info["exceptions"][1]), ints).view(old.dtype)
        if len(indices) != len(values) or len(indices) and (indices.min() < 0 or indices.max() >= old.numel()):
            raise SnapshotMismatch(f"delta for {name!r} has malformed exceptions")
        new = _reconstruct(old, diff, indices, values).reshape(current_state[name].shape)
        if _checksum(new) != info["checksum"]:
            raise SnapshotMismatch(f"checksum mismatch for {name!r} in delta {manifest['identity']!r}")
        out[name] = new
    return out


def _from_bytes(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.zeros(0, dtype=dtype)


def damage(directory) -> None:
    """Corrupt a written snapshot in place (fault tests: a hot load of it must fail, not load garbage): flip bytes in
    a `diff` delta's payload (its checksums catch it), or cut a base's or `copy` delta's weights file in half (it no
    longer parses)."""
    directory = Path(directory)
    delta = directory / DELTA_FILE
    if delta.exists():
        data = bytearray(delta.read_bytes())
        for i in range(len(data) // 3, len(data) // 3 + 64):
            data[i] ^= 0xFF
        delta.write_bytes(bytes(data))
        return
    weights = sorted(directory.glob("*.safetensors"))[0]  # a base or a copy delta
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
