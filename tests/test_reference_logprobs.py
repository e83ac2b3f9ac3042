"""DPO's reference logprobs (`recipes.dpo.ReferenceLogprobs`) against the embedded platform: computed a request per
first-epoch batch as training reaches it, the same values in whatever order batches ask for them (a resumed run),
and the reference released once every pair has its values."""

from __future__ import annotations

import contextlib

from cookbook.client.session import build_session
from cookbook.datasets.cursor import DataCursor
from cookbook.datasets.load import load_dataset
from cookbook.local.platform import LocalPlatform
from cookbook.recipes.dpo import ReferenceLogprobs
from cookbook.recipes.evals import pair_logprobs
from tests.platform_harness import run_config

BATCH = 4


def test_each_pair_gets_its_batch_request_values_in_any_order_and_the_reference_goes_when_all_have_them(tmp_path):
    with LocalPlatform(tmp_path / "platform") as platform, contextlib.ExitStack() as stack:
        session = build_session(run_config(tmp_path / "run"), platform.base_url, platform.api_key,
                                needs_reference=True, needs_deployment=False, stack=stack, log=lambda _: None,
                                poll_interval_s=0.05)
        data = load_dataset("bundled:pref_eval", "preference", session.tokenizer, 512, max_rows=10)
        first_epoch = DataCursor(len(data), 1, True, 0, data.valid)
        batches = []
        while (batch := first_epoch.next_batch(BATCH)).indices:
            batches.append(batch.indices)
        assert [len(b) for b in batches] == [4, 4, 2]
        # Independently: one forward per batch, blocking, on the same reference.
        expected = {i: v for b in batches for i, v in zip(b, pair_logprobs(session.reference,
                                                                             [data.items[i] for i in b], BATCH))}

        def cache():
            return ReferenceLogprobs(session, data, DataCursor(len(data), 1, True, 0, data.valid), BATCH)

        resumed = cache()  # a run resumed at its last batch asks for that one first
        assert resumed.of(batches[2]) == [expected[i] for i in batches[2]]
        assert session.reference is not None  # other pairs still lack values

        uninterrupted = cache()
        for b in batches:
            assert uninterrupted.of(b) == [expected[i] for i in b]
        assert session.reference is None  # every pair has its values: released
        assert uninterrupted.of(batches[1][::-1]) == [expected[i] for i in batches[1][::-1]]  # later epochs: cached
