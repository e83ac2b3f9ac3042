"""What a recipe receives: the live clients of one run, built by `build_session` for every launcher alike.

`build_session` is the one place that turns a config plus a control-plane URL and key into trainer job(s), a
`ReconnectableClient` (policy, optional frozen reference), a deployment with its `WeightSyncer` and a `Sampler`;
launchers only decide the URL and key (and what to start locally first). Everything it creates is torn down by the
`ExitStack` it is given: trainer jobs deleted, the deployment scaled to zero and deleted.
"""

from __future__ import annotations

import contextlib
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from cookbook.client import ReconnectableClient
from cookbook.config import RunConfig
from cookbook.fireworks_api import DeploymentManager, TrainerJobManager
from cookbook.naming import deployment_id_for
from cookbook.weight_sync import WeightSyncer


@dataclass
class Completion:
    tokens: list[int]
    # The model's log-softmax at temperature 1 per token: what the trainer's forward computes for the same tokens.
    logprobs: list[float]
    finish_reason: str  # "length" or "stop"
    # Log-probability under the distribution actually sampled from (after temperature / top-p / top-k): the
    # behaviour policy for importance-sampling corrections. Equal to `logprobs` at temperature 1, top-p 1.
    sampling_logprobs: list[float] = field(default_factory=list)
    text: str = ""


class Sampler:
    """Samples completions from the deployment over token ids (one HTTP request per prompt, `n` per request)."""

    def __init__(self, deploy_mgr: DeploymentManager, deployment_id: str, timeout_s: float = 600,
                 max_concurrency: int = 64):
        self.deploy_mgr = deploy_mgr
        self.deployment_id = deployment_id
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="sampler")

    def sample(self, prompt_tokens: Sequence[int], n: int = 1, max_tokens: int = 16, temperature: float = 1.0,
               top_p: float = 1.0, stop_token_ids: Sequence[int] | None = None, seed: int | None = None,
               top_k: int = 0, stop: Sequence[str] | None = None) -> list[Completion]:
        """`n` completions of one prompt. `stop_token_ids=None` stops at the model's EOS; stop tokens are kept
        in `tokens` (the policy must learn to emit them)."""
        body: dict[str, Any] = {"prompt": list(prompt_tokens), "n": n, "max_tokens": max_tokens,
                                "temperature": temperature, "top_p": top_p, "top_k": top_k, "logprobs": True,
                                "raw_output": True}
        stops: list[Any] = list(stop_token_ids or []) + list(stop or [])
        if stops:
            body["stop"] = stops
        if seed is not None:
            body["seed"] = seed
        reply = self.deploy_mgr.completions(self.deployment_id, body, self.timeout_s)
        return [_completion(c) for c in sorted(reply["choices"], key=lambda c: c.get("index", 0))]

    def sample_many(self, prompts: Sequence[Sequence[int]], n: int = 1, max_tokens: int = 16,
                    temperature: float = 1.0, top_p: float = 1.0, stop_token_ids: Sequence[int] | None = None,
                    seed: int | None = None, **kwargs) -> list[list[Completion]]:
        """Sample all prompts concurrently (the deployment batches them); results in prompt order. With a seed,
        prompt i uses seeds `seed + i*n ...`, so every completion has its own reproducible stream."""
        futures = [self._pool.submit(self.sample, p, n, max_tokens, temperature, top_p, stop_token_ids,
                                     None if seed is None else seed + i * n, **kwargs)
                   for i, p in enumerate(prompts)]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _completion(choice: dict[str, Any]) -> Completion:
    content = (choice.get("logprobs") or {}).get("content") or []
    tokens = choice["raw_output"]["completion_token_ids"]
    lps = [e["logprob"] for e in content]
    slps = [e.get("sampling_logprob", e["logprob"]) for e in content]
    return Completion(tokens=list(tokens), logprobs=lps, finish_reason=choice.get("finish_reason") or "stop",
                      sampling_logprobs=slps, text=choice.get("text", ""))


@dataclass
class Session:
    """The live clients of one run. Recipes use `policy`, `reference`, `sampler`, `weight_syncer`, `tokenizer`."""

    policy: ReconnectableClient
    reference: ReconnectableClient | None
    sampler: Sampler | None
    weight_syncer: WeightSyncer | None
    tokenizer: Any
    base_model: str
    job_id: str
    trainer_mgr: TrainerJobManager
    deploy_mgr: DeploymentManager | None
    deployment_id: str | None = None
    reference_job_id: str | None = None  # set only when the reference runs in its own trainer job
    platform_root: str | None = None  # local launcher only: where jobs/ and promoted models/ live
    # A checkpoint whose weights the policy starts from on a fresh start (`recipe.init_from=<run_dir>:<name>`).
    init_state_path: str | None = None
    _release_reference: Callable[[], None] | None = field(default=None, repr=False)

    def release_reference(self) -> None:
        """Free the reference model once its logprobs are cached (deletes a separate reference job)."""
        if self._release_reference is not None:
            self._release_reference()
            self._release_reference = None
        self.reference = None


def _best_effort(log: Callable[[str], None], what: str, fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception as e:  # teardown must go on; the error is reported, not raised
        log(f"[teardown] {what} failed: {type(e).__name__}: {e}")


def new_job_id(prefix: str = "cookbook") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def build_session(cfg: RunConfig, base_url: str, api_key: str, *, needs_reference: bool, needs_deployment: bool,
                  stack: contextlib.ExitStack, log: Callable[[str], None] = print, poll_interval_s: float = 5.0,
                  platform_root: str | None = None) -> Session:
    """Create the run's trainer job(s), clients, deployment and syncer; register their teardown on `stack`."""
    from cookbook.local.models import load_tokenizer

    infra, deploy, ws = cfg.infra, cfg.deploy, cfg.weight_sync
    if not infra.training_shape_id:
        from cookbook.errors import UserError
        raise UserError("infra.training_shape_id is not set. Fix: pick an infra option (e.g. infra=local-tiny) "
                        "or set infra.training_shape_id to a training shape id.")
    lora_rank = int(getattr(cfg.recipe, "lora_rank", 0) or 0)
    trainer_mgr = TrainerJobManager(api_key, base_url, poll_interval_s=poll_interval_s)
    stack.callback(trainer_mgr.close)
    deploy_mgr = DeploymentManager(api_key, base_url, poll_interval_s=poll_interval_s) if needs_deployment else None
    if deploy_mgr:
        stack.callback(deploy_mgr.close)

    def start_job(shape: str, forward_only: bool) -> str:
        job_id = new_job_id("cookbook-ref" if forward_only else "cookbook")
        log(f"[launch] trainer job {job_id} on {shape} ({cfg.base_model})")
        trainer_mgr.create(cfg.base_model, shape, job_id=job_id, lora_rank=0 if forward_only else lora_rank,
                           max_context_length=infra.max_context_length, region=infra.region,
                           extra_args=infra.extra_args, forward_only=forward_only)
        stack.callback(_best_effort, log, f"deleting trainer job {job_id}", lambda: trainer_mgr.delete(job_id))
        return job_id

    # Jobs and the deployment are created first and waited for afterwards, so they provision in parallel.
    job_id = start_job(infra.training_shape_id, False)
    ref_job_id = start_job(infra.ref_training_shape_id, True) if infra.ref_training_shape_id else None
    deployment_id = None
    if deploy_mgr:
        deployment_id = deploy.deployment_id or deployment_id_for(cfg.base_model)
        log(f"[launch] deployment {deployment_id}")
        deploy_mgr.create_or_get(deploy, cfg.base_model, hot_load_trainer_job=trainer_mgr.job_name(job_id))
        stack.callback(_best_effort, log, f"deleting deployment {deployment_id}",
                       lambda: (deploy_mgr.scale_to_zero(deployment_id), deploy_mgr.delete(deployment_id)))
        if deploy.hot_load_trainer_job is None:  # an existing deployment may point at an older trainer
            dep = deploy_mgr.get(deployment_id) or {}
            if dep.get("hotLoadTrainerJob") != trainer_mgr.job_name(job_id):
                deploy_mgr.update(deployment_id, {"hotLoadTrainerJob": trainer_mgr.job_name(job_id)},
                                  "hot_load_trainer_job")

    endpoint = trainer_mgr.wait_for_ready(job_id, infra.trainer_timeout_s)
    policy = ReconnectableClient(trainer_mgr, job_id, cfg.base_model, lora_rank, fw_api_key=api_key,
                                 endpoint=endpoint, seed=cfg.seed)
    stack.callback(policy.close)
    reference, release = None, None
    if needs_reference or ref_job_id:
        if ref_job_id:
            ref_endpoint = trainer_mgr.wait_for_ready(ref_job_id, infra.trainer_timeout_s)
            reference = ReconnectableClient.reference(trainer_mgr, ref_job_id, cfg.base_model, fw_api_key=api_key,
                                                      endpoint=ref_endpoint)
            release = lambda: (reference.close(), trainer_mgr.delete(ref_job_id))  # noqa: E731
        else:  # a frozen second model on the policy's own trainer (no extra job to provision)
            reference = ReconnectableClient.reference(trainer_mgr, job_id, cfg.base_model, fw_api_key=api_key,
                                                      endpoint=endpoint)
        stack.callback(reference.close)

    sampler = syncer = None
    if deploy_mgr:
        deploy_mgr.wait_for_ready(deployment_id, deploy.deployment_timeout_s)
        sampler = Sampler(deploy_mgr, deployment_id, deploy.sample_timeout)
        stack.callback(sampler.close)
        syncer = WeightSyncer(policy, deploy_mgr, deployment_id, cfg.base_model, hotload_timeout=ws.weight_sync_timeout,
                              first_checkpoint_type=ws.first_checkpoint_type, lora_rank=lora_rank)
    return Session(policy=policy, reference=reference, sampler=sampler, weight_syncer=syncer,
                   tokenizer=load_tokenizer(cfg.tokenizer), base_model=cfg.base_model, job_id=job_id,
                   trainer_mgr=trainer_mgr, deploy_mgr=deploy_mgr, deployment_id=deployment_id,
                   reference_job_id=ref_job_id, platform_root=platform_root, _release_reference=release)
