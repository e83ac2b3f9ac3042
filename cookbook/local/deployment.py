"""The local inference server ("deployment"): completions over token ids, weights changed only by hot load.

    python -m cookbook.local.deployment --port-file F --base-model NAME [--model-source SRC] \
        [--snapshot-root DIR] [--parent-pid PID] [--device auto] [--max-batch 64]      (key: $COOKBOOK_PLATFORM_KEY)

It holds its own copy of the weights (loaded from the base model at start, snapshot identity null), so a weight-sync
bug shows up as different logprobs. A hot load reads `<snapshot-root>/<identity>/`; the control plane sends the
root of the trainer job the deployment is attached to in the `x-cookbook-snapshot-root` header.

The request contract follows the Fireworks completions and hot-load APIs as the official SDK uses them, including
what they reject: unknown request fields answer 400
`{"error": {"code": "invalid_request_error", "message": "Extra inputs are not permitted, field: '<name>'"}}`, stop
sequences are text only, and fields the real API has but this server does not implement answer 400 saying so.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cookbook.local.procs import SNAPSHOT_ROOT_HEADER, KeyAuthMiddleware, serve, spare_argv
from cookbook.local.sampling import Batcher, Engine, SeqRequest
from cookbook.runs.faults import crash_point

INVALID_REQUEST = "invalid_request_error"
# The SDK's `hotload_and_wait` polls the status every 5 s (hard-coded) and its first poll comes right after the POST.
# So the POST waits for the load to finish (up to this bound): the first poll then already sees it, instead of every
# weight sync costing >= 5 s. A longer load keeps going and reports through GET like an asynchronous one. The bound
# stays below the SDK's 60 s timeout on this POST, which it would otherwise retry (loading the snapshot again).
HOT_LOAD_POST_WAIT_S = 45.0
_IDENTITY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Completions request fields this server implements (the SDK's DeploymentSampler, its warm-up probe, and the
# OpenAI-style basics). Any other field is checked against NOT_IMPLEMENTED, then rejected as unknown.
COMPLETION_FIELDS = {
    "model", "prompt", "n", "max_tokens", "temperature", "top_p", "top_k", "stream", "stop", "seed", "echo",
    "logprobs", "raw_output", "perf_metrics_in_response", "ignore_eos",
    # Accepted and ignored: a prompt-cache routing hint and an end-user tag; neither changes what is generated.
    "prompt_cache_key", "user",
}
# Fields the real completions API accepts that this server does not implement, with the value that means "off"
# (sent explicitly at that value they are accepted). Anything else answers 400 naming the field.
NOT_IMPLEMENTED: dict[str, Any] = {
    "frequency_penalty": 0, "presence_penalty": 0, "repetition_penalty": 1, "logit_bias": {}, "min_p": 0,
    "typical_p": 1, "top_logprobs": 0, "mirostat_target": None, "mirostat_lr": None, "min_tokens": 0,
    "include_routing_matrix": False, "routing_matrix_format": None, "top_sampling_logprobs": None,
    "top_sampling_format": None, "response_format": None, "grammar": None, "suffix": None, "best_of": 1,
    "images": None, "return_token_ids": False, "prompt_truncate_len": None,
    "context_length_exceeded_behavior": "error", "echo_last": None, "speculation": None, "prediction": None,
    "metadata": None, "reasoning_effort": None,
}
HOT_LOAD_FIELDS = {"identity", "reset_prompt_cache", "incremental_snapshot_metadata"}
INCREMENTAL_FIELDS = {"previous_snapshot_identity", "compression_format", "checksum_format"}
# The names the SDK sends for its delta format. The bytes are this platform's own delta format (snapshots.py); other
# names would announce a format this server cannot read.
COMPRESSION_FORMATS = {"arc_v2"}
CHECKSUM_FORMATS = {"alder32"}  # sic: the SDK's spelling


class RequestError(ValueError):
    """A request this server refuses with 400; `str()` is the message."""


def _error(status: int, message: str, code: Any = INVALID_REQUEST) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _extra_field(name: str) -> RequestError:
    # The exact wording of the real API's validation error (the SDK matches on it, e.g. sampling.py
    # `_unsupported_routing_format` and deployment.py `_reset_prompt_cache_unsupported`).
    return RequestError(f"Extra inputs are not permitted, field: '{name}'")


class HotLoader:
    """Loads sampler snapshots into this replica; GET reports `replicas[0]` as the Fireworks contract does."""

    def __init__(self, engine: Engine, batcher: Batcher, default_root: str | None, base_model: str, seed: int = 0):
        self.engine, self.batcher = engine, batcher
        self.default_root = default_root
        self.base_model, self.seed = base_model, seed
        self.current_identity: str | None = None
        self.stage = "idle"
        self.target: str | None = None
        self.message = ""
        self._lock = threading.Lock()  # one load (or reset) at a time

    def status(self) -> dict[str, Any]:
        state = {"stage": self.stage, "target_snapshot_identity": self.target}
        if self.message:
            state["message"] = self.message
        return {"replicas": [{"current_snapshot_identity": self.current_identity, "readiness": self.stage != "loading",
                              "loading_state": state}]}

    def start(self, identity: str, previous: str | None, root: str | None) -> concurrent.futures.Future:
        """Begin loading `<root>/<identity>` in the background; the future resolves when it is done or failed."""
        root = root or self.default_root
        if not root:
            raise RequestError("this deployment is not attached to a trainer job (no snapshot root)")
        self.stage, self.target, self.message = "loading", identity, ""
        done: concurrent.futures.Future = concurrent.futures.Future()
        threading.Thread(target=self._load, args=(identity, previous, Path(root) / identity, done),
                         daemon=True).start()
        return done

    def _load(self, identity: str, previous: str | None, directory: Path, done: concurrent.futures.Future) -> None:
        from cookbook.local.snapshots import apply_snapshot, canonical_state, load_state_into, read_manifest

        with self._lock:
            self.stage, self.target, self.message = "loading", identity, ""
            try:
                manifest = read_manifest(directory)
                if manifest["kind"] == "delta":
                    # Both the client's claim and the manifest must name what this replica holds.
                    if previous is None:
                        raise ValueError(f"{identity!r} is a delta snapshot but the request has no "
                                         "incremental_snapshot_metadata naming its predecessor")
                    if previous != self.current_identity:
                        raise ValueError(f"delta {identity!r} was sent for predecessor {previous!r}, but this "
                                         f"replica holds {self.current_identity!r}")
                state = {k: v.cpu() for k, v in canonical_state(self.engine.model).items()}
                new_state = apply_snapshot(directory, state, self.current_identity)  # while decoding goes on

                def swap() -> None:  # on the decode thread, between sequences: none ever sees both weights
                    load_state_into(self.engine.model, new_state)
                    self.current_identity = identity

                self.batcher.swap(swap)
                self.stage = "done"
            except Exception as e:  # reported as stage "error" for this target; the SDK then fails the sync
                self.stage, self.message = "error", f"{type(e).__name__}: {e}"
            finally:
                done.set_result(None)

    def reset(self) -> None:
        """Back to the base model's weights and no snapshot, like a freshly rolled replica (the control plane calls
        this when the deployment is re-attached to another trainer: on Fireworks that PATCH rolls the pods)."""
        from cookbook.local.snapshots import canonical_state, load_state_into
        from cookbook.models import load_model

        with self._lock:
            fresh = canonical_state(load_model(self.base_model, seed=self.seed))

            def swap() -> None:
                load_state_into(self.engine.model, fresh)
                self.current_identity = None

            self.batcher.swap(swap)
            self.stage, self.target, self.message = "idle", None, ""


def _choice(index: int, s: SeqRequest, tokenizer, logprobs: bool) -> dict[str, Any]:
    text = tokenizer.decode(s.tokens, skip_special_tokens=False)
    if s.stop_text_cut is not None:
        text = text[:s.stop_text_cut]
    ids, lps, slps = list(s.tokens), list(s.logprobs), list(s.sampling_logprobs)
    if s.echo:  # the whole prompt first; its first entry has no logprob, so it reports 0.0
        ids = s.prompt + ids
        plp = [0.0] + s.prompt_logprobs
        lps, slps = plp + lps, plp + slps
    content = [{"token_id": t, "logprob": lp, "sampling_logprob": sl} for t, lp, sl in zip(ids, lps, slps)]
    return {"index": index, "text": text, "finish_reason": s.finish_reason,
            "logprobs": {"content": content} if logprobs else None,
            "raw_output": {"completion_token_ids": ids, "prompt_token_ids": s.prompt}}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, key: str, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(f"`{key}` must be a number, got {v!r}")
    return float(v)


def _integer(body: dict, key: str, default: int | None) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if not _is_int(v):
        raise RequestError(f"`{key}` must be an integer, got {v!r}")
    return v


def _flag(body: dict, key: str) -> bool:
    v = body.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise RequestError(f"`{key}` must be a boolean, got {v!r}")
    return v


def check_fields(body: dict) -> None:
    """Unknown fields -> the real API's "Extra inputs" error; known-but-unimplemented ones -> say so."""
    for key, value in body.items():
        if key in COMPLETION_FIELDS:
            continue
        if key not in NOT_IMPLEMENTED:
            raise _extra_field(key)
        if value is None or value == NOT_IMPLEMENTED[key]:
            continue  # explicitly "off": same as absent
        # The real completions API accepts this field; the embedded deployment has no implementation of it.
        raise RequestError(f"`{key}` is not implemented by the embedded deployment (the Fireworks completions API "
                           f"accepts it; send it unset{'' if NOT_IMPLEMENTED[key] is None else f' or {NOT_IMPLEMENTED[key]!r}'})")


def parse_completion(body: Any, tokenizer, eos_id: int | None, max_positions: int) -> tuple[list[SeqRequest], dict]:
    """Validate a completions request; the sequences to decode and the response options."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    check_fields(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = tokenizer.encode(prompt, add_special_tokens=False)
    if not isinstance(prompt, list) or not prompt or not all(_is_int(t) for t in prompt):
        raise RequestError("`prompt` must be a non-empty list of token ids (or a string)")
    vocab = len(tokenizer)
    if any(t < 0 or t >= vocab for t in prompt):
        raise RequestError(f"prompt token ids must lie in [0, {vocab})")
    if len(prompt) >= max_positions:
        raise RequestError(f"the prompt has {len(prompt)} tokens; this model's context is {max_positions} tokens")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
        # The completions API takes stop sequences as text only. The SDK's DeploymentSampler decodes integer stop
        # ids with the tokenizer before sending them (sample_with_prompt_tokens(stop=[ids])).
        raise RequestError(f"`stop` must be a string or a list of strings, got {stop!r}: stop sequences are text; "
                           "decode stop token ids with the tokenizer (tokenizer.decode([id]))")
    if any(not x for x in stop):
        raise RequestError("`stop` sequences must be non-empty strings")
    n = _integer(body, "n", 1)
    max_tokens = _integer(body, "max_tokens", 16)
    temperature = _number(body, "temperature", 1.0)
    top_p = _number(body, "top_p", 1.0)
    top_k = _integer(body, "top_k", 0)
    seed = _integer(body, "seed", None)
    logprobs = body.get("logprobs")
    if _is_int(logprobs) and logprobs > 0:
        # An integer asks for that many alternatives per token (top logprobs), which this server does not compute.
        raise RequestError("`logprobs` as a number of top alternatives is not implemented by the embedded deployment "
                           "(the Fireworks completions API accepts it); send `logprobs: true` for per-token logprobs")
    if logprobs is not None and not isinstance(logprobs, bool) and not _is_int(logprobs):
        raise RequestError(f"`logprobs` must be a boolean, got {logprobs!r}")
    options = {"stream": _flag(body, "stream"), "logprobs": bool(logprobs),
               "perf_metrics": _flag(body, "perf_metrics_in_response")}
    echo, ignore_eos = _flag(body, "echo"), _flag(body, "ignore_eos")
    _flag(body, "raw_output")  # raw_output is always returned
    for key in ("prompt_cache_key", "user"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise RequestError(f"`{key}` must be a string")
    if n < 1 or max_tokens < 0 or temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise RequestError("need n >= 1, max_tokens >= 0, temperature >= 0, 0 < top_p <= 1 and top_k >= 0 "
                           "(0 = no top-k)")
    stop_ids = frozenset() if eos_id is None or ignore_eos else frozenset({eos_id})
    seqs = [SeqRequest(prompt=list(prompt), max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                       stop_ids=stop_ids, stop_strs=tuple(stop), seed=None if seed is None else seed + i, echo=echo)
            for i in range(n)]
    return seqs, options


def parse_hot_load(body: Any) -> tuple[str, str | None]:
    """Validate a hot-load request; (identity, previous identity of a delta)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for key in body:
        if key not in HOT_LOAD_FIELDS:
            raise _extra_field(key)
    identity = body.get("identity")
    if not isinstance(identity, str) or not _IDENTITY_RE.match(identity):
        raise RequestError(f"`identity` must be a snapshot name (letters, digits, '.', '_', '-'), got {identity!r}")
    if body.get("reset_prompt_cache") is not None and not isinstance(body["reset_prompt_cache"], bool):
        raise RequestError("`reset_prompt_cache` must be a boolean")
    meta = body.get("incremental_snapshot_metadata")
    if meta is None:
        return identity, None
    if not isinstance(meta, dict):
        raise RequestError("`incremental_snapshot_metadata` must be an object")
    for key in meta:
        if key not in INCREMENTAL_FIELDS:
            raise _extra_field(f"incremental_snapshot_metadata.{key}")
    previous = meta.get("previous_snapshot_identity")
    if not isinstance(previous, str) or not previous:
        raise RequestError("`incremental_snapshot_metadata.previous_snapshot_identity` must name the snapshot the "
                           "delta applies to")
    if meta.get("compression_format") not in COMPRESSION_FORMATS:
        raise RequestError(f"`incremental_snapshot_metadata.compression_format` must be one of "
                           f"{sorted(COMPRESSION_FORMATS)}, got {meta.get('compression_format')!r}")
    if meta.get("checksum_format") not in CHECKSUM_FORMATS:
        raise RequestError(f"`incremental_snapshot_metadata.checksum_format` must be one of {sorted(CHECKSUM_FORMATS)}, "
                           f"got {meta.get('checksum_format')!r}")
    return identity, previous


def build_app(engine: Engine, batcher: Batcher, loader: HotLoader, api_key: str, model_name: str) -> Any:
    tokenizer = engine.tokenizer
    eos_id = getattr(engine.model.config, "eos_token_id", None)
    eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id

    async def json_body(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except ValueError:
            raise RequestError("the request body is not valid JSON") from None

    async def completions(request: Request) -> Response:
        try:
            body = await json_body(request)
            seqs, options = parse_completion(body, tokenizer, eos_id, engine.max_positions)
        except RequestError as e:
            return _error(400, str(e))
        start = time.perf_counter()
        crash_point("mid_rollout")
        await batcher.submit(seqs)
        choices = [_choice(i, s, tokenizer, options["logprobs"]) for i, s in enumerate(seqs)]
        usage = {"prompt_tokens": len(seqs[0].prompt), "completion_tokens": sum(len(s.tokens) for s in seqs)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        reply = {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": "text_completion", "created": int(time.time()),
                 "model": body.get("model", model_name), "choices": choices, "usage": usage}
        if options["perf_metrics"]:
            # Keys as the Fireworks serving stack names them (the SDK's ServerMetrics reads these). The batch size
            # is the number of sequences decoded together: concurrent n=1 requests share one batch.
            reply["perf_metrics"] = {
                "num-concurrent-requests": seqs[0].batch_size, "prompt-tokens": usage["prompt_tokens"],
                "server-processing-time": round(time.perf_counter() - start, 6),
                "generation-queue-duration": round(seqs[0].queue_s, 6),
                "generation-duration": round(seqs[0].decode_s, 6)}
        if not options["stream"]:
            return JSONResponse(reply)
        # Decoding is done before the first event, so the whole event stream goes out as one body: the same bytes a
        # client parses, without a write (and a proxy hop) per event.
        return Response("".join(_sse(reply)), media_type="text/event-stream")

    async def hot_load(request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(loader.status())
        model = request.headers.get("fireworks-model")
        if model is not None and model != model_name:
            # The SDK sends the deployment's base model here (its error hint: "Verify ... the base model matches the
            # deployment"); the real service's exact rule is unknown, so this server insists on a match.
            return _error(400, f"fireworks-model {model!r} does not match this deployment's base model {model_name!r}")
        try:
            identity, previous = parse_hot_load(await json_body(request))
            done = loader.start(identity, previous, request.headers.get(SNAPSHOT_ROOT_HEADER))
        except RequestError as e:
            return _error(400, str(e))
        try:  # see HOT_LOAD_POST_WAIT_S: answer when loaded; a failed load reports through GET (stage "error")
            await asyncio.wait_for(asyncio.wrap_future(done), HOT_LOAD_POST_WAIT_S)
        except asyncio.TimeoutError:
            pass
        return JSONResponse(loader.status())

    async def reset(request: Request) -> Response:
        await asyncio.to_thread(loader.reset)
        return JSONResponse(loader.status())

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    routes = [Route("/inference/v1/completions", completions, methods=["POST"]),
              Route("/hot_load/v1/models/hot_load", hot_load, methods=["GET", "POST"]),
              Route("/internal/reset", reset, methods=["POST"]),  # the control plane's; not routed to clients
              Route("/healthz", healthz, methods=["GET"])]
    return KeyAuthMiddleware(Starlette(routes=routes), api_key)


def _sse(reply: dict[str, Any]):
    """One event per token (its logprob entry), then the finish event with the text, raw_output, usage and perf
    metrics, then [DONE]. Events of choice i carry `index: i`; clients that send n=1 read `choices[0]`."""
    for choice in reply["choices"]:
        content = (choice.get("logprobs") or {}).get("content", [])
        for entry in content:
            yield _event(reply, {"index": choice["index"], "text": "", "logprobs": {"content": [entry]},
                                 "finish_reason": None})
        last = {"index": choice["index"], "text": choice["text"], "logprobs": {"content": []},
                "finish_reason": choice["finish_reason"], "raw_output": choice["raw_output"]}
        yield _event(reply, last, usage=reply["usage"])
    yield "data: [DONE]\n\n"


def _event(reply: dict[str, Any], choice: dict[str, Any], usage: dict | None = None) -> str:
    ev = {"id": reply["id"], "object": "text_completion", "created": reply["created"], "model": reply["model"],
          "choices": [choice]}
    if usage:
        ev["usage"] = usage
        if "perf_metrics" in reply:
            ev["perf_metrics"] = reply["perf_metrics"]
    return f"data: {json.dumps(ev)}\n\n"


def warm_imports() -> None:
    """What a spare deployment imports before it is assigned: torch and the transformers model classes."""
    import torch  # noqa: F401
    from transformers import Qwen3ForCausalLM  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file")
    p.add_argument("--api-key", help="per-run key; default: $COOKBOOK_PLATFORM_KEY (keeps it out of `ps`)")
    p.add_argument("--base-model", required=True, help="the deployment's base model, as clients name it")
    p.add_argument("--model-source", help="what to load for --base-model (an alias target); default: itself")
    p.add_argument("--snapshot-root")
    p.add_argument("--parent-pid", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--max-batch", type=int, default=64, help="sequences decoded at once (KV-cache slots)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv if argv is not None else spare_argv(warm_imports))
    api_key = args.api_key or os.environ.get("COOKBOOK_PLATFORM_KEY")
    if not api_key:
        p.error("no API key (--api-key or COOKBOOK_PLATFORM_KEY)")

    from cookbook.local.procs import start_parent_watchdog
    start_parent_watchdog(args.parent_pid)  # also while the model loads, before serve() starts
    import torch

    from cookbook.models import load_model, load_tokenizer, register_alias
    if args.model_source:
        register_alias(args.base_model, args.model_source)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = load_model(args.base_model, seed=args.seed).to(device).eval()
    engine = Engine(model, load_tokenizer(args.base_model), device, slots=args.max_batch)
    batcher = Batcher(engine)
    app = build_app(engine, batcher, HotLoader(engine, batcher, args.snapshot_root, args.base_model, args.seed),
                    api_key, args.base_model)
    serve(app, args.port, args.port_file, args.parent_pid)


if __name__ == "__main__":
    main()
