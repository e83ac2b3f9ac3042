"""`python -m cookbook.local.trainer`: the embedded trainer service process.

Binds 127.0.0.1 only, requires the per-run key on every request (from $COOKBOOK_PLATFORM_KEY, which unlike argv
does not show in `ps`; `--api-key` for standalone use), and never outlives its parent: the kernel sends SIGTERM when
the parent dies (PR_SET_PDEATHSIG) and a watchdog also polls `--parent-pid`. With `--port 0` the chosen port is
written atomically to `--port-file` once the socket is listening (`cookbook.local.procs.serve`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cookbook.local.trainer", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file")
    p.add_argument("--api-key", help="per-run key; default: $COOKBOOK_PLATFORM_KEY")
    p.add_argument("--store", required=True, help="<jobs_root>/<job_id>")
    p.add_argument("--job-id", required=True)
    p.add_argument("--base-model", required=True, help="the job's base model, as clients name it")
    p.add_argument("--model-source", help="what to load for --base-model (a catalog alias target: an embedded "
                                          "model or a model directory); default: --base-model itself")
    p.add_argument("--forward-only", action="store_true",
                   help="a FORWARD_ONLY job: forward and state save/load only; training calls are rejected")
    p.add_argument("--max-context-length", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parent-pid", type=int)
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--delta-encoding", choices=("copy", "diff"), default=os.environ.get("COOKBOOK_DELTA_ENCODING", "copy"),
                   help="how delta sampler snapshots store changed tensors: copy (as they are; the deployment reads "
                        "them on this machine) or diff (compact, for bytes that travel); default "
                        "$COOKBOOK_DELTA_ENCODING or copy")
    p.add_argument("--comms", choices=("v1", "v2"), default=os.environ.get("COOKBOOK_TRAINER_COMMS", "v2"),
                   help="the request dialect a model's creation advertises to the Fireworks SDK: v2 (the SDK encodes "
                        "requests with orjson and validates results faster; the same JSON schema) or v1 (its legacy "
                        "path); default $COOKBOOK_TRAINER_COMMS or v2")
    return p.parse_args(argv)


def warm_imports() -> None:
    """What a spare trainer imports before it has a job: torch and the transformers model classes (~3.5 s)."""
    from transformers import Qwen3ForCausalLM  # noqa: F401

    from cookbook.local.trainer import app  # noqa: F401


def main(argv=None) -> int:
    from cookbook.local.procs import serve, set_pdeathsig, spare_argv

    args = parse_args(argv if argv is not None else spare_argv(warm_imports))

    set_pdeathsig()
    api_key = args.api_key or os.environ.get("COOKBOOK_PLATFORM_KEY")
    if not api_key:
        print("trainer: no API key (--api-key or COOKBOOK_PLATFORM_KEY)", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("the trainer service binds loopback only", file=sys.stderr)
        return 2
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format=f"%(asctime)s trainer[{args.job_id}] %(levelname)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from cookbook import models

    if args.model_source:
        models.register_alias(args.base_model, args.model_source)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from cookbook.local.trainer.app import TrainerService, build_app
    from cookbook.local.trainer.checkpoints import Store

    if not models.is_embedded(args.base_model) and not Path(models.resolve(args.base_model)).exists():
        logging.info("base model %s is not embedded or a local path; trying the Hugging Face hub", args.base_model)
    store = Store(args.store, args.job_id, delta_encoding=args.delta_encoding)
    store.root.mkdir(parents=True, exist_ok=True)
    svc = TrainerService(store=store, api_key=api_key, base_model=args.base_model, seed=args.seed,
                         max_context_length=args.max_context_length, forward_only=args.forward_only,
                         comms=args.comms)
    app = build_app(svc)

    logging.info("serving %s%s (store %s)%s", args.base_model,
                 "" if models.resolve(args.base_model) == args.base_model else f" = {models.resolve(args.base_model)}",
                 store.root, " forward-only" if args.forward_only else "")
    try:
        serve(app, args.port, args.port_file, args.parent_pid)
    except KeyboardInterrupt:
        pass
    svc.executor.shutdown(wait=False, cancel_futures=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
