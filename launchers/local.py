"""The `local` launcher: start the embedded platform on loopback, then build the session exactly as `fireworks` does.

The only differences from `launchers/fireworks.py`: the control-plane URL and key come from the `LocalPlatform` just
started (a random per-run key), and polling is fast because everything is on this machine. The launcher also keeps
the local storage tidy: it records the run's trainer jobs in the storage's run registry (`cookbook.local.storage`,
which `python -m cookbook.local storage` reads) and removes what crashed saves of this run's earlier jobs left.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from cookbook.config import RunConfig

if TYPE_CHECKING:  # preflight imports this module to check credentials: it must stay import-light
    from cookbook.client.session import Session

LOCAL_POLL_INTERVAL_S = 0.2
THREADS_ENV = "COOKBOOK_TORCH_THREADS"


def check_credentials(cfg: RunConfig) -> None:
    """Nothing to check: the embedded platform makes a fresh key for each run."""


def torch_threads(cfg: RunConfig) -> int:
    """Torch threads for each trainer and deployment process of this run ($COOKBOOK_TORCH_THREADS overrides).

    SFT, DPO and ORPO keep one process busy at a time (the trainer during steps; the deployment only to evaluate,
    between steps), so that process gets every core. A recipe that samples within every step (GRPO) has the driver,
    the deployment and the trainer working in turns with short overlaps; there one thread each: a multi-threaded
    step whose neighbour is busy waits on its descheduled threads (on 2 cores 3-30x slower than one thread)."""
    if os.environ.get(THREADS_ENV):
        return int(os.environ[THREADS_ENV])
    return 1 if cfg.recipe.SAMPLES_EVERY_STEP else len(os.sched_getaffinity(0))


@contextlib.contextmanager
def launch(cfg: RunConfig, *, needs_reference: bool, needs_deployment: bool,
           log: Callable[[str], None] = print, while_starting: Callable[[Any], None] | None = None
           ) -> Iterator[Session]:
    from cookbook.local.storage import clean_earlier_jobs, record_run

    with _platform_session(cfg, needs_reference=needs_reference, needs_deployment=needs_deployment,
                           log=log, while_starting=while_starting) as session:
        storage, log_path = Path(session.platform_root), Path(cfg.log_path or "runs/local")
        for leftover in clean_earlier_jobs(storage, log_path):
            log(f"[launch] removed {leftover}, left by an unfinished save of an earlier attempt")
        record_run(storage, log_path, [session.job_id, session.reference_job_id])
        yield session


@contextlib.contextmanager
def _platform_session(cfg: RunConfig, *, needs_reference: bool, needs_deployment: bool,
                      log: Callable[[str], None], while_starting: Callable[[Any], None] | None
                      ) -> Iterator[Session]:
    from cookbook.local.platform import LocalPlatform
    from cookbook.runs.rundir import storage_root

    root = Path(cfg.log_path or "runs/local") / "platform"  # this run's platform logs
    # The run's policy trainer (and deployment) start in spare processes launched with the control plane: their
    # imports (~3.5 s each) overlap the driver's own (the SDK, tinker and torch: ~2.5 s, done meanwhile here).
    spares = ["trainer"] + ["deployment"] * needs_deployment
    with contextlib.ExitStack() as stack:
        platform = LocalPlatform(root, storage=storage_root(), torch_threads=torch_threads(cfg), spares=spares)
        stack.push(platform.__exit__)  # stopped however the block exits
        platform.spawn()
        from cookbook.client.session import build_session

        platform.wait_started()
        log(f"[launch] local platform at {platform.base_url} (root {platform.root})")
        yield build_session(cfg, platform.base_url, platform.api_key, needs_reference=needs_reference,
                            needs_deployment=needs_deployment, stack=stack, log=log,
                            poll_interval_s=LOCAL_POLL_INTERVAL_S, platform_root=str(platform.storage),
                            logs_dir=str(platform.root / "logs"), warm_up_after_sync=False,
                            while_starting=while_starting)
