"""The embedded platform's catalog: training shapes, deployment shapes and base-model aliases, in one place.

Built in, for each embedded model `m` in (local-micro, local-tiny, local-small):

| resource | name | what it says |
|---|---|---|
| policy training shape | `accounts/local/trainingShapes/<m>` (version `1`) | FULL_PARAMETER_TRAINER, base model `<m>`, context = the model's positions (512), deployment shape below |
| reference training shape | `accounts/local/trainingShapes/<m>-forward` (version `1`) | FORWARD_ONLY, base model `<m>`, no deployment shape |
| deployment shape | `accounts/local/deploymentShapes/<m>/versions/1` | base model `<m>` |

A catalog file (`--catalog FILE.json` on the control plane, `COOKBOOK_PLATFORM_CATALOG` for `LocalPlatform`, `--catalog`
on `python -m cookbook.local serve`) ADDS to that, so the platform can answer like Fireworks for Fireworks shape and
model names while running an embedded model. Format (JSON; field names are the wire names of a training-shape
version's `snapshot`, so a real snapshot can be pasted in; unknown fields are an error):

    {
      "trainingShapes": [
        {"name": "accounts/fireworks/trainingShapes/qwen3-8b-128k-h200",     # required: parent shape name
         "version": "7",                                                     # optional, default "1"
         "baseModel": "accounts/fireworks/models/qwen3-8b",                  # required
         "trainerMode": "FULL_PARAMETER_TRAINER",                            # required: or LORA_TRAINER / FORWARD_ONLY
         "maxSupportedContextLength": 131072,                                # required
         "deploymentShapeVersion": "accounts/fireworks/deploymentShapes/qwen3-8b-128k-h200/versions/3",
                                            # optional; must name a deployment shape of the catalog (built in or file)
         "acceleratorType": "NVIDIA_H200_141GB", "acceleratorCount": 8,     # optional, default "CPU", 0
         "nodeCount": 1, "trainerImageTag": "...", "deploymentImageTag": "...",
         "baseModelWeightPrecision": "bfloat16", "pipelineParallelism": 1}  # optional
      ],
      "deploymentShapes": [
        {"name": "accounts/fireworks/deploymentShapes/qwen3-8b-128k-h200",   # required: parent shape name
         "version": "3",                                                     # optional, default "1"
         "baseModel": "accounts/fireworks/models/qwen3-8b",                  # optional
         "acceleratorType": "NVIDIA_H200_141GB", "acceleratorCount": 8}     # optional, default "CPU", 0
      ],
      "modelAliases": {
        "accounts/fireworks/models/qwen3-8b": "local-micro"                  # an embedded model, or an HF model
      }                                                                      # directory (absolute, or relative to
    }                                                                        # the catalog file)

An alias makes trainers and deployments created with that base model load the target's weights and tokenizer while
every API answer keeps the aliased name. A name defined twice (built in or across files) is an error.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cookbook.models import EMBEDDED_MODELS

LOCAL_ACCOUNT = "local"
TRAINER_MODES = ("FULL_PARAMETER_TRAINER", "LORA_TRAINER", "FORWARD_ONLY")
TRAINING_SHAPE_RE = re.compile(r"^accounts/([^/]+)/trainingShapes/([^/]+)$")
DEPLOYMENT_SHAPE_RE = re.compile(r"^accounts/([^/]+)/deploymentShapes/([^/]+)$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class CatalogError(ValueError):
    """A catalog file that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class DeploymentShape:
    name: str  # accounts/<a>/deploymentShapes/<s>
    version: str = "1"
    base_model: str | None = None
    accelerator_type: str = "CPU"
    accelerator_count: int = 0

    @property
    def version_name(self) -> str:
        return f"{self.name}/versions/{self.version}"


@dataclass(frozen=True)
class TrainingShape:
    name: str  # accounts/<a>/trainingShapes/<s>
    base_model: str
    trainer_mode: str
    max_context_length: int
    version: str = "1"
    deployment_shape_version: str | None = None
    accelerator_type: str = "CPU"
    accelerator_count: int = 0
    node_count: int = 1
    trainer_image_tag: str = "local"
    deployment_image_tag: str = "local"
    base_model_weight_precision: str = "float32"
    pipeline_parallelism: int = 1

    @property
    def version_name(self) -> str:
        return f"{self.name}/versions/{self.version}"

    @property
    def forward_only(self) -> bool:
        return self.trainer_mode == "FORWARD_ONLY"

    def version_payload(self) -> dict[str, Any]:
        """A training-shape version as `GET .../trainingShapes/{s}/versions[/{v}]` answers it."""
        snapshot: dict[str, Any] = {
            "baseModel": self.base_model, "trainerImageTag": self.trainer_image_tag,
            "maxSupportedContextLength": self.max_context_length, "nodeCount": self.node_count,
            "acceleratorType": self.accelerator_type, "acceleratorCount": self.accelerator_count,
            "baseModelWeightPrecision": self.base_model_weight_precision, "trainerMode": self.trainer_mode,
            "deploymentImageTag": self.deployment_image_tag,
            "trainerShardingScheme": {"pipelineParallelism": self.pipeline_parallelism},
        }
        if self.deployment_shape_version:
            snapshot["deploymentShapeVersion"] = self.deployment_shape_version
        return {"name": self.version_name, "snapshot": snapshot, "validated": True, "latestValidated": True}


# Wire field -> (dataclass field, type) for catalog entries.
_TRAINING_FIELDS: dict[str, tuple[str, type]] = {
    "name": ("name", str), "version": ("version", str), "baseModel": ("base_model", str),
    "trainerMode": ("trainer_mode", str), "maxSupportedContextLength": ("max_context_length", int),
    "deploymentShapeVersion": ("deployment_shape_version", str), "acceleratorType": ("accelerator_type", str),
    "acceleratorCount": ("accelerator_count", int), "nodeCount": ("node_count", int),
    "trainerImageTag": ("trainer_image_tag", str), "deploymentImageTag": ("deployment_image_tag", str),
    "baseModelWeightPrecision": ("base_model_weight_precision", str),
    "pipelineParallelism": ("pipeline_parallelism", int),
}
_TRAINING_REQUIRED = ("name", "baseModel", "trainerMode", "maxSupportedContextLength")
_DEPLOYMENT_FIELDS: dict[str, tuple[str, type]] = {
    "name": ("name", str), "version": ("version", str), "baseModel": ("base_model", str),
    "acceleratorType": ("accelerator_type", str), "acceleratorCount": ("accelerator_count", int),
}


@dataclass
class Catalog:
    training_shapes: dict[str, TrainingShape] = field(default_factory=dict)  # by parent name
    deployment_shapes: dict[str, DeploymentShape] = field(default_factory=dict)  # by versioned name
    model_aliases: dict[str, str] = field(default_factory=dict)  # base-model name -> embedded name or HF directory
    sources: list[str] = field(default_factory=list)  # catalog files loaded, in order

    # ------------------------------------------------------------------ lookups
    def training_shape(self, ref: str) -> TrainingShape | None:
        """`accounts/<a>/trainingShapes/<s>` or `.../versions/<v>` (the version must be the shape's)."""
        parent, _, version = ref.partition("/versions/")
        shape = self.training_shapes.get(parent)
        if shape is None or (version and version != shape.version):
            return None
        return shape

    def deployment_shape(self, ref: str) -> DeploymentShape | None:
        """`accounts/<a>/deploymentShapes/<s>/versions/<v>`, or the unversioned parent (its latest version)."""
        if "/versions/" in ref:
            return self.deployment_shapes.get(ref)
        versions = [s for s in self.deployment_shapes.values() if s.name == ref]
        return max(versions, key=lambda s: _version_key(s.version)) if versions else None

    def model_source(self, base_model: str) -> str:
        """What a trainer or deployment loads for `base_model`: the alias target, else the name itself."""
        seen = set()
        while base_model in self.model_aliases and base_model not in seen:
            seen.add(base_model)
            base_model = self.model_aliases[base_model]
        return base_model

    def auto_select(self, base_model: str, lora_rank: int, forward_only: bool) -> TrainingShape | None:
        """The shape a create request without `trainingShape` (and without `skipValidations`) gets, like the
        backend's auto-selection: same base model; forward-only prefers FORWARD_ONLY, LoRA prefers LORA_TRAINER.
        The embedded trainer runs LoRA and full-parameter on any shape, so the others are the fallbacks."""
        candidates = [s for s in self.training_shapes.values() if s.base_model == base_model]
        if forward_only:
            order = ("FORWARD_ONLY", "LORA_TRAINER", "FULL_PARAMETER_TRAINER")
        elif lora_rank > 0:
            order = ("LORA_TRAINER", "FULL_PARAMETER_TRAINER")
        else:
            order = ("FULL_PARAMETER_TRAINER", "LORA_TRAINER")
        for mode in order:
            matching = sorted((s for s in candidates if s.trainer_mode == mode), key=lambda s: s.name)
            if matching:
                return matching[0]
        return None

    # ------------------------------------------------------------------ building
    def add_training_shape(self, shape: TrainingShape, where: str = "built in") -> None:
        if not TRAINING_SHAPE_RE.match(shape.name):
            raise CatalogError(f"{where}: training shape name {shape.name!r} is not "
                               "accounts/<account>/trainingShapes/<shape>")
        if not _VERSION_RE.match(shape.version):
            raise CatalogError(f"{where}: training shape {shape.name}: bad version {shape.version!r}")
        if shape.trainer_mode not in TRAINER_MODES:
            raise CatalogError(f"{where}: training shape {shape.name}: trainerMode must be one of "
                               f"{', '.join(TRAINER_MODES)}, got {shape.trainer_mode!r}")
        if shape.max_context_length <= 0 or shape.node_count <= 0 or shape.accelerator_count < 0:
            raise CatalogError(f"{where}: training shape {shape.name}: maxSupportedContextLength and nodeCount "
                               "must be positive, acceleratorCount non-negative")
        if shape.deployment_shape_version and shape.deployment_shape_version not in self.deployment_shapes:
            raise CatalogError(f"{where}: training shape {shape.name}: deploymentShapeVersion "
                               f"{shape.deployment_shape_version!r} is not a deployment shape of the catalog "
                               "(define it under \"deploymentShapes\", with its version)")
        if shape.name in self.training_shapes:
            raise CatalogError(f"{where}: training shape {shape.name} is already defined")
        self.training_shapes[shape.name] = shape

    def add_deployment_shape(self, shape: DeploymentShape, where: str = "built in") -> None:
        if not DEPLOYMENT_SHAPE_RE.match(shape.name):
            raise CatalogError(f"{where}: deployment shape name {shape.name!r} is not "
                               "accounts/<account>/deploymentShapes/<shape> (the version goes in \"version\")")
        if not _VERSION_RE.match(shape.version):
            raise CatalogError(f"{where}: deployment shape {shape.name}: bad version {shape.version!r}")
        if shape.version_name in self.deployment_shapes:
            raise CatalogError(f"{where}: deployment shape {shape.version_name} is already defined")
        self.deployment_shapes[shape.version_name] = shape

    def add_alias(self, name: str, target: str, where: str = "built in") -> None:
        if not name or not isinstance(target, str) or not target:
            raise CatalogError(f"{where}: modelAliases entries map a base-model name to a non-empty target")
        if name in self.model_aliases or name in EMBEDDED_MODELS:
            raise CatalogError(f"{where}: model alias {name!r} is already defined (or is an embedded model)")
        if target not in EMBEDDED_MODELS and not Path(target).is_dir():
            raise CatalogError(f"{where}: model alias {name!r} -> {target!r}: the target must be an embedded model "
                               f"({', '.join(EMBEDDED_MODELS)}) or an existing model directory")
        self.model_aliases[name] = target

    def load_file(self, path: str | os.PathLike) -> None:
        path = Path(path).expanduser().resolve()
        where = str(path)
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise CatalogError(f"catalog {where}: cannot read it ({e.strerror or e})") from None
        except json.JSONDecodeError as e:
            raise CatalogError(f"catalog {where}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise CatalogError(f"catalog {where}: the top level must be a JSON object")
        unknown = set(data) - {"trainingShapes", "deploymentShapes", "modelAliases"}
        if unknown:
            raise CatalogError(f"catalog {where}: unknown top-level field(s) {sorted(unknown)}; expected "
                               "trainingShapes, deploymentShapes, modelAliases")
        aliases = data.get("modelAliases") or {}
        if not isinstance(aliases, dict):
            raise CatalogError(f"catalog {where}: modelAliases must be an object of name -> target")
        for name, target in aliases.items():
            if isinstance(target, str) and target not in EMBEDDED_MODELS and not Path(target).is_absolute():
                target = str((path.parent / target).resolve())
            self.add_alias(name, target, where)
        for i, entry in enumerate(_list(data, "deploymentShapes", where)):
            self.add_deployment_shape(DeploymentShape(**_fields(entry, _DEPLOYMENT_FIELDS, ("name",),
                                                                 f"{where}: deploymentShapes[{i}]")), where)
        for i, entry in enumerate(_list(data, "trainingShapes", where)):
            self.add_training_shape(TrainingShape(**_fields(entry, _TRAINING_FIELDS, _TRAINING_REQUIRED,
                                                            f"{where}: trainingShapes[{i}]")), where)
        self.sources.append(where)


def _version_key(version: str) -> tuple:
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def _list(data: dict, key: str, where: str) -> list:
    value = data.get(key) or []
    if not isinstance(value, list):
        raise CatalogError(f"catalog {where}: {key} must be a list")
    return value


def _fields(entry: Any, spec: dict[str, tuple[str, type]], required: tuple[str, ...], where: str) -> dict:
    if not isinstance(entry, dict):
        raise CatalogError(f"{where}: must be an object")
    unknown = sorted(set(entry) - set(spec))
    if unknown:
        raise CatalogError(f"{where}: unknown field(s) {unknown}; allowed: {', '.join(spec)}")
    missing = [k for k in required if k not in entry]
    if missing:
        raise CatalogError(f"{where}: missing required field(s) {missing}")
    out = {}
    for key, value in entry.items():
        attr, typ = spec[key]
        if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
            if isinstance(value, str) and value.isdigit():  # protojson writes int64 as strings
                value = int(value)
            else:
                raise CatalogError(f"{where}: {key} must be an integer, got {value!r}")
        elif typ is str and not isinstance(value, str):
            raise CatalogError(f"{where}: {key} must be a string, got {value!r}")
        out[attr] = value
    return out


def builtin() -> Catalog:
    """The local shapes of every embedded model (see the module docstring)."""
    cat = Catalog()
    for model, spec in EMBEDDED_MODELS.items():
        dep = DeploymentShape(name=f"accounts/{LOCAL_ACCOUNT}/deploymentShapes/{model}", version="1", base_model=model)
        cat.add_deployment_shape(dep)
        common = dict(base_model=model, max_context_length=spec.max_positions, version="1")
        cat.add_training_shape(TrainingShape(name=f"accounts/{LOCAL_ACCOUNT}/trainingShapes/{model}",
                                             trainer_mode="FULL_PARAMETER_TRAINER",
                                             deployment_shape_version=dep.version_name, **common))
        cat.add_training_shape(TrainingShape(name=f"accounts/{LOCAL_ACCOUNT}/trainingShapes/{model}-forward",
                                             trainer_mode="FORWARD_ONLY", **common))
    return cat


def load(files: list[str | os.PathLike] | None = None) -> Catalog:
    """The built-in catalog plus `files` in order; raises CatalogError with a readable message."""
    cat = builtin()
    for f in files or []:
        cat.load_file(f)
    return cat


def describe(cat: Catalog) -> list[str]:
    """A short table of the training shapes: shape, mode, base model (-> what runs it), deployment shape."""
    rows = [("training shape", "mode", "base model", "deployment shape")]
    for shape in sorted(cat.training_shapes.values(), key=lambda s: s.name):
        source = cat.model_source(shape.base_model)
        base = shape.base_model if source == shape.base_model else f"{shape.base_model} -> {source}"
        rows.append((shape.version_name, shape.trainer_mode, base, shape.deployment_shape_version or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
