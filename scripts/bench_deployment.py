"""Benchmark the local deployment against plain baselines, side by side in one run.

    python scripts/bench_deployment.py [--model local-small] [--batch 16] [--new-tokens 64] [--repeats 3]

1. Sampling: deployment tokens/s (B concurrent requests over HTTP, the rollout path) ÷ HF `generate` with KV cache
   (same model, batch, prompt length and number of new tokens, in this process). Goal >= 1.0.
   Mixed: 64 concurrent requests of mixed prompt (8-64) and completion (8-128) lengths ÷ HF `generate` on the same
   64 prompts in left-padded batches of 16, each batch decoding to its longest completion; both count only the
   tokens each request asked for. Goal >= 1.5.
2. Weight sync: `WeightSyncer.save_and_hotload` (trainer save -> hot load -> deployment serves it) ÷ a raw
   `safetensors` save + load of the same weights. Goal <= 1.5. Base and delta syncs are reported separately.
Ratios are what matter: absolute numbers depend on what else the machine is doing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TINKER_TELEMETRY", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bench_hf_generate(model_name: str, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> float:
    import torch

    from cookbook.models import load_model
    model = load_model(model_name)
    ids = torch.randint(0, 250, (batch, prompt_len))
    mask = torch.ones_like(ids)

    def run():
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, use_cache=True, pad_token_id=model.config.pad_token_id)

    run()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return batch * new_tokens / statistics.median(times)


def mixed_requests(n: int = 64, seed: int = 0) -> list[tuple[list[int], int]]:
    import random

    rng = random.Random(seed)
    return [([rng.randrange(250) for _ in range(rng.randint(8, 64))], rng.randint(8, 128)) for _ in range(n)]


def bench_hf_mixed(model_name: str, requests, batch: int = 16) -> float:
    import torch

    from cookbook.models import load_model
    model = load_model(model_name)
    pad = model.config.pad_token_id
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(requests), batch):
            group = requests[i:i + batch]
            width = max(len(p) for p, _ in group)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in group])
            longest = max(n for _, n in group)
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=longest,
                           min_new_tokens=longest, use_cache=True, pad_token_id=pad)
    return sum(n for _, n in requests) / (time.perf_counter() - start)


def bench_deployment_mixed(sampler, requests) -> float:
    import asyncio

    async def one(prompt, n):
        [c] = await sampler.sample_with_prompt_tokens(prompt, n=1, max_tokens=n, temperature=1.0, ignore_eos=True)
        return c.completion_len

    async def gather():
        return sum(await asyncio.gather(*(one(p, n) for p, n in requests)))

    start = time.perf_counter()
    got = asyncio.run(gather())
    assert got == sum(n for _, n in requests), got
    return got / (time.perf_counter() - start)


def bench_deployment(sampler, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> float:
    """`batch` concurrent completions through the SDK's DeploymentSampler (the rollout path), EOS ignored so every
    completion has exactly `new_tokens` tokens."""
    import asyncio
    import random

    prompts = [[random.randrange(250) for _ in range(prompt_len)] for _ in range(batch)]

    async def one(p):
        [c] = await sampler.sample_with_prompt_tokens(p, n=1, max_tokens=new_tokens, temperature=1.0,
                                                      ignore_eos=True)
        return c.completion_len

    async def gather():
        return sum(await asyncio.gather(*(one(p) for p in prompts)))

    def run():
        return asyncio.run(gather())

    run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        n = run()
        times.append(time.perf_counter() - t)
        assert n == batch * new_tokens, n
    return batch * new_tokens / statistics.median(times)


def bench_raw_safetensors(model_name: str, repeats: int) -> float:
    from safetensors.torch import load_file, save_file

    from cookbook.models import load_model
    from cookbook.local.snapshots import canonical_state
    state = {k: v.contiguous() for k, v in canonical_state(load_model(model_name)).items()}
    times = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(repeats):
            t = time.perf_counter()
            save_file(state, f"{d}/m{i}.safetensors")
            load_file(f"{d}/m{i}.safetensors")
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="local-small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads on both sides (the deployment gets it through COOKBOOK_TORCH_THREADS)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)  # a fair comparison: HF generate here, the deployment process there
    os.environ["COOKBOOK_TORCH_THREADS"] = str(args.threads)

    import contextlib

    import tinker
    from fireworks.training.sdk import DeploymentSampler, FixedConcurrencyController

    from cookbook.config import DeployConfig, InfraConfig, RunConfig, SFTConfig
    from cookbook.local.platform import LocalPlatform
    from cookbook.client.session import build_session

    cfg = RunConfig(infra=InfraConfig(training_shape_id=f"accounts/local/trainingShapes/{args.model}",
                                      trainer_timeout_s=300), deploy=DeployConfig(deployment_id="bench"),
                    recipe=SFTConfig(), base_model=args.model)
    with tempfile.TemporaryDirectory() as root, LocalPlatform(root) as p, contextlib.ExitStack() as stack:
        cfg.log_path = root
        session = build_session(cfg, p.base_url, p.api_key, needs_reference=False, needs_deployment=True,
                                stack=stack, log=lambda _: None, poll_interval_s=0.02, warm_up_after_sync=False)
        client, syncer = session.policy, session.weight_syncer
        sampler = DeploymentSampler(inference_url=p.base_url, model="accounts/local/deployments/bench",
                                    api_key=p.api_key, concurrency_controller=FixedConcurrencyController(args.batch))

        # Interleaved rounds, so a busy neighbour slows both sides alike; the ratio is the median of per-round ratios.
        rounds = [(bench_deployment(sampler, args.batch, args.prompt_len, args.new_tokens, 1),
                   bench_hf_generate(args.model, args.batch, args.prompt_len, args.new_tokens, 1))
                  for _ in range(args.repeats)]
        dep_tps = statistics.median(d for d, _ in rounds)
        hf_tps = statistics.median(h for _, h in rounds)
        sample_ratio = statistics.median(d / h for d, h in rounds)
        mixed = mixed_requests()
        mixed_sampler = DeploymentSampler(inference_url=p.base_url, model="accounts/local/deployments/bench",
                                          api_key=p.api_key, concurrency_controller=FixedConcurrencyController(64))
        bench_deployment_mixed(mixed_sampler, mixed[:16])  # warm-up
        mixed_rounds = [(bench_deployment_mixed(mixed_sampler, mixed), bench_hf_mixed(args.model, mixed))
                        for _ in range(args.repeats)]

        data = [tinker.Datum(model_input=tinker.ModelInput.from_ints(list(range(1, 33))),
                             loss_fn_inputs={"target_tokens": tinker.TensorData(data=list(range(2, 34)), dtype="int64",
                                                                                shape=[32])})]
        timings: dict[str, list[tuple[float, float]]] = {"base": [], "delta": []}
        for i in range(args.repeats + 1):
            for ctype in ("base", "delta"):
                client.forward_backward(data, "cross_entropy")
                client.optim_step(tinker.AdamParams(learning_rate=1e-3))
                t0 = time.perf_counter()
                identity = syncer.save_only(f"{ctype}{i}", ctype)  # trainer export
                t1 = time.perf_counter()
                syncer.hotload(identity, ctype)  # deployment load + wait until it serves it
                timings[ctype].append((t1 - t0, time.perf_counter() - t1))
        med = {k: (statistics.median(a for a, _ in v[1:]), statistics.median(b for _, b in v[1:]))
               for k, v in timings.items()}  # the first round is warm-up
        base_s, delta_s = sum(med["base"]), sum(med["delta"])
        raw_s = bench_raw_safetensors(args.model, args.repeats + 2)

    print(f"model {args.model}, batch {args.batch}, prompt {args.prompt_len}, new tokens {args.new_tokens}")
    print(f"sampling   deployment {dep_tps:8.0f} tok/s   HF generate {hf_tps:8.0f} tok/s   "
          f"ratio {sample_ratio:5.2f} (goal >= 1.0)")
    print(f"mixed 64   deployment {statistics.median(d for d, _ in mixed_rounds):8.0f} tok/s   HF generate "
          f"{statistics.median(h for _, h in mixed_rounds):8.0f} tok/s   ratio "
          f"{statistics.median(d / h for d, h in mixed_rounds):5.2f} (goal >= 1.5; HF in padded batches of 16)")
    print(f"weight sync base {base_s * 1e3:7.1f} ms  delta {delta_s * 1e3:7.1f} ms   raw safetensors save+load "
          f"{raw_s * 1e3:7.1f} ms   ratio base {base_s / raw_s:5.2f}  delta {delta_s / raw_s:5.2f} (goal <= 1.5)")
    for k, (save, load) in med.items():
        print(f"  {k:5}: trainer save {save * 1e3:7.1f} ms, hot load + wait {load * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
