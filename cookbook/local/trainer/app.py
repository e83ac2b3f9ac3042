"""The trainer service's HTTP surface: tinker 0.23's JSON API plus the Fireworks trainer's extensions to it.

Futures: operations that the SDK treats as promises get a request id at once and run on the single compute thread;
`retrieve_future` long-polls (≤ LONG_POLL_S) and only then answers 408 try_again, because the SDK re-polls instantly.
Per-model operations run strictly in seq_id order (gaps are buffered) and are de-duplicated on (model_id, seq_id).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import traceback
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cookbook import models
from cookbook.local.procs import KeyAuthMiddleware
from cookbook.local.storage import hold_store, remove_temp_leftovers
from cookbook.local.trainer.checkpoints import Store, check_name, weights_info
from cookbook.local.trainer.engine import TrainModel
from cookbook.local.trainer.losses import UserRequestError
from cookbook.local.trainer.sampling import SamplingSession

log = logging.getLogger("cookbook.trainer")
LONG_POLL_S = 30.0
MAX_KEPT_RESULTS = 4096


def _err(status: int, message: str, category: str = "user") -> JSONResponse:
    return JSONResponse({"error": message, "category": category}, status_code=status)


@dataclass
class _Queue:
    next_seq: int = 1
    pending: dict[int, tuple[str, Callable[[], Any]]] = field(default_factory=dict)
    seen: dict[int, str] = field(default_factory=dict)


class TrainerService:
    def __init__(self, *, store: Store, api_key: str, base_model: str, seed: int = 0,
                 max_context_length: int | None = None, forward_only: bool = False, comms: str = "v2"):
        self.store, self.api_key, self.base_model = store, api_key, base_model
        # What create_model advertises (`comms`): "v2" makes the Fireworks SDK encode forward/forward_backward with
        # orjson (float32 tensors as float32 decimals) and mark them `"comms": "v2"`; the JSON schema both ways is
        # the same, so this service reads either. "v1": the field is left out, as older Fireworks trainers do.
        self.comms = comms
        self.seed, self.max_context_length = seed, max_context_length
        # A FORWARD_ONLY job (a reference trainer): models serve forward and DCP save/load; training is refused.
        self.forward_only = forward_only
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="trainer-compute")
        self.models: dict[str, TrainModel] = {}
        self.samplers: dict[str, SamplingSession] = {}
        self.queues: dict[str, _Queue] = {}
        self.futures: OrderedDict[str, asyncio.Future] = OrderedDict()
        self.created: dict[tuple[str, int], str] = {}  # (session, model_seq_id) -> request id (dedupe)
        self._ids = itertools.count(1)
        self._tokenizers: dict[str, Any] = {}
        # A trainer starting on a store is its only writer: what a crashed save left there (hidden temp dirs) can go.
        # This is how a resumed job (`:resume` after its trainer died) cleans up after itself. The serving lock tells
        # storage cleanup that the store is in use (a trainer's command line need not name its store: see spares).
        self._serving = hold_store(store.root)
        for leftover in remove_temp_leftovers(store.root):
            log.info("removed %s, left by an unfinished save", leftover)
        # Warm the compute thread (model classes import in ~4 s) while the client is still connecting.
        self.executor.submit(lambda: (models.load_model(base_model, seed=seed) if models.is_embedded(base_model)
                                      else None, self.tokenizer(base_model)))

    # ------------------------------------------------------------------ futures
    def _new_future(self) -> str:
        """Called on the event loop (from request handlers); the compute thread settles the future through it."""
        rid = f"req-{next(self._ids)}-{uuid.uuid4().hex[:6]}"
        self.futures[rid] = asyncio.get_running_loop().create_future()
        while len(self.futures) > MAX_KEPT_RESULTS:
            self.futures.popitem(last=False)
        return rid

    def _dispatch(self, rid: str, fn: Callable[[], Any], label: str) -> None:
        fut = self.futures[rid]

        def run():
            try:
                value = fn()
            except UserRequestError as e:
                log.info("%s failed: %s", label, e)
                value = {"error": str(e), "category": "user"}
            except Exception as e:  # noqa: BLE001 - report, keep serving
                log.error("%s crashed:\n%s", label, traceback.format_exc())
                value = {"error": f"internal error in {label}: {type(e).__name__}: {e}", "category": "server"}
            fut.get_loop().call_soon_threadsafe(lambda: fut.done() or fut.set_result(value))

        self.executor.submit(run)

    def submit(self, fn: Callable[[], Any], label: str) -> str:
        rid = self._new_future()
        self._dispatch(rid, fn, label)
        return rid

    def submit_ordered(self, model_id: str, seq_id: int, fn: Callable[[], Any], label: str) -> str:
        q = self.queues[model_id]
        if seq_id in q.seen:  # a resend of the same operation (new idempotency key, same seq)
            return q.seen[seq_id]
        rid = self._new_future()
        q.seen[seq_id] = rid
        if seq_id < q.next_seq:  # late arrival of an old seq: nothing to wait for
            self._dispatch(rid, fn, label)
            return rid
        q.pending[seq_id] = (rid, fn)
        while q.next_seq in q.pending:
            ready_rid, ready_fn = q.pending.pop(q.next_seq)
            self._dispatch(ready_rid, ready_fn, f"{label.split('(')[0]}(seq {q.next_seq})")
            q.next_seq += 1
        return rid

    def check_trainable_job(self, op: str) -> None:
        if self.forward_only:
            raise UserRequestError(
                f"trainer job {self.store.job_id} is forward-only (created with forwardOnly / a FORWARD_ONLY training "
                f"shape) and cannot train: {op} is not allowed. It serves forward, save_state and load_state; create "
                "a policy trainer job (a FULL_PARAMETER_TRAINER or LORA_TRAINER shape, forwardOnly unset) to train.")

    def failed(self, message: str) -> str:
        rid = self._new_future()
        self.futures[rid].set_result({"error": message, "category": "user"})
        return rid

    # ------------------------------------------------------------------ helpers
    def tokenizer(self, name: str):
        if name not in self._tokenizers:
            self._tokenizers[name] = models.load_tokenizer(name)
        return self._tokenizers[name]

    def model(self, model_id: object) -> TrainModel:
        m = self.models.get(model_id)  # type: ignore[arg-type]
        if m is None:
            raise UserRequestError(f"unknown model_id {model_id!r}")
        return m

    def create_model(self, body: dict, model_id: str) -> dict:
        base = body.get("base_model") or self.base_model
        if base != self.base_model:
            raise UserRequestError(f"this trainer serves base model {self.base_model!r}, not {base!r}")
        lora = body.get("lora_config") or {}
        rank = int(lora.get("rank") or 0)
        m = TrainModel(model_id, base, seed=self.seed, lora_rank=rank, lora_alpha=float(lora.get("alpha") or 32),
                       lora_seed=lora.get("seed"), train_attn=lora.get("train_attn", True),
                       train_mlp=lora.get("train_mlp", True), train_unembed=lora.get("train_unembed", True),
                       base_only=bool(body.get("base_only")), max_context_length=self.max_context_length)
        if self.forward_only:  # no gradients ever: forward keeps no graph, and the weights stay frozen
            m.model.requires_grad_(False)
            m.params = []
        self.models[model_id] = m
        log.info("created model %s (%s, %s)", model_id, base,
                 "frozen reference" if m.base_only else f"LoRA rank {rank}" if m.is_lora else "full-parameter")
        return {"model_id": model_id, "type": "create_model", **({"comms": "v2"} if self.comms == "v2" else {})}

    def save_for_sampler(self, m: TrainModel, body: dict, session_seq: object) -> dict:
        path = body.get("path")
        if path is None and session_seq is not None:  # ephemeral: snapshot now, sample from it
            sid = f"{m.model_id.split(':')[0]}:sample:{int(session_seq)}"
            import copy
            snap = m.merged_model()
            snap = copy.deepcopy(snap) if snap is m.model else snap
            snap.requires_grad_(False)
            self.samplers[sid] = SamplingSession(sid, snap, m.base_model, None, self.tokenizer(m.base_model))
            return {"sampling_session_id": sid, "type": "save_weights_for_sampler"}
        ctype = body.get("checkpoint_type")
        self.store.save_sampler(m, self.tokenizer(m.base_model), check_name(path), ctype)
        log.info("sampler snapshot %s (%s) of %s at step %d", path, ctype or "base", m.model_id, m.step)
        reply = path if ctype is not None else f"tinker://{m.model_id}/sampler_weights/{path}"
        return {"path": reply, "type": "save_weights_for_sampler"}

    def open_sampler(self, body: dict, sid: str) -> SamplingSession:
        from cookbook.local import snapshots

        path, base = body.get("model_path"), body.get("base_model")
        if path:
            identity = path.rstrip("/").rsplit("/", 1)[-1]
            chain = []
            while True:  # walk delta → ... → base, then apply forward
                d = self.store.sampler_dir(identity)
                manifest = snapshots.read_manifest(d)
                chain.append(d)
                if manifest["kind"] == "base":
                    break
                identity = manifest["previous_snapshot_identity"]
            model = models.load_model(str(chain[-1]))
            state, ident = snapshots.canonical_state(model), snapshots.read_manifest(chain[-1])["identity"]
            for d in reversed(chain[:-1]):
                state = snapshots.apply_snapshot(d, state, ident)
                ident = snapshots.read_manifest(d)["identity"]
            snapshots.load_state_into(model, state)
            base = manifest.get("base_model", self.base_model)
        else:
            base = base or self.base_model
            model = models.load_model(base, seed=self.seed)
        model.requires_grad_(False)
        tokenizer = self.tokenizer(base if models.is_embedded(base) else self.base_model)
        return SamplingSession(sid, model, base, path, tokenizer)


def build_app(svc: TrainerService) -> KeyAuthMiddleware:
    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001
            raise UserRequestError("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise UserRequestError("request body must be a JSON object")
        return body

    def model_seq(body: dict) -> tuple[str, int]:
        model_id, seq = body.get("model_id"), body.get("seq_id")
        if not isinstance(model_id, str) or not isinstance(seq, int):
            raise UserRequestError("`model_id` (string) and `seq_id` (int) are required")
        return model_id, seq

    def ordered(op: str, request_key: str | None, fn: Callable[[TrainModel, dict], Any], trains: bool = False):
        async def handler(request: Request):
            body = await body_of(request)
            model_id, seq = model_seq(body)
            if model_id not in svc.models:
                return JSONResponse({"request_id": svc.failed(f"unknown model_id {model_id!r}"), "model_id": model_id})
            payload = body.get(request_key) if request_key else body
            m = svc.models[model_id]

            def run():
                if trains:  # refused in seq order, so later operations on the model are not held up
                    svc.check_trainable_job(op)
                return fn(m, payload if isinstance(payload, dict) else {})

            rid = svc.submit_ordered(model_id, seq, run, f"{op}({model_id} seq {seq})")
            return JSONResponse({"request_id": rid, "model_id": model_id})
        return handler

    async def client_config(request):
        return JSONResponse({})

    async def create_session(request):
        return JSONResponse({"session_id": f"sess-{uuid.uuid4().hex[:12]}", "type": "create_session"})

    async def heartbeat(request):
        return JSONResponse({"type": "session_heartbeat"})

    async def telemetry(request):
        return JSONResponse({"status": "accepted"})

    async def healthz(request):
        return JSONResponse({"status": "ok"})

    async def capabilities(request):
        return JSONResponse({"supported_models": [{"model_name": svc.base_model,
                                                   "max_context_length": svc.max_context_length}]})

    async def create_model(request):
        body = await body_of(request)
        session, seq = str(body.get("session_id", "")), body.get("model_seq_id", 0)
        key = (session, int(seq) if isinstance(seq, int) else -1)
        if key in svc.created:
            return JSONResponse({"request_id": svc.created[key]})
        model_id = f"{session or 'sess'}:train:{key[1]}"
        rid = svc.submit(lambda: svc.create_model(body, model_id), f"create_model({model_id})")
        svc.created[key] = rid
        queue = svc.queues.setdefault(model_id, _Queue())
        queue.next_seq = max(queue.next_seq, 1)
        return JSONResponse({"request_id": rid, "model_id": model_id})

    async def get_info(request):
        body = await body_of(request)
        return JSONResponse(svc.model(body.get("model_id")).info())

    async def weights_info_ep(request):
        body = await body_of(request)
        return JSONResponse(weights_info(svc.store, body.get("tinker_path")))

    async def list_checkpoints(request):
        return JSONResponse({"checkpoints": svc.store.list_checkpoints()})

    async def delete_checkpoint(request):
        """tinker's RestClient.delete_checkpoint: `weights/<name>` or `sampler_weights/<name>` of this job's store.
        Not queued behind the model's operations: names are unique per save, so it never races its own save."""
        model_id, checkpoint_id = request.path_params["model_id"], request.path_params["checkpoint_id"]
        if model_id not in svc.models:
            return _err(404, f"unknown model_id {model_id!r}")
        kind, _, name = checkpoint_id.partition("/")
        try:
            await asyncio.to_thread(svc.store.delete, kind, name)
        except FileNotFoundError:
            return _err(404, f"checkpoint {checkpoint_id!r} not found in trainer job {svc.store.job_id}")
        log.info("deleted %s of job %s", checkpoint_id, svc.store.job_id)
        return Response(status_code=204)

    def _save_state(m: TrainModel, b: dict) -> dict:
        svc.store.save_state(m, check_name(b.get("path")))
        log.info("saved state %s of %s at step %d", b.get("path"), m.model_id, m.step)
        return {"path": f"tinker://{m.model_id}/weights/{b['path']}", "type": "save_weights"}

    def _load_state(m: TrainModel, b: dict) -> dict:
        target = svc.store.resolve(b.get("path"))
        svc.store.load_state(m, target, bool(b.get("optimizer")))
        log.info("loaded %s into %s (optimizer=%s)", b.get("path"), m.model_id, bool(b.get("optimizer")))
        return {"path": b.get("path"), "type": "load_weights"}

    async def save_weights_for_sampler(request):
        body = await body_of(request)
        model_id, seq = model_seq(body)
        if model_id not in svc.models:
            return JSONResponse({"request_id": svc.failed(f"unknown model_id {model_id!r}")})
        m = svc.models[model_id]

        def run():
            svc.check_trainable_job("save_weights_for_sampler")
            return svc.save_for_sampler(m, body, body.get("sampling_session_seq_id"))

        rid = svc.submit_ordered(model_id, seq, run, f"save_weights_for_sampler({model_id} seq {seq})")
        return JSONResponse({"request_id": rid, "model_id": model_id})

    async def unload_model(request):
        body = await body_of(request)
        model_id = body.get("model_id")
        svc.model(model_id)
        return JSONResponse({"request_id": svc.submit(lambda: svc.models.pop(model_id, None) and
                                                      {"model_id": model_id, "type": "unload_model"}
                                                      or {"model_id": model_id}, "unload_model")})

    async def create_sampling_session(request):
        body = await body_of(request)
        sid = f"{body.get('session_id', 'sess')}:sample:{body.get('sampling_session_seq_id', 0)}"
        if sid not in svc.samplers:
            sampler = await asyncio.get_running_loop().run_in_executor(svc.executor, svc.open_sampler, body, sid)
            svc.samplers[sid] = sampler
        return JSONResponse({"sampling_session_id": sid, "type": "create_sampling_session"})

    async def get_sampler(request):
        sid = request.path_params["sid"]
        if sid not in svc.samplers:
            return _err(404, f"unknown sampler {sid!r}")
        return JSONResponse(svc.samplers[sid].info())

    async def asample(request):
        body = await body_of(request)
        sid = body.get("sampling_session_id")
        sampler = svc.samplers.get(sid)
        if sampler is None:
            return JSONResponse({"request_id": svc.failed(f"unknown sampling_session_id {sid!r}")})
        return JSONResponse({"request_id": svc.submit(lambda: sampler.sample(body), f"asample({sid})")})

    async def retrieve_future(request):
        body = await body_of(request)
        rid = body.get("request_id")
        fut = svc.futures.get(rid)
        if fut is None:
            return _err(404, f"unknown request_id {rid!r}")
        try:
            value = await asyncio.wait_for(asyncio.shield(fut), timeout=LONG_POLL_S)
        except asyncio.TimeoutError:
            return JSONResponse({"type": "try_again", "request_id": rid, "queue_state": "active"}, status_code=408)
        return JSONResponse(value)

    routes = [
        Route("/api/v1/client/config", client_config, methods=["POST"]),
        Route("/api/v1/create_session", create_session, methods=["POST"]),
        Route("/api/v1/session_heartbeat", heartbeat, methods=["POST"]),
        Route("/api/v1/telemetry", telemetry, methods=["POST"]),
        Route("/api/v1/healthz", healthz, methods=["GET"]),
        Route("/api/v1/get_server_capabilities", capabilities, methods=["GET"]),
        Route("/api/v1/create_model", create_model, methods=["POST"]),
        Route("/api/v1/get_info", get_info, methods=["POST"]),
        Route("/api/v1/weights_info", weights_info_ep, methods=["POST"]),
        Route("/api/v1/list_checkpoints", list_checkpoints, methods=["GET"]),
        Route("/api/v1/training_runs/{model_id}/checkpoints/{checkpoint_id:path}", delete_checkpoint,
              methods=["DELETE"]),
        Route("/api/v1/forward", ordered("forward", "forward_input", lambda m, b: m.forward(b)), methods=["POST"]),
        Route("/api/v1/forward_backward", ordered("forward_backward", "forward_backward_input",
                                                  lambda m, b: m.forward_backward(b), trains=True), methods=["POST"]),
        Route("/api/v1/optim_step", ordered("optim_step", None, lambda m, b: m.optim_step(b), trains=True),
              methods=["POST"]),
        Route("/api/v1/save_weights", ordered("save_weights", None, _save_state), methods=["POST"]),
        Route("/api/v1/load_weights", ordered("load_weights", None, _load_state), methods=["POST"]),
        Route("/api/v1/save_weights_for_sampler", save_weights_for_sampler, methods=["POST"]),
        Route("/api/v1/unload_model", unload_model, methods=["POST"]),
        Route("/api/v1/create_sampling_session", create_sampling_session, methods=["POST"]),
        Route("/api/v1/samplers/{sid:path}", get_sampler, methods=["GET"]),
        Route("/api/v1/asample", asample, methods=["POST"]),
        Route("/api/v1/retrieve_future", retrieve_future, methods=["POST"]),
    ]

    async def user_error(request, exc):
        return _err(400, str(exc))

    app = Starlette(routes=routes, exception_handlers={UserRequestError: user_error})
    # A wrong or missing key gets tinker's error shape, like every other error of this service.
    return KeyAuthMiddleware(app, svc.api_key, error_body={"error": "missing or invalid API key", "category": "user"})
