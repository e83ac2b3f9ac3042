"""The embedded control plane: the subset of the Fireworks REST contract the client uses (wire-contract §5.2).

    python -m cookbook.local.control_plane --root DIR --api-key K --port-file F [--parent-pid PID]

Creating a trainer job spawns a trainer service process; creating a deployment spawns an inference server. Both are
reached through this server: the trainer gateway (`/training/v1/rlorTrainerJobs/{a}/{job}/api/v1/*`), hot load
(routed by the `fireworks-deployment` header) and completions (routed by `model`). Layout under `--root`:
`jobs/<job>/{checkpoints,sampler}/` (the trainers' store), `models/<id>/` (promoted models), `logs/`, `run/`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cookbook.local.procs import (SNAPSHOT_ROOT_HEADER, KeyAuthMiddleware, log_tail, python_cmd, serve, spawn,
                                  stop_group)

ACCOUNT = "local"
HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade",
               "proxy-authorization", "proxy-connection", "trailer"}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": status, "message": message}}, status_code=status)


@dataclass
class Child:
    """A spawned server (trainer or deployment) and what the API reports about it."""

    kind: str
    id: str
    record: dict[str, Any]
    proc: subprocess.Popen | None = None
    port: int | None = None
    port_file: Path | None = None
    log_file: Path | None = None
    watcher: asyncio.Task | None = field(default=None, repr=False)


def torch_threads() -> str:
    """CPU threads per trainer / deployment process. The driver, a trainer and a deployment share the machine:
    with torch's default (all cores each) they oversubscribe it, and on 2 cores a busy neighbour made 2-thread steps
    3-30x slower than 1-thread ones (the embedded models are small, so one thread loses little when idle).
    COOKBOOK_TORCH_THREADS overrides; 0 = torch's default."""
    return os.environ.get("COOKBOOK_TORCH_THREADS", "1")


class ControlPlane:
    def __init__(self, root: Path, api_key: str, storage: Path | None = None):
        self.root = root  # this platform's own state: port files and child logs
        self.storage = storage or root  # trainer stores and promoted models, shared by every platform on the machine
        self.api_key = api_key
        self.jobs: dict[str, Child] = {}
        self.deployments: dict[str, Child] = {}
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))
        for sub in ("logs", "run"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("jobs", "models"):
            (self.storage / sub).mkdir(parents=True, exist_ok=True)

    # -- children ------------------------------------------------------------------------------------------------
    def _start(self, child: Child, cmd: list[str], env: dict[str, str] | None = None) -> None:
        """Spawn from the event-loop (main) thread so PDEATHSIG ties the child to this process's lifetime."""
        child.port_file = self.root / "run" / f"{child.kind}-{child.id}.port"
        child.port_file.unlink(missing_ok=True)
        child.log_file = self.root / "logs" / f"{child.kind}-{child.id}.log"
        child.port = None
        child.proc = spawn(cmd, child.log_file, env)
        child.watcher = asyncio.get_running_loop().create_task(self._watch(child))

    async def _watch(self, child: Child) -> None:
        ready_state = "JOB_STATE_RUNNING" if child.kind == "trainer" else "READY"
        failed_state = "JOB_STATE_FAILED" if child.kind == "trainer" else "FAILED"
        proc = child.proc
        while proc.poll() is None:
            if child.port is None and child.port_file.exists() and child.port_file.read_text().strip():
                child.port = int(child.port_file.read_text().strip())
                child.record["state"] = ready_state
                child.record["updateTime"] = _now()
            await asyncio.sleep(0.1)
        if child.proc is proc:  # not replaced by a resume / scale-up meanwhile
            child.port = None
            child.record["state"] = failed_state
            child.record["statusMessage"] = f"process exited with code {proc.returncode}.{log_tail(child.log_file, 1500)}"

    def _stop(self, child: Child) -> None:
        if child.watcher:
            child.watcher.cancel()
        if child.proc:
            stop_group(child.proc)
        child.proc, child.port = None, None

    def stop_all(self) -> None:
        for child in [*self.deployments.values(), *self.jobs.values()]:
            self._stop(child)

    def job_store(self, job_id: str) -> Path:
        return self.storage / "jobs" / job_id

    def _trainer_cmd(self, job: Child) -> list[str]:
        cfg = job.record["trainingConfig"]
        cmd = python_cmd("cookbook.local.trainer", "--host", "127.0.0.1", "--port", "0", "--port-file",
                         str(self.root / "run" / f"trainer-{job.id}.port"),
                         "--store", str(self.job_store(job.id)), "--job-id", job.id, "--base-model", cfg["baseModel"],
                         "--parent-pid", str(os.getpid()))
        if cfg.get("maxContextLength"):
            cmd += ["--max-context-length", str(int(cfg["maxContextLength"]))]
        return cmd + ["--threads", torch_threads()]

    def _deployment_cmd(self, dep: Child) -> list[str]:
        cmd = python_cmd("cookbook.local.deployment", "--port-file",
                         str(self.root / "run" / f"deployment-{dep.id}.port"),
                         "--base-model", dep.record["baseModel"], "--parent-pid", str(os.getpid()))
        return cmd + ["--threads", torch_threads()]

    def _key_env(self) -> dict[str, str]:
        # The deployment reads the key from the environment, which (unlike argv) other users cannot see in `ps`.
        return {**os.environ, "COOKBOOK_PLATFORM_KEY": self.api_key}

    # -- trainer jobs --------------------------------------------------------------------------------------------
    async def create_job(self, request: Request) -> Response:
        body = await request.json()
        job_id = request.query_params.get("rlorTrainerJobId") or f"training-api-service-{os.urandom(4).hex()}"
        shape = request.query_params.get("trainingShape", "")
        if job_id in self.jobs:
            return _error(409, f"rlorTrainerJob {job_id} already exists")
        cfg = dict(body.get("trainingConfig") or {})
        if not cfg.get("baseModel"):
            return _error(400, "trainingConfig.baseModel is required")
        record = {"name": f"accounts/{ACCOUNT}/rlorTrainerJobs/{job_id}", "state": "JOB_STATE_CREATING",
                  "trainingConfig": cfg, "trainingShape": shape, "serviceMode": True,
                  "forwardOnly": bool(body.get("forwardOnly") or shape.endswith("-forward")),
                  "displayName": body.get("displayName", job_id), "createTime": _now()}
        job = self.jobs[job_id] = Child("trainer", job_id, record)
        self._start(job, self._trainer_cmd(job), self._key_env())
        return JSONResponse(record)

    def _job(self, job_id: str) -> Child | None:
        return self.jobs.get(job_id)

    async def job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        if request.method == "POST" and job_id.endswith(":resume"):
            return await self._resume(job_id.removesuffix(":resume"))
        job = self._job(job_id)
        if job is None or request.method == "POST":  # POST is only `:resume`
            return _error(404, f"rlorTrainerJob {job_id} not found")
        if request.method == "DELETE":
            self._stop(job)
            del self.jobs[job_id]
            return JSONResponse({})
        return JSONResponse(job.record)

    async def _resume(self, job_id: str) -> Response:
        job = self._job(job_id)
        if job is None:
            return _error(404, f"rlorTrainerJob {job_id} not found")
        if job.proc is None or job.proc.poll() is not None:
            job.record.update(state="JOB_STATE_CREATING", statusMessage="")
            self._start(job, self._trainer_cmd(job), self._key_env())
        return JSONResponse(job.record)

    async def list_checkpoints(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        store = self.job_store(job_id)
        if job_id not in self.jobs and not store.exists():
            return _error(404, f"rlorTrainerJob {job_id} not found")
        rows = []
        for sub, kind in (("checkpoints", "CHECKPOINT_TYPE_TRAINING"), ("sampler", "CHECKPOINT_TYPE_INFERENCE")):
            for d in (store / sub).glob("*") if (store / sub).is_dir() else []:
                if not d.is_dir() or d.name.startswith("."):
                    continue  # hidden dirs are saves in progress
                if sub == "checkpoints" and not (d / "meta.json").is_file():
                    continue  # the trainer writes meta.json last: without it the checkpoint is incomplete
                promotable = sub == "sampler" and _snapshot_kind(d) == "base"
                if sub == "sampler" and promotable is False:
                    kind_row = "CHECKPOINT_TYPE_INFERENCE_DELTA"
                else:
                    kind_row = kind
                mtime = d.stat().st_mtime
                rows.append((mtime, {"name": f"accounts/{ACCOUNT}/rlorTrainerJobs/{job_id}/checkpoints/{d.name}",
                                     "createTime": datetime.fromtimestamp(mtime, timezone.utc).isoformat(),
                                     "checkpointType": kind_row, "promotable": promotable}))
        return JSONResponse({"checkpoints": [r for _, r in sorted(rows, key=lambda x: x[0])]})

    async def promote(self, request: Request) -> Response:
        name = request.path_params["ckpt"]
        if not name.endswith(":promote"):
            return _error(404, "unknown checkpoint action")
        ckpt = name.removesuffix(":promote")
        body = await request.json()
        job_id = str(body.get("trainer_job_id", "")).rsplit("/", 1)[-1]
        model_id = str(body.get("output_model", "")).rsplit("/", 1)[-1]
        src = self.job_store(job_id) / "sampler" / ckpt
        if not job_id or not model_id:
            return _error(400, "trainer_job_id and output_model are required")
        if not src.is_dir():
            return _error(404, f"checkpoint {ckpt} of job {job_id} not found (only sampler checkpoints promote)")
        if _snapshot_kind(src) != "base":
            return _error(400, f"checkpoint {ckpt} is a delta snapshot and not promotable; save a base one")
        dst = self.storage / "models" / model_id
        tmp = dst.with_name(f".tmp-{model_id}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        await asyncio.to_thread(shutil.copytree, src, tmp)
        (tmp / "snapshot.json").unlink(missing_ok=True)  # a plain HF model dir, no longer a snapshot
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
        return JSONResponse({"model": {"name": f"accounts/{ACCOUNT}/models/{model_id}", "state": "READY",
                                       "kind": "HF_BASE_MODEL", "localPath": str(dst)}})

    async def shape_versions(self, request: Request) -> Response:
        shape = request.path_params["shape"]
        name = f"accounts/{ACCOUNT}/trainingShapes/{shape}"
        snapshot = {"trainerImageTag": "local", "maxSupportedContextLength": 512, "nodeCount": 1,
                    "acceleratorType": "CPU", "acceleratorCount": 0, "baseModelWeightPrecision": "float32",
                    "trainerMode": "FORWARD_ONLY" if shape.endswith("-forward") else "FULL_PARAMETER_TRAINER",
                    "baseModel": shape.removesuffix("-forward")}
        return JSONResponse({"trainingShapeVersions": [{"name": f"{name}/versions/1", "snapshot": snapshot}]})

    # -- gateway ---------------------------------------------------------------------------------------------------
    async def gateway(self, request: Request) -> Response:
        job = self._job(request.path_params["job_id"])
        if job is None:
            return _error(404, f"rlorTrainerJob {request.path_params['job_id']} not found")
        if job.port is None:
            if job.record["state"] == "JOB_STATE_FAILED":
                # Terminal until someone resumes the job: answer with a status the tinker SDK does not retry (it
                # retries every 5xx, so a 503 here kept a driver whose trainer died polling until its timeout).
                resp = _error(409, f"trainer job {job.id} is {job.record['state']}: "
                                   f"{job.record.get('statusMessage', '')[-500:]}")
                resp.headers["x-should-retry"] = "false"
                return resp
            return _error(503, f"trainer job {job.id} is {job.record['state']}")
        return await self._proxy(request, f"http://127.0.0.1:{job.port}/api/v1/{request.path_params['rest']}")

    async def _proxy(self, request: Request, url: str, body: bytes | None = None,
                     extra_headers: dict[str, str] | None = None) -> Response:
        """Forward one request and stream the answer back with its status; the trainer's long-polls pass through."""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
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

    # -- deployments -----------------------------------------------------------------------------------------------
    async def create_deployment(self, request: Request) -> Response:
        body = await request.json()
        dep_id = request.query_params.get("deploymentId")
        if not dep_id:
            return _error(400, "deploymentId is required")
        if dep_id in self.deployments:
            return _error(409, f"deployment {dep_id} already exists")
        if not body.get("baseModel"):
            return _error(400, "baseModel is required")
        record = {"name": f"accounts/{ACCOUNT}/deployments/{dep_id}", "state": "CREATING", "createTime": _now(),
                  **{k: body[k] for k in ("baseModel", "hotLoadTrainerJob", "hotLoadBucketType", "minReplicaCount",
                                          "maxReplicaCount", "description", "deploymentShape") if k in body}}
        dep = self.deployments[dep_id] = Child("deployment", dep_id, record)
        if record.get("maxReplicaCount", 1) != 0:
            self._start(dep, self._deployment_cmd(dep), self._key_env())
        return JSONResponse(record)

    async def deployment(self, request: Request) -> Response:
        dep_id = request.path_params["dep_id"]
        dep = self.deployments.get(dep_id)
        if dep is None:
            return _error(404, f"deployment {dep_id} not found")
        if request.method == "DELETE":
            self._stop(dep)
            del self.deployments[dep_id]
            return JSONResponse({})
        if request.method == "PATCH":
            body = await request.json()
            dep.record.update({k: v for k, v in body.items() if k not in ("name", "state")})
            if body.get("maxReplicaCount") == 0:
                self._stop(dep)
                dep.record["state"] = "READY"  # scaled to zero: exists, serves nothing
            elif dep.proc is None and dep.record.get("maxReplicaCount", 1) != 0:
                dep.record["state"] = "CREATING"
                self._start(dep, self._deployment_cmd(dep), self._key_env())
        return JSONResponse(dep.record)

    def _route_deployment(self, name: str) -> Child | Response:
        dep = self.deployments.get(name.rsplit("/", 1)[-1]) if name.startswith(f"accounts/{ACCOUNT}/deployments/") else None
        if dep is None:
            return _error(404, f"deployment {name!r} not found")
        if dep.port is None:
            return _error(425, f"deployment {dep.id} has no ready replica (state {dep.record['state']})")
        return dep

    async def hot_load(self, request: Request) -> Response:
        dep = self._route_deployment(request.headers.get("fireworks-deployment", ""))
        if isinstance(dep, Response):
            return dep
        extra = {}
        trainer = dep.record.get("hotLoadTrainerJob")
        if trainer:
            extra[SNAPSHOT_ROOT_HEADER] = str(self.job_store(trainer.rsplit("/", 1)[-1]) / "sampler")
        elif request.method == "POST":
            return _error(400, f"deployment {dep.id} has no hotLoadTrainerJob to load snapshots from")
        return await self._proxy(request, f"http://127.0.0.1:{dep.port}/hot_load/v1/models/hot_load",
                                 extra_headers=extra)

    async def completions(self, request: Request) -> Response:
        body = await request.body()
        try:
            model = json.loads(body).get("model", "")
        except ValueError:
            return _error(400, "the body must be JSON")
        dep = self._route_deployment(model)
        if isinstance(dep, Response):
            return dep
        return await self._proxy(request, f"http://127.0.0.1:{dep.port}/inference/v1/completions", body=body)


def _snapshot_kind(directory: Path) -> str | None:
    from cookbook.local.snapshots import read_manifest

    try:
        return read_manifest(directory).get("kind")
    except (FileNotFoundError, ValueError):
        return None


def build_app(root: Path, api_key: str, storage: Path | None = None):
    cp = ControlPlane(root, api_key, storage)

    async def accounts(request: Request) -> Response:
        return JSONResponse({"accounts": [{"name": f"accounts/{ACCOUNT}"}]})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            cp.stop_all()  # children go down with the control plane
            await cp.http.aclose()

    a = "/v1/accounts/{account}"
    routes = [
        Route("/v1/accounts", accounts, methods=["GET"]),
        Route(a + "/trainingShapes/{shape}/versions", cp.shape_versions, methods=["GET"]),
        Route(a + "/rlorTrainerJobs", cp.create_job, methods=["POST"]),
        Route(a + "/rlorTrainerJobs/{job_id}/checkpoints", cp.list_checkpoints, methods=["GET"]),
        Route(a + "/rlorTrainerJobs/{job_id}", cp.job, methods=["GET", "DELETE", "POST"]),
        Route(a + "/checkpoints/{ckpt}", cp.promote, methods=["POST"]),
        Route(a + "/deployments", cp.create_deployment, methods=["POST"]),
        Route(a + "/deployments/{dep_id}", cp.deployment, methods=["GET", "PATCH", "DELETE"]),
        Route("/training/v1/rlorTrainerJobs/{account}/{job_id}/api/v1/{rest:path}", cp.gateway,
              methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
        Route("/hot_load/v1/models/hot_load", cp.hot_load, methods=["GET", "POST"]),
        Route("/inference/v1/completions", cp.completions, methods=["POST"]),
    ]
    return KeyAuthMiddleware(Starlette(routes=routes, lifespan=lifespan), api_key), cp


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", required=True, help="this platform's port files and logs")
    p.add_argument("--storage", help="trainer stores and promoted models (default: --root)")
    p.add_argument("--api-key", help="per-run key; default: $COOKBOOK_PLATFORM_KEY (keeps it out of `ps`)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file")
    p.add_argument("--parent-pid", type=int)
    args = p.parse_args(argv)
    api_key = args.api_key or os.environ.get("COOKBOOK_PLATFORM_KEY")
    if not api_key:
        sys.exit("control plane: no API key (--api-key or COOKBOOK_PLATFORM_KEY)")
    app, cp = build_app(Path(args.root).resolve(), api_key, Path(args.storage).resolve() if args.storage else None)
    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown (lifespan stops the children); SIGHUP would not be.
    signal.signal(signal.SIGHUP, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    try:
        serve(app, args.port, args.port_file, args.parent_pid)
    finally:
        cp.stop_all()  # idempotent backstop if the lifespan did not run


if __name__ == "__main__":
    main()
