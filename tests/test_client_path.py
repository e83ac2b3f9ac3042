"""The one client code path — the official Fireworks SDK under `build_session` — end to end against the embedded
platform (real servers on loopback, no mocks).

One module-scoped platform and one session (policy trainer job + deployment) built exactly as a run builds it;
tests run in file order and share it.
"""

from __future__ import annotations

import contextlib
import json

import httpx
import pytest
import tinker

from cookbook.client.trainer import ReconnectableClient
from cookbook.local.platform import LocalPlatform
from cookbook.client.session import build_session
from tests.platform_harness import MODEL, REF_SHAPE, datum, max_abs_diff, run_config, trainer_completion_logprobs

DEP = "client-path"
PROMPT = [10, 11, 12, 13, 14]
ADAM = tinker.AdamParams(learning_rate=5e-3)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("platform")
    logs: list[str] = []
    with LocalPlatform(root) as platform, contextlib.ExitStack() as stack:
        session = build_session(run_config(root / "run", deployment_id=DEP), platform.base_url, platform.api_key,
                                needs_reference=False, needs_deployment=True, stack=stack, log=logs.append,
                                poll_interval_s=0.1)
        yield dict(platform=platform, session=session, tm=session.rlor_mgr, dm=session.deploy_mgr,
                   client=session.policy, syncer=session.weight_syncer, sampler=session.sampler, job=session.job_id,
                   logs=logs)


def _train_step(client, seed: int = 0) -> None:
    tokens = [(seed * 7 + i) % 200 + 20 for i in range(12)]
    client.forward_backward([datum(tokens)], "cross_entropy")
    client.optim_step(ADAM, grad_accumulation_normalization="num_loss_tokens")


def _deployment_lps(env, completion_tokens: list[int]) -> list[float]:
    """Deployment logprobs of given completion tokens (echo of prompt+completion, max_tokens 0)."""
    p = env["platform"]
    body = {"model": f"accounts/local/deployments/{DEP}", "prompt": PROMPT + completion_tokens, "max_tokens": 0,
            "echo": True, "temperature": 1.0, "logprobs": True}
    reply = httpx.post(f"{p.base_url}/inference/v1/completions", json=body, headers={"X-Api-Key": p.api_key},
                       timeout=60).raise_for_status().json()
    content = reply["choices"][0]["logprobs"]["content"]
    return [e["logprob"] for e in content][len(PROMPT):]


def _hotload_state(env) -> dict:
    return env["dm"].hotload_check_status(DEP, MODEL)["replicas"][0]


def test_session_was_provisioned_from_the_shape(env):
    """The deployment is pinned to the training shape's deployment shape; the trainer learned its context length
    from the shape; no reference trainer was created for a recipe that needs none."""
    profile = env["tm"].resolve_training_profile(run_config("x").infra.training_shape_id)
    assert profile.deployment_shape
    assert env["dm"].get(DEP).deployment_shape_version == profile.deployment_shape
    job = env["tm"].get(env["job"])
    assert job["trainingConfig"]["maxContextLength"] == profile.max_supported_context_length
    assert job["trainingConfig"]["learningRate"] == pytest.approx(run_config("x").recipe.learning_rate)
    assert env["session"].reference is None and env["session"].reference_job_id is None
    assert sum("[launch] trainer job" in line for line in env["logs"]) == 1


def test_whole_path(env):
    client, tm, job = env["client"], env["tm"], env["job"]
    assert client.job_id == job and client.endpoint.job_id == job
    assert client.endpoint.base_url.endswith(f"/training/v1/rlorTrainerJobs/local/{job}")
    out = client.forward_backward([datum(list(range(30, 42)))], "cross_entropy")
    assert out.metrics["loss:sum"] > 0
    assert client.optim_step(ADAM, grad_accumulation_normalization="num_loss_tokens") is not None
    client.save_state("step-1")
    assert "step-1" in client.list_checkpoints()
    rows = tm.list_checkpoints(job)
    assert any(r["name"].endswith("/step-1") and r["checkpointType"].startswith("CHECKPOINT_TYPE_TRAINING")
               for r in rows)
    client.load_state_with_optimizer(client.resolve_checkpoint_path("step-1"))
    identity = env["syncer"].save_and_hotload("step-1")
    assert _hotload_state(env)["current_snapshot_identity"] == identity
    [completions] = env["sampler"].sample_many([PROMPT], n=3, max_tokens=6, seed=1)
    assert len(completions) == 3
    for c in completions:
        assert 1 <= len(c.tokens) <= 6 and len(c.logprobs) == len(c.tokens) and c.finish_reason in ("stop", "length")


def test_failures_propagate(env):
    with pytest.raises(Exception, match="not found"):
        env["client"].load_state_with_optimizer("no-such-checkpoint")
    with pytest.raises(RuntimeError, match="not found"):
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


def test_stop_tokens_travel_as_strings_and_end_the_completion(env):
    """The recipes pass stop token ids; the SDK sends them as strings and the deployment stops on them, keeping the
    stop token in the completion (the policy must learn to emit it)."""
    [[free]] = env["sampler"].sample_many([PROMPT], n=1, max_tokens=12, temperature=0.0, seed=0)
    texts = [env["session"].tokenizer.decode([t]) for t in free.tokens]
    # a token whose text is one printable character not seen earlier in the completion: the stop string's first
    # match is then exactly that token
    candidates = [i for i in range(1, len(texts)) if len(texts[i]) == 1 and texts[i].isascii()
                  and texts[i].isprintable() and texts[i] not in "".join(texts[:i])]
    assert candidates, texts
    stop = free.tokens[candidates[0]]
    [[stopped]] = env["sampler"].sample_many([PROMPT], n=1, max_tokens=12, temperature=0.0, seed=0,
                                             stop_token_ids=[stop])
    assert stopped.tokens == free.tokens[:candidates[0] + 1]
    assert stopped.finish_reason == "stop"


def test_delta_equals_base_and_a_failed_hot_load_raises(env):
    client, syncer = env["client"], env["syncer"]
    _train_step(client, 2)
    delta_id = syncer.save_and_hotload("step-d")
    store = env["platform"].jobs_root / env["job"] / "sampler"
    assert json.loads((store / delta_id / "snapshot.json").read_text())["kind"] == "delta"
    probe = [40, 41, 42, 43, 44, 45]
    via_delta = _deployment_lps(env, probe)
    base_id = syncer.save_and_hotload("step-b", checkpoint_type="base")  # same weights, full snapshot
    assert base_id != delta_id
    via_base = _deployment_lps(env, probe)
    assert via_delta == via_base  # bit-exact: the delta reconstructs exactly the same tensors
    assert max_abs_diff(via_base, trainer_completion_logprobs(client, PROMPT, probe)) <= 1e-4

    # A delta whose predecessor is not what the deployment holds: d1 is saved but never loaded, d2 chains to d1.
    # The SDK reports such a load by returning False; our syncer raises with the deployment's diagnosis.
    syncer.save_only("orphan-1", "delta")
    d2 = syncer.save_only("orphan-2", "delta")
    with pytest.raises(RuntimeError, match="orphan-2"):
        syncer.hotload(d2, "delta")
    state = _hotload_state(env)
    assert state["current_snapshot_identity"] == base_id
    assert state["loading_state"]["stage"] == "error" and state["loading_state"]["target_snapshot_identity"] == d2
    assert _deployment_lps(env, probe) == via_base  # weights untouched by the rejected load
    syncer.save_and_hotload("recovered", checkpoint_type="base")


def test_promote_base_snapshot(env):
    from cookbook.models import load_model

    rows = [r for r in env["tm"].list_checkpoints(env["job"]) if r["promotable"]]
    model = env["tm"].promote_checkpoint(name=rows[-1]["name"], output_model_id="promoted-test", base_model=MODEL)
    assert model["state"] == "READY" and model["name"].endswith("/models/promoted-test")
    loaded = load_model(str(env["platform"].storage / "models" / "promoted-test"))
    assert loaded.config.vocab_size > 0


def test_reattach_by_job_id_after_creator_is_gone(env):
    from fireworks.training.sdk import TrainerJobManager

    platform = env["platform"]
    env["client"].save_state("before-reattach")
    # A fresh manager and client that know only the job id (as a restarted driver would).
    tm2 = TrainerJobManager(api_key=platform.api_key, base_url=platform.base_url)
    client2 = ReconnectableClient(tm2, env["job"], MODEL, fw_api_key=platform.api_key)
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
    alone = env["sampler"].sample_many(prompts[:1], n=2, max_tokens=8, temperature=0.8, top_p=0.9, seed=5)
    batched = env["sampler"].sample_many(prompts[:1] * 3, n=2, max_tokens=8, temperature=0.8, top_p=0.9, seed=5)
    assert [c.tokens for c in alone[0]] == [c.tokens for c in batched[0]]  # a seed fixes a completion's stream


def _port(platform: LocalPlatform, name: str) -> int:
    return int((platform.root / "run" / f"{name}.port").read_text())


def test_every_server_rejects_requests_without_the_key(env):
    p, job = env["platform"], env["job"]
    trainer, dep = _port(p, f"trainer-{job}"), _port(p, f"deployment-{DEP}")
    urls = [("GET", f"{p.base_url}/v1/accounts"),
            ("GET", f"{p.base_url}/training/v1/rlorTrainerJobs/local/{job}/api/v1/healthz"),
            ("GET", f"http://127.0.0.1:{trainer}/api/v1/healthz"),
            ("POST", f"http://127.0.0.1:{dep}/inference/v1/completions"),
            ("GET", f"http://127.0.0.1:{dep}/hot_load/v1/models/hot_load")]
    for method, url in urls:
        for headers in ({}, {"X-Api-Key": "fw_local_" + "0" * 32}):
            r = httpx.request(method, url, headers=headers, json={"prompt": [1], "max_tokens": 1}, timeout=10)
            assert r.status_code in (401, 403), (url, headers, r.status_code)
    # ... and the same requests with the key get through.
    assert httpx.get(f"http://127.0.0.1:{trainer}/api/v1/healthz", headers={"X-API-Key": p.api_key}).status_code == 200
    assert httpx.get(f"{p.base_url}/v1/accounts", headers={"X-Api-Key": p.api_key}).status_code == 200


def test_fireworks_launcher_is_the_same_flow_on_another_url(env, monkeypatch, tmp_path):
    """`launchers.fireworks` pointed at the embedded control plane: only the URL and key differ. With a reference
    shape set and a recipe that needs a reference, the reference is a separate forward-only trainer job driven by a
    plain rank-0 training client (and it cannot train)."""
    from launchers import fireworks

    p = env["platform"]
    monkeypatch.setenv("FIREWORKS_BASE_URL", p.base_url)
    monkeypatch.setenv("FIREWORKS_API_KEY", p.api_key)
    monkeypatch.setenv("FIREWORKS_POLL_INTERVAL_S", "0.2")
    cfg = run_config(tmp_path, deployment_id="fw-launcher", ref_shape=REF_SHAPE)
    logs: list[str] = []
    with fireworks.launch(cfg, needs_reference=True, needs_deployment=True, log=logs.append) as s:
        job_id, ref_job_id = s.job_id, s.reference_job_id
        assert ref_job_id and env["tm"].get(ref_job_id)["forwardOnly"] is True and not s.reference.base_only
        ref = s.reference.forward([datum(list(range(60, 70)))], "cross_entropy").loss_fn_outputs[0]["logprobs"].data
        with pytest.raises(Exception, match="(?i)forward.only"):
            s.reference.forward_backward([datum(list(range(60, 70)))], "cross_entropy")
        s.policy.forward_backward([datum(list(range(60, 70)))], "cross_entropy")
        s.policy.optim_step(ADAM)
        identity = s.weight_syncer.save_and_hotload("step-1")
        [[c]] = s.sampler.sample_many([PROMPT], n=1, max_tokens=4, seed=0)
        assert max_abs_diff(c.logprobs, trainer_completion_logprobs(s.policy, PROMPT, c.tokens)) <= 1e-4
        again = s.reference.forward([datum(list(range(60, 70)))], "cross_entropy").loss_fn_outputs[0]["logprobs"].data
        assert list(ref) == list(again)  # the reference stays frozen while the policy trains
        status = s.deploy_mgr.hotload_check_status("fw-launcher", MODEL)["replicas"][0]
        assert status["current_snapshot_identity"] == identity
    # Teardown deleted what the launcher created, and nothing else.
    for gone in (job_id, ref_job_id):  # deleted jobs stay as tombstones (their checkpoints remain promotable)
        assert env["tm"].get(gone)["state"] == "JOB_STATE_DELETED"
    assert env["dm"].get("fw-launcher") is None
    assert env["tm"].get(env["job"])["state"] == "JOB_STATE_RUNNING"


def test_reference_trainer_only_when_the_recipe_needs_one(env, tmp_path):
    """A reference shape alone provisions nothing (GRPO with kl_beta=0); without a reference shape, a needed
    reference is a frozen base-only model on the policy's own trainer."""
    p = env["platform"]
    for needs_reference in (False, True):
        logs: list[str] = []
        cfg = run_config(tmp_path / str(needs_reference), ref_shape=REF_SHAPE if not needs_reference else None)
        with contextlib.ExitStack() as stack:
            s = build_session(cfg, p.base_url, p.api_key, needs_reference=needs_reference, needs_deployment=False,
                              stack=stack, log=logs.append, poll_interval_s=0.1)
            assert s.reference_job_id is None and sum("[launch] trainer job" in m for m in logs) == 1
            if needs_reference:
                assert s.reference.base_only and s.reference.job_id == s.job_id
                lps = s.reference.forward([datum(list(range(70, 80)))], "cross_entropy").loss_fn_outputs[0]
                assert len(lps["logprobs"].data) == 9
            else:
                assert s.reference is None


def test_fireworks_launcher_without_key_is_a_user_error(monkeypatch, tmp_path):
    from cookbook.errors import UserError
    from launchers import fireworks

    monkeypatch.delenv("FIREWORKS_API_KEY", raising=False)
    with pytest.raises(UserError, match="infra=local-tiny"):
        with fireworks.launch(run_config(tmp_path), needs_reference=False, needs_deployment=False):
            pass


def test_a_compact_delta_syncs_the_same_weights_as_a_base(tmp_path, monkeypatch):
    """The trainer's compact delta encoding (`diff`, for bytes that travel), end to end: the deployment rebuilds from
    it exactly the weights a base snapshot of the same step gives it."""
    monkeypatch.setenv("COOKBOOK_DELTA_ENCODING", "diff")  # the platform's processes inherit it
    with LocalPlatform(tmp_path) as platform, contextlib.ExitStack() as stack:
        session = build_session(run_config(tmp_path / "run", deployment_id=DEP), platform.base_url, platform.api_key,
                                needs_reference=False, needs_deployment=True, stack=stack, log=lambda _: None,
                                poll_interval_s=0.1, warm_up_after_sync=False)
        env = dict(platform=platform, dm=session.deploy_mgr)
        client, syncer = session.policy, session.weight_syncer
        probe = [40, 41, 42, 43, 44, 45]
        for step in range(3):
            _train_step(client, step)
            syncer.save_and_hotload(f"s{step}")  # a base, then deltas on it
        delta = platform.jobs_root / session.job_id / "sampler" / syncer.base_identity
        manifest = json.loads((delta / "snapshot.json").read_text())
        assert manifest["kind"] == "delta" and manifest["encoding"] == "diff"
        via_delta = _deployment_lps(env, probe)
        syncer.save_and_hotload("full", checkpoint_type="base")
        assert _deployment_lps(env, probe) == via_delta
        assert max_abs_diff(via_delta, trainer_completion_logprobs(client, PROMPT, probe)) <= 1e-4


def test_both_request_dialects_train_the_same(tmp_path, monkeypatch):
    """A trainer advertises comms v2 (its default: the Fireworks SDK then sends forward/forward_backward through its
    orjson encoder, float32 tensors of >= 256 values as float32 decimals) or v1 (the SDK's legacy JSON path, what
    older Fireworks trainers get). Same schema, so the same training: losses and logprobs before and after a step are
    bit-identical either way."""
    tokens = [(7 * i) % 200 + 20 for i in range(300)]
    weights = [1 / 3] * 299  # not exact in a short decimal: v2 writes float32 digits, v1 float64 ones

    def train(comms: str) -> tuple:
        monkeypatch.setenv("COOKBOOK_TRAINER_COMMS", comms)  # the platform's processes inherit it
        with LocalPlatform(tmp_path / comms) as platform, contextlib.ExitStack() as stack:
            session = build_session(run_config(tmp_path / comms / "run"), platform.base_url, platform.api_key,
                                    needs_reference=False, needs_deployment=False, stack=stack, log=lambda _: None,
                                    poll_interval_s=0.1)
            client = session.policy
            assert client.inner.comms == comms
            first = client.forward_backward([datum(tokens, weights)], "cross_entropy")
            client.optim_step(ADAM, grad_accumulation_normalization="num_loss_tokens")
            after = client.forward([datum(tokens, weights)], "cross_entropy")
            return (first.metrics["loss:sum"], list(first.loss_fn_outputs[0]["logprobs"].data),
                    list(after.loss_fn_outputs[0]["logprobs"].data))

    legacy, default = train("v1"), train("v2")
    assert legacy == default
    assert legacy[1] != legacy[2]  # the step changed the weights
