"""The project's trainer client: tinker 0.23 plus the Fireworks trainer extensions (wire-contract §2).

The extensions are added the way the Fireworks SDK adds them: a `tinker.TrainingClient` subclass whose extra calls
take their seq_id from tinker's own per-client counter (`_get_request_id`) and run inside tinker's turn-taking
(`_take_turn`), so they are ordered with every other call on the wire. Extra request fields travel as `extra_body`.

Keys: tinker validates keys client-side (`tml-…` or a JWT). A Fireworks key (anything else) is handled like the
Fireworks SDK does (§2.1): no `client/config` round trip (a preset client config), and the key sent verbatim as
`X-API-Key`. The private tinker internals used here are asserted by `tests/test_trainer_service.py`.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import tinker
from tinker import types
from tinker.lib import internal_client_holder as _holder_module
from tinker.lib._auth_token_provider import AuthTokenProvider
from tinker.lib.api_future_impl import _APIFuture
from tinker.lib.client_connection_pool_type import ClientConnectionPoolType
from tinker.lib.public_interfaces.api_future import APIFuture

# What the Fireworks SDK presets instead of asking the server (§2.1); the transport is left at tinker's default.
_PRESET_CLIENT_CONFIG = {"parallel_fwdbwd_chunks": True, "proto_write_fwdbwd": False,
                         "proto_compress_fwdbwd": False, "sample_no_retries": False}
_AUTH_PATCH_LOCK = threading.Lock()
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_RUN_REF = re.compile(r"^[a-z0-9-]+/run-[0-9a-f]{32}/[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
NORMALIZATIONS = ("num_loss_tokens", "num_sequences", "none")


def is_tinker_key(api_key: str) -> bool:
    return api_key.startswith("tml-") or api_key.startswith("eyJ")


class _HeaderKeyAuth(AuthTokenProvider):
    """Sends any key verbatim as X-API-Key (tinker's provider rejects non-`tml-` keys)."""

    def __init__(self, api_key: str):
        self._token = api_key

    async def get_token(self) -> str | None:
        return self._token


def create_service_client(base_url: str, api_key: str) -> tinker.ServiceClient:
    """A `tinker.ServiceClient` for the trainer at `base_url` (tinker 0.23 is eager: the server must be up)."""
    if not api_key:
        raise ValueError("an API key is required")
    base_url = base_url.rstrip("/")
    if is_tinker_key(api_key):
        return tinker.ServiceClient(base_url=base_url, api_key=api_key)
    # InternalClientHolder builds its auth provider from the module-level name `ApiKeyAuthProvider`; swap it for
    # the duration of the constructor only (under a lock: other threads may construct clients concurrently).
    with _AUTH_PATCH_LOCK:
        original = _holder_module.ApiKeyAuthProvider
        _holder_module.ApiKeyAuthProvider = lambda *_, **__: _HeaderKeyAuth(api_key)  # type: ignore[assignment]
        try:
            return tinker.ServiceClient(base_url=base_url, api_key=api_key,
                                        _client_config=dict(_PRESET_CLIENT_CONFIG))
        finally:
            _holder_module.ApiKeyAuthProvider = original


@dataclass(frozen=True)
class SaveSamplerResult:
    path: str  # what the server answered (for typed saves: the requested, suffixed name)
    snapshot_name: str  # "<name>-<session 8 hex>": the hot-load identity


class _MappedFuture(APIFuture):
    def __init__(self, inner, fn):
        self._inner, self._fn = inner, fn

    def result(self, timeout: float | None = None):
        return self._fn(self._inner.result(timeout))

    async def result_async(self, timeout: float | None = None):
        return self._fn(await self._inner.result_async(timeout))

    def __await__(self):
        return self.result_async().__await__()


class FireworksTrainingClient(tinker.TrainingClient):
    """`tinker.TrainingClient` + `optim_step(grad_accumulation_normalization=…)`, typed sampler saves,
    `list_checkpoints` and `resolve_checkpoint_path`."""

    def __init__(self, holder, model_seq_id: int, model_id: str, *, lora_rank: int = 0):
        super().__init__(holder, model_seq_id=model_seq_id, model_id=model_id)
        self.lora_rank = lora_rank
        self._session_suffix = uuid.uuid4().hex[:8]  # new per client object, hence per resume

    @property
    def session_suffix(self) -> str:
        return self._session_suffix

    def _ordered_call(self, send, result_type, request_type: str) -> APIFuture:
        """Run `send(client, seq_id)` in this client's seq order; resolve the promise into `result_type`."""
        request_id = self._get_request_id()

        async def run():
            start = time.time()

            async def _send():
                with self.holder.aclient(ClientConnectionPoolType.TRAIN) as client:
                    return await send(client, request_id + 1)

            async with self._take_turn(request_id):
                untyped = await self.holder.execute_with_retries(_send)
            return await _APIFuture(result_type, self.holder, untyped, request_start_time=start,
                                    request_type=request_type, queue_state_observer=self._queue_state_logger)

        return self.holder.run_coroutine_threadsafe(run())

    def optim_step(self, adam_params: types.AdamParams,
                   grad_accumulation_normalization: str | None = None) -> APIFuture[types.OptimStepResponse]:
        if grad_accumulation_normalization is None:
            return super().optim_step(adam_params)
        if grad_accumulation_normalization not in NORMALIZATIONS:
            raise ValueError(f"grad_accumulation_normalization must be one of {NORMALIZATIONS}")
        extra = {"grad_accumulation_normalization": grad_accumulation_normalization}

        async def send(client, seq_id):
            request = types.OptimStepRequest(adam_params=adam_params, model_id=self._guaranteed_model_id(),
                                             seq_id=seq_id)
            return await client.training.optim_step(request=request, extra_body=extra)

        return self._ordered_call(send, types.OptimStepResponse, "OptimStep")

    def save_weights_for_sampler_ext(self, name: str, checkpoint_type: str | None = None) -> APIFuture:
        """Sampler snapshot named `<name>-<session_suffix>`; resolves to `SaveSamplerResult`."""
        snapshot_name = f"{name}-{self._session_suffix}"
        ctype = checkpoint_type or "base"
        if ctype not in ("base", "delta", "merged_base"):
            raise ValueError(f"checkpoint_type must be base, delta or merged_base, got {checkpoint_type!r}")

        async def send(client, seq_id):
            request = types.SaveWeightsForSamplerRequest(model_id=self._guaranteed_model_id(), path=snapshot_name,
                                                         seq_id=seq_id)
            return await client.weights.save_for_sampler(request=request, extra_body={"checkpoint_type": ctype},
                                                         max_retries=0)

        inner = self._ordered_call(send, types.SaveWeightsForSamplerResponseInternal, "SaveWeightsForSampler")
        return _MappedFuture(inner, lambda r: SaveSamplerResult(path=r.path or snapshot_name,
                                                                snapshot_name=snapshot_name))

    def list_checkpoints(self) -> list[str]:
        """Sorted DCP checkpoint names of this trainer job. Raises on failure (an empty list would silently turn a
        resume into a fresh start)."""

        async def run():
            async def _get():
                with self.holder.aclient(ClientConnectionPoolType.TRAIN) as client:
                    return await client.get("/api/v1/list_checkpoints", cast_to=dict)
            return await self.holder.execute_with_retries(_get)

        reply = self.holder.run_coroutine_threadsafe(run()).result()
        return list(reply.get("checkpoints", []))

    def resolve_checkpoint_path(self, name: str, source_job_id: str | None = None) -> str:
        """A loadable reference: the validated name, or `cross_job://<source_job_id>/<name>`."""
        if not isinstance(name, str) or not (_DNS_LABEL.match(name) or _RUN_REF.match(name)):
            raise ValueError(f"invalid checkpoint name {name!r}: expected a DNS label like 'step-4' "
                             "(lowercase letters, digits and '-', ≤63 chars)")
        if source_job_id:
            if not _DNS_LABEL.match(source_job_id):
                raise ValueError(f"invalid source job id {source_job_id!r}")
            return f"cross_job://{source_job_id}/{name}"
        return name


def _create_model(service: tinker.ServiceClient, body: dict[str, Any], lora_rank: int) -> FireworksTrainingClient:
    holder = service.holder
    model_seq_id = holder.get_training_client_id()
    body = {"session_id": holder.get_session_id(), "model_seq_id": model_seq_id, "type": "create_model", **body}

    async def run():
        start = time.time()

        async def _send():
            with holder.aclient(ClientConnectionPoolType.TRAIN) as client:
                return await client.post("/api/v1/create_model", body=body, cast_to=types.UntypedAPIFuture)

        untyped = await holder.execute_with_retries(_send)
        return await _APIFuture(types.CreateModelResponse, holder, untyped, request_start_time=start,
                                request_type="CreateModel")

    response = holder.run_coroutine_threadsafe(run()).result()
    return FireworksTrainingClient(holder, model_seq_id, response.model_id, lora_rank=lora_rank)


def create_training_client(service: tinker.ServiceClient, base_model: str, lora_rank: int = 0, *,
                           seed: int | None = None) -> FireworksTrainingClient:
    """Full-parameter for `lora_rank=0` (sent as `rank: 0`, like the Fireworks SDK), LoRA with alpha 32 otherwise."""
    lora: dict[str, Any] = {"rank": int(lora_rank), "train_unembed": True, "train_mlp": True, "train_attn": True}
    if lora_rank > 0:
        lora["alpha"] = 32
    if seed is not None:
        lora["seed"] = int(seed)
    return _create_model(service, {"base_model": base_model, "lora_config": lora}, lora_rank)


def create_reference_client(service: tinker.ServiceClient, base_model: str) -> FireworksTrainingClient:
    """A frozen copy of the base model (`base_only: true`), for `forward` (reference logprobs) only."""
    return _create_model(service, {"base_model": base_model, "base_only": True}, 0)
