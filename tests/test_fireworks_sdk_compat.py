"""The reference Fireworks client (`fireworks-ai[training-sdk]==1.2.24`) drives the local trainer service.

Deselected by default (`-m fireworks_sdk`); skipped when the package is not installed. Importing it monkey-patches
tinker process-wide, which is why it runs in its own marker group and never in the default suite.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.fireworks_sdk


def test_firetitan_client_trains_against_local_service(tmp_path):
    sdk = pytest.importorskip("fireworks.training.sdk", reason="fireworks-ai[training-sdk]==1.2.24 is not installed")
    from tinker import types

    from trainer_harness import start_trainer

    with start_trainer(tmp_path, "fw-job", "local-micro", api_key="fw_local_test_key") as tr:
        service = sdk.FiretitanServiceClient(base_url=tr.base_url, api_key=tr.api_key)
        tc = service.create_training_client(base_model="local-micro", lora_rank=0)
        data = [types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3, 4, 5, 6]),
                            loss_fn_inputs={"target_tokens": [2, 3, 4, 5, 6, 7], "weights": [0, 0, 1, 1, 1, 1]})]
        first = tc.forward_backward(data, "cross_entropy").result()
        assert first.metrics["loss:sum"] > 0
        tc.optim_step(types.AdamParams(learning_rate=1e-2),
                      grad_accumulation_normalization="num_loss_tokens").result()
        second = tc.forward(data, "cross_entropy").result()
        assert second.metrics["loss:sum"] < first.metrics["loss:sum"]
        tc.save_state("step-1").result()
        assert tc.list_checkpoints() == ["step-1"]
        tc.load_state_with_optimizer(tc.resolve_checkpoint_path("step-1")).result()
        saved = tc.save_weights_for_sampler_ext("step-1", checkpoint_type="base")
        saved = saved.result() if hasattr(saved, "result") else saved
        assert (tr.store / "sampler" / saved.snapshot_name / "snapshot.json").is_file()
