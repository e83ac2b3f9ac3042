"""The one client code path, end to end against the embedded platform (real servers on loopback, no mocks).

One module-scoped platform with one policy trainer job and one deployment; tests run in file order and share it.
"""

from __future__ import annotations

import json

import httpx
import pytest
import tinker

from cookbook.client import ReconnectableClient
from cookbook.config import DeployConfig
from cookbook.fireworks_api import DeploymentManager, FireworksAPIError, TrainerJobManager
from cookbook.local.platform import LocalPlatform
from cookbook.session import Sampler
from cookbook.weight_sync import WeightSyncer
from tests.platform_harness import (MODEL, SHAPE, datum, max_abs_diff, run_config, trainer_completion_logprobs)

DEP = "client-path"
PROMPT = [10, 11, 12, 13, 14]
ADAM = tinker.AdamParams(learning_rate=5e-3)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("platform")
    with LocalPlatform(root) as platform:
        tm = TrainerJobManager(platform.api_key, platform.base_url, poll_interval_s=0.1)
        dm = DeploymentManager(platform.api_key, platform.base_url, poll_interval_s=0.1)
        tm.create(MODEL, SHAPE, job_id="policy")
        dm.create_or_get(DeployConfig(deployment_id=DEP), MODEL, hot_load_trainer_job=tm.job_name("policy"))
        client = ReconnectableClient(tm, "policy", MODEL, fw_api_key=platform.api_key, ready_timeout=120)
        dm.wait_for_ready(DEP, 120)
        syncer = WeightSyncer(client, dm, DEP, MODEL, hotload_timeout=60)
        yield dict(platform=platform, tm=tm, dm=dm, client=client, syncer=syncer, sampler=Sampler(dm, DEP))
        client.close()


def _train_step(client, seed: int = 0) -> None:
    tokens = [(seed * 7 + i) % 200 + 20 for i in range(12)]
    client.forward_backward([datum(tokens)], "cross_entropy")
    client.optim_step(ADAM, grad_accumulation_normalization="num_loss_tokens")


def _deployment_lps(env, completion_tokens: list[int]) -> list[float]:
    """Deployment logprobs of given completion tokens (echo of prompt+completion, max_tokens 0)."""
    body = {"prompt": PROMPT + completion_tokens, "max_tokens": 0, "echo": True, "temperature": 1.0}
    reply = env["dm"].completions(DEP, body)
    content = reply["choices"][0]["logprobs"]["content"]
    return [e["logprob"] for e in content][len(PROMPT):]


def test_whole_path(env):
    client, tm = env["client"], env["tm"]
    assert client.endpoint.job_id == "policy" and client.job_id == "policy"
    assert client.endpoint.base_url.endswith("/training/v1/rlorTrainerJobs/local/policy")
    out = client.forward_backward([datum(list(range(30, 42)))], "cross_entropy")
    assert out.metrics["loss:sum"] > 0
    assert client.optim_step(ADAM, grad_accumulation_normalization="num_loss_tokens") is not None
    client.save_state("step-1")
    assert "step-1" in client.list_checkpoints()
    rows = tm.list_checkpoints("policy")
    assert any(r["name"].endswith("/step-1") and r["checkpointType"] == "CHECKPOINT_TYPE_TRAINING" for r in rows)
    client.load_state_with_optimizer(client.resolve_checkpoint_path("step-1"))
    identity = env["syncer"].save_and_hotload("step-1")
    status = env["dm"].hotload_status(DEP, MODEL)
    assert status["current_snapshot_identity"] == identity
    [completions] = env["sampler"].sample_many([PROMPT], n=3, max_tokens=6, seed=1)
    assert len(completions) == 3
    for c in completions:
        assert 1 <= len(c.tokens) <= 6 and len(c.logprobs) == len(c.tokens) and c.finish_reason in ("stop", "length")


def test_failures_propagate(env):
    with pytest.raises(Exception):
        env["client"].load_state_with_optimizer("no-such-checkpoint")
    with pytest.raises(FireworksAPIError, match="not found"):
        env["tm"].get("no-such-job")


def test_logprobs_match_trainer_only_after_sync(env):
    client, syncer, sampler = env["client"], env["syncer"], env["sampler"]
    syncer.save_and_hotload("pre")
    _train_step(client, 1)  # the trainer moves on; the deployment still holds "pre"
    [[c]] = sampler.sample_many([PROMPT], n=1, max_tokens=8, seed=3)
    trainer = trainer_completion_logprobs(client, PROMPT, c.tokens)
    assert max_abs_diff(c.logprobs, trainer) > 1e-3, "deployment already had the new weights before the sync"
    syncer.save_and_hotload("post")  # a delta chained to "pre"
    [[c]] = sampler.sample_many([PROMPT], n=1, max_tokens=8, seed=3)
    trainer = trainer_completion_logprobs(client, PROMPT, c.tokens)
    assert max_abs_diff(c.logprobs, trainer) <= 1e-4
    assert c.sampling_logprobs == pytest.approx(c.logprobs, abs=1e-5)  # temperature 1, top_p 1


def test_delta_equals_base_and_wrong_predecessor_rejected(env):
    client, syncer, dm = env["client"], env["syncer"], env["dm"]
    _train_step(client, 2)
    delta_id = syncer.save_and_hotload("step-d")
    assert json.loads((env["platform"].jobs_root / "policy" / "sampler" / delta_id / "snapshot.json")
                      .read_text())["kind"] == "delta"
    probe = [40, 41, 42, 43, 44, 45]
    via_delta = _deployment_lps(env, probe)
    base_id = syncer.save_and_hotload("step-b", checkpoint_type="base")  # same weights, full snapshot
    assert base_id != delta_id
    via_base = _deployment_lps(env, probe)
    assert via_delta == via_base  # bit-exact: the delta reconstructs exactly the same tensors
    assert max_abs_diff(via_base, trainer_completion_logprobs(client, PROMPT, probe)) <= 1e-4

    # A delta whose predecessor is not what the deployment holds: d1 is saved but never loaded, d2 chains to d1.
    d1, _ = syncer.save_only("orphan-1", "delta")
    d2, _ = syncer.save_only("orphan-2", "delta")
    dm.hotload(DEP, MODEL, d2, previous_snapshot_identity=d1)
    with pytest.raises(RuntimeError, match="failed"):
        dm.wait_for_hotload(DEP, MODEL, d2, timeout_s=30)
    status = dm.hotload_status(DEP, MODEL)
    assert status["current_snapshot_identity"] == base_id
    assert status["loading_state"]["stage"] == "error" and status["loading_state"]["target_snapshot_identity"] == d2
    assert _deployment_lps(env, probe) == via_base  # weights untouched by the rejected load
    syncer.reset_delta_chain()


def test_promote_base_snapshot(env):
    from cookbook.local.models import load_model

    rows = [r for r in env["tm"].list_checkpoints("policy") if r["promotable"]]
    name = rows[-1]["name"].rsplit("/", 1)[-1]
    model = env["tm"].promote_checkpoint("policy", name, "promoted-test", MODEL)
    assert model["state"] == "READY" and model["name"].endswith("/models/promoted-test")
    loaded = load_model(str(env["platform"].models_root / "promoted-test"))
    assert loaded.config.vocab_size > 0


def test_reattach_by_job_id_after_creator_is_gone(env):
    platform = env["platform"]
    env["client"].save_state("before-reattach")
    # A fresh manager and client that know only the job id (as a restarted driver would).
    tm2 = TrainerJobManager(platform.api_key, platform.base_url, poll_interval_s=0.1)
    client2 = ReconnectableClient(tm2, "policy", MODEL, fw_api_key=platform.api_key, ready_timeout=60)
    try:
        assert "before-reattach" in client2.list_checkpoints()
        client2.load_state_with_optimizer("before-reattach")
        out = client2.forward_backward([datum(list(range(50, 60)))], "cross_entropy")
        assert out.metrics["loss:sum"] > 0
    finally:
        client2.close()
        tm2.close()


def test_64_concurrent_requests_and_streaming(env):
    prompts = [[20 + i % 50, 30, 40 + i % 7] for i in range(64)]
    results = env["sampler"].sample_many(prompts, n=1, max_tokens=8, temperature=0.8, top_p=0.9)
    assert len(results) == 64 and all(len(r) == 1 and r[0].tokens for r in results)
    # The streaming dialect the Fireworks SDK's DeploymentSampler uses.
    p = env["platform"]
    body = {"model": f"accounts/local/deployments/{DEP}", "prompt": PROMPT, "max_tokens": 4, "stream": True,
            "raw_output": True, "logprobs": True, "temperature": 1.0}
    r = httpx.post(f"{p.base_url}/inference/v1/completions", json=body, headers={"X-Api-Key": p.api_key}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    content = [x for ch in chunks for x in ch["choices"][0].get("logprobs", {}).get("content", [])]
    raw = [ch["choices"][0]["raw_output"] for ch in chunks if ch["choices"][0].get("raw_output")][-1]
    assert len(content) == len(raw["completion_token_ids"]) and chunks[-1]["choices"][0]["finish_reason"]


def _port(platform: LocalPlatform, name: str) -> int:
    return int((platform.root / "run" / f"{name}.port").read_text())


def test_every_server_rejects_requests_without_the_key(env):
    p = env["platform"]
    trainer, dep = _port(p, "trainer-policy"), _port(p, f"deployment-{DEP}")
    urls = [("GET", f"{p.base_url}/v1/accounts"),
            ("GET", f"{p.base_url}/training/v1/rlorTrainerJobs/local/policy/api/v1/healthz"),
            ("GET", f"http://127.0.0.1:{trainer}/api/v1/healthz"),
            ("POST", f"http://127.0.0.1:{dep}/inference/v1/completions"),
            ("GET", f"http://127.0.0.1:{dep}/hot_load/v1/models/hot_load")]
    for method, url in urls:
        for headers in ({}, {"X-Api-Key": "tml-" + "0" * 32}):
            r = httpx.request(method, url, headers=headers, json={"prompt": [1], "max_tokens": 1}, timeout=10)
            assert r.status_code in (401, 403), (url, headers, r.status_code)
    # ... and the same requests with the key get through.
    assert httpx.get(f"http://127.0.0.1:{trainer}/api/v1/healthz", headers={"X-API-Key": p.api_key}).status_code == 200
    assert httpx.get(f"{p.base_url}/v1/accounts", headers={"X-Api-Key": p.api_key}).status_code == 200


def test_fireworks_launcher_is_the_same_flow_on_another_url(env, monkeypatch, tmp_path):
    """`launchers.fireworks` pointed at the embedded control plane: only the URL and key differ."""
    from launchers import fireworks

    p = env["platform"]
    monkeypatch.setenv("FIREWORKS_BASE_URL", p.base_url)
    monkeypatch.setenv("FIREWORKS_API_KEY", p.api_key)
    monkeypatch.setenv("FIREWORKS_POLL_INTERVAL_S", "0.2")
    cfg = run_config(tmp_path, deployment_id="fw-launcher")
    logs: list[str] = []
    with fireworks.launch(cfg, needs_reference=True, needs_deployment=True, log=logs.append) as s:
        job_id = s.job_id
        ref = s.reference.forward([datum(list(range(60, 70)))], "cross_entropy").loss_fn_outputs[0]["logprobs"].data
        s.policy.forward_backward([datum(list(range(60, 70)))], "cross_entropy")
        s.policy.optim_step(ADAM)
        identity = s.weight_syncer.save_and_hotload("step-1")
        [[c]] = s.sampler.sample_many([PROMPT], n=1, max_tokens=4, seed=0)
        assert max_abs_diff(c.logprobs, trainer_completion_logprobs(s.policy, PROMPT, c.tokens)) <= 1e-4
        again = s.reference.forward([datum(list(range(60, 70)))], "cross_entropy").loss_fn_outputs[0]["logprobs"].data
        assert list(ref) == list(again)  # the reference stays frozen while the policy trains
        assert s.deploy_mgr.hotload_status("fw-launcher", MODEL)["current_snapshot_identity"] == identity
    # Teardown deleted what the launcher created, and nothing else.
    with pytest.raises(FireworksAPIError, match="not found"):
        env["tm"].get(job_id)
    assert env["dm"].get("fw-launcher") is None
    assert env["tm"].get("policy")["state"] == "JOB_STATE_RUNNING"


def test_fireworks_launcher_without_key_is_a_user_error(monkeypatch, tmp_path):
    from cookbook.errors import UserError
    from launchers import fireworks

    monkeypatch.delenv("FIREWORKS_API_KEY", raising=False)
    with pytest.raises(UserError, match="infra=local-tiny"):
        with fireworks.launch(run_config(tmp_path), needs_reference=False, needs_deployment=False):
            pass
