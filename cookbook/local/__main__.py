"""`python -m cookbook.local`: the embedded platform on its own.

    python -m cookbook.local serve [--root DIR] [--port N] [--catalog FILE.json]

`serve` starts the control plane on 127.0.0.1 (it spawns trainers and deployments on demand) and prints, first and
flushed, the two lines a program written against the official Fireworks training SDK needs:

    FIREWORKS_BASE_URL=http://127.0.0.1:<port>
    FIREWORKS_API_KEY=<key>

then a table of the training shapes it offers. It serves until SIGINT or SIGTERM, then stops every process it
started (control plane, trainers, deployments) and exits 0. `--root` holds this platform's logs and port files
(default: a fresh temporary directory, removed on exit); trainer checkpoints and promoted models go to the shared
storage root ($COOKBOOK_PLATFORM_ROOT, default ~/.cache/cookbook/platform). `--catalog` (or
$COOKBOOK_PLATFORM_CATALOG) adds shapes and model aliases: see `cookbook/local/catalog.py` for the format.
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
    from cookbook.local.platform_root import storage_root

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
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
