"""`python -m cookbook.report <run_or_sweep_dir> [--out DIR]`: PNG plots and a markdown table of a run or a sweep.

A *job directory* is a run directory (`status.json`, `metrics.jsonl`, written by cookbook.runs.runner) or a sweep's
job subdirectory (which also has Hydra's `.hydra/`). Given a job directory the report covers that one job; given
a sweep directory it covers every job subdirectory. The sweep callback (cookbook.runs.sweep) writes the same report
into the sweep directory as `summary.md`, so there is one code path.

matplotlib is imported only when plotting, so importing this module stays cheap.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cookbook.runs.rundir import atomic_write_text, read_jsonl, read_status

# Statuses written by runner.py (`ok`, `failed`, `cancelled`, `running` while in progress) and two the report
# derives itself: `dry_run` (a dry-run sweep job: plan.json, no status.json) and `missing` (a Hydra job dir without
# status.json: the job died before the runner could write it, or never started).
OK_STATES = ("ok", "dry_run")

# Metric families: one figure each, one subplot per metric key in the family, one line per job.
# Recipes name their metrics differently (train/loss, train/ce_loss, train/dpo_loss; rollout/reward,
# rollout/raw_reward), so a family is a predicate rather than one exact key.
# Counts (eval/rows, eval/pairs) say how much was evaluated, not how well: left out of plots and tables.
_COUNT_SUFFIXES = ("rows", "pairs", "tokens", "samples", "groups")
FAMILIES: dict[str, tuple[str, Callable[[str], bool]]] = {
    "train_loss": ("train/loss", lambda k: k.startswith("train/") and k.endswith("loss")),
    "rollout_reward": ("rollout/reward", lambda k: k.startswith("rollout/") and "reward" in k),
    "eval": ("eval/*", lambda k: k.startswith("eval/") and not k.endswith(_COUNT_SUFFIXES)),
}
# Within a family these come first (as the table's headline column and the first subplot); others by length.
PREFERRED = ("train/loss", "rollout/reward", "eval/loss", "eval/exact_match", "eval/preference_accuracy",
             "eval/accuracy")


def _key_order(key: str) -> tuple[int, int, str]:
    return (PREFERRED.index(key) if key in PREFERRED else len(PREFERRED), len(key), key)
MAX_SUBPLOTS = 6  # per family figure; the rest of a large family is left out of the plot (still in metrics.jsonl)
MAX_METRIC_COLUMNS = 6  # final-metric columns in the table: a handful, preferring the first key of each family


@dataclass
class Job:
    path: Path
    status: dict[str, Any] | None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    plan: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def label(self) -> str:
        """Short name for tables and legends: the sweep job number (`3_lr=1e-4` → `#3`), else the dir name."""
        m = re.match(r"(\d+)_", self.name)
        return f"#{m.group(1)}" if m else self.name

    @property
    def state(self) -> str:
        if self.status and self.status.get("status"):
            return str(self.status["status"])
        return "dry_run" if self.plan is not None else "missing"

    @property
    def ok(self) -> bool:
        return self.state in OK_STATES

    @property
    def overrides(self) -> list[str]:
        if self.status and self.status.get("overrides") is not None:
            return [str(o) for o in self.status["overrides"]]
        return _hydra_overrides(self.path)

    @property
    def final_metrics(self) -> dict[str, Any]:
        """The runner's final_metrics; for a job that died without them, the last value of each metric logged."""
        final = (self.status or {}).get("final_metrics")
        if final:
            return dict(final)
        last: dict[str, Any] = {}
        for record in self.metrics:
            last.update(record)
        return last

    @property
    def error(self) -> str:
        if self.state == "missing":
            return "no status.json: the job died before the runner wrote one, or never started"
        if self.state == "running":
            return "still `running` at the end: the job process was killed (out of memory, time limit, Ctrl-C)"
        return str((self.status or {}).get("error") or "")


def _hydra_overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    from omegaconf import OmegaConf

    try:
        return [str(o) for o in OmegaConf.load(path)]
    except Exception:  # a torn or hand-edited file must not break the report
        return []


def _job_sort_key(path: Path) -> tuple[int, str]:
    m = re.match(r"(\d+)_", path.name)
    return (int(m.group(1)) if m else sys.maxsize, path.name)


def is_job_dir(path: Path) -> bool:
    return (path / "status.json").is_file() or (path / ".hydra").is_dir()


def find_job_dirs(path: Path) -> list[Path]:
    """The job itself for a run directory, else the job subdirectories of a sweep directory, in job order."""
    path = Path(path)
    if (path / "status.json").is_file():
        return [path]
    subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".") and is_job_dir(d)]
    if subdirs:
        return sorted(subdirs, key=_job_sort_key)
    return [path] if is_job_dir(path) else []  # a single run that died before writing status.json


def load_job(path: Path) -> Job:
    plan_path = path / "plan.json"
    plan = None
    if plan_path.is_file():
        try:
            plan = json.loads(plan_path.read_text())
        except (OSError, json.JSONDecodeError):
            plan = None
    return Job(path=path, status=read_status(path), metrics=read_jsonl(path / "metrics.jsonl"), plan=plan)


def load_jobs(path: Path) -> list[Job]:
    return [load_job(d) for d in find_job_dirs(path)]


# ----------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def series(job: Job, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric. A resumed run re-logs the steps after its last checkpoint; the later line
    describes the run that continued, so the last value per step wins."""
    by_step: dict[int, float] = {}
    for record in job.metrics:
        step, value = record.get("step"), record.get(key)
        if _is_number(step) and _is_number(value):
            by_step[int(step)] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def family_keys(jobs: list[Job], predicate: Callable[[str], bool]) -> list[str]:
    keys = {k for job in jobs for record in job.metrics for k, v in record.items() if predicate(k) and _is_number(v)}
    return sorted(keys, key=_key_order)


def plot_families(jobs: list[Job], out: Path) -> list[tuple[str, Path]]:
    """One PNG per metric family that has data; returns (family title, path) pairs."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in tests
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labels = legend_labels(jobs)
    written = []
    for stem, (title, predicate) in FAMILIES.items():
        keys = family_keys(jobs, predicate)[:MAX_SUBPLOTS]
        if not keys:
            continue
        ncols = min(3, len(keys))
        nrows = -(-len(keys) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
        legend: dict[str, Any] = {}  # label → line, over all subplots: a job may have data in only some of them
        for ax, key in zip(axes.flat, keys):
            for i, job in enumerate(jobs):
                steps, values = series(job, key)
                if steps:
                    (line,) = ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3,
                                      color=f"C{i % 10}", label=labels[job.path])  # one colour per job everywhere
                    legend.setdefault(labels[job.path], line)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.set_visible(False)
        names, handles = list(legend), list(legend.values())
        if handles:
            ncol = 1 if max(len(n) for n in names) > 40 else min(len(names), 4)
            fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize="small")
        if keys != [title]:
            fig.suptitle(title)
        legend_rows = -(-len(handles) // ncol) if handles else 0
        fig.set_figheight(fig.get_figheight() + 0.25 * legend_rows)
        fig.tight_layout(rect=(0, min(0.5, 0.25 * legend_rows / fig.get_figheight() + 0.02 * bool(handles)), 1, 1))
        path = out / f"{stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append((title, path))
    return written


def legend_labels(jobs: list[Job]) -> dict[Path, str]:
    """`#<num> <overrides that differ between jobs>`: the full override list would repeat what all jobs share."""
    common = set.intersection(*(set(j.overrides) for j in jobs)) if len(jobs) > 1 else set()
    labels = {}
    for job in jobs:
        varying = " ".join(o for o in job.overrides if o not in common)
        labels[job.path] = f"{job.label} {varying}".strip() if len(jobs) > 1 else job.label
    return labels


# ----------------------------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------------------------


def metric_columns(jobs: list[Job]) -> list[str]:
    """A handful of final metrics: the headline key of each family first, then the family's other keys."""
    present = {k for job in jobs for k, v in job.final_metrics.items() if _is_number(v)}
    per_family = [[k for k in sorted(present, key=_key_order) if predicate(k)]
                  for _, predicate in FAMILIES.values()]
    columns = [keys[0] for keys in per_family if keys]
    for keys in per_family:
        columns += [k for k in keys[1:] if k not in columns]
    return (["step"] if "step" in present else []) + columns[:MAX_METRIC_COLUMNS]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _fmt_wall(seconds: Any) -> str:
    if not _is_number(seconds):
        return "-"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


def _cell(text: str, limit: int = 0) -> str:
    text = " ".join(str(text).split())  # one line per row
    if limit and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def table(jobs: list[Job]) -> str:
    columns = metric_columns(jobs)
    header = ["job", "status", "overrides", *columns, "wall time", "error"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for job in jobs:
        final = job.final_metrics
        row = [_cell(job.label), job.state, _cell(" ".join(job.overrides)) or "-",
               *(_cell(_fmt(final.get(c))) for c in columns),
               _fmt_wall((job.status or {}).get("wall_time_s")), _cell(job.error, 120)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def held_out_table(jobs: list[Job]) -> str:
    """Each job's held-out metrics at step 0 (logged before the first update) and at its last evaluation; empty when
    no job logged a step-0 evaluation."""
    lines = []
    for job in jobs:
        for key in family_keys([job], FAMILIES["eval"][1]):
            steps, values = series(job, key)
            if len(steps) >= 2 and steps[0] == 0:
                lines.append(f"| {_cell(job.label)} | {key} | {values[0]:.4g} | {values[-1]:.4g} (step {steps[-1]}) | "
                             f"{values[-1] - values[0]:+.4g} |")
    if not lines:
        return ""
    return "\n".join(["| job | held-out metric | step 0 | end | change |", "|---|---|---|---|---|", *lines])


def counts(jobs: list[Job]) -> str:
    by_state: dict[str, int] = {}
    for job in jobs:
        by_state[job.state] = by_state.get(job.state, 0) + 1
    return f"{len(jobs)} job{'s' if len(jobs) != 1 else ''}: " + ", ".join(f"{n} {s}" for s, n in by_state.items())


def render(source: Path, jobs: list[Job], plots: list[tuple[str, Path]], out: Path) -> str:
    parts = [f"# Report: {source}", "", counts(jobs), "", table(jobs), ""]
    held_out = held_out_table(jobs)
    if held_out:
        parts += ["## Held-out evaluation: step 0 vs end", "", held_out, ""]
    if plots:
        parts += ["## Plots", ""]
        parts += [f"![{title}]({_relative(path, out)})" for title, path in plots]
        parts.append("")
    return "\n".join(parts)


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


# ----------------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------------


def write_report(source: Path, out: Path | None = None, name: str = "report.md",
                 jobs: list[Job] | None = None) -> tuple[str, Path]:
    """Write `<out>/<name>` and one PNG per metric family; returns (markdown, path of the markdown file)."""
    source = Path(source).resolve()
    out = Path(out).resolve() if out else source
    out.mkdir(parents=True, exist_ok=True)
    jobs = load_jobs(source) if jobs is None else jobs
    plots = plot_families(jobs, out)
    markdown = render(source, jobs, plots, out)
    path = out / name
    atomic_write_text(path, markdown)
    return markdown, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cookbook.report",
        description="PNG plots (one per metric family: train/loss, rollout/reward, eval/*) and a markdown table "
                    "(report.md) of a run directory or of every job in a sweep directory.")
    parser.add_argument("path", type=Path, help="a run directory (has status.json) or a sweep directory")
    parser.add_argument("--out", type=Path, default=None, help="where to write report.md and the PNGs "
                        "(default: the run or sweep directory itself)")
    args = parser.parse_args(argv)
    if not args.path.is_dir():
        print(f"error: {args.path} is not a directory. Pass a run directory (runs/<name>) or a sweep directory "
              f"(sweeps/<time>).", file=sys.stderr)
        return 2
    jobs = load_jobs(args.path)
    if not jobs:
        print(f"error: no jobs in {args.path}: neither it nor any subdirectory has a status.json or a .hydra/ "
              f"directory. Pass a run directory or a sweep directory.", file=sys.stderr)
        return 2
    markdown, path = write_report(args.path, args.out, jobs=jobs)
    print(markdown)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
