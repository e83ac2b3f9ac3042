"""`LocalPlatform`: start the embedded control plane on loopback for the duration of a `with` block.

    with LocalPlatform(root) as platform:
        mgr = TrainerJobManager(platform.api_key, platform.base_url, poll_interval_s=0.2)

The control plane runs as a child process with a random per-run key shaped like a Fireworks key (`fw_local_` + 32
hex): the official SDK's FiretitanServiceClient takes its Fireworks code path for any key that is not a tinker `tml-`
key, so the local platform exercises exactly the path a real run takes. It spawns trainers and deployments itself.
Training shapes and model aliases: `cookbook.local.catalog`, plus the catalog file in `catalog=` or
$COOKBOOK_PLATFORM_CATALOG. Everything stops when the block exits, however it exits: normally, by exception, by
Ctrl-C; and if this process is SIGKILLed, PDEATHSIG plus the children's parent-pid watchdogs take them down (the
control plane stops its own children on the way out).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from pathlib import Path
from typing import Sequence

from cookbook.local.procs import python_cmd, spawn, stop_group, wait_port_file

KEY_PREFIX = "fw_local_"
CATALOG_ENV = "COOKBOOK_PLATFORM_CATALOG"


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_hex(16)


class LocalPlatform:
    def __init__(self, root_dir: str | os.PathLike, start_timeout_s: float = 60.0,
                 storage: str | os.PathLike | None = None, catalog: str | os.PathLike | None = None,
                 port: int = 0, torch_threads: int | None = None, spares: Sequence[str] = ()):
        self.root = Path(root_dir).resolve()  # this platform's port files and logs
        # Trainer stores and promoted models; shared between platforms so later runs can load earlier checkpoints.
        self.storage = Path(storage).resolve() if storage else self.root
        catalog = catalog or os.environ.get(CATALOG_ENV) or None
        self.catalog = Path(catalog).expanduser().resolve() if catalog else None  # extra shapes and model aliases
        self.port = port  # 0: any free port
        self.torch_threads = torch_threads  # per trainer / deployment process; None: $COOKBOOK_TORCH_THREADS or 1
        self.spares = list(spares)  # "trainer" / "deployment": processes to start at once, ahead of their job
        self.api_key = new_api_key()
        self.start_timeout_s = start_timeout_s
        self.base_url: str | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def jobs_root(self) -> Path:
        return self.storage / "jobs"

    def start(self) -> "LocalPlatform":
        self.spawn()
        return self.wait_started()

    def spawn(self) -> "LocalPlatform":
        """Start the control plane without waiting for it (`wait_started` does), so the caller can do its own
        start-up meanwhile."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "run").mkdir(exist_ok=True)
        port_file = self.root / "run" / "control-plane.port"
        port_file.unlink(missing_ok=True)
        log_file = self.root / "logs" / "control-plane.log"
        env = {**os.environ, "COOKBOOK_PLATFORM_KEY": self.api_key}  # env, not argv: keys stay out of `ps`
        if self.torch_threads is not None:
            env["COOKBOOK_TORCH_THREADS"] = str(self.torch_threads)  # the control plane passes it to its children
        cmd = python_cmd("cookbook.local.control_plane", "--root", str(self.root), "--storage", str(self.storage),
                         "--port-file", str(port_file), "--port", str(self.port), "--parent-pid", str(os.getpid()))
        if self.catalog:
            cmd += ["--catalog", str(self.catalog)]
        for kind in self.spares:
            cmd += ["--spare", kind]
        self.proc = spawn(cmd, log_file, env)
        return self

    def wait_started(self) -> "LocalPlatform":
        port_file, log_file = self.root / "run" / "control-plane.port", self.root / "logs" / "control-plane.log"
        try:
            port = wait_port_file(port_file, self.proc, self.start_timeout_s, "the local control plane", log_file)
        except BaseException:
            self.stop()
            raise
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        """Stop the control plane (it stops its trainers and deployments first); idempotent."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        # SIGTERM lets the control plane stop its children gracefully; stop_group then sweeps its process group.
        stop_group(proc, grace_s=15.0)

    def __enter__(self) -> "LocalPlatform":
        return self.start()

    def __exit__(self, *exc) -> None:
        # Ctrl-C during teardown must not leave children behind: finish stopping first.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
        try:
            self.stop()
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
