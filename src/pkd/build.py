"""Config sections -> objects: the detectors, the distiller, the optimiser and the schedule.

The one place where a :class:`~pkd.config.Config`'s sections become built parts, shared by
training (:func:`pkd.engine.fit`), ``pkd eval`` / ``pkd export`` and ``pkd inspect``
(:func:`pkd.analysis.inspect_pair`); the library's classes take built parts and never read a
config. Datasets too: :func:`build_dataset` is the one place a ``data`` section becomes
:class:`~pkd.data.CocoDetection` splits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pkd.checkpoint import CheckpointError, PickledFileError, load_checkpoint
from pkd.config import DataConfig, DistillConfig, ModelConfig
from pkd.data import CocoDetection, eval_transforms, train_transforms
from pkd.distiller import Distiller
from pkd.families import family_for, family_of
from pkd.models import build_detector
from pkd.weights import read_weights

__all__ = [
    "build_dataset",
    "build_distiller",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "load_detector",
    "load_weights_model",
    "lr_factor",
    "resolve_device",
]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _weights_meta(weights: str, name: str | None) -> dict[str, Any] | None:
    """The pkd metadata in a weights file; None for a plain state_dict or a pickle the builder reads."""
    try:
        _, meta = read_weights(weights)
    except PickledFileError:
        if not name:
            raise
        return None  # e.g. an Ultralytics .pt, which only its family's builder may unpickle
    if meta is not None and name and meta["detector"] != name:
        raise CheckpointError(
            f"checkpoint {weights} is for another model: it holds {meta['detector']!r}, expected {name!r}"
        )
    return meta


def build_model(
    config: ModelConfig, *, num_classes: int, eval_size: int, max_size: int, skip_resize: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """Builds a detector from its config section.

    A teacher given only as a pkd checkpoint (``weights``) is rebuilt with the name and
    settings stored in the checkpoint.

    Returns:
        The detector and its metadata (``detector``, ``num_classes``, ``build``: what
        :func:`~pkd.models.build_detector` needs to rebuild it).
    """
    name = config.name
    # Only what the config sets: a family takes the options it has (YOLO has no FPN width).
    defaults = ModelConfig()
    build: dict[str, Any] = {
        key: getattr(config, key)
        for key in ("backbone", "fpn_channels", "norm", "trainable_backbone_layers", "backbone_options")
        if getattr(config, key) != getattr(defaults, key)
    }
    build.update(config.options)
    if config.num_classes is not None:
        num_classes = config.num_classes
    weights = config.weights
    if weights and Path(weights).suffix in (".pt", ".pth"):
        meta = _weights_meta(weights, name)
        if meta is not None:
            name = name or meta["detector"]
            num_classes = meta["num_classes"] if config.num_classes is None else num_classes
            build = {k: v for k, v in meta["build"].items() if k not in ("min_size", "max_size")}
    if not name:
        raise ValueError("model name missing: set it in the config or give a pkd checkpoint as weights")
    model = build_detector(
        name,
        num_classes=num_classes,
        weights=weights,
        weights_backbone=config.weights_backbone,
        min_size=eval_size,
        max_size=max_size,
        skip_resize=skip_resize,
        **build,
    )
    build.update(family_of(model).resolved_options(model), min_size=eval_size, max_size=max_size)
    return model, {"detector": name, "num_classes": num_classes, "build": build}


def load_detector(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A detector rebuilt from a pkd run checkpoint or exported student, with its weights.

    Returns:
        The detector in eval mode and the checkpoint's ``meta`` (name, classes, label map, ...).
    """
    checkpoint = load_checkpoint(path)
    meta = checkpoint["meta"]
    model = build_detector(meta["detector"], num_classes=meta["num_classes"], **meta["build"])
    model.load_state_dict(checkpoint["model" if checkpoint["kind"] == "run" else "state_dict"])
    return model.eval(), meta


def load_weights_model(
    config: ModelConfig, categories: Mapping[int, str], *, eval_size: int, max_size: int
) -> tuple[nn.Module, dict[str, Any]]:
    """The detector a model section's ``weights`` hold, to evaluate on a split with ``categories``.

    Where the weights say which classes they predict -- a pkd checkpoint's label map, a
    torchvision weights enum's categories, an Ultralytics file's names -- the detector is built
    with their classes and the split's categories are matched to them (by name for the last
    two). A plain state_dict (timm, torchvision references) says nothing: the split's
    categories are numbered ``1..K`` in order of their ids, as training numbers them.

    Args:
        config: The model section; ``weights`` must be set.
        categories: The split's category id -> name.
        eval_size: Shorter image side at evaluation.
        max_size: Longer side limit.

    Returns:
        The detector in eval mode and its metadata: ``detector``, ``num_classes``, ``build``
        and ``label_map`` (category id -> the label the detector predicts for it).

    Raises:
        ValueError: No weights, or categories of the split that the weights do not predict.
    """
    if not config.weights:
        raise ValueError("nothing to evaluate: give --checkpoint or --onnx, or set model.weights in the config")
    weights = str(config.weights)
    sizes = dict(eval_size=eval_size, max_size=max_size)
    meta = _weights_meta(weights, config.name) if Path(weights).suffix in (".pt", ".pth") else None
    if meta is not None:
        model, built = build_model(config, num_classes=meta["num_classes"], **sizes)
        return model.eval(), {**built, "label_map": meta["label_map"]}
    if not config.name:
        raise ValueError("model.name missing: the weights are not a pkd checkpoint, which would name the detector")
    classes = family_for(config.name).weights_classes(config.name, weights)
    if classes is None:
        label_map = {category: label for label, category in enumerate(sorted(categories), start=1)}
    else:
        label_of = {name: label for label, name in classes.items()}
        unknown = sorted({name for name in categories.values() if name not in label_of})
        if unknown:
            raise ValueError(
                f"the split has categories {unknown[:10]} that {weights} does not predict (its classes: "
                f"{', '.join(list(label_of)[:10])}, ...); evaluate it on data of its own classes"
            )
        label_map = {category: label_of[name] for category, name in categories.items()}
        config = replace(config, num_classes=max(classes) + 1)  # the classes the weights predict
    model, built = build_model(config, num_classes=max(label_map.values(), default=0) + 1, **sizes)
    return model.eval(), {**built, "label_map": label_map}


def build_distiller(student: nn.Module, teacher: nn.Module, config: DistillConfig | None) -> Distiller:
    """The :class:`~pkd.distiller.Distiller` a ``distill`` config section describes (defaults if None)."""
    config = config or DistillConfig()
    return Distiller(
        student,
        teacher,
        loss=config.loss,
        weight=config.weight,
        levels=config.levels,
        pairing=config.pairing,
        max_levels=config.max_levels,
        connectors=config.connectors,
        distill_until=config.distill_until,
        warmup_steps=config.warmup_steps,
        resize=config.resize,
    )


def build_optimizer(parameters: Iterable[nn.Parameter], config) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW; no weight decay on norms and biases (1-D parameters)."""
    decay, no_decay = [], []
    for parameter in parameters:
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, 0.999))
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


def lr_factor(step: int, config, total_steps: int) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then step, cosine or constant."""
    if step < config.warmup_steps:
        alpha = step / config.warmup_steps
        return config.warmup_factor * (1 - alpha) + alpha
    progress = step / max(total_steps, 1)
    if config.schedule == "cosine":
        span = max(total_steps - config.warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - config.warmup_steps) / span)))
    if config.schedule == "step":
        return config.gamma ** sum(progress >= milestone for milestone in config.milestones)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, config, total_steps: int):
    """A per-step ``LambdaLR`` following :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config, total_steps))


def build_dataset(
    data: DataConfig, split: str, *, label_map: dict[int, int] | None = None, augment: bool = False
) -> CocoDetection:
    """One split of a ``data`` section as a :class:`~pkd.data.CocoDetection`.

    Args:
        data: the config's data section.
        split: ``"train"``, ``"val"`` or ``"test"``.
        label_map: COCO category id -> label (e.g. a checkpoint's, or the classes pretrained
            weights predict); default: the split's own categories, in order.
        augment: the training transforms (random size and flip); else the evaluation ones.

    Raises:
        ValueError: the config has no such split.
    """
    section = getattr(data, split, None)
    if section is None:
        raise ValueError(f"data.{split}: the config has no {split} split")
    if augment:
        transforms = train_transforms(min_sizes=data.train_sizes, max_size=data.max_size, flip_prob=data.flip_prob)
    else:
        transforms = eval_transforms()
    return CocoDetection(
        section.annotations,
        section.images,
        transforms=transforms,
        label_map=label_map,
        drop_empty=augment and data.drop_empty,
    )
