"""What the embedded platform keeps on disk, whose it is, and what can go: the model behind `python -m cookbook.local
storage` (and the temp-dir cleanup trainers and the local launcher run on start).

The storage root (`platform_root.storage_root()`) holds `jobs/<job_id>/` (one trainer job's store: `checkpoints/`
DCP checkpoints, `sampler/` snapshots), `warmstart/` (cached warm-start models), `models/` (promoted models) and
`runs.jsonl`, the run registry: the local launcher appends `{log_path, job_ids, time}` each time it builds a run's
session, because nothing in a job's store says which run directory it belongs to.

A job's state:
- running: a live trainer process serves that store (it holds the store's serving lock, `.serving.lock`);
- referenced: a registered run directory still exists and its checkpoints.jsonl points at the job (a checkpoint to
  resume from, a sampler snapshot to promote);
- orphaned: recorded for a run whose directory is gone, or whose index does not point at it (a failed attempt,
  a reference trainer, a deleted run);
- unrecorded: no run recorded it (made before the registry existed, or by a program using `serve`): what it is for
  cannot be known, so pruning keeps it unless asked otherwise.

Pruning deletes orphaned jobs; inside referenced jobs every checkpoint and snapshot the indexes do not reference;
everywhere (but in running jobs) the hidden temp dirs a crashed save left. Never warm starts or promoted models
(only the temp dirs of builds or promotions whose process is gone).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

REGISTRY = "runs.jsonl"
STORE_PARTS = ("checkpoints", "sampler")  # what a trainer writes into its store


# --------------------------------------------------------------------------------------------------- the registry
def record_run(storage: Path, log_path: str | os.PathLike, job_ids: Iterable[Optional[str]]) -> None:
    """Append this run's trainer jobs to the registry (one fsynced line: a crash leaves it whole or absent)."""
    from cookbook.runs.rundir import append_jsonl

    storage.mkdir(parents=True, exist_ok=True)
    append_jsonl(storage / REGISTRY, {"log_path": str(Path(log_path).resolve()), "job_ids": [j for j in job_ids if j],
                                      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid()})


def read_registry(storage: Path) -> list[dict[str, Any]]:
    from cookbook.runs.rundir import read_jsonl

    return [r for r in read_jsonl(storage / REGISTRY) if isinstance(r.get("job_ids"), list) and r.get("log_path")]


def jobs_of_run(storage: Path, log_path: str | os.PathLike) -> list[str]:
    """Every trainer job recorded for the run directory `log_path`, oldest first."""
    want = str(Path(log_path).resolve())
    return [j for r in read_registry(storage) if r["log_path"] == want for j in r["job_ids"]]


# ------------------------------------------------------------------------------------------ processes and temp dirs
SERVING_LOCK = ".serving.lock"


def hold_store(store: Path) -> int:
    """Mark `store` as served by this process for as long as it lives: an exclusive flock on a file in it, which the
    kernel releases however the process ends. Returns the descriptor; keep it open."""
    store.mkdir(parents=True, exist_ok=True)
    fd = os.open(store / SERVING_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a trainer of the same job still shutting down holds it for a moment at most
    return fd


def store_is_live(store: Path) -> bool:
    """True while a live trainer process serves `store` (holds its serving lock)."""
    try:
        fd = os.open(store / SERVING_LOCK, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def temp_leftovers(store: Path) -> list[Path]:
    """Hidden entries in a store's checkpoints/ and sampler/: saves (and deletions) that never finished. Every save
    writes into a hidden dir and renames it into place, so a visible entry is complete and a hidden one is not."""
    return sorted(p for part in STORE_PARTS if (store / part).is_dir()
                  for p in (store / part).iterdir() if p.name.startswith("."))


def remove_temp_leftovers(store: Path) -> list[Path]:
    """Delete what a crashed save left in `store`. Only safe while no trainer process writes there: callers own the
    store (a trainer starting on it) or checked that no live process serves it."""
    removed = temp_leftovers(store)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return removed


def clean_earlier_jobs(storage: Path, log_path: str | os.PathLike) -> list[Path]:
    """The next run of a run directory removes what crashed saves of its earlier trainer jobs left behind (each
    attempt gets a new job, so no trainer ever starts on those stores again). Stores still served are skipped."""
    removed: list[Path] = []
    for job_id in dict.fromkeys(jobs_of_run(storage, log_path)):
        store = (storage / "jobs" / job_id).resolve()
        if not store_is_live(store):
            removed += remove_temp_leftovers(store)
    return removed


def _dead_pid_suffix(name: str, sep: str) -> bool:
    """`<...><sep><pid>` whose process is gone (a promotion or warm-start build that crashed)."""
    from cookbook.local.procs import pid_alive

    pid = name.rsplit(sep, 1)[-1]
    return sep in name and pid.isdigit() and not pid_alive(int(pid))


# ------------------------------------------------------------------------------------------------------ the survey
@dataclass
class Entry:
    path: Path
    size: int
    why: str


@dataclass
class Job:
    job_id: str
    store: Path
    size: int
    newest: float  # newest mtime in the store
    state: str = "unrecorded"
    run: Optional[str] = None
    resumable: list[str] = field(default_factory=list)
    promotable: list[str] = field(default_factory=list)
    reason: str = ""
    prunable: list[Entry] = field(default_factory=list)


@dataclass
class Survey:
    root: Path
    jobs: list[Job]
    warmstarts: list[Entry]
    models: list[Entry]
    other_leftovers: list[Entry]  # temp dirs outside job stores

    def prunable(self) -> list[Entry]:
        return [e for j in self.jobs for e in j.prunable] + self.other_leftovers


def size_and_newest(path: Path) -> tuple[int, float]:
    """Bytes on disk of everything under `path` (files counted once) and the newest modification time."""
    if not path.exists():
        return 0, 0.0
    st = path.lstat()
    total, newest = st.st_size if not path.is_dir() else 0, st.st_mtime
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + dirnames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:  # deleted while we looked
                continue
            newest = max(newest, st.st_mtime)
            if name in filenames:
                total += st.st_size
    return total, newest


def _references(storage: Path) -> tuple[dict[str, str], dict[str, dict[str, set[str]]], dict[str, str]]:
    """From the registry and the run indexes that still exist: job -> its run; job -> {"checkpoints": names,
    "sampler": names} the indexes point at; job -> why a recorded job is not referenced."""
    from cookbook.checkpoints import read_index

    run_of: dict[str, str] = {}
    for r in read_registry(storage):
        for job_id in r["job_ids"]:
            run_of[job_id] = r["log_path"]
    refs: dict[str, dict[str, set[str]]] = {}
    referrer: dict[str, str] = {}
    for log_path in dict.fromkeys(run_of.values()):
        for rec in read_index(log_path) if Path(log_path).is_dir() else []:
            state_path = str(rec["state_path"])
            if state_path.startswith("cross_job://"):
                job_id, _, name = state_path.removeprefix("cross_job://").partition("/")
                refs.setdefault(job_id, {"checkpoints": set(), "sampler": set()})["checkpoints"].add(name)
                referrer[job_id] = log_path
            if rec.get("sampler_path") and rec.get("job_id"):
                refs.setdefault(rec["job_id"], {"checkpoints": set(), "sampler": set()})["sampler"].add(
                    rec["sampler_path"])
                referrer[rec["job_id"]] = log_path
    why = {j: ("its run directory is gone" if not Path(p).is_dir() else "its run's checkpoints.jsonl does not "
               "point at it") for j, p in run_of.items()}
    return {**referrer, **run_of}, refs, why


def survey(storage: Path, *, include_unrecorded: bool = False) -> Survey:
    run_of, refs, why = _references(storage)
    jobs = []
    jobs_root = storage / "jobs"
    leftovers = []
    for store in sorted(jobs_root.iterdir()) if jobs_root.is_dir() else []:
        if store.name.startswith("."):  # a job store whose deletion was interrupted
            if _dead_pid_suffix(store.name, "-"):
                leftovers.append(Entry(store, size_and_newest(store)[0], "interrupted deletion, its process is gone"))
            continue
        if not store.is_dir():
            continue
        size, newest = size_and_newest(store)
        job = Job(store.name, store, size, newest, run=run_of.get(store.name))
        ref = refs.get(store.name)
        if ref:
            job.resumable, job.promotable = sorted(ref["checkpoints"], key=_step), sorted(ref["sampler"], key=_step)
        if store_is_live(store):
            job.state = "running"
        elif ref:
            job.state = "referenced"
            for part in STORE_PARTS:
                for p in sorted((store / part).iterdir()) if (store / part).is_dir() else []:
                    if p.name not in ref[part]:
                        job.prunable.append(Entry(p, size_and_newest(p)[0], "temp dir of an unfinished save"
                                                  if p.name.startswith(".") else "no run's index points at it"))
        elif store.name in run_of or include_unrecorded:
            job.state, job.reason = "orphaned", why.get(store.name, "no run recorded it")
            job.prunable.append(Entry(store, size, f"orphaned job: {job.reason}"))
        else:
            job.reason = "no run recorded it"
            job.prunable += [Entry(p, size_and_newest(p)[0], "temp dir of an unfinished save")
                             for p in temp_leftovers(store)]
        jobs.append(job)
    jobs.sort(key=lambda j: j.newest)

    warmstarts, models = [], []
    for folder, kept, sep in ((storage / "warmstart", warmstarts, ".building-"), (storage / "models", models, "-")):
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            unfinished = p.name.startswith(".") or sep in p.name and folder.name == "warmstart"
            if not unfinished:
                kept.append(Entry(p, size_and_newest(p)[0], ""))
            elif _dead_pid_suffix(p.name, sep):
                leftovers.append(Entry(p, size_and_newest(p)[0], "unfinished build or promotion, its process is gone"))
    return Survey(storage, jobs, warmstarts, models, leftovers)


def _step(name: str) -> tuple[int, str]:
    """Sort `step-12` after `step-9`."""
    digits = "".join(c if c.isdigit() else " " for c in name).split()
    return (int(digits[0]) if digits else -1, name)


def delete(entries: Iterable[Entry]) -> int:
    """Delete each entry (a job store, a checkpoint, a temp dir); returns the bytes freed. A directory is first
    renamed to a hidden name so an interrupted delete never leaves a half checkpoint that looks complete."""
    freed = 0
    for e in entries:
        if not e.path.exists():
            continue
        if e.path.is_dir():
            doomed = e.path.with_name(f".deleting-{e.path.name}-{os.getpid()}")
            os.replace(e.path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        else:
            e.path.unlink(missing_ok=True)
        freed += e.size
    return freed
