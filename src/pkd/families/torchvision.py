"""The torchvision family: any of its FPN detectors, on another backbone or FPN width.

``build_detector("retinanet_resnet50_fpn", num_classes=81)`` is torchvision's own builder;
``build_detector("retinanet_resnet18_fpn", num_classes=11, fpn_channels=128)`` is the same
detector on a ResNet-18 with a narrower FPN, assembled from torchvision's parts exactly the way
its builder assembles the ResNet-50 one, so a small student and a large teacher can be built
on a CPU. Names follow torchvision's ``<family>_<backbone>_fpn[_v2]`` pattern; the
``backbone=`` argument overrides the one in the name. This module names, checks and declares
the detectors; :mod:`pkd.families.torchvision_parts` assembles them from torchvision's parts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torchvision
from torch import nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from pkd.detector import DetectorSpec, ExportSpec, Family, Level
from pkd.families.torchvision_parts import (
    KINDS,
    TIMM_PREFIX,
    assemble,
    detect_norm,
    is_weights_path,
    load_strict,
    read_state_dict,
    start_fcos_regression_alive,
)
from pkd.features import probe_levels

__all__ = [
    "BACKBONES",
    "KINDS",
    "TIMM_PREFIX",
    "TorchvisionFamily",
    "build_torchvision",
    "detect_norm",
    "detector_names",
    "is_two_stage",
    "parse_detector_name",
]

#: ResNet-style backbones any family can use (torchvision classification models).
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2")
#: Backbones by name; MobileNetV3 is available for Faster R-CNN through torchvision's own builder.
BACKBONES = (*RESNETS, "mobilenet_v3_large")
NORMS = ("auto", "batch", "frozen", "group")

_NAME = re.compile(r"^(?P<family>[a-z]+)_(?P<backbone>.+)_fpn(?P<v2>_v2)?$")


def detector_names(timm_backbones: bool = True) -> list[str]:
    """Every torchvision detector name :func:`build_torchvision` accepts.

    Args:
        timm_backbones: include ``<family>_timm_<model>_fpn[_v2]`` for every model of
            ``timm.list_models()`` (thousands of names; a model without ``features_only``
            support is an error when built).
    """
    backbones: list[str] = list(RESNETS)
    if timm_backbones:
        import timm

        backbones += [TIMM_PREFIX + model for model in timm.list_models()]
    names = [f"{family}_{backbone}_fpn{v2}" for family in KINDS for backbone in backbones for v2 in ("", "_v2")]
    return sorted({*names, "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn"})


def _known_backbone(backbone: str) -> bool:
    if backbone.startswith(TIMM_PREFIX):
        import timm

        return backbone.removeprefix(TIMM_PREFIX) in timm.list_models()
    return backbone in BACKBONES


def parse_detector_name(name: str) -> tuple[str, str, bool]:
    """Splits ``"retinanet_resnet18_fpn_v2"`` into ``("retinanet", "resnet18", True)``.

    Raises:
        ValueError: the name is not one of :func:`detector_names`, with the list.
    """
    match = _NAME.match(name)
    known = match is not None and match["family"] in KINDS
    if known and match["backbone"].startswith(TIMM_PREFIX):
        known = _known_backbone(match["backbone"])
    elif known:
        known = name in detector_names(timm_backbones=False)
    if not known:
        raise ValueError(
            f"unknown detector {name!r}; known detectors: {', '.join(detector_names(timm_backbones=False))}, "
            f"and <family>_timm_<model>_fpn[_v2] for any timm model with features_only "
            f"(<family>_<backbone>_fpn[_v2] with family in {list(KINDS)} and backbone in {list(BACKBONES)} "
            "or timm_<model>, e.g. fcos_timm_tf_efficientnet_lite0_fpn)"
        )
    backbone = match["backbone"]
    if backbone == "mobilenet_v3_large_320":
        backbone = "mobilenet_v3_large"
    return match["family"], backbone, match["v2"] is not None


def is_two_stage(model: nn.Module) -> bool:
    """Whether ``model`` is a two-stage detector (torchvision's Faster / Mask R-CNN)."""
    return isinstance(model, GeneralizedRCNN)


def build_torchvision(
    name: str,
    *,
    num_classes: int,
    backbone: str | None = None,
    weights: str | Path | None = None,
    weights_backbone: str | Path | None = None,
    min_size: int | tuple[int, ...] = 800,
    max_size: int = 1333,
    fpn_channels: int = 256,
    norm: str = "auto",
    trainable_backbone_layers: int | None = None,
    skip_resize: bool = False,
    backbone_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Builds a torchvision detector, randomly initialised or with weights, never downloading unasked.

    Args:
        name: ``<family>_<backbone>_fpn[_v2]``, e.g. ``"fasterrcnn_resnet50_fpn_v2"`` (torchvision's
            own builder) or ``"fcos_resnet18_fpn"`` (same architecture on ResNet-18); see
            :func:`detector_names`.
        num_classes: number of classes including the background (torchvision convention).
        backbone: overrides the backbone in ``name`` (one of :data:`BACKBONES`, or ``timm_<model>``).
        weights: torchvision weights for the whole detector (e.g. ``"DEFAULT"`` or
            ``"RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1"``; downloads unless cached, only for
            torchvision's own networks), or the path of a local ``.pt``/``.pth`` file: a pkd
            checkpoint or export, or a plain ``state_dict``.
        weights_backbone: torchvision weights for the backbone (e.g. ``"IMAGENET1K_V1"``), or
            a local state_dict of the classification network (its ``fc`` is ignored). For a
            ``timm_<model>`` backbone: a local state_dict of the timm model, ``"timm"`` or
            ``"timm:<tag>"`` (timm downloads its pretrained weights) or an offline name of
            :data:`pkd.backbones.OFFLINE_WEIGHTS` (``"efficientnet_lite0.imagenet"``); the
            detector then normalises pixels with the backbone's pretrained mean and std.
        min_size: shorter image side at evaluation (and in training, unless ``skip_resize``); a
            tuple picks one at random per training batch, as torchvision does.
        max_size: longer side limit.
        fpn_channels: FPN width (256 in torchvision; smaller for CPU-sized models).
        norm: backbone normalisation. ``"auto"`` follows the weights: torchvision's
            FrozenBatchNorm2d with torchvision pretrained weights (as its builders do), trainable
            BatchNorm from random init (frozen statistics do not train from scratch) or the norm
            found in a local weights file. ``"batch"``, ``"frozen"`` or ``"group"`` (GroupNorm(32))
            force one.
        trainable_backbone_layers: ResNet stages left trainable (0-5); default 5 from random
            init, 3 with pretrained weights, as torchvision. For timm backbones, the last
            stages of timm's ``feature_info`` (0 to its number of levels; all from random init).
        skip_resize: in training, leave images at the size the data pipeline made them (for
            multi-scale training in the data transforms, torchvision's ``_skip_resize``).
        backbone_options: keyword arguments of ``timm.create_model`` for a ``timm_<model>``
            backbone (e.g. ``{"embed_dim": 32, "depths": [1, 1, 1, 1]}`` for a tiny Swin).
        **kwargs: passed to the torchvision detector class (e.g. ``score_thresh``,
            ``detections_per_img``, ``image_mean``).

    Returns:
        The detector (``nn.Module``) in training mode.

    Raises:
        ValueError: unknown name, backbone or norm, or weights that do not fit.

    Example:
        >>> model = build_torchvision("fcos_resnet18_fpn", num_classes=3, min_size=64, max_size=64, fpn_channels=64)
        >>> type(model).__name__, model.backbone.out_channels, model.pkd_spec.strides
        ('FCOS', 64, {'0': 8, '1': 16, '2': 32, 'p6': 64, 'p7': 128})
    """
    family, name_backbone, v2 = parse_detector_name(name)
    backbone = backbone or name_backbone
    if not _known_backbone(backbone):
        raise ValueError(
            f"unknown backbone {backbone!r}; known backbones: {', '.join(BACKBONES)}, or timm_<model> for a "
            "model of timm.list_models()"
        )
    if backbone_options and not backbone.startswith(TIMM_PREFIX):
        raise ValueError(f"backbone_options are for timm backbones (timm_<model>), not {backbone!r}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes}")
    local_weights = is_weights_path(weights)
    state_dict = read_state_dict(weights) if local_weights else None
    # A local classification file for a timm backbone is its pretrained weights; for a ResNet
    # it may be anything the user trained, so it keeps the random-init defaults.
    pretrained = (weights is not None and not local_weights) or (
        weights_backbone is not None and (not is_weights_path(weights_backbone) or backbone.startswith(TIMM_PREFIX))
    )
    if norm == "auto":
        norm = detect_norm(state_dict) if state_dict is not None else ("frozen" if pretrained else "batch")
    # All stages train from random init; torchvision leaves the first two frozen when pretrained.
    all_layers = 6 if backbone == "mobilenet_v3_large" else 5
    if trainable_backbone_layers is None:
        # timm backbones have as many stages as their feature_info lists: None trains them all.
        all_layers = None if backbone.startswith(TIMM_PREFIX) else all_layers
        trainable_backbone_layers = 3 if pretrained else all_layers
    kwargs.update(min_size=min_size, max_size=max_size)
    if skip_resize:
        kwargs["_skip_resize"] = True

    if backbone == "mobilenet_v3_large":
        if family != "fasterrcnn" or v2 or fpn_channels != 256 or norm not in ("batch", "frozen"):
            raise ValueError(
                "mobilenet_v3_large is available as torchvision's fasterrcnn_mobilenet_v3_large_fpn "
                "(FPN width 256, batch or frozen norm); use a ResNet backbone for other detectors"
            )
        if is_weights_path(weights_backbone):
            raise ValueError("a local weights_backbone file is supported for ResNet backbones only")
        if (norm == "frozen") != pretrained:
            raise ValueError("torchvision's MobileNetV3 detector uses frozen BatchNorm exactly when pretrained")
        # torchvision's builder picks its norm from the weights, as "auto" does.
        model = torchvision.models.get_model(
            name if "mobilenet" in name else "fasterrcnn_mobilenet_v3_large_fpn",
            weights=None if local_weights else weights,
            weights_backbone=weights_backbone,
            num_classes=num_classes,
            # torchvision warns when this is set without pretrained weights (it trains all then).
            trainable_backbone_layers=trainable_backbone_layers if pretrained else None,
            **kwargs,
        )
    elif weights is not None and not local_weights:
        # A whole torchvision network with its weights: only its own builder reproduces it.
        if backbone != "resnet50" or fpn_channels != 256:
            raise ValueError(
                f"torchvision weights exist for the resnet50 FPN detectors only, not {name} on {backbone} "
                f"with fpn_channels={fpn_channels}; pass weights_backbone for a pretrained backbone instead"
            )
        tv_name = f"{family}_resnet50_fpn{'_v2' if v2 else ''}"
        model = torchvision.models.get_model(
            tv_name,
            weights=weights,
            num_classes=num_classes,
            trainable_backbone_layers=trainable_backbone_layers,
            **kwargs,
        )
    else:
        model = assemble(
            family,
            backbone,
            v2,
            num_classes=num_classes,
            weights_backbone=weights_backbone,
            norm=norm,
            fpn_channels=fpn_channels,
            trainable_layers=trainable_backbone_layers,
            backbone_options=backbone_options,
            **kwargs,
        )
    if state_dict is not None:
        load_strict(model, state_dict, str(weights))
    elif weights is None and isinstance(model, FCOS):
        start_fcos_regression_alive(model)
    strides = _MOBILENET_STRIDES if backbone == "mobilenet_v3_large" else _STRIDES[KINDS[family]]
    model.pkd_spec = _spec(model, dict(strides))
    return model


#: The levels torchvision's FPN backbones return, by name: two-stage detectors read strides 4-32
#: and add a max-pooled 64; one-stage ones read 8-32 and add P6, P7; the MobileNetV3 FPN reads
#: two stages that are both at stride 32 (torchvision's choice) and adds a max-pooled 64.
_STRIDES = {
    "two-stage": {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64},
    "one-stage": {"0": 8, "1": 16, "2": 32, "p6": 64, "p7": 128},
}
_MOBILENET_STRIDES = {"0": 32, "1": 32, "pool": 64}


def _spec(model: nn.Module, strides: dict[str, int]) -> DetectorSpec:
    two_stage = is_two_stage(model)
    channels = int(model.backbone.out_channels)
    return DetectorSpec(
        family="torchvision",
        levels={name: Level(stride, channels) for name, stride in strides.items()},
        image_mean=tuple(float(v) for v in model.transform.image_mean),
        image_std=tuple(float(v) for v in model.transform.image_std),
        distill_weight=6.0 if two_stage else 10.0,
        weight_reason=(
            "the reference configs (MMRazor PKD) use 6 with a two-stage teacher (Faster / Mask R-CNN) "
            "and 10 with a one-stage one (RetinaNet, FCOS)"
        ),
        # The RoI heads see proposals ranked and NMS'd by the RPN: their outputs are checked as detections.
        export=ExportSpec(
            thresholds_at="roi_heads" if two_stage else "", raw_outputs=("rpn.head",) if two_stage else ("head",)
        ),
    )


class TorchvisionFamily(Family):
    """torchvision's Faster R-CNN, Mask R-CNN, RetinaNet and FCOS (:func:`build_torchvision`)."""

    name = "torchvision"
    # The post-processing keywords are declared too, so that another family's option of the same
    # name (DETR's score_thresh) does not make them foreign here.
    options = (
        "backbone",
        "fpn_channels",
        "norm",
        "trainable_backbone_layers",
        "backbone_options",
        "score_thresh",
        "detections_per_img",
        "box_score_thresh",
        "box_detections_per_img",
    )
    pattern = (
        f"<kind>_<backbone>_fpn[_v2] with kind in {', '.join(KINDS)} and backbone in {', '.join(BACKBONES)} "
        "or timm_<model> for any timm model with features_only, e.g. fcos_timm_tf_efficientnet_lite0_fpn"
    )
    open_options = True  # score_thresh, detections_per_img, ...: keywords of torchvision's detector classes

    def names(self) -> list[str]:
        return detector_names(timm_backbones=False)

    def matches(self, name: str) -> bool:
        # Any <kind>_<...>_fpn name is this family's: build_torchvision then says what is wrong with it.
        match = _NAME.match(name)
        return match is not None and match["family"] in KINDS

    def build(self, name: str, **options: Any) -> nn.Module:
        return build_torchvision(name, **options)

    def resolved_options(self, model: nn.Module) -> dict[str, Any]:
        return {"norm": detect_norm(model.state_dict())}

    def weights_classes(self, name: str, weights: str | Path) -> dict[int, str] | None:
        """The categories of a torchvision weights enum (COCO's, labels 1..90 with gaps); None for a file."""
        if is_weights_path(weights):
            return None
        family, backbone, v2 = parse_detector_name(name)
        builder = name if backbone == "mobilenet_v3_large" else f"{family}_resnet50_fpn{'_v2' if v2 else ''}"
        categories = torchvision.models.get_model_weights(builder).verify(weights).meta["categories"]
        return {label: category for label, category in enumerate(categories) if label and category != "N/A"}

    def describe(self, model: nn.Module) -> DetectorSpec | None:
        """A torchvision detector pkd did not build: its levels from one forward of its backbone."""
        if not isinstance(model, GeneralizedRCNN | RetinaNet | FCOS):
            return None
        levels = probe_levels(model.backbone)
        return _spec(model, {name: stride for name, (stride, _) in levels.items()})
