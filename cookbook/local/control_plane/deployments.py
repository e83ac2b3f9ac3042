"""Deployments: create / get / patch / delete, and routing hot-load and completion requests to a replica."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cookbook.local.control_plane.children import Child, ControlPlaneBase
from cookbook.local.control_plane.validation import (
    ACCOUNT,
    DEPLOYMENT_NAME,
    RESOURCE_ID,
    ApiError,
    _camel,
    _check_type,
    _flag,
    _json_object,
    _now,
    _reject_unknown,
    _snake,
)
from cookbook.local.procs import SNAPSHOT_ROOT_HEADER

# Request bodies: the fields of Deployment the SDK (1.2.24) may send. Anything else is rejected, as the real REST
# gateway rejects unknown JSON fields.
DEPLOYMENT_FIELDS = {"baseModel", "description", "displayName", "minReplicaCount", "maxReplicaCount", "enableHotLoad",
                     "forTraining", "placement", "hotLoadBucketType", "hotLoadTrainerJob", "hotLoadTransitionType",
                     "deploymentShape", "acceleratorType", "acceleratorCount", "extraArgs", "extraValues",
                     "annotations", "preemptible"}
# PATCH: the update-mask paths (snake_case) that may change. Others are known fields that cannot be updated here.
MUTABLE_DEPLOYMENT_FIELDS = {"description", "display_name", "min_replica_count", "max_replica_count",
                             "hot_load_trainer_job", "hot_load_transition_type", "annotations"}
TRANSITION_TYPES = {"ASYNC", "SYNC", "HOT_LOAD_TRANSITION_TYPE_UNSPECIFIED"}


class Deployments(ControlPlaneBase):
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
        if dep.record["state"] == "FAILED":
            # What Fireworks answers for a failed deployment is unknown. A status the SDK does not retry (it retries
            # 404/425 for ~50 s after a hot load, and 5xx) lets a run whose deployment died fail in seconds.
            raise ApiError(400, f"deployment {dep.id} is FAILED: {dep.record.get('statusMessage', '')}")
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
