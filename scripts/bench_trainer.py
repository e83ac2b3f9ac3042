"""Trainer-service overhead, measured side by side in one run (not a test; numbers depend on the machine).

Prints, for local-tiny and local-small (batch 8 x 256 tokens):
  - forward_backward throughput through the tinker SDK / a plain torch loop on the same model and batch (goal >= 0.9)
  - a default SFT step (a batch of 64 bundled rows: forward_backward + optim_step sent together and the next step's
    pair sent before this one's results are read, as the recipe does) against the same step in plain torch (forward,
    backward, AdamW): the share of the step spent outside compute (serialization, HTTP, the SDK; goal <= 10 % at
    local-tiny)
  - forward_backward_custom step time / built-in cross_entropy step time (goal <= 1.1)
  - delta sampler snapshot size / base snapshot size after one optimizer step (a fresh optimizer) at GRPO's default
    learning rate, in the compact `diff` encoding (what a delta is for when its bytes travel; goal <= 0.5), and
    after a second step
Measurements alternate between the compared variants and report medians, because neighbours on a shared machine
make absolute timings noisy.

The trainer is started the way a local run starts it: the embedded platform (`LocalPlatform`) plus `build_session`
(a policy trainer job, no deployment, no reference), so the SDK calls take a real run's path through the platform's
gateway. The trainer gets as many torch threads as this process (COOKBOOK_TORCH_THREADS).

    python scripts/bench_trainer.py [--reps 5] [--models local-tiny local-small]

With both cores computing, the SFT step's "outside compute" share is mostly the CPU the driver (the SDK's own work),
the gateway and the trainer's server thread spend a step (printed) taking cores its two torch threads need; with
`OMP_NUM_THREADS=1 python scripts/bench_trainer.py` a core is left for them and the share is what serialization, HTTP
and the SDK add to the step's wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TINKER_TELEMETRY", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tinker import types  # noqa: E402

from cookbook import models  # noqa: E402
from cookbook.client.session import build_session  # noqa: E402
from cookbook.config import InfraConfig, RunConfig, SFTConfig  # noqa: E402
from cookbook.local.platform import LocalPlatform  # noqa: E402

BATCH, LENGTH = 8, 256
SFT_STEPS = 5  # SFT steps per timing through the SDK (steps overlap as in the recipe)
POLL_INTERVAL_S = 0.05


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(0, 256, (BATCH, LENGTH + 1), generator=g)
    return seqs


def torch_step(model, seqs):
    logits = model(input_ids=seqs[:, :-1]).logits
    lp = -torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1),
                                            reduction="none")
    (-lp.sum()).backward()
    model.zero_grad(set_to_none=True)


def sft_batch(tokenizer) -> list:
    from cookbook.datasets.load import load_dataset

    data = load_dataset("bundled:sft_arith_train", "sft", tokenizer, 10**6)
    return [data.items[i] for i in range(64)]


def torch_sft_step(model, optimizer, datums):
    """What the trainer computes for one SFT step: weighted CE over the right-padded batch, backward, AdamW."""
    width = max(d.model_input.length for d in datums)
    ids = torch.zeros(len(datums), width, dtype=torch.long)
    tgt = torch.zeros(len(datums), width, dtype=torch.long)
    w = torch.zeros(len(datums), width)
    for i, d in enumerate(datums):
        n = d.model_input.length
        ids[i, :n] = torch.tensor(d.model_input.to_ints())
        tgt[i, :n] = d.loss_fn_inputs["target_tokens"].to_torch()
        w[i, :n] = d.loss_fn_inputs["weights"].to_torch()
    logits = model(input_ids=ids, use_cache=False).logits.float()
    lp = -torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
    (-(lp * w.reshape(-1)).sum() / w.sum()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cpu_s(pid: int, tid: int | None = None) -> float:
    """CPU seconds (user + system) process `pid` has used so far: all its threads, or only thread `tid`."""
    stat = Path(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def dir_bytes(path: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in path.glob(pattern))


@contextlib.contextmanager
def start_trainer(name: str):
    """The embedded platform and one policy trainer job on `name`'s training shape, both stopped on exit (however it
    exits). Yields the SDK's training client, the job's store directory, and the pids of the gateway (the control
    plane) and the trainer."""
    cfg = RunConfig(infra=InfraConfig(training_shape_id=f"accounts/local/trainingShapes/{name}",
                                      trainer_timeout_s=300), recipe=SFTConfig(), base_model=name)
    with tempfile.TemporaryDirectory() as root, LocalPlatform(root) as platform, contextlib.ExitStack() as stack:
        session = build_session(cfg, platform.base_url, platform.api_key, needs_reference=False,
                                needs_deployment=False, stack=stack, log=lambda _: None,
                                poll_interval_s=POLL_INTERVAL_S)
        [trainer_pid] = child_pids(platform.proc.pid)
        yield session.policy.inner, platform.jobs_root / session.job_id, (platform.proc.pid, trainer_pid)


def bench(name: str, reps: int) -> dict[str, float]:
    seqs = batch()
    data = [types.Datum(model_input=types.ModelInput.from_ints(s[:-1].tolist()),
                        loss_fn_inputs={"target_tokens": s[1:].tolist()}) for s in seqs]
    model = models.load_model(name, seed=0)
    with start_trainer(name) as (tc, store, (gateway_pid, trainer_pid)):
        custom = lambda d, lps: (-sum(lp.sum() for lp in lps), {})  # noqa: E731
        sdk_fb = lambda: tc.forward_backward(data, "cross_entropy").result()  # noqa: E731
        sdk_custom = lambda: tc.forward_backward_custom(data, custom).result()  # noqa: E731
        for fn in (sdk_fb, sdk_custom, lambda: torch_step(model, seqs)):  # warm-up
            fn()
        t_torch, t_sdk, t_custom = [], [], []
        for _ in range(reps):
            t_torch.append(timed(lambda: torch_step(model, seqs)))
            t_sdk.append(timed(sdk_fb))
            t_custom.append(timed(sdk_custom))
        tc.optim_step(types.AdamParams(learning_rate=0)).result()  # drop the accumulated grads
        rows = sft_batch(models.load_tokenizer(name))
        adam = types.AdamParams(learning_rate=1e-5, grad_clip_norm=1.0)

        def sdk_sft_step():
            """SFT_STEPS steps as the recipe sends them: each step's forward_backward + optim_step together, the next
            step's pair sent before this step's results are read. Returns nothing; timed per step by the caller."""
            in_flight = [(tc.forward_backward(rows, "cross_entropy"), tc.optim_step(adam))]
            for i in range(SFT_STEPS):
                if i + 1 < SFT_STEPS:
                    in_flight.append((tc.forward_backward(rows, "cross_entropy"), tc.optim_step(adam)))
                fb, step = in_flight.pop(0)
                fb.result(), step.result()

        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-12, foreach=False)
        t_sft_sdk, t_sft_torch, cpu_sdk = [], [], []
        for rep in range(reps + 1):  # the first of each is a warm-up
            # CPU outside the compute: the driver (the SDK), the gateway, the trainer's server thread (its main
            # thread: HTTP and JSON; the model runs on a worker thread)
            before = time.process_time(), cpu_s(gateway_pid), cpu_s(trainer_pid, trainer_pid)
            t_sft_sdk.append(timed(sdk_sft_step) / SFT_STEPS)
            after = time.process_time(), cpu_s(gateway_pid), cpu_s(trainer_pid, trainer_pid)
            cpu_sdk.append([(b - a) / SFT_STEPS for a, b in zip(before, after)])
            t_sft_torch.append(timed(lambda: torch_sft_step(model, optimizer, rows)))
        t_sft_sdk, t_sft_torch, cpu_sdk = t_sft_sdk[1:], t_sft_torch[1:], cpu_sdk[1:]
        # A fresh optimizer (a weights-only load drops the Adam state), a base, one step at GRPO's learning rate and
        # Adam settings, a delta; then one more step (the update now has Adam history), another delta.
        tc.save_state("fresh").result()
        tc.load_state("fresh").result()
        base = tc.save_weights_for_sampler_ext("b", "base")
        deltas = []
        for i in range(2):
            tc.forward_backward(data, "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=3e-4, beta1=0.9, beta2=0.95, eps=1e-12)).result()
            deltas.append(tc.save_weights_for_sampler_ext(f"d{i}", "delta"))
        base_size = dir_bytes(store / "sampler" / base.snapshot_name, "*.safetensors")
        delta_size, later_size = (dir_bytes(store / "sampler" / d.snapshot_name, "delta.bin") for d in deltas)
    med = statistics.median
    driver, gateway, server = (med(c[i] for c in cpu_sdk) for i in range(3))
    return {"torch_s": med(t_torch), "sdk_s": med(t_sdk), "custom_s": med(t_custom),
            "throughput_ratio": med(t_torch) / med(t_sdk), "custom_ratio": med(t_custom) / med(t_sdk),
            "delta_ratio": delta_size / base_size, "base_bytes": base_size, "delta_bytes": delta_size,
            "later_delta_ratio": later_size / base_size,
            "sft_sdk_s": med(t_sft_sdk), "sft_torch_s": med(t_sft_torch),
            "sft_overhead": 1 - med(t_sft_torch) / med(t_sft_sdk),
            "sft_driver_cpu_s": driver, "sft_gateway_cpu_s": gateway, "sft_server_cpu_s": server}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--models", nargs="+", default=["local-tiny", "local-small"])
    args = p.parse_args()
    # The trainer computes with as many torch threads as this process (torch's default, as printed below); the
    # platform's default is 1 per trainer, so say it explicitly. The platform's children inherit this environment.
    os.environ["COOKBOOK_TORCH_THREADS"] = str(torch.get_num_threads())
    os.environ["COOKBOOK_DELTA_ENCODING"] = "diff"  # the trainer's compact delta (locally it writes `copy`)
    print(f"batch {BATCH} x {LENGTH} tokens, {torch.get_num_threads()} torch threads, median of {args.reps}")
    for name in args.models:
        r = bench(name, args.reps)
        print(f"{name}: fwd_bwd torch {r['torch_s'] * 1e3:.0f} ms, SDK {r['sdk_s'] * 1e3:.0f} ms "
              f"-> SDK/torch throughput {r['throughput_ratio']:.2f} (goal >= 0.9); "
              f"custom {r['custom_s'] * 1e3:.0f} ms -> custom/CE time {r['custom_ratio']:.2f} (goal <= 1.1); "
              f"delta/base size after one step {r['delta_ratio']:.2f} (goal <= 0.5; {r['delta_bytes']} / "
              f"{r['base_bytes']} bytes), after a second {r['later_delta_ratio']:.2f}; "
              f"SFT step SDK {r['sft_sdk_s'] * 1e3:.0f} ms, torch {r['sft_torch_s'] * 1e3:.0f} ms -> outside compute "
              f"{r['sft_overhead']:.0%} of the step (goal <= 10 % at local-tiny); CPU a step outside compute: "
              f"driver (SDK) {r['sft_driver_cpu_s'] * 1e3:.1f} ms, gateway {r['sft_gateway_cpu_s'] * 1e3:.1f} ms, "
              f"trainer's server thread {r['sft_server_cpu_s'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
