"""`ReconnectableClient`: the blocking training client every recipe uses (spec-surface.md).

Each call dispatches exactly one request through the tinker SDK (extended with the Fireworks trainer calls in
`cookbook.tinker_ext`) and blocks on its result for at most the call's timeout. Failures propagate unchanged: there
are no hidden retries, so a loop that loses its trainer crashes and is resumed from its last DCP checkpoint.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import tinker

from cookbook.fireworks_api import TrainerEndpoint, TrainerJobManager
from cookbook.tinker_ext import create_reference_client, create_service_client, create_training_client


class ReconnectableClient:
    """Blocking wrapper around one trainer model (policy, or with `reference=True` a frozen `base_only` model).

    `endpoint=None` waits for the job through `rlor_mgr` (which also reattaches to a job created by an earlier
    process); a pre-resolved `TrainerEndpoint` skips that wait.
    """

    def __init__(self, rlor_mgr: TrainerJobManager, job_id: str, base_model: str, lora_rank: int = 0,
                 fw_api_key: str | None = None, default_timeout: float = 600,
                 endpoint: TrainerEndpoint | None = None, *, reference: bool = False, seed: int | None = None,
                 ready_timeout: float = 3600):
        self._mgr = rlor_mgr
        self._job_id = job_id
        self.base_model = base_model
        self.lora_rank = lora_rank
        self.default_timeout = default_timeout
        self.is_reference = reference
        # Key order: explicit, then the environment (Fireworks), then the manager's own (the local platform's key).
        api_key = fw_api_key or os.environ.get("FIREWORKS_API_KEY") or rlor_mgr.api_key
        self._endpoint = endpoint or rlor_mgr.reattach(job_id, ready_timeout)
        self._service = create_service_client(self._endpoint.base_url, api_key)
        if reference:
            self._inner = create_reference_client(self._service, base_model)
        else:
            self._inner = create_training_client(self._service, base_model, lora_rank, seed=seed)

    @classmethod
    def reference(cls, rlor_mgr: TrainerJobManager, job_id: str, base_model: str, **kwargs) -> "ReconnectableClient":
        """A frozen reference model (`base_only`): use `forward` only."""
        return cls(rlor_mgr, job_id, base_model, reference=True, **kwargs)

    # -- properties ----------------------------------------------------------------------------------------------
    @property
    def inner(self):
        """The underlying `FireworksTrainingClient` (a `tinker.TrainingClient`)."""
        return self._inner

    @property
    def endpoint(self) -> TrainerEndpoint:
        return self._endpoint

    @property
    def job_id(self) -> str:
        return self._job_id

    def _wait(self, future, timeout: float | None):
        return future.result(timeout=self.default_timeout if timeout is None else timeout)

    # -- compute -------------------------------------------------------------------------------------------------
    def forward(self, data: list[tinker.Datum], loss_fn: str = "cross_entropy", loss_fn_config: dict | None = None,
                timeout: float | None = None) -> tinker.ForwardBackwardOutput:
        return self._wait(self._inner.forward(data, loss_fn, loss_fn_config), timeout)

    def forward_backward(self, data: list[tinker.Datum], loss_fn: str = "cross_entropy",
                         loss_fn_config: dict | None = None, timeout: float | None = None) -> tinker.ForwardBackwardOutput:
        return self._wait(self._inner.forward_backward(data, loss_fn, loss_fn_config), timeout)

    def forward_backward_custom(self, data: list[tinker.Datum], loss_fn: Callable[..., Any],
                                timeout: float | None = None) -> tinker.ForwardBackwardOutput:
        """Client-side loss: `loss_fn(data, logprobs_list) -> (loss, metrics)` (0.23: a forward then a CE backward)."""
        return self._wait(self._inner.forward_backward_custom(data, loss_fn), timeout)

    def optim_step(self, params: tinker.AdamParams, grad_accumulation_normalization: str | None = None,
                   timeout: float | None = None) -> tinker.OptimStepResponse:
        return self._wait(self._inner.optim_step(params, grad_accumulation_normalization=grad_accumulation_normalization),
                          timeout)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_state(self, name: str, timeout: float = 2700):
        """DCP checkpoint (weights + optimizer + step) in the trainer's store; returns the server's reply."""
        return self._wait(self._inner.save_state(name), timeout)

    def load_state_with_optimizer(self, path: str, timeout: float = 2700):
        return self._wait(self._inner.load_state_with_optimizer(path), timeout)

    def load_state(self, path: str, timeout: float = 2700):
        """Weights only; the optimizer starts fresh."""
        return self._wait(self._inner.load_state(path), timeout)

    def save_weights_for_sampler_ext(self, name: str, checkpoint_type: str | None = None, timeout: float = 2700):
        """Sampler snapshot (`base` / `delta`); the result's `snapshot_name` is the hot-load identity."""
        return self._wait(self._inner.save_weights_for_sampler_ext(name, checkpoint_type=checkpoint_type), timeout)

    def resolve_checkpoint_path(self, name: str, source_job_id: str | None = None) -> str:
        return self._inner.resolve_checkpoint_path(name, source_job_id=source_job_id)

    def list_checkpoints(self) -> list[str]:
        return self._inner.list_checkpoints()

    def close(self) -> None:
        """Release the SDK's background session (heartbeat thread); the trainer job itself keeps running."""
        holder = getattr(self._service, "holder", None)
        for obj in (self._service, holder):
            fn = getattr(obj, "close", None)
            if callable(fn):
                try:
                    fn()
                except Exception:  # best effort at teardown
                    pass
                return
