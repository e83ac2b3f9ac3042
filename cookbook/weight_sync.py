"""Weight sync: the official SDK's `WeightSyncer`, with every failure raised.

The SDK's syncer keeps the delta chain (a `base` snapshot first, then `delta`s naming the snapshot the deployment
holds), waits for the hot load tolerating transient status errors, and sends a warm-up completion after each load.
It reports a failed `save_only` by returning None and a failed `hotload` by returning False; a training run must
never go on sampling from weights it did not sync, so here both raise instead (`save_and_hotload` already does).
"""

from __future__ import annotations

import time

from fireworks.training.sdk import weight_syncer as _sdk

from cookbook.config import WeightSyncConfig


class WeightSyncer(_sdk.WeightSyncer):
    def save_only(self, name: str, checkpoint_type: str | None = None) -> str:
        """Save a sampler snapshot without loading it; returns its hot-load identity."""
        self.last_timing = {}
        started = time.time()
        saved = self.policy_client.save_weights_for_sampler_ext(
            name, checkpoint_type=checkpoint_type or self._next_checkpoint_type())
        self.last_timing["save_time_s"] = time.time() - started
        self._mark_first_save_done()
        return saved.snapshot_name

    def hotload(self, snapshot_name: str, checkpoint_type: str) -> bool:
        """Load a saved snapshot on the deployment and wait until it serves it; raises with the SDK's diagnosis."""
        self.last_timing = {}
        self._do_hotload(snapshot_name, checkpoint_type)
        return True


def should_sync(step: int, cfg: WeightSyncConfig) -> bool:
    """Sync after optimizer step `step` (1-based) every `weight_sync_interval` steps; 0 = never."""
    return cfg.weight_sync_interval > 0 and step > 0 and step % cfg.weight_sync_interval == 0
