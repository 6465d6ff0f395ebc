"""Building any detector by name: a lookup in the registered families.

``build_detector("fcos_resnet18_fpn", num_classes=11)`` asks :data:`pkd.families.FAMILIES`
which family builds that name (torchvision here, Ultralytics for ``yolo11n``, ...) and calls
its :meth:`~pkd.detector.Family.build`. The model comes back with its declaration attached
(:func:`pkd.families.describe`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from pkd.families import FAMILIES, describe, family_for

__all__ = ["build_detector", "count_parameters", "describe", "detector_names"]


def build_detector(
    name: str,
    *,
    num_classes: int,
    weights: str | Path | None = None,
    weights_backbone: str | Path | None = None,
    min_size: int | tuple[int, ...] = 800,
    max_size: int = 1333,
    skip_resize: bool = False,
    **options: Any,
) -> nn.Module:
    """Builds a detector of any registered family, randomly initialised or with local weights.

    Args:
        name: the detector, e.g. ``"fasterrcnn_resnet50_fpn_v2"``, ``"fcos_timm_tf_efficientnet_lite0_fpn"``
            (torchvision), ``"yolo11n"`` (Ultralytics); :func:`detector_names` lists them.
        num_classes: number of classes including the background (torchvision's convention,
            kept for every family).
        weights: weights of the whole detector (a local file, or a name the family knows).
        weights_backbone: pretrained weights of the backbone only.
        min_size: shorter image side at evaluation (and in training, unless ``skip_resize``).
        max_size: longer side limit.
        skip_resize: in training, leave images at the size the data pipeline made them.
        **options: the family's own options (see its ``build``; e.g. ``fpn_channels`` for
            torchvision, ``width`` for YOLO); one a family does not have is a ``ValueError``.

    Returns:
        The detector (``nn.Module``, training mode) with its :class:`~pkd.detector.DetectorSpec`.

    Example:
        >>> model = build_detector("fcos_resnet18_fpn", num_classes=3, min_size=64, max_size=64, fpn_channels=64)
        >>> describe(model).family, describe(model).strides["0"]
        ('torchvision', 8)
    """
    family = family_for(name)
    # An option of another family is named as such; a family with open options (torchvision's
    # detector classes take many keywords) lets its class check the rest.
    others = {key for other in FAMILIES.values() if other is not family for key in other.options}
    foreign = [key for key in options if key not in family.options and (not family.open_options or key in others)]
    if foreign:
        owners = {key: [f.name for f in FAMILIES.values() if key in f.options] for key in foreign}
        described = "; ".join(
            f"{key}: {' / '.join(owners[key])} options" if owners[key] else f"{key}: no family's option"
            for key in foreign
        )
        raise ValueError(
            f"{described}, not options of {name} (a {family.name} detector takes {', '.join(family.options) or 'none'})"
        )
    return family.build(
        name,
        num_classes=num_classes,
        weights=weights,
        weights_backbone=weights_backbone,
        min_size=min_size,
        max_size=max_size,
        skip_resize=skip_resize,
        **options,
    )


def detector_names() -> list[str]:
    """Every detector name :func:`build_detector` accepts by name (timm backbones: see the torchvision family)."""
    return sorted(name for family in FAMILIES.values() for name in family.names())


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())
