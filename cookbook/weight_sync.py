"""Weight sync: push the policy's weights to the deployment as sampler snapshots (wire-contract §4).

The first snapshot is a full `base`; later ones are `delta`s chained to the snapshot the deployment holds, so each
sync ships only what changed. A deployment that still holds a snapshot from an earlier run (or another trainer) gets
a full base load first, since a delta against an unknown predecessor would be rejected.
"""

from __future__ import annotations

import logging
import time

from cookbook.config import WeightSyncConfig
from cookbook.fireworks_api import DeploymentManager

log = logging.getLogger(__name__)


class WeightSyncer:
    def __init__(self, policy_client, deploy_mgr: DeploymentManager, deployment_id: str, base_model: str,
                 hotload_timeout: float = 600, first_checkpoint_type: str = "base", lora_rank: int = 0):
        self.policy_client = policy_client
        self.deploy_mgr = deploy_mgr
        self.deployment_id = deployment_id
        self.base_model = base_model
        self.hotload_timeout = hotload_timeout
        self.first_checkpoint_type = first_checkpoint_type
        self.lora_rank = lora_rank
        self.base_saved = False  # a sampler snapshot exists on the trainer that a delta can be computed against
        self.base_identity: str | None = None  # the snapshot the deployment holds, as far as this syncer knows
        self._last_saved: str | None = None  # the trainer's latest export: what its next delta is computed against
        self._deployment_checked = False
        self.last_sync_seconds: float | None = None

    def _checkpoint_type(self, requested: str | None) -> str:
        if requested:
            return requested
        if self.lora_rank > 0:
            return "base"  # LoRA adapters are standalone artifacts, never deltas
        return "delta" if self.base_saved else self.first_checkpoint_type

    def save_only(self, name: str, checkpoint_type: str | None = None) -> tuple[str, str]:
        """Save a sampler snapshot without loading it; returns `(snapshot_identity, checkpoint_type)`."""
        ctype = self._checkpoint_type(checkpoint_type)
        result = self.policy_client.save_weights_for_sampler_ext(name, checkpoint_type=ctype)
        self.base_saved = True
        self._last_saved = result.snapshot_name
        return result.snapshot_name, ctype

    def hotload(self, snapshot_identity: str, checkpoint_type: str = "base") -> None:
        """Load a saved snapshot on the deployment and wait until it serves it."""
        if not self._deployment_checked:
            self._check_deployment()
        previous = None
        if checkpoint_type == "delta" and self.lora_rank == 0:
            if self.base_identity is None:
                raise RuntimeError(
                    f"cannot hot load delta snapshot {snapshot_identity}: the deployment holds no snapshot of this "
                    "run to apply it to. Save a 'base' snapshot first (or call reset_delta_chain()).")
            previous = self.base_identity
        self.deploy_mgr.hotload(self.deployment_id, self.base_model, snapshot_identity, previous)
        try:
            self.deploy_mgr.wait_for_hotload(self.deployment_id, self.base_model, snapshot_identity,
                                             self.hotload_timeout)
        except Exception:
            # What the deployment holds is now uncertain: the next snapshot must be a full base.
            self.reset_delta_chain()
            raise
        self.base_identity = snapshot_identity

    def save_and_hotload(self, name: str, checkpoint_type: str | None = None) -> str:
        """Save a sampler snapshot named `name` and load it on the deployment; returns the snapshot identity."""
        start = time.perf_counter()
        if not self._deployment_checked:
            self._check_deployment()
        if checkpoint_type is None and self.lora_rank == 0 and (
                self.base_identity is None or self._last_saved != self.base_identity):
            # A delta is computed against the trainer's last export; it only applies if the deployment holds exactly
            # that snapshot. Otherwise (fresh chain, earlier run's weights, a save_only in between) ship a base.
            checkpoint_type = "base"
        identity, ctype = self.save_only(name, checkpoint_type)
        self.hotload(identity, ctype)
        self.last_sync_seconds = time.perf_counter() - start
        log.debug("weight sync %s (%s) took %.2fs", identity, ctype, self.last_sync_seconds)
        return identity

    def reset_delta_chain(self) -> None:
        """Forget the chain (e.g. after pointing the deployment at another trainer): the next sync is a base."""
        self.base_saved = False
        self.base_identity = None
        self._last_saved = None

    def _check_deployment(self) -> None:
        """Whatever the deployment holds from an earlier run is not our chain's predecessor: start with a base."""
        deadline = time.monotonic() + min(300.0, self.hotload_timeout)
        while True:
            rep = self.deploy_mgr.hotload_status(self.deployment_id, self.base_model)
            if rep or time.monotonic() > deadline:
                break
            time.sleep(self.deploy_mgr.poll_interval_s)
        current = rep.get("current_snapshot_identity") if rep else None
        if current is not None and current != self.base_identity:
            log.info("deployment %s holds snapshot %s from an earlier run; the first sync is a full base",
                     self.deployment_id, current)
            self.base_identity = None
        self._deployment_checked = True


def should_sync(step: int, cfg: WeightSyncConfig) -> bool:
    """Sync after optimizer step `step` (1-based) every `weight_sync_interval` steps; 0 = never."""
    return cfg.weight_sync_interval > 0 and step > 0 and step % cfg.weight_sync_interval == 0

