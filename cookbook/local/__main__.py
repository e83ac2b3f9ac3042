"""`python -m cookbook.local`: the embedded platform on its own.

    python -m cookbook.local serve [--root DIR] [--port N] [--catalog FILE.json]
    python -m cookbook.local storage [--prune [--yes]] [--include-unrecorded] [--storage DIR]

`serve` starts the control plane on 127.0.0.1 (it spawns trainers and deployments on demand) and prints, first and
flushed, the two lines a program written against the official Fireworks training SDK needs:

    FIREWORKS_BASE_URL=http://127.0.0.1:<port>
    FIREWORKS_API_KEY=<key>

then a table of the training shapes it offers. It serves until SIGINT or SIGTERM, then stops every process it
started (control plane, trainers, deployments) and exits 0. `--root` holds this platform's logs and port files
(default: a fresh temporary directory, removed on exit); trainer checkpoints and promoted models go to the shared
storage root ($COOKBOOK_PLATFORM_ROOT, default ~/.cache/cookbook/platform). `--catalog` (or
$COOKBOOK_PLATFORM_CATALOG) adds shapes and model aliases: see `cookbook/local/catalog.py` for the format.

`storage` lists what the storage root holds: each trainer job with its run, size, age and state (running,
referenced, orphaned, unrecorded), then the warm starts and promoted models. `--prune` shows what no run can resume
from or promote (orphaned jobs, unreferenced checkpoints and snapshots, temp dirs of crashed saves) and `--yes`
deletes it; see `cookbook/local/storage.py` for the rules.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path


def serve(args: argparse.Namespace) -> int:
    from cookbook.local import catalog as catalog_mod
    from cookbook.local.platform import CATALOG_ENV, LocalPlatform
    from cookbook.runs.rundir import storage_root

    catalog_file = args.catalog or os.environ.get(CATALOG_ENV) or None
    try:  # read it here too: a bad file fails before anything starts, with the file and entry named
        cat = catalog_mod.load([catalog_file] if catalog_file else [])
    except catalog_mod.CatalogError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    made_root = args.root is None
    root = Path(tempfile.mkdtemp(prefix="cookbook-platform-")) if made_root else Path(args.root)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    platform = LocalPlatform(root, storage=storage_root(), catalog=catalog_file, port=args.port)
    try:
        try:
            platform.start()
        except (RuntimeError, TimeoutError) as e:
            print(f"error: the embedded platform did not start: {e}", file=sys.stderr)
            return 1
        print(f"FIREWORKS_BASE_URL={platform.base_url}", flush=True)
        print(f"FIREWORKS_API_KEY={platform.api_key}", flush=True)
        print("", flush=True)
        for line in catalog_mod.describe(cat):
            print(line)
        print(f"\nlogs: {platform.root / 'logs'}   storage: {platform.storage}   (Ctrl-C stops everything)", flush=True)
        while not stop.wait(0.5):
            if platform.proc is None or platform.proc.poll() is not None:
                code = platform.proc.returncode if platform.proc else None
                print(f"error: the control plane exited (code {code}); see {platform.root / 'logs'}", file=sys.stderr)
                return 1
        return 0
    finally:
        # Ignore further Ctrl-C while stopping: a second one must not leave children behind.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        platform.stop()
        if made_root:
            shutil.rmtree(root, ignore_errors=True)


def storage(args: argparse.Namespace) -> int:
    from cookbook.local import storage as st
    from cookbook.runs.rundir import storage_root

    root = Path(args.storage).expanduser().resolve() if args.storage else storage_root()
    if args.yes and not args.prune:
        print("error: --yes confirms a prune and does nothing on its own. Fix: run `python -m cookbook.local storage "
              "--prune` to see what would be deleted, then add --yes to delete it.", file=sys.stderr)
        return 2
    if not root.is_dir():
        print(f"{root}: nothing stored yet")
        return 0
    survey = st.survey(root, include_unrecorded=args.include_unrecorded)
    _print_survey(survey)
    if not args.prune:
        return 0
    doomed = survey.prunable()
    total = sum(e.size for e in doomed)
    print(f"\n{'deleting' if args.yes else 'would delete'} ({len(doomed)} item(s), {_size(total)}):")
    for e in doomed:
        print(f"  {_size(e.size):>9}  {e.path}  ({e.why})")
    if not args.yes:
        print("dry run: nothing deleted; add --yes to delete these.")
        return 0
    freed = st.delete(doomed)
    print(f"freed {_size(freed)}; {root} now holds {_size(st.size_and_newest(root)[0])}")
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _age(mtime: float) -> str:
    import time

    s = max(0.0, time.time() - mtime)
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= span:
            return f"{s / span:.0f}{unit}"
    return f"{s:.0f}s"


def _print_survey(survey) -> None:
    jobs = survey.jobs
    total = sum(j.size for j in jobs) + sum(e.size for e in survey.warmstarts + survey.models + survey.other_leftovers)
    print(f"storage root {survey.root}: {_size(total)}")
    print(f"\n{'job':<24} {'state':<11} {'size':>9} {'age':>5}  run")
    for j in jobs:
        print(f"{j.job_id:<24} {j.state:<11} {_size(j.size):>9} {_age(j.newest):>5}  {j.run or '-'}")
        details = []
        if j.resumable:
            details.append(f"resumable: {', '.join(j.resumable[-3:])}")
        if j.promotable:
            details.append(f"promotable: {', '.join(j.promotable[-3:])}")
        if j.reason:
            details.append(j.reason)
        if details:
            print(f"{'':<24} {'; '.join(details)}")
    counts = {s: sum(j.state == s for j in jobs) for s in ("running", "referenced", "orphaned", "unrecorded")}
    print(f"{len(jobs)} job(s): " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    for title, entries in (("warm starts (kept)", survey.warmstarts), ("promoted models (kept)", survey.models)):
        print(f"\n{title}: {_size(sum(e.size for e in entries))}")
        for e in entries:
            print(f"  {_size(e.size):>9}  {e.path.name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cookbook.local", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("serve", help="run the embedded platform (control plane + on-demand trainers and deployments)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--root", help="logs and port files of this platform (default: a fresh temporary directory)")
    s.add_argument("--port", type=int, default=0, help="control-plane port on 127.0.0.1 (default: any free port)")
    s.add_argument("--catalog", help="a catalog file adding training shapes and model aliases "
                                     "(default: $COOKBOOK_PLATFORM_CATALOG)")
    s.set_defaults(func=serve)
    g = sub.add_parser("storage", help="list what the platform storage holds; --prune deletes what no run needs",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--prune", action="store_true", help="show what no run can resume from or promote (dry run)")
    g.add_argument("--yes", action="store_true", help="with --prune: delete it")
    g.add_argument("--include-unrecorded", action="store_true",
                   help="treat jobs no run recorded (made before the run registry, or through `serve`) as orphaned")
    g.add_argument("--storage", help="the storage root (default: $COOKBOOK_PLATFORM_ROOT or ~/.cache/cookbook/platform)")
    g.set_defaults(func=storage)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
