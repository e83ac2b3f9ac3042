"""Child-process supervision, and the state and checks that trainer jobs and deployments share.

`ControlPlaneBase` holds the platform's state (directories, key, catalog, the children, the HTTP client to them); it
spawns, watches and stops the trainer and deployment processes, builds their command lines, resolves the resource
names that both kinds of request carry, and proxies requests to a child.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from cookbook.local import catalog as catalog_mod
from cookbook.local.catalog import Catalog
from cookbook.local.control_plane.validation import ACCOUNT, JOB_NAME, MODEL_NAME, ApiError, _error, _now
from cookbook.local.procs import SNAPSHOT_ROOT_HEADER, assign_spare, python_cmd, spawn, start_spare, stop_group
from cookbook.models import EMBEDDED_MODELS

CHILD_MODULES = {"trainer": "cookbook.local.trainer", "deployment": "cookbook.local.deployment"}

HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade",
               "proxy-authorization", "proxy-connection", "trailer"}


@dataclass
class Child:
    """A spawned server (trainer or deployment) and what the API reports about it."""

    kind: str
    id: str
    record: dict[str, Any]
    source: str = ""  # what the process loads for the record's baseModel (an alias target, a directory, ...)
    proc: subprocess.Popen | None = None
    port: int | None = None
    port_file: Path | None = None
    log_file: Path | None = None
    watcher: asyncio.Task | None = field(default=None, repr=False)


def torch_threads() -> str:
    """CPU threads per trainer / deployment process: $COOKBOOK_TORCH_THREADS (0 = torch's default), which the local
    launcher sets per run (`launchers/local.torch_threads`); 1 when unset, e.g. under `python -m cookbook.local
    serve`, where nothing says how many processes will share the machine."""
    return os.environ.get("COOKBOOK_TORCH_THREADS", "1")


class ControlPlaneBase:
    """The state shared by every concern of the control plane (`ControlPlane` in app.py adds the routes)."""

    def __init__(self, root: Path, api_key: str, storage: Path | None = None, catalog: Catalog | None = None):
        self.root = root  # this platform's own state: port files and child logs
        self.storage = storage or root  # trainer stores and promoted models, shared by every platform on the machine
        self.api_key = api_key
        self.catalog = catalog or catalog_mod.builtin()
        self.jobs: dict[str, Child] = {}
        self.spares: list[tuple[str, subprocess.Popen, Path]] = []  # (kind, process, its log) waiting for a child
        self.deployments: dict[str, Child] = {}
        # Every trainer call and completion passes through here. httpx's own async pool scans all idle connections
        # for each queued request (a GRPO step's 128 concurrent completions spent most of their time there); the
        # aiohttp transport (httpx-aiohttp, which the Fireworks SDK ships with) keeps the same httpx API without it.
        from httpx_aiohttp import HttpxAiohttpClient

        self.http = HttpxAiohttpClient(timeout=httpx.Timeout(None, connect=5.0),
                                       limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256))
        for sub in ("logs", "run"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("jobs", "models"):
            (self.storage / sub).mkdir(parents=True, exist_ok=True)

    # -- children ------------------------------------------------------------------------------------------------
    def start_spares(self, kinds: list[str]) -> None:
        """Start one spare process per entry of `kinds` ("trainer" / "deployment"): it does the imports that are most
        of a child's start-up (~3.5 s of torch and transformers on 2 cores) while the driver is still starting, and
        the next job or deployment of its kind starts in it. Call from the event-loop thread (PDEATHSIG)."""
        for i, kind in enumerate(kinds):
            log_file = self.root / "logs" / f"{kind}-spare-{i}.log"
            self.spares.append((kind, start_spare(CHILD_MODULES[kind], log_file, self._key_env()), log_file))

    def _start(self, child: Child, cmd: list[str], env: dict[str, str] | None = None) -> None:
        """Spawn from the event-loop (main) thread so PDEATHSIG ties the child to this process's lifetime."""
        child.port_file = self.root / "run" / f"{child.kind}-{child.id}.port"
        child.port_file.unlink(missing_ok=True)
        child.log_file = self.root / "logs" / f"{child.kind}-{child.id}.log"
        child.port = None
        child.proc = self._take_spare(child.kind, cmd, child.log_file) or spawn(cmd, child.log_file, env)
        child.watcher = asyncio.get_running_loop().create_task(self._watch(child))

    def _take_spare(self, kind: str, cmd: list[str], log_file: Path) -> subprocess.Popen | None:
        for entry in [e for e in self.spares if e[0] == kind]:
            self.spares.remove(entry)
            _, proc, spare_log = entry
            if assign_spare(proc, cmd, log_file):
                spare_log.unlink(missing_ok=True)  # its own log held only its imports
                return proc
            stop_group(proc)
        return None

    async def _watch(self, child: Child) -> None:
        ready_state = "JOB_STATE_RUNNING" if child.kind == "trainer" else "READY"
        failed_state = "JOB_STATE_FAILED" if child.kind == "trainer" else "FAILED"
        proc = child.proc
        while proc.poll() is None:
            if child.port is None and child.port_file.exists() and child.port_file.read_text().strip():
                child.port = int(child.port_file.read_text().strip())
                child.record["state"] = ready_state
                child.record["updateTime"] = _now()
                if child.kind == "deployment":
                    child.record["replicaCount"] = 1
            await asyncio.sleep(0.1)
        if child.proc is proc:  # not replaced by a resume / scale-up meanwhile
            child.port = None
            child.record["state"] = failed_state
            child.record["updateTime"] = _now()
            child.record["statusMessage"] = _exit_message(proc.returncode, child.log_file)
            if child.kind == "deployment":
                child.record["replicaCount"] = 0

    def _stop(self, child: Child) -> None:
        if child.watcher:
            child.watcher.cancel()
        if child.proc:
            stop_group(child.proc)
        child.proc, child.port = None, None

    def stop_all(self) -> None:
        for child in [*self.deployments.values(), *self.jobs.values()]:
            self._stop(child)
        for _, proc, _ in self.spares:
            stop_group(proc)
        self.spares.clear()

    def job_store(self, job_id: str) -> Path:
        return self.storage / "jobs" / job_id

    def _trainer_cmd(self, job: Child) -> list[str]:
        cfg = job.record["trainingConfig"]
        cmd = python_cmd(CHILD_MODULES["trainer"], "--host", "127.0.0.1", "--port", "0", "--port-file",
                         str(self.root / "run" / f"trainer-{job.id}.port"),
                         "--store", str(self.job_store(job.id)), "--job-id", job.id, "--base-model", cfg["baseModel"],
                         "--parent-pid", str(os.getpid()))
        if job.source != cfg["baseModel"]:
            cmd += ["--model-source", job.source]
        if job.record.get("forwardOnly"):
            cmd += ["--forward-only"]
        if cfg.get("maxContextLength"):
            cmd += ["--max-context-length", str(int(cfg["maxContextLength"]))]
        return cmd + ["--threads", torch_threads()]

    def _deployment_cmd(self, dep: Child) -> list[str]:
        cmd = python_cmd(CHILD_MODULES["deployment"], "--port-file",
                         str(self.root / "run" / f"deployment-{dep.id}.port"),
                         "--base-model", dep.record["baseModel"], "--parent-pid", str(os.getpid()))
        if dep.source != dep.record["baseModel"]:
            cmd += ["--model-source", dep.source]
        return cmd + ["--threads", torch_threads()]

    def _key_env(self) -> dict[str, str]:
        # The children read the key from the environment, which (unlike argv) other users cannot see in `ps`.
        return {**os.environ, "COOKBOOK_PLATFORM_KEY": self.api_key}

    # -- shared checks ---------------------------------------------------------------------------------------------
    @staticmethod
    def _own_account(account: str) -> None:
        if account != ACCOUNT:
            raise ApiError(403, f"this API key has access to account {ACCOUNT!r} only, not {account!r}")

    def model_source(self, base_model: Any, where: str) -> str:
        """What a trainer or deployment loads for `base_model`, or 400 when it names nothing this platform has."""
        if not isinstance(base_model, str) or not base_model:
            raise ApiError(400, f"{where} is required")
        source = self.catalog.model_source(base_model)
        if source != base_model or source in EMBEDDED_MODELS:
            return source
        m = MODEL_NAME.match(base_model)
        if m:
            promoted = self.storage / "models" / m.group(2)
            if m.group(1) == ACCOUNT and (promoted / "config.json").is_file():
                return str(promoted)
            raise ApiError(400, f"{where} {base_model!r} is not a model of this platform: use an embedded model "
                                f"({', '.join(EMBEDDED_MODELS)}), a promoted model accounts/{ACCOUNT}/models/<id>, a "
                                "model directory, or add a modelAliases entry for it to a catalog file (--catalog)")
        if base_model.startswith("accounts/"):
            raise ApiError(400, f"{where} {base_model!r} is not a model resource name (accounts/<a>/models/<id>)")
        if os.path.isabs(base_model) and not Path(base_model).is_dir():
            raise ApiError(400, f"{where} {base_model!r}: no such model directory")
        return base_model  # a model directory or a Hugging Face id (loaded with from_pretrained)

    def _job_for_name(self, name: Any, where: str) -> str:
        """The job id of `accounts/local/rlorTrainerJobs/<id>` naming a job of this platform (or one with a store)."""
        m = JOB_NAME.match(name) if isinstance(name, str) else None
        if not m:
            raise ApiError(400, f"{where} must be accounts/{ACCOUNT}/rlorTrainerJobs/<job>, got {name!r}")
        if m.group(1) != ACCOUNT:
            raise ApiError(400, f"{where} {name!r} belongs to another account than {ACCOUNT!r}")
        job_id = m.group(2)
        if job_id not in self.jobs and not self.job_store(job_id).is_dir():
            raise ApiError(400, f"{where} {name!r}: no such trainer job")
        return job_id

    # -- proxy -----------------------------------------------------------------------------------------------------
    async def _proxy(self, request: Request, url: str, body: bytes | None = None,
                     extra_headers: dict[str, str] | None = None) -> Response:
        """Forward one request and stream the answer back with its status; the trainer's long-polls pass through."""
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in HOP_HEADERS and k.lower() != SNAPSHOT_ROOT_HEADER}
        headers.update(extra_headers or {})
        body = await request.body() if body is None else body
        upstream = self.http.build_request(request.method, url, params=request.query_params, headers=headers,
                                           content=body)
        try:
            resp = await self.http.send(upstream, stream=True)
        except httpx.TransportError as e:
            return _error(503, f"upstream unavailable: {type(e).__name__}")
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_HEADERS}
        return StreamingResponse(resp.aiter_raw(), status_code=resp.status_code, headers=out_headers,
                                 background=BackgroundTask(resp.aclose))


def _exit_message(returncode: int, log_file: Path | None) -> str:
    """One line a driver can relay as is: how the process ended and where its log is."""
    how = f"was killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exited with code {returncode}"
    return f"the process {how}; its log: {log_file}"
