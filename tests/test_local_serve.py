"""`python -m cookbook.local serve` driven by the official Fireworks training SDK, as its README shows it.

One serve process (with a catalog file that makes it answer like Fireworks for a Fireworks shape and model name)
serves the whole module; the last test stops it with SIGINT and checks that it exits 0 and leaves no process behind.
Everything runs on `local-micro`, the unit-test model.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.platform_harness import find_pids
from tests.conftest import REPO

MODEL = "local-micro"
SHAPE = f"accounts/local/trainingShapes/{MODEL}"
FW_SHAPE = "accounts/fireworks/trainingShapes/qwen3-8b-128k-h200"
FW_DEPLOYMENT_SHAPE = "accounts/fireworks/deploymentShapes/qwen3-8b-128k-h200/versions/3"
FW_MODEL = "accounts/fireworks/models/qwen3-8b"
CATALOG = {
    "trainingShapes": [
        {"name": FW_SHAPE, "version": "7", "baseModel": FW_MODEL, "trainerMode": "FULL_PARAMETER_TRAINER",
         "maxSupportedContextLength": 131072, "deploymentShapeVersion": FW_DEPLOYMENT_SHAPE,
         "acceleratorType": "NVIDIA_H200_141GB", "acceleratorCount": 8, "nodeCount": 1,
         "baseModelWeightPrecision": "bfloat16"},
        {"name": FW_SHAPE + "-forward", "version": "2", "baseModel": FW_MODEL, "trainerMode": "FORWARD_ONLY",
         "maxSupportedContextLength": 131072, "acceleratorType": "NVIDIA_H200_141GB", "acceleratorCount": 8},
    ],
    "deploymentShapes": [{"name": FW_DEPLOYMENT_SHAPE.split("/versions/")[0], "version": "3", "baseModel": FW_MODEL,
                          "acceleratorType": "NVIDIA_H200_141GB", "acceleratorCount": 8}],
    "modelAliases": {FW_MODEL: MODEL},
}
POLL = dict(poll_interval_s=0.2)


@dataclass
class Served:
    proc: subprocess.Popen
    root: Path
    base_url: str
    api_key: str
    lines: list[str]


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _wait_gone(marker: str, timeout_s: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := find_pids(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-root")
    catalog = root.parent / f"{root.name}-catalog.json"
    catalog.write_text(json.dumps(CATALOG))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "cookbook.local", "serve", "--root", str(root),
                             "--catalog", str(catalog)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    got: queue.Queue = queue.Queue()

    def read() -> None:  # drain stdout for the whole run so the pipe never blocks the server
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            got.put(line.rstrip("\n"))
        got.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        env_lines = []
        deadline = time.monotonic() + 60
        while len(env_lines) < 2:
            line = got.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "serve exited before printing its settings:\n" + "\n".join(lines)
            env_lines.append(line)
        assert env_lines[0].startswith("FIREWORKS_BASE_URL=http://127.0.0.1:"), env_lines
        assert env_lines[1].startswith("FIREWORKS_API_KEY=fw_local_"), env_lines
        yield Served(proc, root, env_lines[0].split("=", 1)[1], env_lines[1].split("=", 1)[1], lines)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in _wait_gone(str(root), 10):  # never leave a child behind, even when a test failed
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def sdk(served):
    from fireworks.training.sdk import DeploymentManager, TrainerJobManager

    trainer_mgr = TrainerJobManager(api_key=served.api_key, base_url=served.base_url)
    deploy_mgr = DeploymentManager(api_key=served.api_key, base_url=served.base_url)
    yield trainer_mgr, deploy_mgr
    trainer_mgr.close()
    deploy_mgr.close()


def _datum(tokens: list[int], weights: list[float] | None = None):
    from tinker import types

    targets = tokens[1:]
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": targets, "weights": weights or [1.0] * len(targets)})


def _trainer_logprobs(client, prompt: list[int], completion: list[int]) -> list[float]:
    """The trainer's `forward` logprobs of `completion` after `prompt` (the same weights a sampler should serve)."""
    out = client.forward([_datum(prompt + completion)], "cross_entropy").result()
    lps = out.loss_fn_outputs[0]["logprobs"]
    lps = lps.data if hasattr(lps, "data") else lps
    return [float(x) for x in lps[len(prompt) - 1:]]


def _sample(served, deploy_mgr, dep_id: str, prompt: list[int], n: int, **kwargs):
    from fireworks.training.sdk import DeploymentSampler

    from cookbook.models import build_tokenizer

    sampler = DeploymentSampler(inference_url=deploy_mgr.inference_url, api_key=served.api_key,
                                model=f"accounts/{deploy_mgr.account_id}/deployments/{dep_id}",
                                tokenizer=build_tokenizer())
    try:
        return asyncio.run(sampler.sample_with_prompt_tokens(prompt, n=n, **kwargs))
    finally:
        sampler.close()


def test_sdk_lifecycle_as_the_readme_shows(served, sdk):
    from fireworks.training.sdk import DeploymentConfig, FiretitanServiceClient, TrainerJobConfig, WeightSyncer
    from tinker import types

    from cookbook.models import build_tokenizer

    trainer_mgr, deploy_mgr = sdk
    assert trainer_mgr.account_id == "local"
    profile = trainer_mgr.resolve_training_profile(SHAPE)
    assert profile.training_shape == SHAPE and profile.trainer_mode == "FULL_PARAMETER_TRAINER"
    assert profile.deployment_shape == f"accounts/local/deploymentShapes/{MODEL}/versions/1"
    assert profile.max_supported_context_length == 512

    job_id, dep_id = _uid("sdk-life"), _uid("sdk-life")
    endpoint = trainer_mgr.create_and_wait(
        TrainerJobConfig(base_model=MODEL, lora_rank=0, learning_rate=1e-2, training_shape_ref=profile.training_shape,
                         display_name="sdk lifecycle", requested_job_id=job_id), timeout_s=120, **POLL)
    assert endpoint.job_id == job_id and endpoint.max_context_length == 512
    assert endpoint.base_url == f"{served.base_url}/training/v1/rlorTrainerJobs/local/{job_id}"
    deploy = deploy_mgr.create_or_get(DeploymentConfig.from_training_profile(
        deployment_id=dep_id, base_model=MODEL, profile=profile, hot_load_trainer_job=endpoint.job_name))
    assert deploy.deployment_shape_version == profile.deployment_shape
    assert deploy_mgr.wait_for_ready(dep_id, timeout_s=120, **POLL).state == "READY"

    service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=served.api_key)
    policy = service.create_training_client(base_model=MODEL, lora_rank=0)
    batch = [_datum([10, 20, 30, 40, 50, 60, 70]), _datum([5, 6, 7, 8, 9], [0, 0, 1, 1])]

    def train_step() -> float:
        loss = policy.forward_backward(batch, "cross_entropy").result().metrics["loss:sum"]
        policy.optim_step(types.AdamParams(learning_rate=1e-2), grad_accumulation_normalization="num_loss_tokens"
                          ).result()
        return loss

    first = train_step()
    syncer = WeightSyncer(policy_client=policy, deploy_mgr=deploy_mgr, deployment_id=dep_id, base_model=MODEL)
    step1 = syncer.save_and_hotload("step-1")  # a base snapshot
    assert train_step() < first
    step2 = syncer.save_and_hotload("step-2")  # a delta against step-1
    replica = deploy_mgr.hotload_check_status(dep_id, MODEL)["replicas"][0]
    assert replica["current_snapshot_identity"] == step2 and replica["readiness"]

    tokenizer = build_tokenizer()
    prompt = tokenizer.encode("12+34=", add_special_tokens=False)
    completions = _sample(served, deploy_mgr, dep_id, prompt, n=4, max_tokens=12, temperature=1.0,
                          stop=[tokenizer.eos_token_id], logprobs=True)
    assert len(completions) == 4
    sample = max(completions, key=lambda c: c.completion_len)
    assert sample.completion_len >= 1 and sample.full_tokens[:len(prompt)] == prompt
    tokens = sample.full_tokens[len(prompt):]
    assert sample.sampling_logprobs is not None and len(sample.inference_logprobs) == len(tokens)
    # The deployment serves exactly the synced (base + delta) weights: its logprobs are the trainer's.
    trainer_lps = _trainer_logprobs(policy, prompt, tokens)
    assert max(abs(a - b) for a, b in zip(sample.inference_logprobs, trainer_lps)) <= 1e-4

    rows = trainer_mgr.list_checkpoints(job_id)
    by_name = {r["name"].rsplit("/", 1)[-1]: r for r in rows}
    assert by_name[step1]["promotable"] and not by_name[step2]["promotable"]
    assert [r["name"] for r in rows[:1]] == [by_name[step1]["name"]]  # oldest first
    pages, token = [], None
    with httpx.Client(base_url=served.base_url, headers={"X-Api-Key": served.api_key}) as http:
        while True:  # one row per page: every row once, in order, then no token
            page = http.get(f"/v1/accounts/local/rlorTrainerJobs/{job_id}/checkpoints",
                            params={"pageSize": 1, **({"pageToken": token} if token else {})}).json()
            pages.append([r["name"] for r in page["checkpoints"]])
            if not (token := page.get("nextPageToken")):
                break
    assert pages == [[r["name"]] for r in rows]
    model = trainer_mgr.promote_checkpoint(name=by_name[step1]["name"], output_model_id=_uid("sdk-life"),
                                           base_model=MODEL)
    assert model["state"] == "READY" and model["name"].startswith("accounts/local/models/sdk-life-")
    assert (Path(model["localPath"]) / "config.json").is_file()

    trainer_mgr.delete(job_id)
    assert trainer_mgr.get(job_id)["state"] == "JOB_STATE_DELETED"  # a tombstone: checkpoints stay listable
    assert trainer_mgr.list_checkpoints(job_id)
    deploy_mgr.scale_to_zero(dep_id)
    assert deploy_mgr._get_deployment(dep_id)["replicaCount"] == 0
    deploy_mgr.delete(dep_id)
    assert deploy_mgr.get(dep_id) is None


def test_catalog_shape_resolves_and_runs_the_aliased_model(served, sdk):
    import torch
    from fireworks.training.sdk import DeploymentConfig, FiretitanServiceClient, TrainerJobConfig

    from cookbook.models import build_tokenizer, load_model

    trainer_mgr, deploy_mgr = sdk
    profile = trainer_mgr.resolve_training_profile(FW_SHAPE)
    assert profile.training_shape_version == f"{FW_SHAPE}/versions/7" and profile.deployment_shape == FW_DEPLOYMENT_SHAPE
    assert (profile.accelerator_type, profile.accelerator_count, profile.max_supported_context_length) == (
        "NVIDIA_H200_141GB", 8, 131072)
    assert trainer_mgr.resolve_training_profile(profile.training_shape_version).deployment_shape == FW_DEPLOYMENT_SHAPE
    assert trainer_mgr.resolve_training_profile(FW_SHAPE + "-forward").trainer_mode == "FORWARD_ONLY"

    job_id, dep_id = _uid("catalog"), _uid("catalog")
    created = trainer_mgr.create(TrainerJobConfig(base_model=FW_MODEL, training_shape_ref=profile.training_shape,
                                                  requested_job_id=job_id))
    # The deployment is created while the trainer still starts, so both processes load at once.
    deploy_mgr.create_or_get(DeploymentConfig.from_training_profile(
        deployment_id=dep_id, base_model=FW_MODEL, profile=profile, hot_load_trainer_job=created.job_name))
    endpoint = trainer_mgr.wait_for_ready(job_id, timeout_s=120, **POLL)
    assert endpoint.max_context_length == 131072
    deploy_mgr.wait_for_ready(dep_id, timeout_s=120, **POLL)
    try:
        policy = FiretitanServiceClient(base_url=endpoint.base_url, api_key=served.api_key).create_training_client(
            base_model=FW_MODEL, lora_rank=0)
        tokenizer = build_tokenizer()
        prompt = tokenizer.encode("7*6=", add_special_tokens=False)
        [sample] = _sample(served, deploy_mgr, dep_id, prompt, n=1, max_tokens=6, temperature=1.0, logprobs=True)
        tokens = sample.full_tokens[len(prompt):]
        # Both run the embedded local-micro weights behind the Fireworks names: same logprobs as a local copy.
        reference = load_model(MODEL)
        with torch.no_grad():
            logits = reference(input_ids=torch.tensor([prompt + tokens])).logits.float()
        logp = torch.log_softmax(logits[0, :-1], -1).gather(1, torch.tensor(prompt[1:] + tokens)[:, None])[:, 0]
        expected = logp[len(prompt) - 1:].tolist()
        assert max(abs(a - b) for a, b in zip(_trainer_logprobs(policy, prompt, tokens), expected)) <= 1e-4
        assert max(abs(a - b) for a, b in zip(sample.inference_logprobs, expected)) <= 1e-4
    finally:
        trainer_mgr.delete(job_id)
        deploy_mgr.delete(dep_id)


def test_sigint_stops_serve_and_everything_it_started(served):
    assert any(line.startswith(f"{FW_SHAPE}/versions/7") for line in served.lines), served.lines  # the shape table
    served.proc.send_signal(signal.SIGINT)
    assert served.proc.wait(60) == 0, "\n".join(served.lines[-30:])
    assert _wait_gone(str(served.root)) == []


def test_a_bad_catalog_file_stops_serve_before_anything_starts(tmp_path):
    bad = tmp_path / "catalog.json"
    bad.write_text(json.dumps({"trainingShapes": [{"name": FW_SHAPE, "baseModel": FW_MODEL,
                                                   "trainerMode": "FULL_PARAMETER_TRAINER",
                                                   "maxSupportedContextLength": 1024, "acceleratorTyp": "X"}]}))
    result = subprocess.run([sys.executable, "-m", "cookbook.local", "serve", "--root", str(tmp_path / "root"),
                             "--catalog", str(bad)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "acceleratorTyp" in result.stderr and str(bad) in result.stderr, result.stderr
    assert "FIREWORKS_BASE_URL" not in result.stdout and not (tmp_path / "root").exists()
