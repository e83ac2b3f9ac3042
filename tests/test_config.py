"""Config composition: every infra × recipe, the spec tables field by field, YAML ↔ schema agreement."""

import dataclasses

import pytest
import yaml
from omegaconf import OmegaConf

from cookbook import DeployConfig, InfraConfig, WandBConfig, WeightSyncConfig
from cookbook.config.compose import CONF_DIR, compose_run_config, group_options
from cookbook.config import RECIPES, DPOConfig, GRPOConfig, ORPOConfig, RunConfig, SFTConfig
from cookbook.errors import UserError

INFRAS = group_options("infra")
RECIPE_NAMES = group_options("recipe")


def test_groups_list_the_expected_options():
    assert {"local-tiny", "local-small", "qwen3-8b-h200", "qwen3p5-9b"} <= set(INFRAS)
    assert RECIPE_NAMES == ["dpo", "grpo", "orpo", "sft"]
    assert group_options("wandb") == ["disabled", "offline", "online"]
    assert "schema" not in INFRAS  # schemas live under schema/<group>, never as options


@pytest.mark.parametrize("infra", INFRAS)
@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_every_infra_and_recipe_composes_to_typed_objects(infra, recipe):
    run = compose_run_config([f"+recipe={recipe}", f"infra={infra}"])
    assert isinstance(run, RunConfig)
    assert type(run.recipe) is RECIPES[recipe]
    assert isinstance(run.infra, InfraConfig) and run.infra.training_shape_id
    assert run.base_model and run.infra.launcher in ("local", "fireworks")


def test_default_infra_is_local_tiny_and_fireworks_shapes_are_real_ids():
    run = compose_run_config(["+recipe=sft"])
    assert run.base_model == "local-tiny" and run.infra.launcher == "local"
    h200 = compose_run_config(["+recipe=grpo", "infra=qwen3-8b-h200"]).infra
    assert h200.training_shape_id == "accounts/fireworks/trainingShapes/qwen3-8b-128k-h200"
    assert h200.ref_training_shape_id == "accounts/fireworks/trainingShapes/qwen3-8b-128k-h200-forward"
    q35 = compose_run_config(["+recipe=grpo", "infra=qwen3p5-9b"])
    assert q35.infra.training_shape_id == "accounts/fireworks/trainingShapes/qwen3p5-9b-256k"
    assert q35.base_model == "accounts/fireworks/models/qwen3p5-9b"


SPEC = {
    InfraConfig: [("training_shape_id", "str | None", None), ("ref_training_shape_id", "str | None", None),
                  ("region", "str | None", None), ("trainer_timeout_s", "float", 3600),
                  ("extra_args", "list[str] | None", None)],
    DeployConfig: [("deployment_id", "str | None", None), ("tokenizer_model", "str | None", None),
                   ("deployment_shape", "str | None", None), ("deployment_region", "str | None", None),
                   ("hot_load_bucket_type", "str", "FW_HOSTED"), ("hot_load_trainer_job", "str | None", None),
                   ("deployment_timeout_s", "float", 5400), ("deployment_extra_args", "list[str] | None", None),
                   ("sample_timeout", "int", 600), ("disable_speculative_decoding", "bool", True),
                   ("extra_values", "dict[str, str] | None", None), ("replica_count", "int | None", None)],
    WeightSyncConfig: [("dcp_save_interval", "int", 0), ("weight_sync_interval", "int", 1),
                       ("dcp_timeout", "int", 2700), ("first_checkpoint_type", "str", "base"),
                       ("weight_sync_before_training", "bool", False), ("weight_sync_timeout", "int", 600)],
    WandBConfig: [("entity", "str | None", None), ("project", "str | None", None), ("run_name", "str | None", None)],
}


def _normalize_type(annotation) -> str:
    text = str(annotation).replace("Optional[", "").replace("typing.", "")
    optional = str(annotation).startswith("Optional[")
    text = text[:-1] if optional else text
    return f"{text} | None" if optional else text


@pytest.mark.parametrize("cls", list(SPEC), ids=lambda c: c.__name__)
def test_spec_configs_match_the_spec_table_field_by_field(cls):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    instance = cls()
    for name, type_text, default in SPEC[cls]:
        assert name in fields, f"{cls.__name__}.{name} missing"
        assert _normalize_type(fields[name].type) == type_text, (name, fields[name].type)
        value = getattr(instance, name)
        assert value == default and type(value) is type(default), (name, value)


@pytest.mark.parametrize("group,cls", [("deploy", DeployConfig), ("weight_sync", WeightSyncConfig)])
def test_default_group_files_carry_the_spec_defaults(group, cls):
    run = compose_run_config(["+recipe=sft"])
    assert getattr(run, group) == cls()


def test_recipe_normalization_defaults():
    assert SFTConfig().grad_accumulation_normalization is None
    assert GRPOConfig().grad_accumulation_normalization == "num_loss_tokens"
    assert DPOConfig().grad_accumulation_normalization is None
    assert ORPOConfig().grad_accumulation_normalization is None
    assert GRPOConfig().raw_sum and not SFTConfig().raw_sum


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_recipe_yaml_lists_every_schema_field_with_its_default_and_a_comment(recipe):
    path = CONF_DIR / "recipe" / f"{recipe}.yaml"
    values = yaml.safe_load(path.read_text())
    values.pop("defaults")
    cls = RECIPES[recipe]
    assert set(values) == {f.name for f in dataclasses.fields(cls)}
    typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), values))
    assert typed == cls(), "recipe YAML and dataclass defaults drifted apart"
    for line in path.read_text().splitlines():
        if line and not line.startswith((" ", "#", "defaults", "-")):
            assert "#" in line, f"uncommented field in {path.name}: {line}"


def test_every_group_file_field_is_commented():
    for path in CONF_DIR.rglob("*.yaml"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if ":" in stripped and not stripped.startswith(("#", "-", "defaults")) and not stripped.endswith(":"):
                if path.name == "config.yaml" and line.startswith(" "):
                    continue  # the hydra: block
                assert "#" in stripped, f"{path.relative_to(CONF_DIR)}: uncommented field: {line}"


@pytest.mark.parametrize("overrides,words", [
    ([], ["No recipe chosen", "+recipe=", "dpo, grpo, orpo, sft"]),
    (["recipe=sft"], ["+recipe="]),
    (["+recipe=sft", "infra=qwen3-8b"], ["infra=qwen3-8b", "local-tiny", "qwen3-8b-h200"]),
    (["+recipe=sft", "wandb=loud"], ["wandb=loud", "offline"]),
    (["+recipe=sft", "+lerning_rate=1"], ["lerning_rate", "recipe.learning_rate"]),
    (["+recipe=sft", "recipe.group_size=4"], ["recipe.group_size", "SFTConfig", "grpo"]),
    (["+recipe=sft", "infra.trainer_timeout_s=abc"], ["infra.trainer_timeout_s", "float", "abc"]),
    (["+recipe=sft", "weight_sync.dcp_save_interval=-1"], ["weight_sync.dcp_save_interval", "negative"]),
    (["+recipe=grpo", "recipe.group_size=1"], ["recipe.group_size", "at least 2"]),
    (["+recipe=dpo", "recipe.beta=0.5"], ["recipe.beta", "(0, 0.5)"]),
    (["+recipe=sft", "recipe.grad_accumulation_normalization=tokens"], ["grad_accumulation_normalization"]),
    (["+recipe=sft", "resume=sometimes"], ["resume", "auto, never, must"]),
])
def test_user_errors_name_the_key_and_the_fix(overrides, words):
    with pytest.raises(UserError) as info:
        compose_run_config(overrides)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    assert "Fix" in message or "+recipe=" in message
