"""The embedded trainer service driven over HTTP by the official Fireworks SDK (tinker 0.23 underneath), by plain
tinker, and by raw httpx for malformed input.

One service per module (local-micro, seed 0); each test creates its own model on it (through its own SDK service
client, as the SDK wants one per training client) so tests stay independent.
Weights are read back through base sampler snapshots (the HF-loadable export), so every comparison also exercises
the export path.
"""

from __future__ import annotations

import httpx
import pytest
import tinker
import torch
from tinker import types
from transformers import AutoModelForCausalLM

from fireworks.training.sdk import FiretitanServiceClient

from cookbook import models
from cookbook.local import snapshots
from trainer_harness import start_trainer

BASE = "local-micro"
SEED = 0
EPS = 1e-4  # keeps Adam's update Lipschitz in the gradient, so float-level differences stay float-level


@pytest.fixture(scope="module")
def jobs_root(tmp_path_factory):
    return tmp_path_factory.mktemp("jobs")


@pytest.fixture(scope="module")
def trainer(jobs_root):
    with start_trainer(jobs_root, "job-a", BASE, seed=SEED) as t:
        yield t


@pytest.fixture(scope="module")
def service(trainer):
    return FiretitanServiceClient(base_url=trainer.base_url, api_key=trainer.api_key)


def new_client(trainer, lora_rank: int = 0):
    """A fresh model on the trainer through its own SDK service client (one training client per service)."""
    return FiretitanServiceClient(base_url=trainer.base_url, api_key=trainer.api_key).create_training_client(
        base_model=BASE, lora_rank=lora_rank)


def datum(tokens, weights=None):
    inputs = {"target_tokens": tokens[1:]}
    if weights is not None:
        inputs["weights"] = [float(w) for w in weights]
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def rand_tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()


def weights_of(trainer, tc, name) -> dict[str, torch.Tensor]:
    res = tc.save_weights_for_sampler_ext(name, "base")
    return snapshots.apply_snapshot(trainer.store / "sampler" / res.snapshot_name, None, None)


def torch_logprobs(model, tokens_list):
    out = []
    for toks in tokens_list:
        ids = torch.tensor([toks[:-1]])
        lp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
        out.append(lp.gather(-1, torch.tensor(toks[1:])[:, None])[:, 0])
    return out


def assert_states_close(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def adam(lr=1e-3):
    return types.AdamParams(learning_rate=lr, beta1=0.9, beta2=0.95, eps=EPS, weight_decay=0.01)


# ---------------------------------------------------------------------------------------------------------------------
def test_forward_matches_independent_torch(trainer):
    tc = new_client(trainer)
    seqs = [rand_tokens(n, i) for i, n in enumerate([9, 17, 5])]
    out = tc.forward([datum(s) for s in seqs], "cross_entropy").result()
    ref = torch_logprobs(models.load_model(BASE, seed=SEED), seqs)
    for o, r in zip(out.loss_fn_outputs, ref):
        torch.testing.assert_close(torch.tensor(o["logprobs"].data), r.detach(), atol=1e-5, rtol=0)
    assert abs(out.metrics["loss:sum"] + sum(float(r.detach().sum()) for r in ref)) < 1e-3


def test_fireworks_style_key_and_auth(trainer):
    # a Fireworks key is sent verbatim (no client/config call); a wrong key gets 401 JSON
    with pytest.raises(Exception):
        FiretitanServiceClient(base_url=trainer.base_url, api_key="fw-not-the-key").create_training_client(BASE)
    r = httpx.post(f"{trainer.base_url}/api/v1/create_session", json={}, headers={"X-API-Key": "tml-wrong"})
    assert r.status_code == 401 and "error" in r.json()
    r = httpx.get(f"{trainer.base_url}/api/v1/healthz", headers={"Authorization": f"Bearer {trainer.api_key}"})
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_custom_loss_update_equals_torch_autograd(trainer):
    tc = new_client(trainer)
    seqs = [rand_tokens(12, 10 + i) for i in range(3)]  # equal lengths: same batch layout as the reference

    def loss_fn(data, lps):
        loss = sum((lp.sum() * 0.05) ** 2 - lp[:3].sum() for lp in lps)
        return loss, {"custom:mean": float(loss.detach())}

    res = tc.forward_backward_custom([datum(s) for s in seqs], loss_fn).result()
    assert "custom:mean" in res.metrics
    tc.optim_step(adam()).result()
    got = weights_of(trainer, tc, "custom")

    ref = models.load_model(BASE, seed=SEED)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=EPS, weight_decay=0.01)
    ids = torch.tensor([s[:-1] for s in seqs])
    lp = torch.log_softmax(ref(input_ids=ids).logits, -1).gather(-1, torch.tensor([s[1:] for s in seqs])[..., None])
    sum(((row.sum() * 0.05) ** 2 - row[:3].sum()) for row in lp[..., 0]).backward()
    opt.step()
    assert_states_close(got, snapshots.canonical_state(ref), atol=2e-6)


def test_forward_never_touches_grads_or_weights(trainer):
    a = new_client(trainer)
    b = new_client(trainer)
    d1, d2 = [datum(rand_tokens(10, 1))], [datum(rand_tokens(14, 2))]
    initial = weights_of(trainer, a, "init")
    a.forward(d1, "cross_entropy").result()
    a.optim_step(adam()).result()  # nothing accumulated => no parameter has a grad => unchanged
    assert_states_close(weights_of(trainer, a, "after-fwd"), initial)
    # fwd_bwd, then forwards (incl. one with the same inputs), then a step == fwd_bwd then step
    a.forward_backward(d1, "cross_entropy").result()
    a.forward(d2, "cross_entropy").result()
    a.forward(d1, "cross_entropy").result()
    a.optim_step(adam()).result()
    b.forward_backward(d1, "cross_entropy").result()
    b.optim_step(adam()).result()
    b.forward_backward(d1, "cross_entropy").result()
    b.optim_step(adam()).result()
    assert not torch.equal(weights_of(trainer, b, "b")["model.norm.weight"], initial["model.norm.weight"])
    # a made 2 steps too (the first with no grads does not advance Adam's per-param state)
    a.forward_backward(d1, "cross_entropy").result()
    a.optim_step(adam()).result()
    assert_states_close(weights_of(trainer, a, "a"), weights_of(trainer, b, "b2"))


@pytest.mark.parametrize("mode", ["num_loss_tokens", "num_sequences"])
def test_grad_accumulation_normalization(trainer, mode):
    seqs1 = [rand_tokens(11, 20), rand_tokens(7, 21)]
    seqs2 = [rand_tokens(15, 22), rand_tokens(9, 23), rand_tokens(6, 24)]
    w1 = [[1.0] * 10, [0, 0, 1, 1, 1, 1]]
    w2 = [[0.0] * 4 + [1.0] * 10, [1.0] * 8, [0.0] * 5]  # the last sequence carries no loss at all
    all_w = w1 + w2
    tokens = sum(sum(1 for x in w if x != 0) for w in all_w)
    sequences = sum(1 for w in all_w if any(x != 0 for x in w))
    divisor = tokens if mode == "num_loss_tokens" else sequences

    a = new_client(trainer)
    a.forward_backward([datum(s, w) for s, w in zip(seqs1, w1)], "cross_entropy").result()
    a.forward_backward([datum(s, w) for s, w in zip(seqs2, w2)], "cross_entropy").result()
    a.optim_step(adam(), grad_accumulation_normalization=mode).result()
    b = new_client(trainer)
    scaled = [[x / divisor for x in w] for w in all_w]
    b.forward_backward([datum(s, w) for s, w in zip(seqs1 + seqs2, scaled)], "cross_entropy").result()
    b.optim_step(adam(), grad_accumulation_normalization="none").result()
    assert_states_close(weights_of(trainer, a, f"norm-a-{mode}"), weights_of(trainer, b, f"norm-b-{mode}"), atol=2e-6)


def test_save_load_state_resumes_exactly(trainer):
    tc = new_client(trainer)
    data = [datum(rand_tokens(10, 30 + i)) for i in range(2)]

    def steps(k):
        for _ in range(k):
            tc.forward_backward(data, "cross_entropy").result()
            tc.optim_step(adam(1e-2)).result()

    steps(1)
    tc.save_state("resume-1").result()
    assert "resume-1" in tc.list_checkpoints()
    steps(2)
    w_straight = weights_of(trainer, tc, "straight")
    tc.load_state_with_optimizer("resume-1").result()
    steps(2)
    assert_states_close(weights_of(trainer, tc, "resumed"), w_straight)
    tc.load_state(tc.resolve_checkpoint_path("resume-1")).result()  # weights only: fresh Adam state
    steps(2)
    fresh = weights_of(trainer, tc, "fresh-adam")
    assert not torch.equal(fresh["model.norm.weight"], w_straight["model.norm.weight"])
    # the same as a brand-new optimizer started from the checkpoint weights
    tc.load_state("resume-1").result()
    steps(2)
    assert_states_close(weights_of(trainer, tc, "fresh-adam-2"), fresh)


def test_sampler_snapshots_base_and_delta(trainer):
    tc = new_client(trainer)
    with pytest.raises(Exception, match="base"):
        tc.save_weights_for_sampler_ext("too-early", "delta")
    data = [datum(rand_tokens(12, 40))]
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(adam(1e-2)).result()
    base = tc.save_weights_for_sampler_ext("snap-base", "base")
    assert base.snapshot_name == f"snap-base-{tc.session_id}" and base.path == base.snapshot_name
    base_dir = trainer.store / "sampler" / base.snapshot_name
    hf = AutoModelForCausalLM.from_pretrained(base_dir)
    fwd = tc.forward(data, "cross_entropy").result()
    torch.testing.assert_close(torch.tensor(fwd.loss_fn_outputs[0]["logprobs"].data),
                               torch_logprobs(hf, [rand_tokens(12, 40)])[0].detach(), atol=1e-5, rtol=0)
    base_state = snapshots.apply_snapshot(base_dir, None, None)
    assert_states_close(base_state, snapshots.canonical_state(hf))

    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(adam(1e-2)).result()
    delta = tc.save_weights_for_sampler_ext("snap-delta", "delta")
    delta_dir = trainer.store / "sampler" / delta.snapshot_name
    manifest = snapshots.read_manifest(delta_dir)
    assert manifest["kind"] == "delta" and manifest["previous_snapshot_identity"] == base.snapshot_name
    rebuilt = snapshots.apply_snapshot(delta_dir, base_state, base.snapshot_name)
    assert_states_close(rebuilt, weights_of(trainer, tc, "snap-check"))
    with pytest.raises(snapshots.SnapshotMismatch):
        snapshots.apply_snapshot(delta_dir, base_state, "some-other-identity")


def test_lora_changes_only_adapters_and_reference_is_frozen(trainer, service):
    ref = service.create_base_training_client(BASE)
    data = [datum(rand_tokens(12, 50)), datum(rand_tokens(8, 51))]
    before = ref.forward(data, "cross_entropy").result()
    with pytest.raises(tinker.RequestFailedError if hasattr(tinker, "RequestFailedError") else Exception):
        ref.forward_backward(data, "cross_entropy").result()

    lora = new_client(trainer, lora_rank=8)
    assert lora.get_info().lora_rank == 8
    initial = weights_of(trainer, lora, "lora-0")
    assert_states_close(initial, snapshots.canonical_state(models.load_model(BASE, seed=SEED)))  # B = 0 at init
    for _ in range(2):
        lora.forward_backward(data, "cross_entropy").result()
        lora.optim_step(adam(1e-2)).result()
    merged = weights_of(trainer, lora, "lora-2")
    changed = {k for k in merged if not torch.equal(merged[k], initial[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed), changed
    after = ref.forward(data, "cross_entropy").result()
    assert after.metrics == before.metrics


def test_bad_requests_get_errors_and_service_keeps_serving(trainer):
    tc = new_client(trainer)
    good = [datum(rand_tokens(8, 60))]
    bad_cases = [
        ([datum([1, 2, 300, 4])], "cross_entropy", "vocabulary"),
        ([datum(rand_tokens(600, 61))], "cross_entropy", "context"),
        (good, "dro", "unsupported loss"),
        ([types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                      loss_fn_inputs={"target_tokens": [1, 2]})], "cross_entropy", "values for"),
    ]
    for data, loss, message in bad_cases:
        with pytest.raises(Exception, match=message):
            tc.forward_backward(data, loss).result()
        assert tc.forward_backward(good, "cross_entropy").result().metrics["loss:sum"] > 0
    h = {"X-API-Key": trainer.api_key}
    url = trainer.base_url + "/api/v1"
    r = httpx.post(f"{url}/forward", headers=h, json={"model_id": "nope", "seq_id": 1, "forward_input": {}})
    rid = r.json()["request_id"]
    assert "unknown model_id" in httpx.post(f"{url}/retrieve_future", headers=h, json={"request_id": rid}).json()["error"]
    r = httpx.post(f"{url}/forward", headers=h, content=b"{not json")
    assert r.status_code == 400 and r.json()["category"] == "user"
    assert httpx.post(f"{url}/retrieve_future", headers=h, json={"request_id": "x"}).status_code == 404
    with pytest.raises(Exception, match="not found"):
        tc.load_state("no-such-checkpoint").result()
    assert tc.forward(good, "cross_entropy").result().metrics["loss:sum"] > 0


def test_seq_ordering_and_dedupe_over_raw_http(trainer):
    tc = new_client(trainer)  # the SDK client is not used after this
    h = {"X-API-Key": trainer.api_key}
    url = trainer.base_url + "/api/v1"
    d = datum(rand_tokens(8, 70))
    fb_input = {"data": [{"model_input": {"chunks": [{"type": "encoded_text", "tokens": d.model_input.to_ints()}]},
                          "loss_fn_inputs": {"target_tokens": {"data": d.loss_fn_inputs["target_tokens"].data,
                                                               "dtype": "int64"}}}], "loss_fn": "cross_entropy"}
    adam_json = {"learning_rate": 0.05, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.0,
                 "grad_clip_norm": 0.0}
    mid = tc.model_id
    r4 = httpx.post(f"{url}/forward", headers=h, json={"model_id": mid, "seq_id": 4, "forward_input": fb_input})
    r3 = httpx.post(f"{url}/optim_step", headers=h, json={"model_id": mid, "seq_id": 3, "adam_params": adam_json})
    r1 = httpx.post(f"{url}/forward", headers=h, json={"model_id": mid, "seq_id": 1, "forward_input": fb_input})
    r2 = httpx.post(f"{url}/forward_backward", headers=h,
                    json={"model_id": mid, "seq_id": 2, "forward_backward_input": fb_input})
    again = httpx.post(f"{url}/forward_backward", headers=h,
                       json={"model_id": mid, "seq_id": 2, "forward_backward_input": fb_input})
    assert again.json()["request_id"] == r2.json()["request_id"]
    res = [httpx.post(f"{url}/retrieve_future", headers=h, json={"request_id": r.json()["request_id"]},
                      timeout=60).json() for r in (r1, r2, r3, r4)]
    assert res[0]["metrics"]["loss:sum"] == pytest.approx(res[1]["metrics"]["loss:sum"])
    assert res[3]["metrics"]["loss:sum"] < res[0]["metrics"]["loss:sum"]  # seq 4 ran after the step


def test_cross_job_load_and_plain_tinker_client(jobs_root, trainer):
    """A checkpoint of job-a loads by cross_job:// into job-b; job-b is also driven by plain tinker (a `tml-` key,
    LoRA, tinker's own sampler): the service speaks the tinker 0.23 contract itself, not only the SDK's dialect."""
    tc = new_client(trainer)
    data = [datum(rand_tokens(10, 80))]
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(adam(1e-2)).result()
    tc.save_state("shared-ckpt").result()
    expected = weights_of(trainer, tc, "shared")
    with start_trainer(jobs_root, "job-b", BASE, seed=SEED, api_key="tml-" + "1" * 32) as other:
        tb = new_client(other)
        assert tb.list_checkpoints() == []
        tb.load_state_with_optimizer(tb.resolve_checkpoint_path("shared-ckpt", source_job_id="job-a")).result()
        assert_states_close(weights_of(other, tb, "loaded"), expected)

        plain_service = tinker.ServiceClient(base_url=other.base_url, api_key=other.api_key)
        lora = plain_service.create_lora_training_client(BASE, rank=8)
        lora.forward_backward(data, "cross_entropy").result()
        lora.optim_step(adam(1e-2)).result()
        plain = lora.save_weights_for_sampler("plain").result()
        assert plain.path.startswith("tinker://") and plain.path.endswith("/sampler_weights/plain")
        sampler = plain_service.create_sampling_client(model_path=plain.path)
        lps = sampler.compute_logprobs(types.ModelInput.from_ints(rand_tokens(10, 80))).result()
        assert lps[0] is None
        expected_lps = lora.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
        torch.testing.assert_close(torch.tensor(lps[1:]), torch.tensor(expected_lps), atol=1e-5, rtol=0)
        out = sampler.sample(types.ModelInput.from_ints([1, 2, 3]), 2,
                             types.SamplingParams(max_tokens=4, seed=3)).result()
        assert len(out.sequences) == 2 and all(len(s.tokens) == len(s.logprobs) >= 1 for s in out.sequences)
