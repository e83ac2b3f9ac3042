"""Start a real trainer service process for tests and stop it afterwards (never leaves a server running)."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass
class RunningTrainer:
    base_url: str
    api_key: str
    store: Path
    job_id: str
    proc: subprocess.Popen
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@contextlib.contextmanager
def start_trainer(jobs_root: Path, job_id: str = "job-a", base_model: str = "local-micro", *, seed: int = 0,
                  api_key: str | None = None, max_context_length: int | None = None, timeout: float = 60.0,
                  threads: int | None = 1):
    api_key = api_key or f"fw_test_{secrets.token_hex(16)}"  # a Fireworks-style key: the SDK's Fireworks path
    store = Path(jobs_root) / job_id
    store.mkdir(parents=True, exist_ok=True)
    port_file = store / "port"
    port_file.unlink(missing_ok=True)
    stderr_path = store / "trainer.stderr"
    cmd = [sys.executable, "-m", "cookbook.local.trainer", "--port", "0", "--port-file", str(port_file),
           "--api-key", api_key, "--store", str(store), "--job-id", job_id, "--base-model", base_model,
           "--seed", str(seed), "--parent-pid", str(os.getpid())]
    if max_context_length:
        cmd += ["--max-context-length", str(max_context_length)]
    # One compute thread by default: test machines are small and shared; the benchmark passes threads=None.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TINKER_TELEMETRY": "0"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"trainer exited with {proc.returncode}:\n{stderr_path.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"trainer did not start:\n{stderr_path.read_text()}")
            time.sleep(0.05)
        base_url = f"http://127.0.0.1:{int(port_file.read_text())}"
        r = httpx.get(f"{base_url}/api/v1/healthz", headers={"X-API-Key": api_key}, timeout=10)
        r.raise_for_status()
        yield RunningTrainer(base_url, api_key, store, job_id, proc, stderr_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
