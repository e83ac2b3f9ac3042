"""Checkpoints: `{log_path}/checkpoints.jsonl`, saving on a cadence, resuming, and listing.

The weights live in the trainer's storage; the index line says where (a `cross_job://` path that any later trainer
job can load) and where the data cursor stood. The line is appended only after the save has completed, with one
atomic write, so a crash mid-save leaves the previous line — and so the previous checkpoint — in charge.

Resume rules (documented in the README):
- `resume=auto` (default): the last line of this run's index, if any: weights + optimizer + step + data cursor.
- `resume=never`: refuse to start when the index has lines (no silent overwrite). `resume=must`: fail when none.
- `resume_from=<name>`: that checkpoint of this run, full resume (step and cursor too).
- `resume_from=<other_run_dir>:<name>`: weights + optimizer from another run; step and data position start at 0
  (a new run that starts from those weights).
- `resume_weights_only=true` with `resume_from`: weights only, fresh optimizer, position 0.
A checkpoint whose base model, recipe or training shape differs from this run's is refused unless `resume_force`.

Retention: after each periodic save, this trainer job's periodic checkpoints beyond the newest
`weight_sync.dcp_keep_last` are deleted from the trainer's storage (best effort, `cookbook.runs.retention`) and each
deletion is recorded as an event line `{"event": "deleted", "name", "job_id", ...}`, after which the index no longer
offers that checkpoint. Final checkpoints (kind `both`), the checkpoint of the newest line and other jobs' checkpoints
(earlier attempts, other runs) are never deleted here; `python -m cookbook.local storage --prune` handles those.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from cookbook.config import RunConfig
from cookbook.errors import UserError
from cookbook.runs.faults import crash_point
from cookbook.runs.retention import discard
from cookbook.runs.rundir import append_jsonl, read_jsonl

if TYPE_CHECKING:  # the checkpoints CLI stays free of the SDK import
    from cookbook.client.session import Session

INDEX = "checkpoints.jsonl"
DELETED = "deleted"  # the event of an index line that records a retention deletion


def read_index(log_path: str | Path) -> list[dict[str, Any]]:
    """The checkpoints a run can still use, oldest first: every checkpoint line not followed by a deletion event
    for the same (job, name)."""
    live: list[dict[str, Any]] = []
    for r in read_jsonl(Path(log_path) / INDEX):
        if r.get("event") == DELETED:
            live = [x for x in live if (x["name"], x.get("job_id")) != (r.get("name"), r.get("job_id"))]
        elif r.get("state_path"):
            live.append(r)
    return live


def deleted_checkpoints(log_path: str | Path) -> list[dict[str, Any]]:
    """The deletion events of a run's index, oldest first."""
    return [r for r in read_jsonl(Path(log_path) / INDEX) if r.get("event") == DELETED]


@dataclass
class ResumePoint:
    step: int = 0
    cursor: Optional[dict[str, Any]] = None  # DataCursor.state_dict() to restore, None = start of data
    source: Optional[str] = None  # "<run_dir>:<name>" the weights came from, None = fresh


class Checkpointer:
    """Saves and resumes the policy through the ReconnectableClient; knows nothing about the backend."""

    def __init__(self, run: RunConfig, policy: Any, recipe: str):
        self.run, self.policy, self.recipe = run, policy, recipe
        self.log_path = Path(run.log_path)
        self.timeout = run.weight_sync.dcp_timeout
        self._state_saved_at: Optional[int] = None

    # ------------------------------------------------------------------------------------------------ saving
    def save(self, step: int, cursor: dict[str, Any], *, final: bool = False) -> dict[str, Any]:
        """Periodic saves are resumable (DCP); the final save is resumable and promotable (sampler base too)."""
        name = f"step-{step}"
        started = time.time()
        if self._state_saved_at != step:
            self.policy.save_state(name, timeout=self.timeout)
            self._state_saved_at = step
        record: dict[str, Any] = {
            "name": name, "step": step, "kind": "both" if final else "state", "data_cursor": cursor,
            "state_path": self.policy.resolve_checkpoint_path(name, source_job_id=self.policy.job_id),
            "sampler_path": None, "job_id": self.policy.job_id, "base_model": self.run.base_model,
            "training_shape": self.run.infra.training_shape_id, "recipe": self.recipe,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if final:
            saved = self.policy.save_weights_for_sampler_ext(name, checkpoint_type="base", timeout=self.timeout)
            record["sampler_path"] = saved.snapshot_name
        record["save_time_s"] = round(time.time() - started, 3)
        crash_point("after_state_save")
        append_jsonl(self.log_path / INDEX, record)
        if not final:
            self._retire_old_checkpoints()
        return record

    def _retire_old_checkpoints(self) -> None:
        """Delete this job's periodic checkpoints beyond the newest `dcp_keep_last` (0 = keep all). Deleted first,
        recorded after: a failed delete leaves the line offering a checkpoint that still exists."""
        keep = self.run.weight_sync.dcp_keep_last
        records = read_index(self.log_path)
        if not keep or not records:
            return
        job = self.policy.job_id
        periodic = sorted((r for r in records if r.get("job_id") == job and r.get("kind", "state") == "state"),
                          key=lambda r: r["step"])
        protected = {records[-1]["name"]} | {r["name"] for r in records if r.get("job_id") == job
                                             and r.get("kind") == "both"}
        for r in periodic[:-keep]:
            if r["name"] in protected or not discard(self.policy, f"weights/{r['name']}"):
                continue
            append_jsonl(self.log_path / INDEX, {
                "event": DELETED, "name": r["name"], "step": r["step"], "job_id": job,
                "reason": f"weight_sync.dcp_keep_last={keep}", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    # ---------------------------------------------------------------------------------------------- resuming
    def resume(self, init_state_path: Optional[str] = None) -> ResumePoint:
        """Restore the trainer per the resume rules; a fresh start loads `init_state_path` (weights only) if given."""
        run = self.run
        if run.resume_from:
            record, same_run = self._find(run.resume_from)
            self._check_compatible(record)
            if run.resume_weights_only:
                self.policy.load_state(record["state_path"], timeout=self.timeout)
                return ResumePoint(source=run.resume_from)
            self.policy.load_state_with_optimizer(record["state_path"], timeout=self.timeout)
            if same_run:
                return ResumePoint(record["step"], record.get("data_cursor"), run.resume_from)
            return ResumePoint(source=run.resume_from)
        records = read_index(self.log_path)
        if not records:
            if run.resume == "must":
                raise UserError(f"resume=must but {self.log_path / INDEX} has no checkpoint to resume from. Fix: use "
                                f"resume=auto to start fresh, or point log_path at the run you meant to resume.")
            if init_state_path:
                self.policy.load_state(init_state_path, timeout=self.timeout)
            return ResumePoint()
        if run.resume == "never":
            raise UserError(f"resume=never but {self.log_path} already holds {len(records)} checkpoint(s) (last: "
                            f"{records[-1]['name']}); starting over would mix two runs in one directory. Fix: choose a "
                            f"new log_path, or use resume=auto to continue the run.")
        record = records[-1]
        self._check_compatible(record)
        self.policy.load_state_with_optimizer(record["state_path"], timeout=self.timeout)
        self._state_saved_at = record["step"]
        return ResumePoint(record["step"], record.get("data_cursor"), f"{self.log_path}:{record['name']}")

    def _find(self, ref: str) -> tuple[dict[str, Any], bool]:
        run_dir, name = ref.rsplit(":", 1) if ":" in ref else (str(self.log_path), ref)
        same_run = Path(run_dir).resolve() == self.log_path.resolve()
        records = read_index(run_dir)
        matches = [r for r in records if r["name"] == name]
        gone = [r for r in deleted_checkpoints(run_dir) if r.get("name") == name]
        if not matches and gone:
            names = ", ".join(r["name"] for r in records[-8:]) or "none"
            raise UserError(f"resume_from={ref}: checkpoint '{name}' of {run_dir} was deleted at {gone[-1].get('time')} "
                            f"by checkpoint retention ({gone[-1].get('reason')} keeps only the newest periodic "
                            f"checkpoints). Fix: resume from a checkpoint that is kept ({names}); to keep every "
                            f"checkpoint of a run, run it with weight_sync.dcp_keep_last=0.")
        if not matches:
            names = ", ".join(r["name"] for r in records[-8:]) or "none"
            raise UserError(f"resume_from={ref}: no checkpoint named '{name}' in {Path(run_dir) / INDEX} (available: "
                            f"{names}). Fix: use one of the listed names, as <name> or <run_dir>:<name>.")
        return matches[-1], same_run

    def _check_compatible(self, record: dict[str, Any]) -> None:
        if self.run.resume_force:
            return
        mine = {"base_model": self.run.base_model, "recipe": self.recipe,
                "training_shape": self.run.infra.training_shape_id}
        differs = [f"{k} (checkpoint: {record.get(k)}, this run: {v})" for k, v in mine.items()
                   if record.get(k) is not None and record.get(k) != v]
        if differs:
            raise UserError(f"Refusing to resume from checkpoint {record['name']}: its {'; '.join(differs)} differ. "
                            f"Fix: rerun with the checkpoint's settings, use a new log_path, or add resume_force=true "
                            f"to load it anyway.")


def promote(session: Session, record: dict[str, Any], output_model_id: str) -> Any:
    """Export a final (sampler) checkpoint as a standalone model through the control plane's promote call."""
    if not record.get("sampler_path"):
        raise UserError(f"Checkpoint {record['name']} has no sampler export to promote. Fix: promote the final "
                        f"checkpoint (kind 'both').")
    mgr = session.rlor_mgr
    name = f"accounts/{mgr.account_id}/rlorTrainerJobs/{record['job_id']}/checkpoints/{record['sampler_path']}"
    return mgr.promote_checkpoint(name=name, output_model_id=output_model_id, base_model=session.base_model)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def describe(log_path: str | Path, storage_root: Optional[Path] = None) -> list[dict[str, Any]]:
    """Rows for `python -m cookbook.checkpoints`: name, step, kind, time and size where the storage is local."""
    rows = []
    for r in read_index(log_path):
        size = None
        if storage_root is not None:
            size = _dir_size(storage_root / "jobs" / r["job_id"] / "checkpoints" / r["name"])
        rows.append({"name": r["name"], "step": r["step"], "kind": r.get("kind", "state"), "time": r.get("time"),
                     "size_mb": round(size / 2**20, 2) if size else None, "state_path": r["state_path"],
                     "sampler_path": r.get("sampler_path")})
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    from cookbook.runs.rundir import storage_root

    parser = argparse.ArgumentParser(prog="python -m cookbook.checkpoints",
                                     description="List a run's checkpoints (name, step, kind, time, size).")
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    if not (Path(args.run_dir) / INDEX).exists():
        print(f"error: {Path(args.run_dir) / INDEX} does not exist. Fix: pass a run directory (the run's log_path).",
              file=sys.stderr)
        sys.exit(2)
    rows = describe(args.run_dir, storage_root())
    print(f"{'name':<14} {'step':>6} {'kind':<6} {'time':<25} {'size':>9}  state_path")
    for r in rows:
        size = f"{r['size_mb']} MB" if r["size_mb"] is not None else "-"
        print(f"{r['name']:<14} {r['step']:>6} {r['kind']:<6} {r['time'] or '-':<25} {size:>9}  {r['state_path']}")
    deleted = deleted_checkpoints(args.run_dir)
    if deleted:
        names = ("..., " if len(deleted) > 6 else "") + ", ".join(r["name"] for r in deleted[-6:])
        print(f"({len(deleted)} older periodic checkpoint(s) deleted by retention ({deleted[-1].get('reason')}): "
              f"{names})")


if __name__ == "__main__":
    main()
