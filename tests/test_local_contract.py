"""The embedded platform rejects what the real Fireworks service rejects, with a 400 and a readable JSON error.

One `LocalPlatform` (control plane) serves the module, with one forward-only trainer and one deployment on
`local-micro`. Requests that the official SDK would never send are sent raw, with httpx.
"""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from cookbook.local.platform import LocalPlatform
from tests.platform_harness import find_pids
from cookbook.runs.rundir import storage_root

MODEL = "local-micro"
SHAPE = f"accounts/local/trainingShapes/{MODEL}"
DEPLOYMENT_SHAPE = f"accounts/local/deploymentShapes/{MODEL}/versions/1"


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Env:
    def __init__(self, platform: LocalPlatform):
        from fireworks.training.sdk import DeploymentManager, TrainerJobManager

        self.platform = platform
        self.url, self.key = platform.base_url, platform.api_key
        self.http = httpx.Client(base_url=self.url, headers={"X-Api-Key": self.key}, timeout=60)
        self.trainer_mgr = TrainerJobManager(api_key=self.key, base_url=self.url)
        self.deploy_mgr = DeploymentManager(api_key=self.key, base_url=self.url)
        self.ref_job = _uid("contract-ref")
        self.dep_id = _uid("contract")

    @property
    def model(self) -> str:
        return f"accounts/local/deployments/{self.dep_id}"

    def close(self) -> None:
        self.http.close()
        self.trainer_mgr.close()
        self.deploy_mgr.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from fireworks.training.sdk import DeploymentConfig, TrainerJobConfig

    root = tmp_path_factory.mktemp("contract-platform")
    with LocalPlatform(root, storage=storage_root()) as platform:
        e = Env(platform)
        try:
            # A forward-only reference trainer and a deployment without a trainer, started together.
            ref_profile = e.trainer_mgr.resolve_training_profile(SHAPE + "-forward")
            e.trainer_mgr.create(TrainerJobConfig(base_model=MODEL, training_shape_ref=ref_profile.training_shape,
                                                  forward_only=True, requested_job_id=e.ref_job))
            e.deploy_mgr.create_or_get(DeploymentConfig(deployment_id=e.dep_id, base_model=MODEL,
                                                        deployment_shape=DEPLOYMENT_SHAPE))
            e.ref_endpoint = e.trainer_mgr.wait_for_ready(e.ref_job, poll_interval_s=0.2, timeout_s=120)
            e.deploy_mgr.wait_for_ready(e.dep_id, poll_interval_s=0.2, timeout_s=120)
            yield e
        finally:
            e.close()
    assert find_pids(str(root)) == [], "the platform left processes behind"


def _error(resp: httpx.Response, status: int = 400) -> str:
    assert resp.status_code == status, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert set(err) >= {"code", "message"}
    return err["message"]


def test_every_server_requires_the_key(env):
    assert env.key.startswith("fw_local_") and len(env.key) == len("fw_local_") + 32
    url = f"{env.url}/v1/accounts"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"X-Api-Key": "fw_local_" + "0" * 32}).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {env.key}"}).status_code == 200
    health = f"{env.url}/training/v1/rlorTrainerJobs/local/{env.ref_job}/api/v1/healthz"
    assert httpx.get(health).status_code == 401
    assert httpx.get(health, headers={"Authorization": f"Bearer {env.key}", "X-Api-Key": env.key}).status_code == 200


# -- training shapes and trainer jobs --------------------------------------------------------------------------------

def test_unknown_training_shape_is_404(env):
    msg = _error(env.http.get("/v1/accounts/fireworks/trainingShapes/no-such-shape/versions",
                              params={"filter": "latest_validated=true", "pageSize": 1}), 404)
    assert "no-such-shape" in msg
    _error(env.http.get(f"/v1/{SHAPE}/versions/99"), 404)
    with pytest.raises(RuntimeError, match="not found"):
        env.trainer_mgr.resolve_training_profile("accounts/fireworks/trainingShapes/no-such-shape")


def test_trainer_create_rejects_shape_owned_fields(env):
    def create(body: dict, **query) -> httpx.Response:
        return env.http.post("/v1/accounts/local/rlorTrainerJobs",
                             params={"trainingShape": SHAPE, "rlorTrainerJobId": _uid("rejected"), **query}, json=body)

    cfg = {"baseModel": MODEL, "loraRank": 0, "learningRate": 1e-4}
    for extra_cfg, extra_top, field in (({"acceleratorType": "NVIDIA_H200_141GB"}, {}, "trainingConfig.acceleratorType"),
                                        ({"acceleratorCount": 8}, {}, "trainingConfig.acceleratorCount"),
                                        ({"maxContextLength": 256}, {}, "trainingConfig.maxContextLength"),
                                        ({}, {"nodeCount": 2}, "nodeCount")):
        msg = _error(create({"serviceMode": True, "trainingConfig": {**cfg, **extra_cfg}, **extra_top}))
        assert field in msg and "shape" in msg
    assert "baseModel" in _error(create({"trainingConfig": {"loraRank": 0}}))
    assert "no-such" in _error(create({"trainingConfig": cfg}, trainingShape="accounts/local/trainingShapes/no-such"))
    assert "'bogus'" in _error(create({"trainingConfig": cfg, "bogus": 1}))
    assert "FORWARD_ONLY" in _error(create({"trainingConfig": cfg}, trainingShape=SHAPE + "-forward"))
    # The official client refuses shape-owned fields before sending anything, too.
    from fireworks.training.sdk import TrainerJobConfig
    with pytest.raises(ValueError, match="accelerator_type"):
        env.trainer_mgr.create(TrainerJobConfig(base_model=MODEL, training_shape_ref=SHAPE,
                                                accelerator_type="NVIDIA_H200_141GB"))
    assert env.trainer_mgr.get(env.ref_job)["forwardOnly"] is True


def test_forward_only_trainer_serves_forward_but_cannot_train(env):
    from fireworks.training.sdk import FiretitanServiceClient
    from tinker import types

    ref = FiretitanServiceClient(base_url=env.ref_endpoint.base_url, api_key=env.key).create_training_client(
        base_model=MODEL, lora_rank=0)
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3, 4]),
                        loss_fn_inputs={"target_tokens": [2, 3, 4, 5], "weights": [1, 1, 1, 1]})
    assert ref.forward([datum], "cross_entropy").result().metrics["loss:sum"] > 0
    with pytest.raises(Exception, match="forward-only.*forward_backward is not allowed"):
        ref.forward_backward([datum], "cross_entropy").result()
    with pytest.raises(Exception, match="optim_step is not allowed"):
        ref.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    # The refusals consumed their place in the sequence: the model keeps serving afterwards.
    assert ref.forward([datum], "cross_entropy").result().metrics["loss:sum"] > 0


# -- deployments -----------------------------------------------------------------------------------------------------

def test_deployment_needs_exactly_one_of_shape_or_accelerator(env):
    def create(body: dict, **query) -> httpx.Response:
        return env.http.post("/v1/accounts/local/deployments", params={"deploymentId": _uid("rejected"), **query},
                             json={"baseModel": MODEL, "minReplicaCount": 0, "maxReplicaCount": 1, **body})

    assert "accelerator" in _error(create({}))
    msg = _error(create({"deploymentShape": DEPLOYMENT_SHAPE, "acceleratorType": "NVIDIA_H200_141GB"}))
    assert "deploymentShape" in msg and "acceleratorType" in msg
    assert "acceptShapelessRisk" in _error(create({"deploymentShape": DEPLOYMENT_SHAPE}, acceptShapelessRisk="true"))
    assert "no-such" in _error(create({"deploymentShape": "accounts/local/deploymentShapes/no-such/versions/1"}))
    assert "'bogus'" in _error(create({"deploymentShape": DEPLOYMENT_SHAPE, "bogus": True}))
    # Through the official client: an empty accelerator is sent as such and refused by the server.
    from fireworks.training.sdk import DeploymentConfig
    with pytest.raises(httpx.HTTPStatusError) as info:
        env.deploy_mgr.create_or_get(DeploymentConfig(deployment_id=_uid("rejected"), base_model=MODEL,
                                                      accelerator_type=""))
    assert info.value.response.status_code == 400


def test_hot_load_rejects_unknown_fields_and_needs_a_trainer(env):
    headers = {"fireworks-model": MODEL, "fireworks-deployment": env.model}
    msg = _error(env.http.post("/hot_load/v1/models/hot_load", headers=headers, json={"identity": "x"}))
    assert "hotLoadTrainerJob" in msg
    # Attach a trainer the way the SDK re-attaches one; the PATCH settles READY with the new trainer.
    info = env.deploy_mgr.reattach_trainer(env.dep_id, base_model=MODEL, trainer_job_name=env.ref_endpoint.job_name,
                                           timeout_s=60, poll_interval_s=0.2)
    assert info.state == "READY" and info.hot_load_trainer_job == env.ref_endpoint.job_name
    msg = _error(env.http.post("/hot_load/v1/models/hot_load", headers=headers,
                               json={"identity": "step-1", "reset_prompt_cache": True, "bogus_field": 1}))
    assert "Extra inputs are not permitted" in msg and "bogus_field" in msg
    # A snapshot that does not exist fails the load: status stage "error" with that target, and the SDK says False.
    assert env.deploy_mgr.hotload_and_wait(env.dep_id, MODEL, "no-such-snapshot", timeout_seconds=30) is False
    state = env.deploy_mgr.hotload_check_status(env.dep_id, MODEL)["replicas"][0]["loading_state"]
    assert state["stage"] == "error" and state["target_snapshot_identity"] == "no-such-snapshot"


# -- completions -----------------------------------------------------------------------------------------------------

def _complete(env, **body) -> httpx.Response:
    return env.http.post("/inference/v1/completions", json={"model": env.model, "prompt": [65, 66, 67], **body})


def test_completions_reject_integer_stops_and_unknown_fields(env):
    assert "stop" in _error(_complete(env, max_tokens=4, stop=[256]))
    assert "stop" in _error(_complete(env, max_tokens=4, stop=256))
    resp = _complete(env, max_tokens=4, frobnicate=True)
    assert resp.status_code == 400
    assert resp.json() == {"error": {"code": "invalid_request_error",
                                     "message": "Extra inputs are not permitted, field: 'frobnicate'"}}
    msg = _error(_complete(env, max_tokens=4, frequency_penalty=0.5))
    assert "frequency_penalty" in msg and "not implemented" in msg
    assert _complete(env, max_tokens=4, frequency_penalty=0).status_code == 200  # the "off" value is fine
    # The SDK's readiness probe, non-streaming.
    probe = env.http.post("/inference/v1/completions",
                          json={"model": env.model, "prompt": [1, 2], "max_tokens": 4, "temperature": 0.0})
    assert probe.status_code == 200 and len(probe.json()["choices"][0]["raw_output"]["completion_token_ids"]) <= 4


def test_stop_strings_end_generation_and_cut_the_text(env):
    from cookbook.models import build_tokenizer

    tok = build_tokenizer()
    # Greedy local-micro mostly repeats one token; from this prompt it switches once (GGGGGGGG then quotes).
    greedy = dict(prompt=tok.encode("L86QG", add_special_tokens=False), max_tokens=12, temperature=0.0,
                  ignore_eos=True, logprobs=True)
    ids = _complete(env, **greedy).json()["choices"][0]["raw_output"]["completion_token_ids"]
    text = tok.decode(ids, skip_special_tokens=False)
    change = next((k for k in range(1, len(ids)) if ids[k] != ids[k - 1]), 2)
    stop = tok.decode(ids[change - 1:change + 1], skip_special_tokens=False)  # spans the switch when there is one
    end = next(i for i in range(1, len(ids) + 1) if stop in tok.decode(ids[:i], skip_special_tokens=False))
    assert end < len(ids)
    choice = _complete(env, **greedy, stop=["never-appears", stop]).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["raw_output"]["completion_token_ids"] == ids[:end]  # the tokens through the match stay
    assert choice["text"] == text[:text.find(stop)]  # the text ends before the stop string
    assert len(choice["logprobs"]["content"]) == end


def test_concurrent_streaming_requests_are_batched(env):
    from fireworks.training.sdk import DeploymentSampler, FixedConcurrencyController

    from cookbook.models import build_tokenizer

    sampler = DeploymentSampler(inference_url=env.url, model=env.model, api_key=env.key, tokenizer=build_tokenizer(),
                                concurrency_controller=FixedConcurrencyController(16))

    async def many():
        return await asyncio.gather(*(sampler.sample_with_prompt_tokens([65 + i, 66, 67], n=2, max_tokens=8,
                                                                        temperature=1.0, logprobs=True)
                                      for i in range(8)))

    try:
        results = asyncio.run(many())
        metrics = sampler.drain_metrics()
    finally:
        sampler.close()
    assert [len(r) for r in results] == [2] * 8
    assert all(c.sampling_logprobs and len(c.sampling_logprobs) == c.completion_len for r in results for c in r)
    # 16 streaming n=1 requests in flight: the deployment decodes them together, not one by one.
    assert max(m.num_concurrent_requests or 0 for m in metrics) >= 4, [m.num_concurrent_requests for m in metrics]


def test_model_directory_base_models_are_accepted(env, tmp_path):
    from cookbook.models import build_tokenizer, load_model, save_model_dir

    model_dir = save_model_dir(load_model(MODEL), build_tokenizer(), tmp_path / "warm-start")
    job = _uid("dir-base")
    # A warm start runs a model directory on a local shape (the shape's base model differs: allowed).
    resp = env.http.post("/v1/accounts/local/rlorTrainerJobs", params={"trainingShape": SHAPE, "rlorTrainerJobId": job},
                         json={"serviceMode": True, "trainingConfig": {"baseModel": str(model_dir), "loraRank": 0}})
    assert resp.status_code == 200, resp.text
    assert resp.json()["trainingConfig"]["maxContextLength"] == 512
    env.trainer_mgr.delete(job)
    resp = env.http.post("/v1/accounts/local/deployments", params={"deploymentId": _uid("dir-base")},
                         json={"baseModel": str(model_dir), "deploymentShape": DEPLOYMENT_SHAPE, "maxReplicaCount": 0})
    assert resp.status_code == 200 and resp.json()["state"] == "READY", resp.text  # zero replicas: nothing started
    assert "no such model directory" in _error(env.http.post(
        "/v1/accounts/local/deployments", params={"deploymentId": _uid("dir-base")},
        json={"baseModel": str(tmp_path / "missing"), "deploymentShape": DEPLOYMENT_SHAPE}))
    assert "modelAliases" in _error(env.http.post(
        "/v1/accounts/local/rlorTrainerJobs", params={"trainingShape": SHAPE, "rlorTrainerJobId": _uid("unknown")},
        json={"trainingConfig": {"baseModel": "accounts/fireworks/models/unknown"}}))


def test_dead_processes_fail_their_job_and_deployment_and_a_job_resumes(env):
    """Runs last: it kills the module's trainer and deployment."""
    import os
    import signal
    import time

    def wait_state(get, state: str) -> dict:
        deadline = time.monotonic() + 30
        while (record := get())["state"] != state:
            assert time.monotonic() < deadline, record
            time.sleep(0.1)
        return record

    [trainer_pid] = find_pids(f"--job-id {env.ref_job} ")
    os.kill(trainer_pid, signal.SIGKILL)
    record = wait_state(lambda: env.trainer_mgr.get(env.ref_job), "JOB_STATE_FAILED")
    assert "killed by SIGKILL" in record["statusMessage"]
    assert record["statusMessage"].endswith(f"trainer-{env.ref_job}.log")  # one line naming the log
    health = env.http.get(f"/training/v1/rlorTrainerJobs/local/{env.ref_job}/api/v1/healthz")
    assert health.status_code == 409 and health.headers["x-should-retry"] == "false"
    with pytest.raises(RuntimeError, match="failed"):
        env.trainer_mgr.wait_for_ready(env.ref_job, poll_interval_s=0.2, timeout_s=30)
    endpoint = env.trainer_mgr.resume_and_wait(env.ref_job, poll_interval_s=0.2, timeout_s=120)
    assert env.trainer_mgr.get(env.ref_job)["state"] == "JOB_STATE_RUNNING" and endpoint.job_id == env.ref_job
    assert "only a failed or stopped job" in _error(env.http.post(f"/v1/accounts/local/rlorTrainerJobs/{env.ref_job}:resume"))

    [deployment_pid] = find_pids(f"deployment-{env.dep_id}.port")
    os.kill(deployment_pid, signal.SIGKILL)
    record = wait_state(lambda: env.deploy_mgr._get_deployment(env.dep_id), "FAILED")
    assert "killed by SIGKILL" in record["statusMessage"] and f"deployment-{env.dep_id}.log" in record["statusMessage"]
    failed = _complete(env, max_tokens=2)  # not 425: the SDK would retry that for ~50 s
    assert failed.status_code == 400 and "FAILED" in failed.json()["error"]["message"]
