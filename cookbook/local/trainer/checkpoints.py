"""Trainer store: DCP training checkpoints and sampler snapshots.

Layout (the control plane and the checkpoint code rely on it):
    <jobs_root>/<job_id>/checkpoints/<name>/   DCP state (model [+ optimizer] + step) and meta.json
    <jobs_root>/<job_id>/sampler/<identity>/   sampler snapshots (cookbook.local.snapshots)
    <jobs_root>/<job_id>/.sampler-files/<key>/ the config and tokenizer files base snapshots link to
`cross_job://<other_job>/<name>` resolves to `<jobs_root>/<other_job>/checkpoints/<name>`.

Every save writes into a hidden temp dir and renames it into place, so a crash never leaves a half checkpoint
that looks complete (`meta.json` is written last inside the temp dir, and list_checkpoints requires it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path

from cookbook.local import snapshots
from cookbook.local.trainer.engine import TrainModel
from cookbook.local.trainer.losses import UserRequestError
from cookbook.runs.faults import crash_point, should_fail

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
META = "meta.json"


def check_name(name: object, what: str = "checkpoint name") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise UserRequestError(f"invalid {what} {name!r}: use letters, digits, '.', '_' or '-' (no slashes)")
    return name


class Store:
    def __init__(self, store_dir: str | os.PathLike, job_id: str, delta_encoding: str = "copy"):
        self.root = Path(store_dir)
        self.delta_encoding = delta_encoding  # snapshots.write_delta's `encoding`
        self.job_id = job_id
        self.jobs_root = self.root.parent
        self.checkpoints = self.root / "checkpoints"
        self.sampler = self.root / "sampler"

    def list_checkpoints(self) -> list[str]:
        if not self.checkpoints.is_dir():
            return []
        return sorted(p.name for p in self.checkpoints.iterdir() if not p.name.startswith(".") and (p / META).is_file())

    def resolve(self, path: object, model_id: str | None = None) -> Path:
        """`tinker://<model_id>/weights/<n>`, `<n>` or `cross_job://<job>/<n>` → the checkpoint directory."""
        if not isinstance(path, str) or not path:
            raise UserRequestError("checkpoint path must be a non-empty string")
        root = self.checkpoints
        if path.startswith("cross_job://"):
            job, _, name = path.removeprefix("cross_job://").partition("/")
            check_name(job, "job id")
            root = self.jobs_root / job / "checkpoints"
        elif path.startswith("tinker://"):
            m = re.fullmatch(r"tinker://([^/]+)/weights/([^/]+)", path)
            if not m:
                raise UserRequestError(f"cannot load {path!r}: expected tinker://<model_id>/weights/<name>")
            name = m.group(2)
        else:
            name = path
        check_name(name)
        target = root / name
        if not (target / META).is_file():
            raise UserRequestError(f"checkpoint {path!r} not found (looked in {root})")
        return target

    # ------------------------------------------------------------------ DCP state
    def save_state(self, m: TrainModel, name: str) -> Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        check_name(name)
        final = self.checkpoints / name
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoints / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        # Without any optimizer step there is no Adam state to save; get_state_dict would otherwise initialise it
        # with a fake step (changing the live optimizer and dropping accumulated grads).
        has_opt = m.optimizer is not None and bool(m.optimizer.state)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "assuming single process" etc.
                if has_opt:
                    model_sd, optim_sd = get_state_dict(m.model, m.optimizer)
                    state = {"model": model_sd, "optim": optim_sd}
                else:
                    state = {"model": {k: v for k, v in m.model.state_dict().items()}}
                dcp.save(state, checkpoint_id=str(tmp))
            crash_point("mid_dcp_save")
            meta = {"step": m.step, "base_model": m.base_model, "lora_rank": m.lora_rank if m.is_lora else 0,
                    "lora_alpha": m.lora_alpha, "has_optimizer": has_opt, "job_id": self.job_id, "name": name,
                    "seed": m.seed, **m.train_flags}
            (tmp / META).write_text(json.dumps(meta, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    @staticmethod
    def read_meta(path: Path) -> dict:
        return json.loads((path / META).read_text())

    def load_state(self, m: TrainModel, path: Path, with_optimizer: bool) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        meta = self.read_meta(path)
        if meta["base_model"] != m.base_model or int(meta["lora_rank"]) != (m.lora_rank if m.is_lora else 0):
            raise UserRequestError(
                f"checkpoint {path.name} is for base model {meta['base_model']!r} with lora_rank {meta['lora_rank']}; "
                f"this model is {m.base_model!r} with lora_rank {m.lora_rank if m.is_lora else 0}")
        m.reset_accumulation()
        load_opt = with_optimizer and meta.get("has_optimizer", False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if load_opt:
                m.optimizer = m.new_optimizer()
                model_sd, optim_sd = get_state_dict(m.model, m.optimizer)  # template with the right structure
                state = {"model": model_sd, "optim": optim_sd}
                dcp.load(state, checkpoint_id=str(path))
                set_state_dict(m.model, m.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
                m.optimizer.zero_grad(set_to_none=True)
            else:
                state = {"model": dict(m.model.state_dict())}
                dcp.load(state, checkpoint_id=str(path))
                m.model.load_state_dict(state["model"])
                m.optimizer = None  # fresh Adam state at the next step
        m.step = int(meta["step"]) if with_optimizer else m.step
        m.last_snapshot = None  # a delta chain never spans a weight load

    # ------------------------------------------------------------------ sampler snapshots
    def save_sampler(self, m: TrainModel, tokenizer, identity: str, checkpoint_type: str | None) -> Path:
        check_name(identity, "sampler checkpoint name")
        target = self.sampler / identity
        kind = checkpoint_type or "base"
        if kind not in ("base", "delta", "merged_base"):
            raise UserRequestError(f"checkpoint_type must be base, delta or merged_base, got {kind!r}")
        if m.is_lora or kind == "merged_base":
            kind = "base"  # LoRA exports merged full weights: always a promotable base, never a delta
        merged = m.merged_model()
        state = {k: v.detach() for k, v in snapshots.canonical_state(merged).items()}  # the live weights
        extra = {"base_model": m.base_model, "step": m.step, "lora_rank": m.lora_rank if m.is_lora else 0}
        if kind == "delta":
            if m.last_snapshot is None:
                raise UserRequestError("a delta sampler checkpoint needs an earlier base snapshot from this model; "
                                       "save with checkpoint_type='base' first")
            prev_identity, prev_state = m.last_snapshot
            snapshots.write_delta(target, state, prev_state, prev_identity, identity, self.delta_encoding)
        else:
            # Config and tokenizer files are the same in every snapshot of this model: written once, then linked.
            static = self.root / ".sampler-files" / hashlib.sha1(m.base_model.encode()).hexdigest()[:16]
            snapshots.write_base(target, merged, tokenizer, identity, extra=extra,
                                 static_dir=snapshots.static_files(merged, tokenizer, static))
        # What the next delta is computed against. Copied into the last export's buffers: fresh ones would cost page
        # faults (a clone of local-small takes 4x as long as a copy into memory already mapped).
        previous = m.last_snapshot[1] if m.last_snapshot else {}
        m.last_snapshot = None  # until the copy below is whole
        m.last_snapshot = (identity, snapshots.copy_state(state, into=previous))
        if should_fail("sampler_snapshot"):
            snapshots.damage(target)
        return target

    def sampler_dir(self, identity: str) -> Path:
        return self.sampler / check_name(identity, "sampler checkpoint name")

    # ------------------------------------------------------------------ deletion
    def delete(self, kind: str, name: str) -> None:
        """Delete this job's DCP checkpoint (`weights`) or sampler snapshot (`sampler_weights`) `name`; raises
        FileNotFoundError when there is none. Only ever inside this store: `name` is a plain name (no slashes).
        The directory is renamed to a hidden name first, so an interrupted delete leaves a temp dir (removed at the
        next start), never a half checkpoint that still lists as complete."""
        parent = {"weights": self.checkpoints, "sampler_weights": self.sampler}.get(kind)
        if parent is None:
            raise UserRequestError(f"cannot delete {kind}/{name}: checkpoint ids are weights/<name> (a DCP "
                                   "checkpoint) or sampler_weights/<name> (a sampler snapshot)")
        target = parent / check_name(name)
        if not target.is_dir():
            raise FileNotFoundError(f"{kind}/{name}")
        doomed = parent / f".deleting-{name}-{uuid.uuid4().hex[:8]}"
        os.replace(target, doomed)
        shutil.rmtree(doomed)


def weights_info(store: Store, tinker_path: object) -> dict:
    path = store.resolve(tinker_path)
    meta = Store.read_meta(path)
    return {"base_model": meta["base_model"], "is_lora": int(meta["lora_rank"]) > 0, "lora_rank": int(meta["lora_rank"]),
            "train_unembed": meta.get("train_unembed"), "train_mlp": meta.get("train_mlp"),
            "train_attn": meta.get("train_attn")}
