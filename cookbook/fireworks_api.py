"""Control-plane client for the Fireworks Training API (wire-contract §3), used verbatim for the embedded platform.

`TrainerJobManager` creates, inspects, resumes and deletes RLOR trainer jobs and hands out the tinker base URL of a
job (the gateway prefix). `DeploymentManager` creates deployments, hot loads sampler snapshots and sends completion
requests. Both talk plain httpx; the only thing that differs between Fireworks and the local platform is the base URL,
the key and the polling interval.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

import httpx

from cookbook.naming import deployment_id_for

DEFAULT_BASE_URL = "https://api.fireworks.ai"
RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
STOPPED = {"JOB_STATE_CANCELLING", "JOB_STATE_CANCELLED", "JOB_STATE_COMPLETED", "JOB_STATE_EARLY_STOPPED",
           "JOB_STATE_DELETING"}
TOMBSTONE = {"JOB_STATE_DELETED", "JOB_STATE_ARCHIVED"}
RESUMABLE = {"JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_PAUSED", "JOB_STATE_COMPLETED"}


class FireworksAPIError(RuntimeError):
    """A control-plane call failed; the message carries the server's own error text."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class TrainerEndpoint:
    """Where a ready trainer job is served: the tinker base URL (gateway prefix) and its names."""

    base_url: str
    job_id: str
    job_name: str
    max_context_length: int | None = None


def _error_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500] or resp.reason_phrase
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)


class _ControlPlaneClient:
    """Shared HTTP plumbing: auth headers, account lookup, error mapping and transport-level retries."""

    def __init__(self, api_key: str, base_url: str | None = None, *, poll_interval_s: float = 5.0,
                 retry_budget_s: float = 300.0, timeout_s: float = 60.0):
        if not api_key:
            raise ValueError("an API key is required")
        self.api_key = api_key
        self.base_url = (base_url or os.environ.get("FIREWORKS_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.poll_interval_s = poll_interval_s
        self.retry_budget_s = retry_budget_s
        headers = {"X-Api-Key": api_key, "Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s, connect=5.0))
        self._account: str | None = None

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:  # never print the key
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    # -- requests ------------------------------------------------------------------------------------------------
    def _request(self, method: str, url: str, *, ok_statuses: Iterable[int] = (), retry: bool = True,
                 **kwargs) -> httpx.Response:
        """One logical request. Retries 408/429/5xx and connection errors with backoff up to `retry_budget_s`
        (the contract's transport retries); any other non-2xx status raises `FireworksAPIError` with the server's
        message, except those in `ok_statuses`, which are returned for the caller to interpret."""
        if not url.startswith("http"):
            url = self.base_url + url
        deadline = time.monotonic() + (self.retry_budget_s if retry else 0)
        delay = min(0.5, self.poll_interval_s)
        while True:
            try:
                resp = self._http.request(method, url, **kwargs)
            except httpx.TransportError as e:
                if time.monotonic() + delay > deadline:
                    raise FireworksAPIError(f"{method} {url} failed: {type(e).__name__}: {e}") from e
            else:
                if resp.is_success or resp.status_code in ok_statuses:
                    return resp
                if resp.status_code not in RETRY_STATUSES or time.monotonic() + delay > deadline:
                    raise FireworksAPIError(f"{method} {url} -> HTTP {resp.status_code}: {_error_text(resp)}",
                                            resp.status_code)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)

    @property
    def account_id(self) -> str:
        """The one account the key belongs to (`GET /v1/accounts?pageSize=2`; 0 or 2+ accounts is an error)."""
        if self._account is None:
            accounts = self._request("GET", "/v1/accounts", params={"pageSize": 2}).json().get("accounts", [])
            if len(accounts) != 1:
                raise FireworksAPIError(f"expected exactly one account for this API key, found {len(accounts)}")
            self._account = accounts[0]["name"].split("/")[-1]
        return self._account

    def _sleep_poll(self) -> None:
        time.sleep(self.poll_interval_s)


class TrainerJobManager(_ControlPlaneClient):
    """RLOR trainer jobs (wire-contract §3.2): create, wait, reattach, resume, delete, checkpoints, promotion."""

    def job_name(self, job_id: str) -> str:
        return f"accounts/{self.account_id}/rlorTrainerJobs/{job_id}"

    def endpoint(self, job_id: str, max_context_length: int | None = None) -> TrainerEndpoint:
        base = f"{self.base_url}/training/v1/rlorTrainerJobs/{self.account_id}/{job_id}"
        return TrainerEndpoint(base, job_id, self.job_name(job_id), max_context_length)

    def create(self, base_model: str, training_shape_id: str, *, job_id: str | None = None, lora_rank: int = 0,
               max_context_length: int | None = None, region: str | None = None,
               extra_args: list[str] | None = None, forward_only: bool = False,
               display_name: str | None = None) -> dict[str, Any]:
        """Create a service-mode trainer job on a training shape; a 409 (id taken) reuses the existing job."""
        job_id = job_id or f"training-api-service-{uuid.uuid4().hex[:8]}"
        config: dict[str, Any] = {"baseModel": base_model, "loraRank": lora_rank}
        if max_context_length:
            config["maxContextLength"] = max_context_length
        if region:
            config["region"] = region
        if extra_args:
            config["extraArgs"] = list(extra_args)
        body: dict[str, Any] = {"serviceMode": True, "keepAlive": False, "dataset": "", "trainingConfig": config,
                                "useReservation": True}
        if forward_only:
            body["forwardOnly"] = True
        if display_name:
            body["displayName"] = display_name
        resp = self._request("POST", f"/v1/accounts/{self.account_id}/rlorTrainerJobs", ok_statuses=(409,),
                             params={"trainingShape": training_shape_id, "rlorTrainerJobId": job_id}, json=body)
        if resp.status_code == 409:
            job = self.get(job_id)
            if job.get("state") in TOMBSTONE:
                raise FireworksAPIError(f"trainer job {job_id} already exists and is {job['state']}; use another id")
            return job
        return resp.json()

    def get(self, job_id: str) -> dict[str, Any]:
        resp = self._request("GET", f"/v1/accounts/{self.account_id}/rlorTrainerJobs/{job_id}", ok_statuses=(404,))
        if resp.status_code == 404:
            raise FireworksAPIError(f"trainer job {job_id} not found", 404)
        return resp.json()

    def healthz(self, job_id: str) -> bool:
        try:
            r = self._http.get(self.endpoint(job_id).base_url + "/api/v1/healthz", timeout=5.0)
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    def wait_for_ready(self, job_id: str, timeout_s: float = 3600) -> TrainerEndpoint:
        """Poll until the job is RUNNING and its trainer answers healthz through the gateway."""
        deadline = time.monotonic() + timeout_s
        stopped_since: float | None = None
        while True:
            job = self.get(job_id)
            state = job.get("state", "")
            if state == "JOB_STATE_FAILED" or state in TOMBSTONE:
                raise FireworksAPIError(f"trainer job {job_id} is {state}: {_status_message(job)}")
            if state in STOPPED:
                stopped_since = stopped_since or time.monotonic()
                if time.monotonic() - stopped_since > 30:
                    raise FireworksAPIError(f"trainer job {job_id} stopped ({state}): {_status_message(job)}")
            if state == "JOB_STATE_RUNNING" and self.healthz(job_id):
                ctx = job.get("trainingConfig", {}).get("maxContextLength")
                return self.endpoint(job_id, int(ctx) if ctx else None)
            if time.monotonic() > deadline:
                raise TimeoutError(f"trainer job {job_id} not ready after {timeout_s:.0f}s (state {state})")
            self._sleep_poll()

    def create_and_wait(self, base_model: str, training_shape_id: str, *, timeout_s: float = 3600,
                        **kwargs) -> TrainerEndpoint:
        job = self.create(base_model, training_shape_id, **kwargs)
        return self.wait_for_ready(job["name"].split("/")[-1], timeout_s)

    def resume(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/accounts/{self.account_id}/rlorTrainerJobs/{job_id}:resume", json={}).json()

    def reattach(self, job_id: str, timeout_s: float = 3600) -> TrainerEndpoint:
        """Connect to an existing job by id: wait if running, `:resume` first if it failed or was paused/stopped."""
        if self.get(job_id).get("state") in RESUMABLE:
            self.resume(job_id)
        return self.wait_for_ready(job_id, timeout_s)

    def delete(self, job_id: str) -> None:
        self._request("DELETE", f"/v1/accounts/{self.account_id}/rlorTrainerJobs/{job_id}", ok_statuses=(404,))

    def list_checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        """Control-plane checkpoint rows (DCP and sampler), oldest first; works in any job state."""
        rows: list[dict[str, Any]] = []
        token = None
        while True:
            params = {"pageSize": 200, **({"pageToken": token} if token else {})}
            body = self._request("GET", f"/v1/accounts/{self.account_id}/rlorTrainerJobs/{job_id}/checkpoints",
                                 params=params).json()
            rows += body.get("checkpoints", body.get("rlorTrainerJobCheckpoints", []))
            token = body.get("nextPageToken")
            if not token:
                return rows

    def promote_checkpoint(self, job_id: str, checkpoint: str, output_model_id: str, base_model: str,
                           timeout_s: float = 3600) -> dict[str, Any]:
        """Promote a sampler checkpoint to a model; returns the model object (waits on an async operation)."""
        body = {"output_model": f"accounts/{self.account_id}/models/{output_model_id}",
                "trainer_job_id": self.job_name(job_id), "base_model": base_model, "async_promotion": True}
        url = f"/v1/accounts/{self.account_id}/checkpoints/{checkpoint}:promote"
        resp = self._request("POST", url, json=body, ok_statuses=(400,))
        if resp.status_code == 400:
            if "async_promotion" not in _error_text(resp):
                raise FireworksAPIError(f"promote {checkpoint} -> HTTP 400: {_error_text(resp)}", 400)
            body.pop("async_promotion")
            resp = self._request("POST", url, json=body)
        out = resp.json()
        if "model" in out:
            return out["model"]
        op, deadline = out["operation"], time.monotonic() + timeout_s
        while not op.get("done"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"promotion of {checkpoint} not done after {timeout_s:.0f}s")
            self._sleep_poll()
            op = self._request("GET", f"/v1/{op['name']}").json()
        if op.get("error"):
            raise FireworksAPIError(f"promotion of {checkpoint} failed: {op['error'].get('message', op['error'])}")
        return op["response"]


def _status_message(job: dict[str, Any]) -> str:
    status = job.get("status") or {}
    return job.get("statusMessage") or job.get("message") or status.get("message") or "(no message)"


class DeploymentManager(_ControlPlaneClient):
    """Deployments, hot load and completions (wire-contract §3.4–3.6)."""

    def __init__(self, api_key: str, base_url: str | None = None, inference_url: str | None = None,
                 hotload_api_url: str | None = None, **kwargs):
        super().__init__(api_key, base_url, **kwargs)
        self.inference_url = (inference_url or self.base_url).rstrip("/")
        self.hotload_api_url = (hotload_api_url or self.base_url).rstrip("/")

    def deployment_name(self, deployment_id: str) -> str:
        return f"accounts/{self.account_id}/deployments/{deployment_id}"

    def _path(self, deployment_id: str) -> str:
        return f"/v1/accounts/{self.account_id}/deployments/{deployment_id}"

    def get(self, deployment_id: str) -> dict[str, Any] | None:
        resp = self._request("GET", self._path(deployment_id), ok_statuses=(404,))
        return None if resp.status_code == 404 else resp.json()

    def create_or_get(self, cfg, base_model: str, hot_load_trainer_job: str | None = None,
                      description: str = "cookbook") -> dict[str, Any]:
        """Create the deployment `cfg` (a DeployConfig) describes, or return it if it already exists.
        A FAILED/DELETED deployment with that id is deleted first so the id can be reused."""
        deployment_id = cfg.deployment_id or deployment_id_for(base_model)
        existing = self.get(deployment_id)
        if existing and existing.get("state") in ("FAILED", "DELETED", "DELETING"):
            self.delete(deployment_id)
            deadline = time.monotonic() + 60
            while (d := self.get(deployment_id)) and d.get("state") != "DELETED" and time.monotonic() < deadline:
                time.sleep(min(self.poll_interval_s, 2.0))
            existing = None
        if existing:
            return existing
        replicas = cfg.replica_count if cfg.replica_count is not None else 1
        body: dict[str, Any] = {
            "baseModel": base_model, "description": description, "minReplicaCount": replicas,
            "maxReplicaCount": max(replicas, 1), "enableHotLoad": True, "forTraining": False,
            "hotLoadBucketType": cfg.hot_load_bucket_type,
        }
        trainer_job = cfg.hot_load_trainer_job or hot_load_trainer_job
        if trainer_job:
            body["hotLoadTrainerJob"] = trainer_job
        if cfg.deployment_shape:
            body["deploymentShape"] = cfg.deployment_shape
        if cfg.deployment_region:
            body["placement"] = {"region": cfg.deployment_region}
        if cfg.deployment_extra_args:
            body["extraArgs"] = list(cfg.deployment_extra_args)
        if cfg.extra_values:
            body["extraValues"] = dict(cfg.extra_values)
        params: dict[str, Any] = {"deploymentId": deployment_id}
        if cfg.disable_speculative_decoding:
            params["disableSpeculativeDecoding"] = "true"
        resp = self._request("POST", f"/v1/accounts/{self.account_id}/deployments", params=params, json=body,
                             ok_statuses=(409,))
        return self.get(deployment_id) if resp.status_code == 409 else resp.json()

    def wait_for_ready(self, deployment_id: str, timeout_s: float = 5400) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            dep = self.get(deployment_id)
            state = (dep or {}).get("state", "DELETED")
            if state == "READY":
                return dep
            if state in ("FAILED", "DELETED", "DELETING"):
                raise FireworksAPIError(f"deployment {deployment_id} is {state}: {_status_message(dep or {})}")
            if state == "CREATING" and self._probe(deployment_id):
                return dep
            if time.monotonic() > deadline:
                raise TimeoutError(f"deployment {deployment_id} not ready after {timeout_s:.0f}s (state {state})")
            self._sleep_poll()

    def _probe(self, deployment_id: str) -> bool:
        body = {"model": self.deployment_name(deployment_id), "prompt": [1, 2], "max_tokens": 4, "temperature": 0.0}
        try:
            return self._http.post(f"{self.inference_url}/inference/v1/completions", json=body).status_code == 200
        except httpx.HTTPError:
            return False

    def update(self, deployment_id: str, body: dict[str, Any], update_mask: str | None = None) -> dict[str, Any]:
        params = {"updateMask": update_mask} if update_mask else None
        return self._request("PATCH", self._path(deployment_id), params=params, json=body).json()

    def reattach_trainer(self, deployment_id: str, trainer_job_name: str) -> dict[str, Any]:
        """Point the deployment's hot load at another trainer job's snapshots (call `reset_delta_chain` after)."""
        self.update(deployment_id, {"hotLoadTrainerJob": trainer_job_name}, "hot_load_trainer_job")
        return self.wait_for_ready(deployment_id)

    def scale_to_zero(self, deployment_id: str) -> None:
        self.update(deployment_id, {"minReplicaCount": 0, "maxReplicaCount": 0})

    def delete(self, deployment_id: str) -> None:
        self._request("DELETE", self._path(deployment_id), params={"ignoreChecks": "true", "hard": "true"},
                      ok_statuses=(404,))

    # -- hot load ------------------------------------------------------------------------------------------------
    def _hotload_headers(self, deployment_id: str, base_model: str) -> dict[str, str]:
        return {"fireworks-model": base_model, "fireworks-deployment": self.deployment_name(deployment_id)}

    def hotload(self, deployment_id: str, base_model: str, snapshot_identity: str,
                previous_snapshot_identity: str | None = None, reset_prompt_cache: bool = True) -> dict[str, Any]:
        """Ask the deployment to load a sampler snapshot; a delta names the snapshot it applies to."""
        body: dict[str, Any] = {"identity": snapshot_identity, "reset_prompt_cache": reset_prompt_cache}
        if previous_snapshot_identity:
            body["incremental_snapshot_metadata"] = {"previous_snapshot_identity": previous_snapshot_identity,
                                                     "compression_format": "arc_v2", "checksum_format": "alder32"}
        url = f"{self.hotload_api_url}/hot_load/v1/models/hot_load"
        headers = self._hotload_headers(deployment_id, base_model)
        resp = self._request("POST", url, json=body, headers=headers, ok_statuses=(400,))
        if resp.status_code == 400:
            text = _error_text(resp)
            if "reset_prompt_cache" not in text or "extra inputs are not permitted" not in text.lower():
                raise FireworksAPIError(f"hot load of {snapshot_identity} -> HTTP 400: {text}", 400)
            body.pop("reset_prompt_cache")
            resp = self._request("POST", url, json=body, headers=headers)
        return resp.json()

    def hotload_status(self, deployment_id: str, base_model: str) -> dict[str, Any]:
        """`replicas[0]` of the hot-load status: current_snapshot_identity, readiness, loading_state."""
        body = self._request("GET", f"{self.hotload_api_url}/hot_load/v1/models/hot_load",
                             headers=self._hotload_headers(deployment_id, base_model)).json()
        replicas = body.get("replicas")
        if not isinstance(replicas, list):
            raise FireworksAPIError(f"hot-load status of {deployment_id} has no replicas list: {body}")
        return replicas[0] if replicas else {}

    def wait_for_hotload(self, deployment_id: str, base_model: str, identity: str, timeout_s: float = 400) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            rep = self.hotload_status(deployment_id, base_model)
            state = rep.get("loading_state") or {}
            loaded = rep.get("current_snapshot_identity") == identity or any(
                a.get("identity") == identity and a.get("status") == "loaded" for a in rep.get("loaded_adapters") or [])
            if rep.get("readiness") and loaded:
                return
            if state.get("stage") == "error" and state.get("target_snapshot_identity") == identity:
                raise RuntimeError(f"hot load of {identity} on {deployment_id} failed: "
                                   f"{state.get('message', 'the deployment reported an error')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"hot load of {identity} on {deployment_id} not done after {timeout_s:.0f}s "
                                   f"(replica: {rep})")
            time.sleep(min(self.poll_interval_s, 5.0))

    # -- inference -----------------------------------------------------------------------------------------------
    def completions(self, deployment_id: str, body: dict[str, Any], timeout_s: float = 600) -> dict[str, Any]:
        """One non-streaming completions request (`prompt` = token ids); the JSON reply with `choices[i]`."""
        body = {"model": self.deployment_name(deployment_id), **body}
        return self._request("POST", f"{self.inference_url}/inference/v1/completions", json=body,
                             timeout=httpx.Timeout(timeout_s, connect=5.0)).json()
