"""Configuration: the typed dataclasses every config field is declared in (`schema`), Hydra composition into them
(`compose`), and the checks that run before anything is launched (`preflight`)."""

from cookbook.config.schema import (
                                    RECIPES,
                                    DeployConfig,
                                    DPOConfig,
                                    GRPOConfig,
                                    InfraConfig,
                                    ORPOConfig,
                                    PreferenceConfig,
                                    RecipeConfig,
                                    RunConfig,
                                    SFTConfig,
                                    WandBConfig,
                                    WeightSyncConfig,
                                    register_configs,
)

__all__ = ["RECIPES", "DeployConfig", "DPOConfig", "GRPOConfig", "InfraConfig", "ORPOConfig", "PreferenceConfig",
           "RecipeConfig", "RunConfig", "SFTConfig", "WandBConfig", "WeightSyncConfig", "register_configs"]
