"""What a recipe receives: the live clients of one run, built by `build_session` for every launcher alike.

`build_session` is the one place that turns a config plus a control-plane URL and key into trainer job(s), a
`ReconnectableClient` (policy, and a frozen reference when the recipe needs one), a deployment with its
`WeightSyncer` and a `CompletionSampler` — all through the official Fireworks SDK, the way its own cookbook drives it:

  1. resolve the training shape's latest validated version (it names the deployment shape and context length);
  2. create the policy trainer on that shape (and a forward-only reference trainer on `ref_training_shape_id` only
     when the recipe needs a reference), then the deployment pinned to the shape's deployment shape;
  3. wait for each: trainer placement (PENDING) and readiness have separate budgets, then the deployment.

Launchers only decide the URL and key (and what to start locally first). Everything created here is torn down by
the `ExitStack` it is given: trainer jobs deleted, a deployment this run created scaled to zero and deleted.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import httpx

from cookbook.client.sampler import CompletionSampler
from cookbook.client.trainer import ReconnectableClient, call_with_deadline
from cookbook.client.weight_sync import WeightSyncer
from cookbook.config import RunConfig
from cookbook.errors import InfraError, UserError

if TYPE_CHECKING:
    from fireworks.training.sdk import DeploymentManager, TrainerJobManager, TrainingShapeProfile

SAMPLING_CONCURRENCY = 128  # requests in flight per sampler: a GRPO step's rollouts (16 prompts x 8) at once
BAD_DEPLOYMENT_STATES = ("FAILED", "DELETED", "DELETING")


def deployment_id_for(base_model: str) -> str:
    """Deployment id derived from the base model: the last path segment, lowercased, `[a-z0-9-]`, ≤ 63 chars."""
    leaf = base_model.rstrip("/").rsplit("/", 1)[-1].lower()
    return (re.sub(r"[^a-z0-9-]+", "-", leaf).strip("-") or "model")[:50] + "-cookbook"


@dataclass
class Session:
    """The live clients of one run. Recipes use `policy`, `reference`, `sampler`, `weight_syncer`, `tokenizer`."""

    policy: ReconnectableClient
    reference: ReconnectableClient | None
    sampler: CompletionSampler | None
    weight_syncer: WeightSyncer | None
    tokenizer: Any
    base_model: str
    job_id: str
    rlor_mgr: "TrainerJobManager"
    deploy_mgr: "DeploymentManager | None"
    deployment_id: str | None = None
    reference_job_id: str | None = None  # set only when the reference runs in its own trainer job
    platform_root: str | None = None  # local launcher only: where jobs/ and promoted models/ live
    logs_dir: str | None = None  # local launcher only: the platform's process logs
    # A checkpoint whose weights the policy starts from on a fresh start (`recipe.init_from=<run_dir>:<name>`).
    init_state_path: str | None = None
    _release_reference: Callable[[], None] | None = field(default=None, repr=False)

    def release_reference(self) -> None:
        """Free the reference model once its logprobs are cached (deletes a separate reference job)."""
        if self._release_reference is not None:
            self._release_reference()
            self._release_reference = None
        self.reference = None

    def explain_failure(self, budget_s: float = 15.0) -> str | None:
        """What broke on the platform side — a trainer job or the deployment that failed, or a hot load the
        deployment could not apply — in one sentence each; None when every resource looks healthy (the error was
        the driver's own). Bounded: the SDK retries an unreachable control plane for minutes."""
        try:
            return call_with_deadline(budget_s, self._platform_problems)
        except TimeoutError:
            return f"the control plane did not answer within {budget_s:.0f}s"

    def _platform_problems(self) -> str | None:
        problems = []
        for role, job_id in (("policy trainer", self.job_id), ("reference trainer", self.reference_job_id)):
            job = self.rlor_mgr.try_get(job_id) if job_id else None
            if job and job.get("state") not in ("JOB_STATE_RUNNING", "JOB_STATE_CREATING", "JOB_STATE_PENDING"):
                problems.append(f"the {role} job {job_id} is {job.get('state')}: {job.get('statusMessage') or '-'}")
        if self.deploy_mgr is not None and self.deployment_id:
            # DeploymentInfo drops the status message, hence the raw record.
            record = self.deploy_mgr._get_deployment(self.deployment_id) or {"state": "gone"}
            if record.get("state") in (*BAD_DEPLOYMENT_STATES, "gone"):
                problems.append(f"the deployment {self.deployment_id} is {record.get('state')}: "
                                f"{record.get('statusMessage') or '-'}")
            elif self.weight_syncer is not None:
                replicas = self.deploy_mgr.hotload_check_status(self.deployment_id,
                                                                self.weight_syncer.base_model).get("replicas") or []
                state = replicas[0].get("loading_state", {}) if replicas else {}
                if state.get("stage") == "error":
                    problems.append(f"the deployment {self.deployment_id} could not load snapshot "
                                    f"{state.get('target_snapshot_identity')}: {state.get('message') or '-'} (it still "
                                    f"serves {replicas[0].get('current_snapshot_identity')})")
        return "; ".join(problems) or None


def check_control_plane(base_url: str, api_key: str, budget_s: float = 20.0) -> None:
    """Fail fast, naming the URL, when the control plane is unreachable or rejects the key. (The SDK retries a
    refused connection silently for five minutes.)"""
    url = f"{base_url.rstrip('/')}/v1/accounts"
    headers = {"X-Api-Key": api_key, "Authorization": f"Bearer {api_key}"}
    deadline = time.monotonic() + budget_s
    while True:
        try:
            resp = httpx.get(url, params={"pageSize": 2}, headers=headers, timeout=httpx.Timeout(10.0, connect=5.0))
        except httpx.TransportError as e:
            problem = f"{type(e).__name__}: {e}"
        else:
            if resp.status_code in (401, 403):
                raise UserError(f"The control plane at {base_url} rejected the API key (HTTP {resp.status_code}). "
                                "Fix: export a valid training-scoped FIREWORKS_API_KEY (keys are read from the "
                                "environment only).")
            if resp.status_code < 500 and resp.status_code not in (408, 429):
                return
            problem = f"HTTP {resp.status_code}"
        if time.monotonic() >= deadline:
            raise InfraError(f"Cannot reach the control plane at {base_url} ({problem}; retried for "
                             f"{budget_s:.0f}s). Fix: check FIREWORKS_BASE_URL and the network, or run locally "
                             "with infra=local-tiny.")
        time.sleep(1.0)


def _best_effort(log: Callable[[str], None], what: str, fn: Callable[[], Any], timeout_s: float = 30.0) -> None:
    """A teardown step that reports its failure instead of raising, and gives up after `timeout_s` (the SDK retries
    an unreachable control plane for minutes; the message names what may be left to delete by hand)."""
    try:
        call_with_deadline(timeout_s, fn)
    except Exception as e:  # teardown must go on; the error is reported, not raised
        log(f"[teardown] {what} failed: {type(e).__name__}: {e}")


def new_job_id(prefix: str = "cookbook") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _resolve_shape(rlor_mgr: "TrainerJobManager", shape_id: str, key: str) -> "TrainingShapeProfile":
    """The shape's latest validated version; a malformed or unknown shape id is the user's to fix."""
    try:
        return rlor_mgr.resolve_training_profile(shape_id)
    except ValueError:
        raise UserError(f"{key}={shape_id} is not a training shape name. Fix: use the full resource name "
                        "accounts/<account>/trainingShapes/<shape>, e.g. accounts/local/trainingShapes/local-tiny.")
    except RuntimeError as e:
        if "(HTTP 404)" not in str(e):
            raise
        raise UserError(f"{key}={shape_id}: the control plane at {rlor_mgr.base_url} has no such training shape. "
                        "Fix: pick an infra option that names a shape of your account (the embedded platform's "
                        "shapes are listed by `python -m cookbook.local serve`).") from None


def _shape_ref(requested: str, profile: "TrainingShapeProfile") -> str:
    """Create on the parent shape so the control plane launches its latest validated version, unless the user
    pinned a version (what the SDK's managed provisioning does)."""
    return requested if "/versions/" in requested else (profile.training_shape or requested)


def _deployment_shape(cfg: RunConfig, profile: "TrainingShapeProfile") -> str | None:
    """The deployment shape to pin (the user's, else the training shape's validated one); without one, the deployment
    needs an accelerator type. Checked before any trainer is created, so a bad plan costs nothing."""
    shape = cfg.deploy.deployment_shape or profile.deployment_shape
    if shape and cfg.deploy.accelerator_type:
        raise UserError(f"deploy.accelerator_type={cfg.deploy.accelerator_type} is set, but the deployment is pinned "
                        f"to shape {shape}, which owns the accelerator (the service rejects both). Fix: drop "
                        "deploy.accelerator_type, or set deploy.deployment_shape=null on a training shape without one.")
    if not shape and not cfg.deploy.accelerator_type:
        raise UserError(f"Training shape {cfg.infra.training_shape_id} names no deployment shape, and no deployment "
                        "can be created without a shape or an accelerator type. Fix: set deploy.deployment_shape "
                        "(recommended) or deploy.accelerator_type (e.g. NVIDIA_H200_141GB).")
    return shape


def build_session(cfg: RunConfig, base_url: str, api_key: str, *, needs_reference: bool, needs_deployment: bool,
                  stack: contextlib.ExitStack, log: Callable[[str], None] = print, poll_interval_s: float = 5.0,
                  platform_root: str | None = None, logs_dir: str | None = None,
                  warm_up_after_sync: bool = True, while_starting: Callable[[Any], None] | None = None) -> Session:
    """Create the run's trainer job(s), clients, deployment and syncer; register their teardown on `stack`.
    `warm_up_after_sync=False` drops the SDK's completion after each hot load: for a deployment that answers the
    hot load only once it serves the new weights (the embedded one), it only costs time. `while_starting(tokenizer)`
    is the driver's own start-up work (rendering the run's data), done once the trainers and the deployment are
    created and before waiting for them, so it overlaps their start."""
    from fireworks.training.sdk import (
        DeploymentManager,
        DeploymentSampler,
        FixedConcurrencyController,
        TrainerJobConfig,
        TrainerJobManager,
    )

    from cookbook.models import load_tokenizer

    infra, deploy, ws = cfg.infra, cfg.deploy, cfg.weight_sync
    if not infra.training_shape_id:
        raise UserError("infra.training_shape_id is not set. Fix: pick an infra option (e.g. infra=local-tiny) "
                        "or set infra.training_shape_id to a training shape id.")
    check_control_plane(base_url, api_key)
    lora_rank = int(cfg.recipe.lora_rank or 0)
    rlor_mgr = TrainerJobManager(api_key=api_key, base_url=base_url)
    stack.callback(rlor_mgr.close)

    # 1. Plan everything from the shapes before anything is created.
    profile = _resolve_shape(rlor_mgr, infra.training_shape_id, "infra.training_shape_id")
    # Like the official client: a full-parameter policy gets a separate forward-only reference trainer when a
    # reference shape is given; otherwise (and always for LoRA) the reference is a frozen base-only model on the
    # policy's own trainer.
    separate_reference = needs_reference and bool(infra.ref_training_shape_id) and lora_rank == 0
    ref_profile = (_resolve_shape(rlor_mgr, infra.ref_training_shape_id, "infra.ref_training_shape_id")
                   if separate_reference else None)
    deployment_shape = _deployment_shape(cfg, profile) if needs_deployment else None

    # 2. Create: trainers first, then the deployment, so they provision in parallel.
    def start_job(shape_id: str, shape: "TrainingShapeProfile", forward_only: bool) -> str:
        job_id = new_job_id("cookbook-ref" if forward_only else "cookbook")
        log(f"[launch] trainer job {job_id} on {shape_id} ({cfg.base_model}{', forward only' if forward_only else ''})")
        rlor_mgr.create(TrainerJobConfig(
            base_model=cfg.base_model, lora_rank=0 if forward_only else lora_rank,
            learning_rate=cfg.recipe.learning_rate, display_name=job_id, region=infra.region,
            extra_args=infra.extra_args, training_shape_ref=_shape_ref(shape_id, shape), forward_only=forward_only,
            requested_job_id=job_id))
        stack.callback(_best_effort, log, f"deleting trainer job {job_id}", lambda: rlor_mgr.delete(job_id))
        return job_id

    job_id = start_job(infra.training_shape_id, profile, False)
    job_name = f"accounts/{rlor_mgr.account_id}/rlorTrainerJobs/{job_id}"
    ref_job_id = start_job(infra.ref_training_shape_id, ref_profile, True) if separate_reference else None

    deploy_mgr = deployment_id = deployment_base_model = None
    if needs_deployment:
        deploy_mgr = DeploymentManager(api_key=api_key, base_url=base_url)
        stack.callback(deploy_mgr.close)
        deployment_id = deploy.deployment_id or deployment_id_for(cfg.base_model)
        deployment_base_model = _attach_deployment(cfg, deploy_mgr, deployment_id, deployment_shape,
                                                   deploy.hot_load_trainer_job or job_name, stack, log,
                                                   poll_interval_s)

    tokenizer = load_tokenizer(cfg.tokenizer)
    if while_starting is not None:
        while_starting(tokenizer)

    # 3. Wait: placement (PENDING, waiting for capacity) and readiness after placement have separate budgets.
    def wait_job(jid: str) -> Any:
        log(f"[launch] waiting for trainer job {jid} (placement up to {infra.trainer_pending_timeout_s:.0f}s, "
            f"then readiness up to {infra.trainer_timeout_s:.0f}s)")
        return rlor_mgr.wait_for_ready(jid, poll_interval_s=poll_interval_s, timeout_s=infra.trainer_timeout_s,
                                          pending_timeout_s=infra.trainer_pending_timeout_s)

    endpoint = wait_job(job_id)
    policy = ReconnectableClient(rlor_mgr, job_id, cfg.base_model, lora_rank, fw_api_key=api_key,
                                 endpoint=endpoint, seed=cfg.seed)
    stack.callback(policy.close)
    reference, release = None, None
    if separate_reference:
        reference = ReconnectableClient(rlor_mgr, ref_job_id, cfg.base_model, 0, fw_api_key=api_key,
                                        endpoint=wait_job(ref_job_id))
        release = lambda: (reference.close(), rlor_mgr.delete(ref_job_id))  # noqa: E731
    elif needs_reference:
        if infra.ref_training_shape_id:
            log(f"[launch] LoRA policy: the reference is the frozen base model on the policy trainer "
                f"({infra.ref_training_shape_id} is not used)")
        reference = ReconnectableClient(rlor_mgr, job_id, cfg.base_model, fw_api_key=api_key, endpoint=endpoint,
                                        base_only=True)
    if reference is not None:
        stack.callback(reference.close)

    sampler = syncer = None
    if deploy_mgr is not None:
        log(f"[launch] waiting for deployment {deployment_id}")
        deploy_mgr.wait_for_ready(deployment_id, timeout_s=deploy.deployment_timeout_s, poll_interval_s=poll_interval_s)
        sampler = CompletionSampler(DeploymentSampler(
            inference_url=deploy_mgr.inference_url, model=f"accounts/{deploy_mgr.account_id}/deployments/{deployment_id}",
            api_key=api_key, tokenizer=tokenizer,
            concurrency_controller=FixedConcurrencyController(SAMPLING_CONCURRENCY)), deploy.sample_timeout)
        stack.callback(sampler.close)
        syncer = WeightSyncer(policy_client=policy, deploy_mgr=deploy_mgr, deployment_id=deployment_id,
                              base_model=deployment_base_model, hotload_timeout=ws.weight_sync_timeout,
                              first_checkpoint_type=ws.first_checkpoint_type, lora_rank=lora_rank,
                              warmup_after_hotload=warm_up_after_sync)
        stack.callback(syncer.close)
    return Session(policy=policy, reference=reference, sampler=sampler, weight_syncer=syncer, tokenizer=tokenizer,
                   base_model=cfg.base_model, job_id=job_id, rlor_mgr=rlor_mgr, deploy_mgr=deploy_mgr,
                   deployment_id=deployment_id, reference_job_id=ref_job_id, platform_root=platform_root,
                   logs_dir=logs_dir, _release_reference=release)


def _attach_deployment(cfg: RunConfig, deploy_mgr: "DeploymentManager", deployment_id: str,
                       shape: str | None, trainer_job_name: str, stack: contextlib.ExitStack,
                       log: Callable[[str], None], poll_interval_s: float) -> str:
    """Create the deployment, or point an existing one at this run's trainer; returns the model name hot loads
    address. A deployment the user named and this run did not create is left running at the end."""
    from fireworks.training.sdk import DeploymentConfig

    deploy = cfg.deploy
    existing = deploy_mgr.get(deployment_id)
    if existing is not None and existing.state not in BAD_DEPLOYMENT_STATES:
        if shape and existing.deployment_shape_version and existing.deployment_shape_version != shape:
            raise UserError(f"Deployment {deployment_id} exists with shape {existing.deployment_shape_version}, but "
                            f"this run needs {shape}. Fix: delete that deployment, or set deploy.deployment_id to "
                            "another id.")
        log(f"[launch] deployment {deployment_id} exists; attaching it to {trainer_job_name}")
        info = deploy_mgr.reattach_trainer(existing, base_model=existing.base_model or cfg.base_model,
                                           trainer_job_name=trainer_job_name, timeout_s=deploy.deployment_timeout_s,
                                           poll_interval_s=poll_interval_s)
        created = False
    else:
        replicas = deploy.replica_count or 1
        log(f"[launch] deployment {deployment_id} on {shape or deploy.accelerator_type}")
        info = deploy_mgr.create_or_get(DeploymentConfig(
            deployment_id=deployment_id, base_model=cfg.base_model, description="cookbook",
            deployment_shape=shape, region=deploy.deployment_region, min_replica_count=replicas,
            max_replica_count=replicas, hot_load_bucket_type=deploy.hot_load_bucket_type,
            hot_load_trainer_job=trainer_job_name, disable_speculative_decoding=deploy.disable_speculative_decoding,
            extra_args=deploy.deployment_extra_args, extra_values=deploy.extra_values, for_training=True,
            **({} if shape else {"accelerator_type": deploy.accelerator_type})))
        created = True
    if created or deploy.deployment_id is None:  # ours: created now, or left behind by an earlier attempt of a run
        stack.callback(_best_effort, log, f"deleting deployment {deployment_id}",
                       lambda: (deploy_mgr.scale_to_zero(deployment_id), deploy_mgr.delete(deployment_id)))
    return info.base_model or cfg.base_model
