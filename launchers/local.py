"""The `local` launcher: start the embedded platform on loopback, then build the session exactly as `fireworks` does.

The only differences from `launchers/fireworks.py`: the control-plane URL and key come from the `LocalPlatform` just
started (a random per-run key), and polling is fast because everything is on this machine.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

from cookbook.config import RunConfig
from cookbook.session import Session, build_session

LOCAL_POLL_INTERVAL_S = 0.2


@contextlib.contextmanager
def launch(cfg: RunConfig, *, needs_reference: bool, needs_deployment: bool,
           log: Callable[[str], None] = print) -> Iterator[Session]:
    from cookbook.local.platform import LocalPlatform
    from cookbook.local.platform_root import storage_root

    root = Path(cfg.log_path or "runs/local") / "platform"  # this run's platform logs
    with contextlib.ExitStack() as stack:
        platform = stack.enter_context(LocalPlatform(root, storage=storage_root()))
        log(f"[launch] local platform at {platform.base_url} (root {platform.root})")
        yield build_session(cfg, platform.base_url, platform.api_key, needs_reference=needs_reference,
                            needs_deployment=needs_deployment, stack=stack, log=log,
                            poll_interval_s=LOCAL_POLL_INTERVAL_S, platform_root=str(platform.storage))
