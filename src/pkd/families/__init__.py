"""Detector families, one module each, registered in one plain dict.

:data:`FAMILIES` maps a family's key to its :class:`~pkd.detector.Family`; building a detector
by name is a lookup in it (:func:`family_for`), and what pkd needs to know about a built
detector is its declaration (:func:`describe`). Adding a family is one module and one line::

    from pkd.families import FAMILIES
    FAMILIES["mine"] = MyFamily()

A family's own libraries (Ultralytics, Hugging Face's) are imported by its module only when one
of its detectors is built. The torchvision family's module names, checks and declares its
detectors; ``torchvision_parts.py`` beside it assembles them from torchvision's parts.
"""

from __future__ import annotations

from torch import nn

from pkd.detector import DetectorSpec, Family
from pkd.families.detr import DetrFamily
from pkd.families.torchvision import TorchvisionFamily
from pkd.families.yolo import YoloFamily

__all__ = ["FAMILIES", "describe", "family_for", "family_of", "unwrap"]

#: Every family pkd builds detectors of, by key; torchvision's is asked last (its names are a pattern).
FAMILIES: dict[str, Family] = {"yolo": YoloFamily(), "detr": DetrFamily(), "torchvision": TorchvisionFamily()}


def family_for(name: str) -> Family:
    """The family that builds the detector called ``name``.

    Raises:
        ValueError: no family knows the name; the message lists what each one builds.
    """
    for family in FAMILIES.values():
        if family.matches(name):
            return family
    known = "; ".join(
        f"{key}: {', '.join(family.names())}{f' ({family.pattern})' if family.pattern else ''}"
        for key, family in FAMILIES.items()
    )
    raise ValueError(f"unknown detector {name!r}. Known detectors by family: {known}")


def unwrap(model: nn.Module) -> nn.Module:
    """The detector inside DDP (``.module``) or a :class:`~pkd.distiller.Distiller` (``.student``)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif getattr(model, "pkd_spec", None) is None and isinstance(getattr(model, "student", None), nn.Module):
            model = model.student
        else:
            return model


def describe(model: nn.Module) -> DetectorSpec:
    """What ``model`` declares about itself: its levels, normalisation, default weight and export needs.

    A detector built by :func:`pkd.models.build_detector` carries its spec (``model.pkd_spec``);
    for one built elsewhere each family is asked whether it is one of its own.

    Raises:
        TypeError: no family recognises the model.
    """
    model = unwrap(model)
    spec = getattr(model, "pkd_spec", None)
    if spec is not None:
        return spec
    for family in FAMILIES.values():
        spec = family.describe(model)
        if spec is not None:
            return spec
    raise TypeError(
        f"pkd cannot tell what a {type(model).__name__} is: build it with pkd.build_detector, or register a "
        f"pkd.detector.Family that describes it (families: {', '.join(FAMILIES)})"
    )


def family_of(model: nn.Module) -> Family:
    """The registered family of a detector (from its spec)."""
    return FAMILIES[describe(model).family]
