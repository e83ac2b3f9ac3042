"""Sampler snapshot format: what the trainer exports and the local deployment hot-loads.

A snapshot is a directory `<store>/sampler/<identity>/` with a `snapshot.json` manifest:

- `base`: a normal HF-loadable model directory (safetensors + config + tokenizer), so the same directory is also
  what promotion copies. `{"kind": "base", "identity": ...}`.
- `delta`: only the tensors that changed since the previous snapshot, stored as the XOR of the bit patterns in one
  `delta.bin`. The XOR bytes are split into byte planes (every element's byte 0, then byte 1, ...): a small update
  leaves the sign/exponent bytes unchanged, so those planes are mostly zeros and zlib shrinks them to almost
  nothing, while the low mantissa planes look random (zlib saves ~2-10 % there for most of the time spent), so a
  plane is compressed only when it has clearly more zero bytes than random data (>= 5 %; random bytes: 0.4 %). The manifest names the
  predecessor (`previous_snapshot_identity`), each tensor's byte range, dtype/shape and an adler32 checksum of the
  reconstructed tensor, so applying a delta onto the wrong weights fails loudly instead of silently.

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
DELTA_FILE = "delta.bin"
_COMPRESSION = "xor-byteplanes-zlib-v3"
_ZERO_FRACTION_TO_COMPRESS = 0.05


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
    """Copy a canonical state into `model`; only tied duplicates may be missing."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(model.state_dict()) - set(canonical_state(model))
    bad_missing = [k for k in missing if k not in tied]
    if bad_missing or unexpected:
        raise SnapshotMismatch(f"state does not fit the model: missing {bad_missing[:5]}, unexpected {unexpected[:5]}")


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


def write_base(directory, model, tokenizer, identity: str, extra: dict | None = None) -> Path:
    from cookbook.models import save_model_dir

    final = Path(directory)
    tmp = _atomic_dir(final)
    try:
        save_model_dir(model, tokenizer, tmp)
        _write_manifest(tmp, {"kind": "base", "identity": identity, **(extra or {})})
        _commit(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_delta(directory, state: dict[str, torch.Tensor], previous_state: dict[str, torch.Tensor],
                previous_identity: str, identity: str) -> Path:
    if set(state) != set(previous_state):
        raise ValueError("delta needs the same tensor names in both states")
    final = Path(directory)
    tmp = _atomic_dir(final)
    tensors: dict[str, Any] = {}
    try:
        with open(tmp / DELTA_FILE, "wb") as f:
            offset = 0
            for name, new in state.items():
                old = previous_state[name]
                if new.shape != old.shape or new.dtype != old.dtype:
                    raise ValueError(f"tensor {name} changed shape/dtype; write a base snapshot instead")
                if torch.equal(new, old):
                    continue  # unchanged tensors are omitted entirely
                a = new.detach().contiguous().view(torch.uint8).reshape(-1, new.element_size())
                b = old.detach().contiguous().view(torch.uint8).reshape(-1, new.element_size())
                planes = torch.bitwise_xor(a, b).t().contiguous()  # [bytes per element, elements]
                encoded = []
                for plane in planes:
                    compress = float((plane == 0).float().mean()) >= _ZERO_FRACTION_TO_COMPRESS
                    blob = zlib.compress(plane.numpy().tobytes(), 1) if compress else plane.numpy().tobytes()
                    f.write(blob)
                    encoded.append([offset, len(blob), "zlib" if compress else "raw"])
                    offset += len(blob)
                tensors[name] = {"planes": encoded, "dtype": str(new.dtype).removeprefix("torch."),
                                 "shape": list(new.shape), "checksum": _checksum(new)}
        _write_manifest(tmp, {"kind": "delta", "identity": identity, "previous_snapshot_identity": previous_identity,
                              "compression": _COMPRESSION, "checksum_format": "adler32", "tensors": tensors})
        _commit(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


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
    out = dict(current_state)
    blob_file = (directory / DELTA_FILE).read_bytes()
    for name, info in manifest["tensors"].items():
        if name not in current_state:
            raise SnapshotMismatch(f"delta names tensor {name!r} that the current weights lack")
        old = current_state[name].detach().contiguous()
        xor = b"".join(zlib.decompress(blob_file[start:start + length]) if codec == "zlib"
                       else blob_file[start:start + length] for start, length, codec in info["planes"])
        diff = torch.frombuffer(bytearray(xor), dtype=torch.uint8)
        if diff.numel() != old.numel() * old.element_size():
            raise SnapshotMismatch(f"delta for {name!r} has the wrong size")
        diff = diff.reshape(old.element_size(), -1).t()  # byte planes back to per-element bytes
        new = torch.bitwise_xor(old.view(torch.uint8).reshape(-1, old.element_size()), diff)
        new = new.reshape(-1).view(old.dtype).reshape(old.shape)
        if _checksum(new) != info["checksum"]:
            raise SnapshotMismatch(f"checksum mismatch for {name!r} in delta {manifest['identity']!r}")
        out[name] = new
    return out


def damage(directory) -> None:
    """Corrupt a written snapshot in place (fault tests: a hot load of it must fail, not load garbage): flip bytes in
    a delta's payload (its checksums catch it), or cut a base's weights file in half (it no longer parses)."""
    directory = Path(directory)
    delta = directory / DELTA_FILE
    if delta.exists():
        data = bytearray(delta.read_bytes())
        for i in range(len(data) // 3, len(data) // 3 + 64):
            data[i] ^= 0xFF
        delta.write_bytes(bytes(data))
        return
    weights = sorted(directory.glob("*.safetensors"))[0]
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
