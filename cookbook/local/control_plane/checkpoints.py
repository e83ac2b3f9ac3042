"""A trainer job's checkpoints: listing (training and sampler checkpoints) and promotion to a model."""

from __future__ import annotations

import asyncio
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cookbook.local.control_plane.children import ControlPlaneBase
from cookbook.local.control_plane.validation import (
    ACCOUNT,
    CHECKPOINT_NAME,
    MODEL_NAME,
    RESOURCE_ID,
    ApiError,
    _check_type,
    _json_object,
    _now,
)

PROMOTE_FIELDS = {"output_model", "trainer_job_id", "base_model", "async_promotion", "hot_load_deployment_id"}


def _snapshot_kind(directory: Path) -> str | None:
    from cookbook.local.snapshots import read_manifest

    try:
        return read_manifest(directory).get("kind")
    except (FileNotFoundError, ValueError):
        return None


class Checkpoints(ControlPlaneBase):
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
