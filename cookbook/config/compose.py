"""Compose a run config from `conf/` + overrides, convert it to typed objects, and explain mistakes.

Hydra reports user mistakes as tracebacks or terse messages with exit code 1, and lets `+typo=1` through
silently. The CLI therefore composes every job itself first (cheap: no torch) and turns each mistake into a
`UserError` paragraph that names the key or option and the fix. Tests use the same functions.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from cookbook.config import RECIPES, RecipeConfig, RunConfig, register_configs
from cookbook.errors import UserError

_CHECKOUT_CONF = Path(__file__).resolve().parents[2] / "conf"
# From a checkout or an editable install the top-level conf/ is used; a wheel ships it as cookbook/conf.
CONF_DIR: Path | None = _CHECKOUT_CONF if (_CHECKOUT_CONF / "config.yaml").exists() else None
CONFIG_PATH = str(CONF_DIR) if CONF_DIR else "pkg://cookbook.conf"
GROUPS = ("infra", "deploy", "weight_sync", "wandb", "recipe")


def group_options(group: str) -> list[str]:
    """Options of a config group, read from the config source Hydra uses."""
    if CONF_DIR is not None:
        return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    from importlib import resources

    return sorted(p.name[:-5] for p in resources.files("cookbook.conf").joinpath(group).iterdir()
                  if p.name.endswith(".yaml"))


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("cookbook_run_dir", default_run_dir, replace=True)
    OmegaConf.register_new_resolver("cookbook_slug", slug, replace=True)


def default_run_dir(log_path: Any, recipe: Any, infra: Any) -> str:
    if log_path not in (None, "None", ""):
        return str(log_path)
    from datetime import datetime

    return f"runs/{recipe}-{infra}-{datetime.now():%Y%m%d-%H%M%S}"


def slug(text: Any) -> str:
    """Directory-safe form of an override string: `/` would create nested directories."""
    return re.sub(r"[^A-Za-z0-9=,._+-]", "~", str(text))[:200] or "default"


def compose(overrides: Iterable[str], *, return_hydra_config: bool = False) -> DictConfig:
    """Compose the primary config with Hydra's compose API, translating Hydra's errors into UserErrors."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    register_resolvers()
    overrides = list(overrides)
    GlobalHydra.instance().clear()
    init = (initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3") if CONF_DIR
            else initialize_config_module("cookbook.conf", version_base="1.3"))
    try:
        with init:
            return hydra_compose("config", overrides=overrides, return_hydra_config=return_hydra_config)
    except UserError:
        raise
    except Exception as exc:  # Hydra raises a zoo of types; the message is what identifies the mistake
        raise explain_hydra_error(exc, overrides) from None
    finally:
        GlobalHydra.instance().clear()


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Typed objects from a composed config; validation runs in each dataclass's __post_init__."""
    cfg = cfg.copy()
    if "hydra" in cfg:
        with _open(cfg):
            cfg.pop("hydra")
    if OmegaConf.is_missing(cfg, "recipe"):
        raise UserError(missing_recipe_message())
    try:
        run = OmegaConf.to_object(cfg)
    except UserError:
        raise
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", "") or "?"
        raise UserError(f"`{key}` has no value. Fix: set it on the command line, e.g. `{key}=...`.") from None
    except OmegaConfBaseException as exc:
        raise explain_hydra_error(exc, []) from None
    assert isinstance(run, RunConfig)
    reject_extra_keys(run)
    return run


def compose_run_config(overrides: Iterable[str]) -> RunConfig:
    return to_run_config(compose(overrides))


def recipe_name(recipe: RecipeConfig) -> str:
    return next(name for name, cls in RECIPES.items() if type(recipe) is cls)


def missing_recipe_message() -> str:
    names = ", ".join(group_options("recipe"))
    return (f"No recipe chosen. Add `+recipe=<name>` (the leading + is required because the recipe is not in the "
            f"defaults list), where <name> is one of: {names}. Example: python -m cookbook.train +recipe=sft")


# --------------------------------------------------------------------------------------------------------------
# Extra keys: Hydra accepts `+typo=1` silently, even on structured configs, so they are checked here.
# --------------------------------------------------------------------------------------------------------------


def field_paths(obj: Any, prefix: str = "") -> list[str]:
    paths = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        paths.append(path)
        if dataclasses.is_dataclass(value):
            paths.extend(field_paths(value, path + "."))
    return paths


def _extra_keys(obj: Any, prefix: str = "") -> list[str]:
    declared = {f.name for f in dataclasses.fields(obj)}
    extras = [f"{prefix}{k}" for k in vars(obj) if k not in declared]
    for name in declared:
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            extras.extend(_extra_keys(value, f"{prefix}{name}."))
    return extras


def reject_extra_keys(run: RunConfig) -> None:
    extras = _extra_keys(run)
    if not extras:
        return
    known = field_paths(run)
    hints = []
    for key in extras:
        leaf = key.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.8) or [
            p for p in known if difflib.get_close_matches(leaf, [p.rsplit(".", 1)[-1]], n=1, cutoff=0.75)][:1]
        hints.append(f"`{key}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
    raise UserError(
        f"Unknown config key{'s' if len(extras) > 1 else ''} {', '.join(hints)}: it is not a field of the run "
        f"config, so it would be silently ignored. Fix: remove the `+{extras[0]}=...` override or correct the name "
        f"(see `python -m cookbook.train +recipe={recipe_name(run.recipe)} --cfg job` for every field).")


# --------------------------------------------------------------------------------------------------------------
# Hydra / OmegaConf errors → one readable paragraph
# --------------------------------------------------------------------------------------------------------------


def explain_hydra_error(exc: BaseException, overrides: list[str]) -> UserError:
    text = " ".join(str(exc).split())
    cause = exc.__cause__ or exc.__context__
    if cause is not None and not isinstance(exc, (ConfigKeyError, ValidationError)):
        text = f"{text} {' '.join(str(cause).split())}"

    missing = re.search(r"Could not find '([\w/.-]+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        group = group.split("/")[-1]
        opts = group_options(group) if group in GROUPS else []
        listing = f" Available options: {', '.join(opts)}." if opts else ""
        return UserError(f"`{group}={option}` is not an option of the `{group}` config group.{listing} "
                         f"Fix: pick one of the listed options, or add conf/{group}/{option}.yaml.")
    if re.search(r"Could not override 'recipe'", text):
        return UserError(f"Choose the recipe with a leading plus: `+recipe=<name>` (recipes: "
                         f"{', '.join(group_options('recipe'))}). The recipe is not in the defaults list, "
                         f"so Hydra needs the + to add it.")
    if "Multiple values for recipe" in text:
        return UserError("The recipe was chosen twice. Fix: pass `+recipe=<name>` once.")
    key_missing = re.search(r"Key '([^']+)' not in '(\w+)'", text)
    if key_missing:
        key, schema = key_missing.groups()
        full = _full_key(text) or _override_key(overrides, key) or key
        owners = [n for n, cls in RECIPES.items() if key in {f.name for f in dataclasses.fields(cls)}]
        where = f" It is a field of the {', '.join(owners)} recipe{'s' if len(owners) > 1 else ''}." if owners else ""
        known = _schema_fields(schema)
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        return UserError(f"`{full}` is not a field of {schema}.{where}{hint} Fix: correct or remove the override "
                         f"(`--cfg job` prints every field).")
    conv = re.search(r"Value '([^']*)' (?:of type '(\w+)' )?could not be converted to (\w+)", text)
    if conv:
        value, _, target = conv.groups()
        full = _full_key(text) or "a field"
        return UserError(f"`{full}` expects {_article(target)} {target.lower()} but got '{value}'. "
                         f"Fix: give a value of that type, e.g. `{full}=...`.")
    if "Invalid value" in text or "expected one of" in text:
        return UserError(f"{text} Fix: use one of the listed values.")
    if "mismatched input" in text or "extraneous input" in text or "no viable alternative" in text:
        return UserError(f"Could not parse the command-line overrides: {text} "
                         f"Fix: write overrides as key=value (quote values with spaces or special characters).")
    return UserError(f"The configuration could not be composed: {text} Fix: check the override named above; "
                     f"`python -m cookbook.train --help` lists the config groups and their options.")


def _full_key(text: str) -> str | None:
    m = re.search(r"full_key: ([\w.]+)", text)
    return m.group(1) if m else None


def _override_key(overrides: list[str], leaf: str) -> str | None:
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key == leaf or key.endswith("." + leaf):
            return key
    return None


def _schema_fields(schema: str) -> list[str]:
    import cookbook.config.schema as config

    cls = getattr(config, schema, None)
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


class _open:
    """Temporarily lift struct mode so a key can be removed."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def __enter__(self):
        OmegaConf.set_struct(self.cfg, False)

    def __exit__(self, *exc):
        OmegaConf.set_struct(self.cfg, True)
