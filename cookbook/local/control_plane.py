"""The embedded control plane: the subset of the Fireworks REST contract the official training SDK uses.

    python -m cookbook.local.control_plane --root DIR [--storage DIR] [--catalog FILE.json ...] \
        [--port N] [--port-file F] [--parent-pid PID]                            (key: $COOKBOOK_PLATFORM_KEY)

Creating a trainer job spawns a trainer service process; creating a deployment spawns an inference server. Both are
reached through this server: the trainer gateway (`/training/v1/rlorTrainerJobs/{a}/{job}/api/v1/*`), hot load
(routed by the `fireworks-deployment` header) and completions (routed by `model`). Shapes and base-model aliases come
from `cookbook.local.catalog` (+ `--catalog` files). Layout: `--root` holds `logs/` and `run/` (port files) of this
platform; `--storage` holds `jobs/<job>/{checkpoints,sampler}/` (the trainers' stores) and `models/<id>/` (promoted).

It serves what the SDK sends (wire-contract §3) and rejects what the real service rejects, answering
`{"error": {"code": <HTTP status>, "status": <gRPC code name>, "message": "..."}}`. Rules of thumb where the real
behaviour is not documented (each marked "unknown" where it is applied): the strict-but-reasonable choice; a missing
resource named in the URL is 404, a missing or malformed resource named inside a request body is 400.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
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

from cookbook.local import catalog as catalog_mod
from cookbook.local.catalog import Catalog, TrainingShape
from cookbook.local.models import EMBEDDED_MODELS
from cookbook.local.procs import SNAPSHOT_ROOT_HEADER, KeyAuthMiddleware, log_tail, python_cmd, serve, spawn, stop_group

ACCOUNT = catalog_mod.LOCAL_ACCOUNT
HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade",
               "proxy-authorization", "proxy-connection", "trailer"}
GRPC_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
               405: "UNIMPLEMENTED", 409: "ALREADY_EXISTS", 425: "UNAVAILABLE", 503: "UNAVAILABLE"}
RESOURCE_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")  # trainer job, deployment and model ids
CHECKPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # the trainer's checkpoint names
JOB_NAME = re.compile(r"^accounts/([^/]+)/rlorTrainerJobs/([^/]+)$")
MODEL_NAME = re.compile(r"^accounts/([^/]+)/models/([^/]+)$")
DEPLOYMENT_NAME = re.compile(r"^accounts/([^/]+)/deployments/([^/]+)$")
TERMINAL_JOB_STATES = ("JOB_STATE_FAILED", "JOB_STATE_DELETED")
RESUMABLE_JOB_STATES = ("JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_PAUSED", "JOB_STATE_COMPLETED")

# Request bodies: the fields of RlorTrainerJob / Deployment the SDK (1.2.24) may send. Anything else is rejected, as
# the real REST gateway rejects unknown JSON fields.
JOB_FIELDS = {"serviceMode", "keepAlive", "dataset", "trainingConfig", "trainerReplicaCount", "useReservation",
              "reservationTarget", "nodeCount", "displayName", "hotLoadDeploymentId", "extraValues", "forwardOnly",
              "purpose", "preemptible", "managedBy", "inactivityTimeout", "disableInactivityCleanup"}
TRAINING_CONFIG_FIELDS = {"baseModel", "loraRank", "learningRate", "projectionHeadDim", "maxContextLength",
                          "customImageTag", "acceleratorType", "acceleratorCount", "region", "extraArgs"}
DEPLOYMENT_FIELDS = {"baseModel", "description", "displayName", "minReplicaCount", "maxReplicaCount", "enableHotLoad",
                     "forTraining", "placement", "hotLoadBucketType", "hotLoadTrainerJob", "hotLoadTransitionType",
                     "deploymentShape", "acceleratorType", "acceleratorCount", "extraArgs", "extraValues",
                     "annotations", "preemptible"}
# PATCH: the update-mask paths (snake_case) that may change. Others are known fields that cannot be updated here.
MUTABLE_DEPLOYMENT_FIELDS = {"description", "display_name", "min_replica_count", "max_replica_count",
                             "hot_load_trainer_job", "hot_load_transition_type", "annotations"}
PROMOTE_FIELDS = {"output_model", "trainer_job_id", "base_model", "async_promotion", "hot_load_deployment_id"}
TRANSITION_TYPES = {"ASYNC", "SYNC", "HOT_LOAD_TRANSITION_TYPE_UNSPECIFIED"}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": status, "status": GRPC_STATUS.get(status, "UNKNOWN"), "message": message}},
                        status_code=status)


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(w.capitalize() for w in rest)


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", camel).lower()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_type(obj: dict, key: str, kind: str, where: str) -> None:
    if key not in obj or obj[key] is None:
        return
    v = obj[key]
    ok = {"int": _is_int(v), "bool": isinstance(v, bool), "str": isinstance(v, str),
          "number": isinstance(v, (int, float)) and not isinstance(v, bool), "dict": isinstance(v, dict),
          "list[str]": isinstance(v, list) and all(isinstance(x, str) for x in v),
          "dict[str,str]": isinstance(v, dict) and all(isinstance(x, str) for x in v.values())}[kind]
    if not ok:
        raise ApiError(400, f"{where}.{key} must be {kind.replace('str', 'string').replace('dict', 'object')}, "
                            f"got {v!r}")


def _reject_unknown(obj: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ApiError(400, f"invalid {where}: unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name)
    if value is None:
        return False
    if value.lower() not in ("true", "false", "1", "0"):
        raise ApiError(400, f"query parameter {name} must be true or false, got {value!r}")
    return value.lower() in ("true", "1")


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
    """CPU threads per trainer / deployment process. The driver, a trainer and a deployment share the machine:
    with torch's default (all cores each) they oversubscribe it, and on 2 cores a busy neighbour made 2-thread steps
    3-30x slower than 1-thread ones (the embedded models are small, so one thread loses little when idle).
    COOKBOOK_TORCH_THREADS overrides; 0 = torch's default."""
    return os.environ.get("COOKBOOK_TORCH_THREADS", "1")


class ControlPlane:
    def __init__(self, root: Path, api_key: str, storage: Path | None = None, catalog: Catalog | None = None):
        self.root = root  # this platform's own state: port files and child logs
        self.storage = storage or root  # trainer stores and promoted models, shared by every platform on the machine
        self.api_key = api_key
        self.catalog = catalog or catalog_mod.builtin()
        self.jobs: dict[str, Child] = {}
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
                if child.kind == "deployment":
                    child.record["replicaCount"] = 1
            await asyncio.sleep(0.1)
        if child.proc is proc:  # not replaced by a resume / scale-up meanwhile
            child.port = None
            child.record["state"] = failed_state
            child.record["updateTime"] = _now()
            child.record["statusMessage"] = f"process exited with code {proc.returncode}.{log_tail(child.log_file, 1500)}"
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

    def job_store(self, job_id: str) -> Path:
        return self.storage / "jobs" / job_id

    def _trainer_cmd(self, job: Child) -> list[str]:
        cfg = job.record["trainingConfig"]
        cmd = python_cmd("cookbook.local.trainer", "--host", "127.0.0.1", "--port", "0", "--port-file",
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
        cmd = python_cmd("cookbook.local.deployment", "--port-file",
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

    # -- training shapes -------------------------------------------------------------------------------------------
    async def shape_versions(self, request: Request) -> Response:
        """GET .../trainingShapes/{s}/versions[?filter=latest_validated=true&pageSize=N] (any account: shapes
        usually live under accounts/fireworks)."""
        p = request.path_params
        name = f"accounts/{p['account']}/trainingShapes/{p['shape']}"
        shape = self.catalog.training_shape(name)
        if shape is None:
            raise ApiError(404, f"training shape {name!r} not found (this platform has: "
                                f"{', '.join(sorted(self.catalog.training_shapes))})")
        flt = (request.query_params.get("filter") or "").replace(" ", "")
        if flt not in ("", "latest_validated=true", "validated=true"):
            raise ApiError(400, f"unsupported filter {request.query_params.get('filter')!r} (supported: "
                                "latest_validated=true, validated=true)")
        page_size = request.query_params.get("pageSize", "50")
        if not page_size.isdigit():
            raise ApiError(400, f"pageSize must be a non-negative integer, got {page_size!r}")
        return JSONResponse({"trainingShapeVersions": [shape.version_payload()]})

    async def shape_version(self, request: Request) -> Response:
        p = request.path_params
        name = f"accounts/{p['account']}/trainingShapes/{p['shape']}/versions/{p['version']}"
        shape = self.catalog.training_shape(name)
        if shape is None:
            raise ApiError(404, f"training shape version {name!r} not found")
        return JSONResponse(shape.version_payload())

    # -- trainer jobs ----------------------------------------------------------------------------------------------
    async def create_job(self, request: Request) -> Response:
        self._own_account(request.path_params["account"])
        body = await _json_object(request)
        q = request.query_params
        job_id = q.get("rlorTrainerJobId") or f"training-api-service-{os.urandom(4).hex()}"
        if not RESOURCE_ID.match(job_id):
            raise ApiError(400, f"rlorTrainerJobId {job_id!r} must be 1-63 characters of a-z, 0-9 and '-'")
        if job_id in self.jobs:  # deleted jobs stay as tombstones: their id cannot be reused (as on Fireworks)
            raise ApiError(409, f"rlorTrainerJob accounts/{ACCOUNT}/rlorTrainerJobs/{job_id} already exists "
                                f"(state {self.jobs[job_id].record['state']})")
        if q.get("deploymentId") or body.get("hotLoadDeploymentId"):
            raise ApiError(400, "hotLoadDeploymentId (the deprecated PER_DEPLOYMENT hot-load scope) is not implemented "
                                "by the embedded platform: create the deployment with hotLoadTrainerJob instead")
        _reject_unknown(body, JOB_FIELDS, "rlorTrainerJob")
        cfg = body.get("trainingConfig")
        if not isinstance(cfg, dict):
            raise ApiError(400, "trainingConfig is required (with trainingConfig.baseModel)")
        _reject_unknown(cfg, TRAINING_CONFIG_FIELDS, "rlorTrainerJob.trainingConfig")
        for key, kind in (("loraRank", "int"), ("learningRate", "number"), ("maxContextLength", "int"),
                          ("acceleratorCount", "int"), ("projectionHeadDim", "int"), ("acceleratorType", "str"),
                          ("region", "str"), ("customImageTag", "str"), ("extraArgs", "list[str]")):
            _check_type(cfg, key, kind, "trainingConfig")
        for key, kind in (("nodeCount", "int"), ("trainerReplicaCount", "int"), ("forwardOnly", "bool"),
                          ("serviceMode", "bool"), ("displayName", "str"), ("extraValues", "dict[str,str]"),
                          ("inactivityTimeout", "str"), ("dataset", "str")):
            _check_type(body, key, kind, "rlorTrainerJob")
        source = self.model_source(cfg.get("baseModel"), "trainingConfig.baseModel")
        if body.get("serviceMode") is False or body.get("dataset"):
            raise ApiError(400, "only service-mode trainer jobs (serviceMode: true, no dataset) are supported by the "
                                "embedded platform")
        if (cfg.get("projectionHeadDim") or 0) > 0:
            raise ApiError(400, "trainingConfig.projectionHeadDim is not implemented by the embedded trainer")
        if (body.get("trainerReplicaCount") or 1) > 1:
            raise ApiError(400, "trainerReplicaCount > 1 (replicated HSDP) is not implemented by the embedded trainer")
        if (cfg.get("loraRank") or 0) < 0:
            raise ApiError(400, "trainingConfig.loraRank must be >= 0")
        forward_only = bool(body.get("forwardOnly"))

        shape_ref = q.get("trainingShape")
        skip = _flag(request, "skipValidations")
        shape: TrainingShape | None = None
        if shape_ref or not skip:
            owned = [f"trainingConfig.{k}" for k in ("acceleratorType", "acceleratorCount", "maxContextLength")
                     if cfg.get(k) not in (None, "", 0)] + (["nodeCount"] if body.get("nodeCount") else [])
            if not shape_ref:  # auto-selection path: the context length is a selector input there
                owned = [o for o in owned if o != "trainingConfig.maxContextLength"]
            if owned:
                raise ApiError(400, f"{', '.join(owned)} cannot be set with a training shape: the shape owns the "
                                    "hardware, node count and context length. Remove them, or create the job on the "
                                    "manual path (no trainingShape, skipValidations=true)")
        if shape_ref:
            if not catalog_mod.TRAINING_SHAPE_RE.match(shape_ref.split("/versions/")[0]):
                raise ApiError(400, f"trainingShape {shape_ref!r} is not accounts/<a>/trainingShapes/<s>[/versions/<v>]")
            shape = self.catalog.training_shape(shape_ref)
            if shape is None:
                raise ApiError(400, f"trainingShape {shape_ref!r} not found")
        elif not skip:
            shape = self.catalog.auto_select(cfg["baseModel"], int(cfg.get("loraRank") or 0), forward_only)
            if shape is None:
                raise ApiError(400, f"no validated training shape for base model {cfg['baseModel']!r}: pass "
                                    "trainingShape, or skipValidations=true for a manual launch")
        if shape is not None:
            if shape.forward_only and not forward_only:
                # Unknown on Fireworks; strict: a FORWARD_ONLY shape's trainer cannot train, so say so up front.
                raise ApiError(400, f"training shape {shape.name} is FORWARD_ONLY: create the job with "
                                    "forwardOnly: true (a reference trainer), or use a policy shape to train")
            # The real service's rule for a base model that differs from the shape's is unknown; this platform allows
            # it (a warm start runs a model directory on a local shape) and records both.
            cfg = {**cfg, "maxContextLength": min(shape.max_context_length, int(cfg.get("maxContextLength") or
                                                                                shape.max_context_length))}
        now = _now()
        record: dict[str, Any] = {
            "name": f"accounts/{ACCOUNT}/rlorTrainerJobs/{job_id}", "displayName": body.get("displayName") or job_id,
            "state": "JOB_STATE_CREATING", "statusMessage": "", "createTime": now, "updateTime": now,
            "serviceMode": True, "trainingConfig": cfg, "forwardOnly": forward_only,
            "nodeCount": shape.node_count if shape else int(body.get("nodeCount") or 1)}
        if shape is not None:
            record["trainingShape"] = shape_ref or shape.name
            record["trainingShapeVersion"] = shape.version_name
        # Recorded, not acted on: placement and lifecycle knobs of the real service (the embedded trainer has one
        # process on this machine; extraArgs are opaque test flags of the real trainer image).
        for key in ("keepAlive", "useReservation", "reservationTarget", "trainerReplicaCount", "extraValues",
                    "purpose", "preemptible", "managedBy", "inactivityTimeout", "disableInactivityCleanup"):
            if key in body:
                record[key] = body[key]
        job = self.jobs[job_id] = Child("trainer", job_id, record, source=source)
        self._start(job, self._trainer_cmd(job), self._key_env())
        return JSONResponse(record)

    def _job(self, account: str, job_id: str) -> Child:
        self._own_account(account)
        job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"rlorTrainerJob accounts/{account}/rlorTrainerJobs/{job_id} not found")
        return job

    async def job(self, request: Request) -> Response:
        account, job_id = request.path_params["account"], request.path_params["job_id"]
        if request.method == "POST":
            if not job_id.endswith(":resume"):
                raise ApiError(404, f"unknown action on rlorTrainerJob {job_id!r} (supported: :resume)")
            return self._resume(self._job(account, job_id.removesuffix(":resume")))
        job = self._job(account, job_id)
        if request.method == "DELETE":
            # Deleted jobs stay as tombstones (JOB_STATE_DELETED): their checkpoints can still be listed and
            # promoted, and the id cannot be reused; the SDK reports both (trainer.py _TRAINER_TOMBSTONE_STATES).
            if job.record["state"] != "JOB_STATE_DELETED":
                self._stop(job)
                job.record.update(state="JOB_STATE_DELETED", updateTime=_now(), statusMessage="deleted")
            return JSONResponse(job.record)
        return JSONResponse(job.record)

    def _resume(self, job: Child) -> Response:
        state = job.record["state"]
        if state not in RESUMABLE_JOB_STATES:
            # Unknown on Fireworks; strict: only a stopped job resumes (the SDK resumes FAILED/CANCELLED/PAUSED/
            # COMPLETED jobs only, trainer.py reconnect_and_wait).
            raise ApiError(400, f"rlorTrainerJob {job.id} is {state}; only a failed or stopped job can be resumed")
        job.record.update(state="JOB_STATE_CREATING", statusMessage="", updateTime=_now())
        self._start(job, self._trainer_cmd(job), self._key_env())
        return JSONResponse(job.record)

    async def list_checkpoints(self, request: Request) -> Response:
        self._own_account(request.path_params["account"])
        job_id = request.path_params["job_id"]
        store = self.job_store(job_id)
        if job_id not in self.jobs and not store.is_dir():
            raise ApiError(404, f"rlorTrainerJob accounts/{ACCOUNT}/rlorTrainerJobs/{job_id} not found")
        page_size, token = request.query_params.get("pageSize", "200"), request.query_params.get("pageToken") or "0"
        if not page_size.isdigit() or not 0 < int(page_size) <= 1000:
            raise ApiError(400, f"pageSize must be an integer in [1, 1000], got {page_size!r}")
        if not token.isdigit():
            raise ApiError(400, f"invalid pageToken {token!r}")
        rows = []
        for sub in ("checkpoints", "sampler"):
            for d in (store / sub).iterdir() if (store / sub).is_dir() else []:
                if not d.is_dir() or d.name.startswith("."):
                    continue  # hidden dirs are saves in progress
                if sub == "checkpoints":
                    if not (d / "meta.json").is_file():
                        continue  # the trainer writes meta.json last: without it the checkpoint is incomplete
                    kind, promotable = "CHECKPOINT_TYPE_TRAINING", False
                else:
                    snapshot_kind = _snapshot_kind(d)
                    if snapshot_kind is None:
                        continue
                    promotable = snapshot_kind == "base"
                    kind = "CHECKPOINT_TYPE_INFERENCE_BASE" if promotable else "CHECKPOINT_TYPE_INFERENCE_ARC_V2"
                mtime = d.stat().st_mtime
                stamp = datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z")
                rows.append((mtime, d.name, {"name": f"accounts/{ACCOUNT}/rlorTrainerJobs/{job_id}/checkpoints/{d.name}",
                                             "createTime": stamp, "updateTime": stamp, "checkpointType": kind,
                                             "promotable": promotable}))
        rows.sort(key=lambda r: (r[0], r[1]))  # oldest first, as the real service answers
        start, size = int(token), int(page_size)
        page = [r[2] for r in rows[start:start + size]]
        reply: dict[str, Any] = {"checkpoints": page}
        if start + size < len(rows):
            reply["nextPageToken"] = str(start + size)
        return JSONResponse(reply)

    async def promote(self, request: Request) -> Response:
        """POST /v1/accounts/{a}/checkpoints/{ckpt}:promote (what the SDK sends for both promote_checkpoint forms),
        and the 4-segment form /v1/accounts/{a}/rlorTrainerJobs/{job}/checkpoints/{ckpt}:promote."""
        self._own_account(request.path_params["account"])
        name = request.path_params["ckpt"]
        if not name.endswith(":promote"):
            raise ApiError(404, f"unknown checkpoint action in {name!r} (supported: :promote)")
        ckpt = name.removesuffix(":promote")
        body = await _json_object(request)
        for key in body:
            if key not in PROMOTE_FIELDS:
                # The SDK retries without async_promotion when a 400 names it; everything else is just unknown.
                raise ApiError(400, f"invalid promote request: unknown field {key!r}")
        _check_type(body, "async_promotion", "bool", "promote")
        if body.get("hot_load_deployment_id"):
            raise ApiError(400, "hot_load_deployment_id (legacy PER_DEPLOYMENT checkpoints) is not implemented by the "
                                "embedded platform: promote with trainer_job_id only")
        path_job = request.path_params.get("job_id")
        job_name = body.get("trainer_job_id") or (f"accounts/{ACCOUNT}/rlorTrainerJobs/{path_job}" if path_job else None)
        if job_name is None:
            raise ApiError(400, "trainer_job_id is required (accounts/<a>/rlorTrainerJobs/<job>)")
        job_id = self._job_for_name(job_name, "trainer_job_id")
        if path_job and path_job != job_id:
            raise ApiError(400, f"trainer_job_id {job_name!r} does not match the checkpoint's job {path_job!r}")
        output = body.get("output_model")
        m = MODEL_NAME.match(output) if isinstance(output, str) else None
        if not m or m.group(1) != ACCOUNT or not RESOURCE_ID.match(m.group(2)):
            raise ApiError(400, f"output_model must be accounts/{ACCOUNT}/models/<id> with an id of 1-63 characters "
                                f"a-z, 0-9, '-', got {output!r}")
        if not isinstance(body.get("base_model"), str) or not body["base_model"]:
            raise ApiError(400, "base_model is required")
        if not CHECKPOINT_NAME.match(ckpt):
            raise ApiError(400, f"invalid checkpoint id {ckpt!r}")
        store = self.job_store(job_id)
        src = store / "sampler" / ckpt
        if not src.is_dir():
            if (store / "checkpoints" / ckpt).is_dir():
                raise ApiError(400, f"checkpoint {ckpt} of job {job_id} is a training (DCP) checkpoint and is not "
                                    "promotable; promote a base sampler checkpoint (save_weights_for_sampler_ext)")
            raise ApiError(404, f"checkpoint accounts/{ACCOUNT}/rlorTrainerJobs/{job_id}/checkpoints/{ckpt} not found")
        if _snapshot_kind(src) != "base":
            raise ApiError(400, f"checkpoint {ckpt} is a delta snapshot and not promotable; save a base one")
        model_id = m.group(2)
        dst = self.storage / "models" / model_id
        tmp = dst.with_name(f".tmp-{model_id}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        await asyncio.to_thread(shutil.copytree, src, tmp)
        (tmp / "snapshot.json").unlink(missing_ok=True)  # a plain HF model dir, no longer a snapshot
        # Unknown: the real service most likely refuses an existing output model (ALREADY_EXISTS). This model store
        # is shared by every local run on the machine and has no model-deletion API, so a re-promotion replaces it.
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
        # Synchronous (async_promotion is honoured by finishing before the answer, which the SDK accepts): an
        # operation would cost the SDK's 10 s polling interval for a copy that takes milliseconds.
        return JSONResponse({"model": {"name": output, "state": "READY", "kind": "HF_BASE_MODEL",
                                       "baseModel": body["base_model"], "createTime": _now(), "localPath": str(dst)}})

    # -- gateway ---------------------------------------------------------------------------------------------------
    async def gateway(self, request: Request) -> Response:
        job = self._job(request.path_params["account"], request.path_params["job_id"])
        if job.port is None:
            if job.record["state"] in TERMINAL_JOB_STATES:
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

    # -- deployments -----------------------------------------------------------------------------------------------
    def _check_deployment_fields(self, body: dict, where: str) -> None:
        _reject_unknown(body, DEPLOYMENT_FIELDS, where)
        for key, kind in (("baseModel", "str"), ("description", "str"), ("displayName", "str"),
                          ("minReplicaCount", "int"), ("maxReplicaCount", "int"), ("enableHotLoad", "bool"),
                          ("forTraining", "bool"), ("placement", "dict"), ("hotLoadBucketType", "str"),
                          ("hotLoadTrainerJob", "str"), ("hotLoadTransitionType", "str"), ("deploymentShape", "str"),
                          ("acceleratorType", "str"), ("acceleratorCount", "int"), ("extraArgs", "list[str]"),
                          ("extraValues", "dict[str,str]"), ("annotations", "dict[str,str]"), ("preemptible", "bool")):
            _check_type(body, key, kind, where)
        if body.get("hotLoadTransitionType") not in (None, *TRANSITION_TYPES):
            raise ApiError(400, f"{where}.hotLoadTransitionType must be ASYNC or SYNC, got "
                                f"{body['hotLoadTransitionType']!r}")
        for key in ("minReplicaCount", "maxReplicaCount"):
            if (body.get(key) or 0) < 0:
                raise ApiError(400, f"{where}.{key} must be >= 0")

    async def create_deployment(self, request: Request) -> Response:
        self._own_account(request.path_params["account"])
        body = await _json_object(request)
        dep_id = request.query_params.get("deploymentId")
        if not dep_id:
            raise ApiError(400, "deploymentId is required")
        if not RESOURCE_ID.match(dep_id):
            raise ApiError(400, f"deploymentId {dep_id!r} must be 1-63 characters of a-z, 0-9 and '-'")
        if dep_id in self.deployments:
            raise ApiError(409, f"deployment accounts/{ACCOUNT}/deployments/{dep_id} already exists")
        self._check_deployment_fields(body, "deployment")
        source = self.model_source(body.get("baseModel"), "baseModel")
        shapeless_ok = _flag(request, "acceptShapelessRisk")
        _flag(request, "skipShapeValidation"), _flag(request, "disableSpeculativeDecoding")  # validated, recorded
        shape_ref, accelerator = body.get("deploymentShape"), body.get("acceleratorType")
        if shape_ref and accelerator:
            raise ApiError(400, "deploymentShape and acceleratorType are mutually exclusive: the deployment shape owns "
                                "the hardware. Remove acceleratorType, or create the deployment without a shape")
        if shape_ref and shapeless_ok:
            raise ApiError(400, "acceptShapelessRisk is an opt-out of deployment shapes and cannot be combined with "
                                f"deploymentShape {shape_ref!r}")
        if not shape_ref and (not accelerator or accelerator == "ACCELERATOR_TYPE_UNSPECIFIED"):
            # As on Fireworks: the real server rejects an unspecified accelerator (SDK deployment.py DeploymentConfig).
            raise ApiError(400, "a deployment needs a deploymentShape (recommended: the training shape's "
                                "deploymentShapeVersion) or an acceleratorType; the accelerator is unspecified")
        record: dict[str, Any] = {"name": f"accounts/{ACCOUNT}/deployments/{dep_id}", "state": "CREATING",
                                  "createTime": _now(), "updateTime": _now(), "baseModel": body["baseModel"],
                                  "description": body.get("description", ""), "minReplicaCount": 0,
                                  "maxReplicaCount": 1, "enableHotLoad": False, "forTraining": False,
                                  "replicaCount": 0}
        if shape_ref:
            shape = self.catalog.deployment_shape(shape_ref)
            if shape is None:
                raise ApiError(400, f"deploymentShape {shape_ref!r} not found (this platform has: "
                                    f"{', '.join(sorted(self.catalog.deployment_shapes))})")
            # Unknown: whether the real service requires the shape's base model to match; not required here (a
            # warm start deploys a model directory on a local shape).
            record.update(deploymentShape=shape.version_name, acceleratorType=shape.accelerator_type,
                          acceleratorCount=shape.accelerator_count)
        record.update({k: v for k, v in body.items() if k != "deploymentShape"})
        if record["minReplicaCount"] > record["maxReplicaCount"]:
            raise ApiError(400, "minReplicaCount must not exceed maxReplicaCount")
        self._check_hot_load_fields(record)
        dep = self.deployments[dep_id] = Child("deployment", dep_id, record, source=source)
        # One replica serves every maxReplicaCount >= 1 (this machine runs one inference server per deployment).
        if record["maxReplicaCount"] >= 1:
            self._start(dep, self._deployment_cmd(dep), self._key_env())
        else:
            record["state"] = "READY"  # exists with zero replicas
        return JSONResponse(record)

    def _check_hot_load_fields(self, record: dict) -> None:
        trainer = record.get("hotLoadTrainerJob")
        if trainer:
            if not record.get("enableHotLoad"):
                raise ApiError(400, "hotLoadTrainerJob needs enableHotLoad: true")
            job_id = self._job_for_name(trainer, "hotLoadTrainerJob")
            record["hotLoadBucketUrl"] = (self.job_store(job_id) / "sampler").as_uri()
        else:
            record.pop("hotLoadBucketUrl", None)

    def _deployment(self, account: str, dep_id: str) -> Child:
        self._own_account(account)
        dep = self.deployments.get(dep_id)
        if dep is None:
            raise ApiError(404, f"deployment accounts/{account}/deployments/{dep_id} not found")
        return dep

    async def deployment(self, request: Request) -> Response:
        dep = self._deployment(request.path_params["account"], request.path_params["dep_id"])
        if request.method == "DELETE":
            # ignoreChecks / hard are what the SDK sends; the deployment goes at once either way.
            _flag(request, "ignoreChecks"), _flag(request, "hard")
            self._stop(dep)
            del self.deployments[dep.id]
            return JSONResponse({})
        if request.method == "PATCH":
            return await self._update_deployment(request, dep)
        return JSONResponse(dep.record)

    async def _update_deployment(self, request: Request, dep: Child) -> Response:
        """PATCH with `updateMask` (snake_case paths; only those fields change, a masked field absent from the body is
        cleared). Without a mask the fields present in the body change (the SDK sends no mask only for
        scale_to_zero, with both replica counts; the real server's no-mask rule is to replace every mutable field)."""
        body = await _json_object(request)
        self._check_deployment_fields(body, "deployment")
        mask_param = request.query_params.get("updateMask")
        paths = [p.strip() for p in mask_param.split(",") if p.strip()] if mask_param else [_snake(k) for k in body]
        for path in paths:
            if path not in MUTABLE_DEPLOYMENT_FIELDS:
                known = _camel(path) in DEPLOYMENT_FIELDS
                raise ApiError(400, f"updateMask path {path!r} " + (
                    "names a field that cannot be updated on this platform" if known else "is not a deployment field")
                    + f" (updatable: {', '.join(sorted(MUTABLE_DEPLOYMENT_FIELDS))})")
        new = dict(dep.record)
        for path in paths:
            key = _camel(path)
            if key in body:
                new[key] = body[key]
            else:
                new.pop(key, None)
                if key in ("minReplicaCount", "maxReplicaCount"):
                    new[key] = 0
        if new.get("minReplicaCount", 0) > new.get("maxReplicaCount", 0):
            raise ApiError(400, "minReplicaCount must not exceed maxReplicaCount")
        self._check_hot_load_fields(new)
        rolled = (new.get("hotLoadTrainerJob") != dep.record.get("hotLoadTrainerJob")
                  or new.get("hotLoadTransitionType") != dep.record.get("hotLoadTransitionType"))
        new["updateTime"] = _now()
        dep.record.clear()
        dep.record.update(new)
        if new.get("maxReplicaCount", 0) == 0:
            if dep.proc is not None:
                self._stop(dep)
            dep.record.update(state="READY", replicaCount=0)  # scaled to zero: exists, serves nothing
        elif dep.proc is None or dep.proc.poll() is not None:
            dep.record.update(state="CREATING", replicaCount=0, statusMessage="")
            self._start(dep, self._deployment_cmd(dep), self._key_env())
        elif rolled and dep.port is not None:
            # On Fireworks re-pointing the hot-load trainer (or the transition type) rolls the pods, so the replica
            # comes back with the base weights and no snapshot. Same here, in place, before answering.
            resp = await self.http.post(f"http://127.0.0.1:{dep.port}/internal/reset",
                                        headers={"X-Api-Key": self.api_key})
            if resp.status_code != 200:
                raise ApiError(503, f"could not reset the replica of deployment {dep.id}: HTTP {resp.status_code}")
        return JSONResponse(dep.record)

    def _route_deployment(self, name: str, where: str) -> Child:
        m = DEPLOYMENT_NAME.match(name or "")
        if not m:
            raise ApiError(400, f"{where} must be accounts/{ACCOUNT}/deployments/<id>, got {name!r}")
        dep = self.deployments.get(m.group(2)) if m.group(1) == ACCOUNT else None
        if dep is None:
            raise ApiError(404, f"deployment {name!r} not found")
        if dep.port is None:
            raise ApiError(425, f"deployment {dep.id} has no ready replica (state {dep.record['state']}, "
                                f"{dep.record.get('replicaCount', 0)} replicas)")
        return dep

    async def hot_load(self, request: Request) -> Response:
        dep = self._route_deployment(request.headers.get("fireworks-deployment", ""), "the fireworks-deployment header")
        if not dep.record.get("enableHotLoad"):
            raise ApiError(400, f"deployment {dep.id} was created without enableHotLoad")
        extra = {}
        trainer = dep.record.get("hotLoadTrainerJob")
        if trainer:
            extra[SNAPSHOT_ROOT_HEADER] = str(self.job_store(trainer.rsplit("/", 1)[-1]) / "sampler")
        elif request.method == "POST":
            raise ApiError(400, f"deployment {dep.id} has no hotLoadTrainerJob to load snapshots from")
        return await self._proxy(request, f"http://127.0.0.1:{dep.port}/hot_load/v1/models/hot_load",
                                 extra_headers=extra)

    async def completions(self, request: Request) -> Response:
        body = await request.body()
        try:
            parsed = json.loads(body)
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(parsed, dict) or not isinstance(parsed.get("model"), str):
            raise ApiError(400, "`model` is required: the deployment as accounts/<account>/deployments/<id>")
        dep = self._route_deployment(parsed["model"], "model")
        return await self._proxy(request, f"http://127.0.0.1:{dep.port}/inference/v1/completions", body=body)


async def _json_object(request: Request) -> dict:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _snapshot_kind(directory: Path) -> str | None:
    from cookbook.local.snapshots import read_manifest

    try:
        return read_manifest(directory).get("kind")
    except (FileNotFoundError, ValueError):
        return None


def build_app(root: Path, api_key: str, storage: Path | None = None, catalog: Catalog | None = None):
    cp = ControlPlane(root, api_key, storage, catalog)

    async def accounts(request: Request) -> Response:
        return JSONResponse({"accounts": [{"name": f"accounts/{ACCOUNT}", "displayName": "embedded platform"}]})

    async def api_error(request: Request, exc: ApiError) -> Response:
        return _error(exc.status, exc.message)

    async def http_error(request: Request, exc: Exception) -> Response:  # unknown paths and methods, as JSON too
        status = getattr(exc, "status_code", 500)
        return _error(status, f"{request.method} {request.url.path}: {getattr(exc, 'detail', '') or 'not supported'}")

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
        Route(a + "/trainingShapes/{shape}/versions/{version}", cp.shape_version, methods=["GET"]),
        Route(a + "/rlorTrainerJobs", cp.create_job, methods=["POST"]),
        Route(a + "/rlorTrainerJobs/{job_id}/checkpoints", cp.list_checkpoints, methods=["GET"]),
        Route(a + "/rlorTrainerJobs/{job_id}/checkpoints/{ckpt}", cp.promote, methods=["POST"]),
        Route(a + "/rlorTrainerJobs/{job_id}", cp.job, methods=["GET", "DELETE", "POST"]),
        Route(a + "/checkpoints/{ckpt}", cp.promote, methods=["POST"]),
        Route(a + "/deployments", cp.create_deployment, methods=["POST"]),
        Route(a + "/deployments/{dep_id}", cp.deployment, methods=["GET", "PATCH", "DELETE"]),
        Route("/training/v1/rlorTrainerJobs/{account}/{job_id}/api/v1/{rest:path}", cp.gateway,
              methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
        Route("/hot_load/v1/models/hot_load", cp.hot_load, methods=["GET", "POST"]),
        Route("/inference/v1/completions", cp.completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={ApiError: api_error, 404: http_error, 405: http_error})
    return KeyAuthMiddleware(app, api_key), cp


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="this platform's port files and logs")
    p.add_argument("--storage", help="trainer stores and promoted models (default: --root)")
    p.add_argument("--catalog", action="append", default=[],
                   help="a catalog file adding training shapes, deployment shapes and model aliases "
                        "(format: cookbook/local/catalog.py); repeatable")
    p.add_argument("--api-key", help="per-run key; default: $COOKBOOK_PLATFORM_KEY (keeps it out of `ps`)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file")
    p.add_argument("--parent-pid", type=int)
    args = p.parse_args(argv)
    api_key = args.api_key or os.environ.get("COOKBOOK_PLATFORM_KEY")
    if not api_key:
        sys.exit("control plane: no API key (--api-key or COOKBOOK_PLATFORM_KEY)")
    try:
        cat = catalog_mod.load(args.catalog)
    except catalog_mod.CatalogError as e:
        sys.exit(f"control plane: {e}")
    app, cp = build_app(Path(args.root).resolve(), api_key, Path(args.storage).resolve() if args.storage else None,
                        cat)
    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown (lifespan stops the children); SIGHUP would not be.
    signal.signal(signal.SIGHUP, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    try:
        serve(app, args.port, args.port_file, args.parent_pid)
    finally:
        cp.stop_all()  # idempotent backstop if the lifespan did not run


if __name__ == "__main__":
    main()
