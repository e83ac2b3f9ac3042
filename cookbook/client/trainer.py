"""`ReconnectableClient`: the blocking training client every recipe uses.

A thin wrapper around the official Fireworks SDK's `FiretitanTrainingClient` (tinker 0.23 plus the Fireworks trainer
extensions): each call dispatches exactly one operation and blocks on its result for at most the call's timeout.
Failures propagate unchanged — no hidden retries — so a loop that loses its trainer crashes and is resumed from its
last DCP checkpoint. The same class drives Fireworks and the embedded platform; only the manager's URL differs.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, Callable

import tinker

if TYPE_CHECKING:
    from fireworks.training.sdk import (
        FiretitanTrainingClient,
        SaveSamplerResult,
        TrainerJobManager,
        TrainerServiceEndpoint,
    )

# Control-plane checkpoint rows of resumable (DCP) checkpoints; sampler rows are CHECKPOINT_TYPE_INFERENCE*.
_DCP_ROW_PREFIX = "CHECKPOINT_TYPE_TRAINING"


class ReconnectableClient:
    """Blocking wrapper around one model on a trainer job.

    `endpoint=None` waits for the job through `rlor_mgr` (resuming it first when it failed or was stopped, as a
    restarted driver must); a pre-resolved `TrainerServiceEndpoint` skips that wait. `base_only=True` creates a frozen
    copy of the base model on the trainer (a reference that shares the policy's trainer); use `forward` only.
    """

    def __init__(self, rlor_mgr: "TrainerJobManager", job_id: str, base_model: str, lora_rank: int = 0,
                 fw_api_key: str | None = None, default_timeout: float = 600,
                 endpoint: "TrainerServiceEndpoint | None" = None, *, base_only: bool = False,
                 seed: int | None = None):
        from fireworks.training.sdk import FiretitanServiceClient

        self._mgr = rlor_mgr
        self._job_id = job_id
        self.base_model = base_model
        self.lora_rank = lora_rank
        self.default_timeout = default_timeout
        self.base_only = base_only
        api_key = fw_api_key or os.environ.get("FIREWORKS_API_KEY") or rlor_mgr.api_key
        self._endpoint = endpoint or rlor_mgr.reconnect_and_wait(job_id)
        self._service = FiretitanServiceClient(base_url=self._endpoint.base_url, api_key=api_key)
        if base_only:
            self._inner = self._service.create_base_training_client(base_model)
        else:
            self._inner = self._service.create_training_client(base_model=base_model, lora_rank=lora_rank, seed=seed)
        self._rest = None  # the SDK's REST client, made on first use (only checkpoint deletion needs it)

    # -- properties ----------------------------------------------------------------------------------------------
    @property
    def inner(self) -> "FiretitanTrainingClient":
        """The SDK's `FiretitanTrainingClient` (a `tinker.TrainingClient`)."""
        return self._inner

    @property
    def endpoint(self) -> "TrainerServiceEndpoint":
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

    # -- pipelined (not in the spec's surface) ---------------------------------------------------------------------
    # The trainer runs a model's operations in the order they were sent, so an operation sent before the previous
    # one finished starts the moment it does: `submit_forward_backward` then `submit_optim_step`, then wait for
    # both, saves a round trip per step. Each returns a `Pending` whose `result()` waits like the blocking call.
    def submit_forward(self, data: list[tinker.Datum], loss_fn: str = "cross_entropy",
                       loss_fn_config: dict | None = None) -> "Pending":
        return Pending(self._inner.forward(data, loss_fn, loss_fn_config), self.default_timeout)

    def submit_forward_backward(self, data: list[tinker.Datum], loss_fn: str = "cross_entropy",
                                loss_fn_config: dict | None = None) -> "Pending":
        return Pending(self._inner.forward_backward(data, loss_fn, loss_fn_config), self.default_timeout)

    def submit_optim_step(self, params: tinker.AdamParams,
                          grad_accumulation_normalization: str | None = None) -> "Pending":
        return Pending(self._inner.optim_step(params, grad_accumulation_normalization=grad_accumulation_normalization),
                       self.default_timeout)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_state(self, name: str, timeout: float = 2700):
        """DCP checkpoint (weights + optimizer + step) in the trainer's store; returns the server's reply."""
        return self._wait(self._inner.save_state(name), timeout)

    def load_state_with_optimizer(self, path: str, timeout: float = 2700):
        return self._wait(self._inner.load_state_with_optimizer(path), timeout)

    def load_state(self, path: str, timeout: float = 2700):
        """Weights only; the optimizer starts fresh."""
        return self._wait(self._inner.load_state(path), timeout)

    def save_weights_for_sampler_ext(self, name: str, checkpoint_type: str | None = None,
                                     timeout: float = 2700) -> "SaveSamplerResult":
        """Sampler snapshot (`base` / `delta`); the result's `snapshot_name` (`<name>-<session>`) is the hot-load
        identity. The SDK call blocks without a deadline, so it runs under `call_with_deadline` to honour `timeout`."""
        return call_with_deadline(timeout, self._inner.save_weights_for_sampler_ext, name,
                                  checkpoint_type=checkpoint_type)

    def resolve_checkpoint_path(self, name: str, source_job_id: str | None = None) -> str:
        return self._inner.resolve_checkpoint_path(name, source_job_id=source_job_id)

    def list_checkpoints(self) -> list[str]:
        """Sorted DCP checkpoint names of this trainer job, from the control plane. Raises on failure: the SDK's
        trainer-side listing answers [] when the request fails, which would silently turn a resume into a fresh
        start."""
        rows = self._mgr.list_checkpoints(self._job_id)
        return sorted(r["name"].rsplit("/", 1)[-1] for r in rows
                      if str(r.get("checkpointType", "")).startswith(_DCP_ROW_PREFIX))

    def delete_checkpoint(self, checkpoint_id: str, timeout: float | None = None) -> None:
        """Delete one of this model's checkpoints on the trainer: `weights/<name>` (DCP) or `sampler_weights/<name>`
        (a sampler snapshot, named by its snapshot name). Not in the spec's surface: checkpoint retention needs it.
        It is tinker 0.23's REST call (DELETE /api/v1/training_runs/{model_id}/checkpoints/{checkpoint_id}) through
        the SDK's own REST client; raises on failure (the embedded trainer answers 404 for an unknown name)."""
        self.submit_delete_checkpoint(checkpoint_id).result(timeout)

    def submit_delete_checkpoint(self, checkpoint_id: str) -> "Pending":
        """`delete_checkpoint` without waiting for the answer."""
        if self._rest is None:
            self._rest = self._service.create_rest_client()
        return Pending(self._rest.delete_checkpoint(self._inner.model_id, checkpoint_id), self.default_timeout)

    def close(self) -> None:
        """Release the SDK session (its heartbeat thread); the trainer job itself keeps running."""
        for close in (self._service.close, getattr(getattr(self._service, "holder", None), "close", None)):
            try:
                if close is not None:
                    close()
            except Exception:  # best effort at teardown
                pass


class Pending:
    """An operation already sent to the trainer; `result()` blocks for at most the client's default timeout."""

    def __init__(self, future: Any, timeout: float):
        self._future, self._timeout = future, timeout

    def result(self, timeout: float | None = None) -> Any:
        return self._future.result(timeout=self._timeout if timeout is None else timeout)


def call_with_deadline(timeout: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` on a daemon thread, waited for at most `timeout` seconds (then TimeoutError). A daemon
    thread rather than an executor's: executor threads are joined at interpreter exit, so one stuck call would also
    hang the driver's exit after it reported the failure."""
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller below
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, name=f"deadline-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    if not done.wait(timeout):
        raise TimeoutError(f"{getattr(fn, '__qualname__', fn)} did not finish within {timeout:.0f}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
