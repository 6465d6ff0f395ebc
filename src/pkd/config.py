"""Typed run configuration: YAML -> dataclasses, validated, with ``--set key=value`` overrides.

A config has five sections, written once each (no inheritance, no code in YAML)::

    model:    the detector to train (the student when distilling)
    teacher:  the frozen detector to imitate (distillation only)
    distill:  the feature loss and how levels are paired (distillation only)
    data:     COCO-format splits and image sizes
    train:    optimiser, schedule, evaluation and checkpoint intervals

Every unknown key and every bad value is an error naming the key, the value and what is
allowed. The resolved config is saved next to each run as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pkd.io import atomic_write_text

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "ModelConfig",
    "SplitConfig",
    "TrainConfig",
    "apply_overrides",
    "config_changes",
    "config_from_dict",
    "config_reference",
    "config_to_dict",
    "load_config",
    "save_config",
]


class ConfigError(ValueError):
    """A config key or value that is not allowed; the message names it and what is allowed."""


def _field(default: Any = dataclasses.MISSING, *, choices=None, minimum=None, doc: str = "", **kwargs) -> Any:
    metadata = {"choices": choices, "minimum": minimum, "doc": doc}
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class SplitConfig:
    """One COCO-format split."""

    annotations: str = _field(doc="instances JSON file")
    images: str = _field(doc="folder the JSON's file_name entries are relative to")


@dataclass
class DataConfig:
    """Datasets and image sizes."""

    train: SplitConfig | None = _field(None, doc="training split")
    val: SplitConfig | None = _field(None, doc="validation split, evaluated during training")
    test: SplitConfig | None = _field(None, doc="test split, evaluated once at the end with the best checkpoint")
    train_sizes: list[int] = _field([800], minimum=1, doc="shorter sides drawn at random per training image")
    max_size: int = _field(1333, minimum=1, doc="longer-side limit, training and evaluation")
    eval_size: int = _field(800, minimum=1, doc="shorter side at evaluation")
    flip_prob: float = _field(0.5, minimum=0.0, doc="horizontal flip probability in training")
    workers: int = _field(2, minimum=0, doc="data-loader worker processes per training process")
    drop_empty: bool = _field(False, doc="drop training images without annotations")
    group_aspect_ratio: bool = _field(True, doc="batch training images of similar aspect ratio")


@dataclass
class ModelConfig:
    """A detector (see :func:`pkd.models.build_detector`)."""

    name: str = _field(
        "",
        doc="torchvision-style name, e.g. fcos_resnet18_fpn, or fcos_timm_<timm model>_fpn for a timm "
        "backbone, or an Ultralytics YOLO model: yolov8n, yolo11s, yolo26m, ... (pkd[yolo]), or a DETR from "
        "Hugging Face: rtdetr_r18, rtdetr_v2_r18, dfine_s, deimv2_s, ... (pkd[detr]); for a teacher, may "
        "be left empty when weights is a pkd checkpoint (its own name is used)",
    )
    backbone: str | None = _field(
        None, doc="override the backbone in the name (a ResNet or timm_<model>; for DETRs a timm model)"
    )
    weights: str | None = _field(
        None,
        doc="torchvision weights name, or a local .pt/.pth file: a pkd checkpoint, a state_dict, an Ultralytics "
        ".pt (read without running code); `pkd eval CONFIG` evaluates it",
    )
    weights_backbone: str | None = _field(
        None,
        doc="torchvision backbone weights or a local classification .pt; for timm backbones also timm, "
        "timm:<tag> (downloads) or offline ImageNet weights: efficientnet_lite0.imagenet (lite1, lite2)",
    )
    num_classes: int | None = _field(None, minimum=2, doc="classes + background; default: the dataset's")
    fpn_channels: int = _field(256, minimum=1, doc="FPN width")
    norm: str = _field("auto", choices=("auto", "batch", "frozen", "group"), doc="backbone normalisation")
    trainable_backbone_layers: int | None = _field(None, minimum=0, doc="trainable ResNet stages (0-5)")
    backbone_options: dict[str, Any] = _field({}, doc="extra keyword arguments of timm.create_model (timm backbones)")
    options: dict[str, Any] = _field(
        {},
        doc="extra keyword arguments of the torchvision detector class; for YOLO models width, depth, end2end, "
        "score_thresh, nms_thresh, detections_per_img; for DETRs hf_config (fields of its Hugging Face config), "
        "score_thresh, detections_per_img",
    )


@dataclass
class DistillConfig:
    """Feature distillation (see :class:`pkd.distiller.Distiller`)."""

    loss: str = _field("pkd", choices=("pkd", "mse", "cwd"), doc="feature loss")
    weight: float | None = _field(None, minimum=0.0, doc="loss weight; default 6 (two-stage teacher) or 10")
    pairing: str = _field("stride", choices=("stride", "index"), doc="pair levels by stride or by position")
    levels: list[int] | None = _field(None, minimum=0, doc="strides (or positions) to distil; default first 4")
    max_levels: int = _field(4, minimum=1, doc="number of pairs by default")
    connectors: bool = _field(False, doc="learn 1x1 convs where channel counts differ")
    warmup_steps: int = _field(0, minimum=0, doc="linear ramp of the weight")
    distill_until: int | None = _field(None, minimum=0, doc="stop distilling at this step")
    resize: str = _field("student", choices=("student", "teacher"), doc="which map is resized on a size mismatch")


@dataclass
class TrainConfig:
    """Optimisation, schedule, evaluation and checkpoints."""

    epochs: int | None = _field(12, minimum=1, doc="training length in epochs (or set steps)")
    steps: int | None = _field(None, minimum=1, doc="training length in steps; overrides epochs")
    batch_size: int = _field(2, minimum=1, doc="images per step per process")
    optimizer: str = _field("sgd", choices=("sgd", "adamw"), doc="optimiser")
    lr: float = _field(0.01, minimum=0.0, doc="peak learning rate")
    momentum: float = _field(0.9, minimum=0.0, doc="SGD momentum (AdamW beta1)")
    weight_decay: float = _field(1e-4, minimum=0.0, doc="weight decay")
    schedule: str = _field("step", choices=("step", "cosine", "constant"), doc="learning-rate schedule")
    milestones: list[float] = _field([0.667, 0.917], minimum=0.0, doc="step schedule: fractions of training")
    gamma: float = _field(0.1, minimum=0.0, doc="step schedule: factor at each milestone")
    warmup_steps: int = _field(500, minimum=0, doc="linear warm-up steps")
    warmup_factor: float = _field(0.001, minimum=0.0, doc="learning-rate factor at step 0 of the warm-up")
    clip_grad_norm: float | None = _field(None, minimum=0.0, doc="clip the gradient norm (off by default)")
    amp: bool = _field(True, doc="automatic mixed precision (CUDA only)")
    max_bad_steps: int = _field(5, minimum=1, doc="consecutive non-finite losses tolerated (skipped)")
    eval_every: int | None = _field(None, minimum=1, doc="steps between evaluations; default every epoch")
    checkpoint_every: int | None = _field(None, minimum=1, doc="steps between checkpoints; default at evals")
    log_every: int = _field(20, minimum=1, doc="steps between logged training metrics")
    seed: int = _field(0, doc="random seed")
    deterministic: bool = _field(False, doc="deterministic algorithms (reproducible, slower)")
    device: str = _field("auto", doc="auto, cpu, cuda or cuda:N")


@dataclass
class Config:
    """A whole run: ``pkd train`` uses model/data/train; ``pkd distill`` also teacher/distill."""

    model: ModelConfig = _field(doc="the detector trained (the student when distilling)")
    data: DataConfig = _field(doc="datasets")
    train: TrainConfig = _field(doc="training")
    teacher: ModelConfig | None = _field(None, doc="the frozen teacher (distillation)")
    distill: DistillConfig | None = _field(None, doc="distillation settings")
    output: str = _field("runs/run", doc="run folder (checkpoints, metrics, TensorBoard events)")


def _allowed(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _convert(value: Any, annotation: Any, key: str, meta: dict) -> Any:
    """Checks and converts one value against a field's type and metadata."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key, meta)
    if dataclasses.is_dataclass(annotation):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {_allowed(annotation)}, got {value!r}")
        return _build(annotation, value, key)
    if origin is list:
        if not isinstance(value, list | tuple):
            value = [value]
        return [_convert(item, args[0], f"{key}[{i}]", meta) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
    elif annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
    elif annotation is Any:
        return value
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(meta['choices'])}")
    if meta.get("minimum") is not None and isinstance(value, int | float) and value < meta["minimum"]:
        raise ConfigError(f"{key}: {value!r} is below the minimum {meta['minimum']}")
    return value


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]}; allowed keys{' in ' + prefix if prefix else ''}: {_allowed(cls)}"
        )
    kwargs = {}
    for name, f in names.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in values:
            kwargs[name] = _convert(values[name], hints[name], key, f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _convert({}, hints[name], key, f.metadata)
            else:
                raise ConfigError(f"missing key {key} ({f.metadata.get('doc', '')})")
    return cls(**kwargs)


def config_from_dict(values: dict) -> Config:
    """Builds and validates a :class:`Config` from plain data (e.g. parsed YAML)."""
    if not isinstance(values, dict):
        raise ConfigError(f"a config is a mapping of {_allowed(Config)}, got {type(values).__name__}")
    config = _build(Config, values, "")
    _check(config)
    return config


def _check(config: Config) -> None:
    """Rules that involve several keys."""
    if config.teacher is not None and not (config.teacher.name or config.teacher.weights):
        raise ConfigError("teacher: give a name and weights, or the weights of a pkd checkpoint")
    if config.train.epochs is None and config.train.steps is None:
        raise ConfigError("train: set epochs or steps")
    if sorted(config.train.milestones) != config.train.milestones or any(m > 1 for m in config.train.milestones):
        raise ConfigError(f"train.milestones: {config.train.milestones} must be increasing fractions in [0, 1]")
    if config.data.train is None:
        raise ConfigError("data.train: a training split (annotations, images) is required")


def config_to_dict(config: Config) -> dict:
    """Plain data of a config (what ``config.yaml`` holds)."""
    return dataclasses.asdict(config)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.lr=0.02")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {item!r}: cannot parse the value ({error})") from error
    return [part for part in key.strip().split(".") if part], value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Applies ``section.key=value`` overrides (values parsed as YAML) to plain config data."""
    values = dict(values)
    for item in overrides:
        path, value = _parse_override(item)
        if not path:
            raise ConfigError(f"override {item!r} has no key")
        node = values
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node[part] = child = dict(child)
            node = child
        node[path[-1]] = value
    return values


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Reads a YAML config, applies overrides and validates it.

    Args:
        path: YAML file.
        overrides: ``["train.lr=0.02", "data.workers=0", ...]``.

    Raises:
        ConfigError: unknown keys, bad values, or missing required keys (the message says which).
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config is a mapping of {_allowed(Config)}")
    return config_from_dict(apply_overrides(values, list(overrides)))


def save_config(config: Config, path: str | Path) -> Path:
    """Writes the resolved config as YAML (atomically: a run folder never holds half a config)."""
    return atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(inner) + " or null"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(annotation):
        return "section"
    return {int: "int", float: "float", str: "string", bool: "bool"}.get(annotation, str(annotation))


def config_reference() -> str:
    """The config keys, types, defaults and meanings as Markdown (``docs/config.md``)."""
    lines = [
        "# Config reference",
        "",
        "Generated from `pkd/config.py` by `pkd.config.config_reference()`; a test keeps it in step with the code.",
        "Override any key on the command line with `--set section.key=value` (the value is read as YAML).",
    ]
    sections = [
        ("top level", Config),
        ("model and teacher", ModelConfig),
        ("distill", DistillConfig),
        ("data", DataConfig),
        ("data.train / data.val / data.test", SplitConfig),
        ("train", TrainConfig),
    ]
    for title, cls in sections:
        lines += ["", f"## {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f"`{yaml.safe_dump(f.default, default_flow_style=True).strip().removesuffix('...').strip()}`"
            elif f.default_factory is not dataclasses.MISSING:
                default = f"`{yaml.safe_dump(f.default_factory(), default_flow_style=True).strip()}`"
            else:
                default = "section" if dataclasses.is_dataclass(hints[f.name]) else "required"
            meaning = f.metadata.get("doc", "")
            if f.metadata.get("choices"):
                meaning += f" ({' / '.join(f.metadata['choices'])})"
            lines.append(f"| `{f.name}` | {_type_name(hints[f.name])} | {default} | {meaning} |")
    return "\n".join(lines) + "\n"


# Keys that may change between an interrupted run and its resumption without changing the result.
_RESUMABLE_CHANGES = {"output", "train.device", "train.log_every", "data.workers", "train.checkpoint_every"}


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(values, dict):
        return {prefix: values}
    flat = {}
    for key, value in values.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


# Keys that name files: `demo/data/x.json` and `/home/me/demo/data/x.json` (from /home/me) are one file.
_PATH_KEYS = (".annotations", ".images", ".weights")


def _comparable(key: str, value: Any) -> Any:
    if key.endswith(_PATH_KEYS) and isinstance(value, str) and ("/" in value or os.sep in value):
        return os.path.abspath(value)  # relative to the working directory, as the run would open it
    return value


def config_changes(saved: dict, current: dict) -> list[str]:
    """Differences between two plain configs that would change a run, as ``key: old -> new``.

    A file named by a relative path in one and an absolute path in the other (from the working
    directory) is not a change.
    """
    old, new = _flatten(saved), _flatten(current)
    keys = [k for k in dict.fromkeys([*old, *new]) if k not in _RESUMABLE_CHANGES]
    changed = [k for k in keys if _comparable(k, old.get(k)) != _comparable(k, new.get(k))]
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed]
