"""cookbook: a Hydra-composed experiment framework for LLM post-training (SFT, GRPO, DPO, ORPO)."""

from cookbook.config import DeployConfig, InfraConfig, WandBConfig, WeightSyncConfig

__all__ = ["InfraConfig", "DeployConfig", "WeightSyncConfig", "WandBConfig", "ReconnectableClient", "WeightSyncer"]


def __getattr__(name: str):
    # The client classes pull in tinker (and so torch); load them only when asked so the CLI stays fast.
    if name == "ReconnectableClient":
        from cookbook.client.trainer import ReconnectableClient

        return ReconnectableClient
    if name == "WeightSyncer":
        from cookbook.client.weight_sync import WeightSyncer

        return WeightSyncer
    raise AttributeError(f"module 'cookbook' has no attribute {name!r}")
