"""Shared pieces for tests that run against the embedded platform (real servers on loopback, no mocks)."""

from __future__ import annotations

import os
from pathlib import Path

import tinker

from cookbook.config import DeployConfig, InfraConfig, RunConfig, SFTConfig
from cookbook.local.procs import pid_alive

os.environ.setdefault("TINKER_TELEMETRY", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "local-micro"
SHAPE = f"accounts/local/trainingShapes/{MODEL}"
REF_SHAPE = f"{SHAPE}-forward"  # the forward-only reference shape


def run_config(log_path: str | Path, deployment_id: str | None = None, ref_shape: str | None = None) -> RunConfig:
    return RunConfig(infra=InfraConfig(training_shape_id=SHAPE, ref_training_shape_id=ref_shape, trainer_timeout_s=120,
                                       trainer_pending_timeout_s=60),
                     deploy=DeployConfig(deployment_id=deployment_id, deployment_timeout_s=120),
                     recipe=SFTConfig(), base_model=MODEL, log_path=str(log_path))


def datum(tokens: list[int], weights: list[float] | None = None) -> tinker.Datum:
    """A pre-shifted datum: input tokens[:-1] predict tokens[1:]."""
    inputs, targets = tokens[:-1], tokens[1:]
    weights = weights if weights is not None else [1.0] * len(targets)
    return tinker.Datum(model_input=tinker.ModelInput.from_ints(inputs),
                        loss_fn_inputs={"target_tokens": tinker.TensorData(data=targets, dtype="int64",
                                                                          shape=[len(targets)]),
                                        "weights": tinker.TensorData(data=weights, dtype="float32",
                                                                    shape=[len(weights)])})


def completion_datum(prompt: list[int], completion: list[int]) -> tinker.Datum:
    """Loss only on the completion tokens, so `forward` logprobs at those positions are the completion's."""
    tokens = prompt + completion
    return datum(tokens, [0.0] * (len(prompt) - 1) + [1.0] * len(completion))


def trainer_completion_logprobs(client, prompt: list[int], completion: list[int]) -> list[float]:
    out = client.forward([completion_datum(prompt, completion)], "cross_entropy")
    lps = out.loss_fn_outputs[0]["logprobs"].data
    return list(lps[len(prompt) - 1:])


def max_abs_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b))


def find_pids(marker: str) -> list[int]:
    """Live pids whose command line contains `marker` (scans /proc; no psutil)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and pid_alive(int(entry)):
            out.append(int(entry))
    return out
