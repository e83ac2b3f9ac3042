"""Trainer jobs: training shapes, create / get / delete / resume, and the gateway to a job's trainer process."""

from __future__ import annotations

import os
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cookbook.local import catalog as catalog_mod
from cookbook.local.catalog import TrainingShape
from cookbook.local.control_plane.children import Child, ControlPlaneBase
from cookbook.local.control_plane.validation import (
    ACCOUNT,
    RESOURCE_ID,
    ApiError,
    _check_type,
    _error,
    _flag,
    _json_object,
    _now,
    _reject_unknown,
)

TERMINAL_JOB_STATES = ("JOB_STATE_FAILED", "JOB_STATE_DELETED")
RESUMABLE_JOB_STATES = ("JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_PAUSED", "JOB_STATE_COMPLETED")

# Request bodies: the fields of RlorTrainerJob the SDK (1.2.24) may send. Anything else is rejected, as the real
# REST gateway rejects unknown JSON fields.
JOB_FIELDS = {"serviceMode", "keepAlive", "dataset", "trainingConfig", "trainerReplicaCount", "useReservation",
              "reservationTarget", "nodeCount", "displayName", "hotLoadDeploymentId", "extraValues", "forwardOnly",
              "purpose", "preemptible", "managedBy", "inactivityTimeout", "disableInactivityCleanup"}
TRAINING_CONFIG_FIELDS = {"baseModel", "loraRank", "learningRate", "projectionHeadDim", "maxContextLength",
                          "customImageTag", "acceleratorType", "acceleratorCount", "region", "extraArgs"}


class TrainerJobs(ControlPlaneBase):
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
