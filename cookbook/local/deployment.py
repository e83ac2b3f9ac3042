"""The local inference server ("deployment"): completions over token ids, weights changed only by hot load.

    python -m cookbook.local.deployment --port-file F --api-key K --base-model local-tiny \
        [--snapshot-root DIR] [--parent-pid PID] [--device auto] [--max-batch 64]

It holds its own copy of the weights (loaded from the base model at start, snapshot identity null), so a weight-sync
bug shows up as different logprobs. A hot load reads `<snapshot-root>/<identity>/`; the control plane sends the
root of the trainer job the deployment is attached to in the `x-cookbook-snapshot-root` header.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cookbook.local.procs import SNAPSHOT_ROOT_HEADER, KeyAuthMiddleware, serve
from cookbook.local.sampling import Batcher, Engine, SeqRequest



def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": status, "message": message}}, status_code=status)


class HotLoader:
    """Background hot load: POST returns at once; GET reports `replicas[0]` as the Fireworks contract does."""

    def __init__(self, engine: Engine, default_root: str | None):
        self.engine = engine
        self.default_root = default_root
        self.current_identity: str | None = None
        self.stage = "idle"
        self.target: str | None = None
        self.message = ""
        self._lock = threading.Lock()  # one load at a time

    def status(self) -> dict[str, Any]:
        state = {"stage": self.stage, "target_snapshot_identity": self.target}
        if self.message:
            state["message"] = self.message
        return {"replicas": [{"current_snapshot_identity": self.current_identity, "readiness": self.stage != "loading",
                              "loading_state": state}]}

    def start(self, identity: str, previous: str | None, root: str | None) -> None:
        root = root or self.default_root
        if not root:
            raise ValueError("this deployment is not attached to a trainer job (no snapshot root)")
        self.stage, self.target, self.message = "loading", identity, ""
        threading.Thread(target=self._load, args=(identity, previous, Path(root) / identity), daemon=True).start()

    def _load(self, identity: str, previous: str | None, directory: Path) -> None:
        from cookbook.local.snapshots import apply_snapshot, canonical_state, load_state_into, read_manifest

        with self._lock:
            try:
                manifest = read_manifest(directory)
                if manifest["kind"] == "delta":
                    # Both the client's claim and the manifest must name what this replica holds.
                    if previous is not None and previous != self.current_identity:
                        raise ValueError(f"delta {identity!r} was sent for predecessor {previous!r}, but this "
                                         f"replica holds {self.current_identity!r}")
                state = {k: v.cpu() for k, v in canonical_state(self.engine.model).items()}
                new_state = apply_snapshot(directory, state, self.current_identity)  # outside the engine lock
                with self.engine.lock:  # swap between batches, never mid-decode
                    load_state_into(self.engine.model, new_state)
                    self.current_identity = identity
                self.stage = "done"
            except Exception as e:
                self.stage, self.message = "error", f"{type(e).__name__}: {e}"


def _choice(index: int, s: SeqRequest, tokenizer) -> dict[str, Any]:
    text = tokenizer.decode(s.tokens, skip_special_tokens=False)
    if s.stop_text_cut is not None:
        text = text[:s.stop_text_cut]
    ids, lps, slps = list(s.tokens), list(s.logprobs), list(s.sampling_logprobs)
    if s.echo:  # the whole prompt first; its first entry has no logprob, so it reports 0.0
        ids = s.prompt + ids
        plp = [0.0] + s.prompt_logprobs
        lps, slps = plp + lps, plp + slps
    content = [{"token_id": t, "logprob": lp, "sampling_logprob": sl} for t, lp, sl in zip(ids, lps, slps)]
    return {"index": index, "text": text, "finish_reason": s.finish_reason, "logprobs": {"content": content},
            "raw_output": {"completion_token_ids": ids, "prompt_token_ids": s.prompt}}


def _parse(body: dict[str, Any], tokenizer, eos_id: int | None) -> list[SeqRequest]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = tokenizer.encode(prompt, add_special_tokens=False)
    if not isinstance(prompt, list) or not prompt or not all(isinstance(t, int) for t in prompt):
        raise ValueError("`prompt` must be a non-empty list of token ids (or a string)")
    vocab = len(tokenizer)
    if any(t < 0 or t >= vocab for t in prompt):
        raise ValueError(f"prompt token ids must lie in [0, {vocab})")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, (str, int)) else list(stop)
    stop_ids = {t for t in stop if isinstance(t, int)} | set(body.get("stop_token_ids") or [])
    if eos_id is not None and not body.get("ignore_eos"):
        stop_ids.add(eos_id)
    n, max_tokens = int(body.get("n", 1)), int(body.get("max_tokens", 16))
    temperature, top_p, top_k = float(body.get("temperature", 1.0)), float(body.get("top_p", 1.0)), int(body.get("top_k") or 0)
    if n < 1 or max_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError("need n >= 1, max_tokens >= 0, temperature >= 0 and 0 < top_p <= 1")
    seed = body.get("seed")
    return [SeqRequest(prompt=list(prompt), max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                       stop_ids=frozenset(stop_ids), stop_strs=tuple(s for s in stop if isinstance(s, str)),
                       seed=None if seed is None else int(seed) + i, echo=bool(body.get("echo")))
            for i in range(n)]


def build_app(engine: Engine, batcher: Batcher, loader: HotLoader, api_key: str, model_name: str) -> Any:
    tokenizer = engine.tokenizer
    eos_id = getattr(engine.model.config, "eos_token_id", None)
    eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id

    async def completions(request: Request) -> Response:
        try:
            body = await request.json()
            seqs = _parse(body, tokenizer, eos_id)
        except (ValueError, TypeError, json.JSONDecodeError) as e:
            return _error(400, str(e))
        start = time.perf_counter()
        await batcher.submit(seqs)
        # Logprobs are always returned: they cost nothing extra here and rollouts always need them.
        choices = [_choice(i, s, tokenizer) for i, s in enumerate(seqs)]
        usage = {"prompt_tokens": len(seqs[0].prompt), "completion_tokens": sum(len(s.tokens) for s in seqs)}
        reply = {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": "text_completion", "model": body.get("model", model_name),
                 "choices": choices, "usage": usage}
        if body.get("perf_metrics_in_response"):
            reply["perf_metrics"] = {"server_time_s": time.perf_counter() - start}
        if not body.get("stream"):
            return JSONResponse(reply)
        return StreamingResponse(_sse(reply), media_type="text/event-stream")

    async def hot_load(request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(loader.status())
        try:
            body = await request.json()
            identity = body["identity"]
            meta = body.get("incremental_snapshot_metadata") or {}
            loader.start(identity, meta.get("previous_snapshot_identity"), request.headers.get(SNAPSHOT_ROOT_HEADER))
        except (ValueError, KeyError, TypeError) as e:
            return _error(400, f"bad hot load request: {e}")
        return JSONResponse({})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    routes = [Route("/inference/v1/completions", completions, methods=["POST"]),
              Route("/hot_load/v1/models/hot_load", hot_load, methods=["GET", "POST"]),
              Route("/healthz", healthz, methods=["GET"])]
    return KeyAuthMiddleware(Starlette(routes=routes), api_key)


def _sse(reply: dict[str, Any]):
    """One event per token (text delta + its logprob entry), then the finish event with raw_output, then [DONE].
    Events of choice i carry `index: i`; clients that send n=1 read `choices[0]`."""
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
    ev = {"id": reply["id"], "object": "text_completion", "model": reply["model"], "choices": [choice]}
    if usage:
        ev["usage"] = usage
        if "perf_metrics" in reply:
            ev["perf_metrics"] = reply["perf_metrics"]
    return f"data: {json.dumps(ev)}\n\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file")
    p.add_argument("--api-key", help="per-run key; default: $COOKBOOK_PLATFORM_KEY (keeps it out of `ps`)")
    p.add_argument("--base-model", required=True)
    p.add_argument("--snapshot-root")
    p.add_argument("--parent-pid", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    api_key = args.api_key or os.environ.get("COOKBOOK_PLATFORM_KEY")
    if not api_key:
        p.error("no API key (--api-key or COOKBOOK_PLATFORM_KEY)")

    from cookbook.local.procs import start_parent_watchdog
    start_parent_watchdog(args.parent_pid)  # also while the model loads, before serve() starts
    import torch

    from cookbook.local.models import load_model, load_tokenizer
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = load_model(args.base_model, seed=args.seed).to(device).eval()
    engine = Engine(model, load_tokenizer(args.base_model), device)
    app = build_app(engine, Batcher(engine, args.max_batch), HotLoader(engine, args.snapshot_root), api_key,
                    args.base_model)
    serve(app, args.port, args.port_file, args.parent_pid)


if __name__ == "__main__":
    main()
