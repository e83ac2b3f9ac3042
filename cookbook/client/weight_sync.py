"""Weight sync: the official SDK's `WeightSyncer`, with every failure raised and old snapshots deleted.

The SDK's syncer keeps the delta chain (a `base` snapshot first, then `delta`s naming the snapshot the deployment
holds), waits for the hot load tolerating transient status errors, and sends a warm-up completion after each load.
It reports a failed `save_only` by returning None and a failed `hotload` by returning False; a training run must
never go on sampling from weights it did not sync, so here both raise instead (`save_and_hotload` already does).

Retention: once the deployment has loaded a new snapshot, the one it held before is deleted from the trainer's
storage. Nothing can read it any more: the deployment applies the next delta to the weights it holds in memory
(the delta names the snapshot it now holds, which is kept), and the trainer computes that delta against its own
in-memory copy of its last export. Only snapshots this syncer saved are deleted — never the checkpointer's final,
promotable snapshots — and a snapshot saved but never loaded stays. Deletion is best effort
(`cookbook.runs.retention`) and not waited for within the sync; the session calls `close()` at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from fireworks.training.sdk import weight_syncer as _sdk

from cookbook.config import WeightSyncConfig
from cookbook.runs.retention import discard_soon


@dataclass
class WeightSyncer(_sdk.WeightSyncer):
    _saved: set = field(default_factory=set, init=False, repr=False)  # snapshot names this syncer saved
    _held: str | None = field(default=None, init=False, repr=False)  # what the deployment holds by our last load
    _deleting: Callable[[], bool] | None = field(default=None, init=False, repr=False)  # discard_soon's wait

    def save_only(self, name: str, checkpoint_type: str | None = None) -> str:
        """Save a sampler snapshot without loading it; returns its hot-load identity."""
        self.last_timing = {}
        started = time.time()
        saved = self.policy_client.save_weights_for_sampler_ext(
            name, checkpoint_type=checkpoint_type or self._next_checkpoint_type())
        self.last_timing["save_time_s"] = time.time() - started
        self._mark_first_save_done()
        self._saved.add(saved.snapshot_name)
        return saved.snapshot_name

    def hotload(self, snapshot_name: str, checkpoint_type: str) -> bool:
        """Load a saved snapshot on the deployment and wait until it serves it; raises with the SDK's diagnosis."""
        self.last_timing = {}
        self._do_hotload(snapshot_name, checkpoint_type)
        self._loaded(snapshot_name)
        return True

    def save_and_hotload(self, name: str, checkpoint_type: str | None = None) -> str | None:
        snapshot = super().save_and_hotload(name, checkpoint_type)
        self._saved.add(snapshot)
        if self._hotload_enabled:
            self._loaded(snapshot)
        return snapshot

    def _loaded(self, snapshot: str) -> None:
        """The deployment now serves `snapshot`: the one it held before is no longer needed by anything. Its
        deletion is sent now and its answer collected at the next sync (or `close`), off the training step."""
        self.close()
        previous, self._held = self._held, snapshot
        if previous and previous != snapshot and previous in self._saved:
            self._saved.discard(previous)
            self._deleting = discard_soon(self.policy_client, f"sampler_weights/{previous}")

    def close(self) -> None:
        """Wait for the answer to the last deletion this syncer sent."""
        deleting, self._deleting = self._deleting, None
        if deleting is not None:
            deleting()


def should_sync(step: int, cfg: WeightSyncConfig) -> bool:
    """Sync after optimizer step `step` (1-based) every `weight_sync_interval` steps; 0 = never."""
    return cfg.weight_sync_interval > 0 and step > 0 and step % cfg.weight_sync_interval == 0
