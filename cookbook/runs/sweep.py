"""Sweep bookkeeping: a Hydra callback that summarises a multirun and tells train.py whether any job failed.

Registered in conf/config.yaml under `hydra.callbacks`. Where each hook runs:
- `on_multirun_start` / `on_multirun_end`: the head process, for every launcher (basic, joblib, submitit), so
  module state set here is visible to `cookbook.train.main()` after Hydra returns.
- `on_job_end`: the process that ran the job (the head for basic, a loky worker for joblib, the submitit job);
  it only writes files into the job directory.

Failure handling, given how Hydra treats a failing job and a raising callback:
- runner.py records a failing job in status.json and returns, so the sweep goes on and Hydra calls
  `on_multirun_end`, which reads every job's status, prints the failures and writes summary.md + PNGs.
- A job that raises anyway (e.g. a user error caught only at run time) makes Hydra's basic sweeper re-raise at the
  end and skip `on_multirun_end`. `on_job_end` records such a job as failed, and `train.main()` calls `finish()`
  itself when Hydra skipped it, so the summary is still written and the exit code is still non-zero.
- Hydra turns exceptions in callbacks into warnings. `finish()` therefore assumes failure until it has read every
  status, and writes the report separately, so a broken summary can never turn a failed sweep into exit code 0.

Kept import-light (no matplotlib, no torch): Hydra instantiates this callback for every run, and train.py imports it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

SUMMARY_NAME = "summary.md"

# Head-process state of the current multirun (None: not a multirun, or it has not started).
_state: dict[str, Any] = {"sweep_dir": None, "dry_run": False, "finished": False, "failed": False}


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Resolved here once: `${now:...}` is cached on this config object, which the launcher also uses.
        _state.update(sweep_dir=Path(str(config.hydra.sweep.dir)).resolve(), dry_run=_dry_run(config),
                      finished=False, failed=False)
        share_cores(int(config.hydra.launcher.get("n_jobs") or 1))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        try:
            record_job_end(job_return)
        except Exception as exc:  # never let bookkeeping break a job; the summary treats unknown jobs as failed
            print(f"warning: could not record the end of the job: {exc!r}", file=sys.stderr)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        finish()


def share_cores(jobs_at_once: int) -> None:
    """Local jobs running side by side split the cores: each job's trainer and deployment get cores / jobs torch
    threads (set through the environment the workers inherit; a value the user set is kept)."""
    if jobs_at_once > 1:
        os.environ.setdefault("COOKBOOK_TORCH_THREADS", str(max(1, len(os.sched_getaffinity(0)) // jobs_at_once)))


def _dry_run(config: DictConfig) -> bool:
    try:
        return bool(config.get("dry_run", False))
    except Exception:
        return False


def record_job_end(job_return: Any) -> None:
    """Persist what only the job's process knows: a dry run's plan, or an exception that escaped the runner."""
    from hydra.core.utils import JobStatus
    from hydra.types import RunMode

    hydra_cfg = job_return.hydra_cfg.hydra
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    job_dir = Path(hydra_cfg.runtime.output_dir)
    value = job_return._return_value  # the `return_value` property re-raises a failed job's exception
    if job_return.status == JobStatus.FAILED:
        from cookbook.runs.rundir import read_status, redact, write_status

        (job_dir / "plan.json").unlink(missing_ok=True)  # a stale plan from an earlier dry run would hide this
        previous = read_status(job_dir) or {}
        if previous.get("status") != "failed":
            write_status(job_dir, {**previous, "status": "failed", "previous_status": previous.get("status"),
                                   "error": redact(f"{type(value).__name__}: {value}"),
                                   "overrides": list(job_return.overrides or [])})
    elif isinstance(value, dict) and value.get("status") == "dry_run":
        from cookbook.runs.rundir import atomic_write_text

        atomic_write_text(job_dir / "plan.json", json.dumps(value, indent=2, default=str) + "\n")


def finish() -> bool:
    """Summarise the current multirun once; returns True when any job failed (False outside a multirun).

    Called by `on_multirun_end`, and by `train.main()` after Hydra returns or raises (a no-op if already done).
    """
    sweep_dir = _state["sweep_dir"]
    if sweep_dir is None:
        return False
    if _state["finished"]:
        return bool(_state["failed"])
    _state.update(finished=True, failed=True)  # pessimistic until every status has been read
    try:
        _state["failed"] = summarize(sweep_dir, dry_run=bool(_state["dry_run"]))
    except Exception as exc:
        print(f"error: could not read the job statuses in {sweep_dir} ({exc!r}); treating the sweep as failed.",
              file=sys.stderr)
    return bool(_state["failed"])


def summarize(sweep_dir: Path, dry_run: bool = False) -> bool:
    """Print the sweep's outcome and write summary.md + plots into the sweep dir; True when any job failed."""
    from cookbook import report

    jobs = report.load_jobs(sweep_dir) if sweep_dir.is_dir() else []
    if not jobs:
        print(f"error: the sweep wrote no job directories under {sweep_dir}.", file=sys.stderr)
        return True
    # A dry run judges each job by its plan (an earlier real run's status.json in the same dir does not count).
    failed = [job for job in jobs if (job.plan is None if dry_run else not job.ok)]
    if dry_run and not failed:
        print(dry_run_line(jobs))
        return False
    try:
        markdown, path = report.write_report(sweep_dir, sweep_dir, name=SUMMARY_NAME, jobs=jobs)
        print(markdown)
        print(f"Sweep summary: {path}")
    except Exception as exc:  # plots are a convenience; the failure list below must still be printed
        print(f"warning: could not write the sweep summary in {sweep_dir}: {exc!r}", file=sys.stderr)
    if failed:
        print(failure_table(jobs, failed), file=sys.stderr)
    else:
        print(f"All {len(jobs)} jobs finished ({sweep_dir}).")
    return bool(failed)


def failure_table(jobs: list[Any], failed: list[Any]) -> str:
    lines = [f"{len(failed)} of {len(jobs)} sweep jobs did not finish:"]
    for job in failed:
        details = job.path / "error.txt"
        where = details if details.exists() else job.path
        lines.append(f"  {job.label:>4} {job.state:9} {' '.join(job.overrides)}")
        lines.append(f"       {job.error.splitlines()[0] if job.error else '(no error recorded)'}")
        lines.append(f"       details: {where}")
    lines.append("Rerun the same command with hydra.sweep.dir=<this sweep dir> to retry them: finished jobs are "
                 "skipped and unfinished ones resume from their checkpoints.")
    return "\n".join(lines)


def dry_run_line(jobs: list[Any]) -> str:
    plans = [job.plan or {} for job in jobs]

    def n(key: str, noun: str) -> str:
        count = sum(1 for p in plans if p.get(key))
        return f"{count} {noun}{'s' if count != 1 else ''}"

    return (f"[dry-run] {len(jobs)} job{'s' if len(jobs) != 1 else ''} would create "
            f"{n('policy_trainer', 'policy trainer')}, {n('reference_trainer', 'reference trainer')} and "
            f"{n('deployment', 'deployment')}; nothing was started.")
