"""The torchvision family: any of its FPN detectors, on another backbone or FPN width.

``build_detector("retinanet_resnet50_fpn", num_classes=81)`` is torchvision's own builder;
``build_detector("retinanet_resnet18_fpn", num_classes=11, fpn_channels=128)`` is the same
detector on a ResNet-18 with a narrower FPN, assembled from torchvision's parts exactly the way
its builder assembles the ResNet-50 one, so a small student and a large teacher can be built
on a CPU. Names follow torchvision's ``<family>_<backbone>_fpn[_v2]`` pattern; the
``backbone=`` argument overrides the one in the name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import AnchorGenerator, RPNHead
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from pkd.backbones import TimmBackboneWithFPN, build_timm_body
from pkd.checkpoint import CheckpointError, read_weights
from pkd.detector import DetectorSpec, ExportSpec, Family, Level
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

#: torchvision's detector kinds: two-stage (region proposals, then RoI heads) or one-stage (dense heads).
KINDS = {"fasterrcnn": "two-stage", "maskrcnn": "two-stage", "retinanet": "one-stage", "fcos": "one-stage"}
#: ResNet-style backbones any family can use (torchvision classification models).
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2")
#: Backbones by name; MobileNetV3 is available for Faster R-CNN through torchvision's own builder.
BACKBONES = (*RESNETS, "mobilenet_v3_large")
#: ``timm_<model>`` names any timm model with ``features_only`` (``fcos_timm_tf_efficientnet_lite0_fpn``).
TIMM_PREFIX = "timm_"
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


def _norm_layer(norm: str) -> Callable[..., nn.Module]:
    if norm == "frozen":
        return FrozenBatchNorm2d
    if norm == "group":
        return lambda channels: nn.GroupNorm(32, channels)
    return nn.BatchNorm2d


def _is_path(value: Any) -> bool:
    return isinstance(value, Path) or (isinstance(value, str) and (Path(value).suffix in {".pt", ".pth"}))


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a pkd checkpoint or export, a ``{"model": ...}`` dict, or a plain state_dict."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    try:
        return read_weights(path)[0]
    except CheckpointError as error:  # build_detector reports bad arguments, files included, as ValueError
        raise ValueError(str(error)) from None


def _load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str, ignore=()) -> None:
    """``load_state_dict(strict=True)`` with an error that says what does not fit (keys under ``ignore`` skipped)."""
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(ignore))}
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(tuple(ignore))}
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        details = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                details.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise ValueError(
            f"weights in {source} do not fit this model: {'; '.join(details)}. Build the detector with the "
            "name, backbone, num_classes, fpn_channels and norm the weights were trained with."
        )
    model.load_state_dict(state_dict, strict=not ignore)


def detect_norm(state_dict: dict[str, torch.Tensor]) -> str:
    """The backbone norm a state_dict was trained with: ``"batch"``, ``"frozen"`` or ``"group"``.

    Trainable BatchNorm keeps ``num_batches_tracked``; FrozenBatchNorm2d has running statistics
    without it; GroupNorm has neither.
    """
    backbone_keys = [k for k in state_dict if ".body." in k or not k.startswith(("backbone.", "fpn."))]
    if any(k.endswith("num_batches_tracked") for k in backbone_keys):
        return "batch"
    if any(k.endswith("running_var") for k in backbone_keys):
        return "frozen"
    return "group"


def _resnet_body(
    backbone: str, weights_backbone: str | Path | None, norm: str, trainable_layers: int
) -> tuple[nn.Module, list[int]]:
    """A torchvision ResNet with its first layers frozen, and the channel counts of layer1..4."""
    local = _is_path(weights_backbone)
    body = torchvision.models.get_model(
        backbone, weights=None if local else weights_backbone, norm_layer=_norm_layer(norm)
    )
    if local:
        _load_strict(body, _read_state_dict(weights_backbone), str(weights_backbone), ignore=("fc.",))
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be in 0..5, got {trainable_layers}")
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, parameter in body.named_parameters():
        if not name.startswith(tuple(trainable)):
            parameter.requires_grad_(False)
    # The last conv of each layer says how many channels the layer returns (64.. for BasicBlock,
    # 256.. for Bottleneck), whatever the ResNet variant.
    channels = []
    for index in range(1, 5):
        block = getattr(body, f"layer{index}")[-1]
        channels.append((block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels)
    return body, channels


def _fpn_backbone(
    family: str,
    backbone: str,
    v2: bool,
    *,
    weights_backbone: str | Path | None,
    norm: str,
    fpn_channels: int,
    trainable_layers: int | None,
    backbone_options: dict[str, Any] | None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Backbone + FPN with the levels ``family`` expects, and detector keyword arguments it implies.

    Two-stage detectors read strides 4-32 and add a max-pooled stride 64; one-stage ones read
    strides 8-32 and add P6, P7 (from P5, or from C5 for RetinaNet v2), as torchvision's builders.
    """
    two_stage = KINDS[family] == "two-stage"
    wanted = (4, 8, 16, 32) if two_stage else (8, 16, 32)
    detector_kwargs: dict[str, Any] = {}
    if backbone.startswith(TIMM_PREFIX):
        if norm == "group":
            raise ValueError("timm backbones keep their own norms: norm must be auto, batch or frozen")
        weights: Any = weights_backbone
        if _is_path(weights_backbone):
            weights = _read_state_dict(weights_backbone)
        body, strides, channels_all, pretrained_cfg = build_timm_body(
            backbone.removeprefix(TIMM_PREFIX),
            weights,
            source=str(weights_backbone),
            frozen_norm=norm == "frozen",
            trainable_layers=trainable_layers,
            options=backbone_options,
        )
        missing = [s for s in wanted if s not in strides]
        if missing:
            timm_model = backbone.removeprefix(TIMM_PREFIX)
            raise ValueError(
                f"{family} needs backbone levels at strides {list(wanted)}; timm's {timm_model} "
                f"has strides {strides} (missing {missing})"
            )
        levels = [strides.index(s) for s in wanted]
        channels = [channels_all[i] for i in levels]
        # The pixel normalisation the backbone was pretrained with (timm's pretrained config).
        detector_kwargs = {"image_mean": list(pretrained_cfg["mean"]), "image_std": list(pretrained_cfg["std"])}
    else:
        body, resnet_channels = _resnet_body(
            backbone, weights_backbone, norm, 5 if trainable_layers is None else trainable_layers
        )
        channels = resnet_channels[-len(wanted) :]
    if two_stage:
        extra = LastLevelMaxPool()
    elif family == "retinanet" and v2:
        extra = LastLevelP6P7(channels[-1], fpn_channels)  # P6 from C5, as retinanet v2
    else:
        extra = LastLevelP6P7(fpn_channels, fpn_channels)  # P6 from P5
    # The v2 two-stage models put BatchNorm in the FPN; v1 and the one-stage models have none.
    fpn_norm = nn.BatchNorm2d if (v2 and two_stage) else None
    if backbone.startswith(TIMM_PREFIX):
        channels_last = str(getattr(body, "output_fmt", "NCHW")).upper().endswith("NHWC")
        fpn_backbone: nn.Module = TimmBackboneWithFPN(
            body, levels, channels, fpn_channels, extra, fpn_norm, channels_last=channels_last
        )
    else:
        returned = [1, 2, 3, 4][-len(wanted) :]
        fpn_backbone = BackboneWithFPN(
            body,
            return_layers={f"layer{k}": str(i) for i, k in enumerate(returned)},
            in_channels_list=channels,
            out_channels=fpn_channels,
            extra_blocks=extra,
            norm_layer=fpn_norm,
        )
    return fpn_backbone, detector_kwargs


def _assemble(
    family: str,
    backbone: str,
    v2: bool,
    *,
    num_classes: int,
    weights_backbone: str | Path | None,
    norm: str,
    fpn_channels: int,
    trainable_layers: int | None,
    backbone_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Builds a detector from torchvision's parts, as its ``*_resnet50_fpn[_v2]`` builder does."""
    fpn_backbone, implied = _fpn_backbone(
        family,
        backbone,
        v2,
        weights_backbone=weights_backbone,
        norm=norm,
        fpn_channels=fpn_channels,
        trainable_layers=trainable_layers,
        backbone_options=backbone_options,
    )
    kwargs = {**implied, **kwargs}
    group_norm = partial(nn.GroupNorm, 32)
    if (family == "fcos" or (family == "retinanet" and v2)) and fpn_channels % 32:
        raise ValueError(f"{family} heads use GroupNorm(32): fpn_channels must be a multiple of 32, got {fpn_channels}")
    if family == "retinanet":
        if v2:
            anchors = AnchorGenerator(
                tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in [32, 64, 128, 256, 512]),
                ((0.5, 1.0, 2.0),) * 5,
            )
            head = RetinaNetHead(
                fpn_channels, anchors.num_anchors_per_location()[0], num_classes, norm_layer=group_norm
            )
            head.regression_head._loss_type = "giou"
            return RetinaNet(fpn_backbone, num_classes, anchor_generator=anchors, head=head, **kwargs)
        return RetinaNet(fpn_backbone, num_classes, **kwargs)
    if family == "fcos":
        if v2:
            raise ValueError("torchvision has no FCOS v2; use fcos_<backbone>_fpn")
        return FCOS(fpn_backbone, num_classes, **kwargs)
    detector = MaskRCNN if family == "maskrcnn" else FasterRCNN
    if v2:
        anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
        kwargs.setdefault("rpn_anchor_generator", anchors)
        kwargs.setdefault("rpn_head", RPNHead(fpn_channels, anchors.num_anchors_per_location()[0], conv_depth=2))
        kwargs.setdefault(
            "box_head",
            FastRCNNConvFCHead((fpn_channels, 7, 7), [256, 256, 256, 256], [1024], norm_layer=nn.BatchNorm2d),
        )
        if family == "maskrcnn":
            kwargs.setdefault(
                "mask_head", MaskRCNNHeads(fpn_channels, [256, 256, 256, 256], 1, norm_layer=nn.BatchNorm2d)
            )
    return detector(fpn_backbone, num_classes, **kwargs)


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
    local_weights = _is_path(weights)
    state_dict = _read_state_dict(weights) if local_weights else None
    # A local classification file for a timm backbone is its pretrained weights; for a ResNet
    # it may be anything the user trained, so it keeps the random-init defaults.
    pretrained = (weights is not None and not local_weights) or (
        weights_backbone is not None and (not _is_path(weights_backbone) or backbone.startswith(TIMM_PREFIX))
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
        if _is_path(weights_backbone):
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
        model = _assemble(
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
        _load_strict(model, state_dict, str(weights))
    elif weights is None and isinstance(model, FCOS):
        _start_fcos_regression_alive(model)
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
    options = ("backbone", "fpn_channels", "norm", "trainable_backbone_layers", "backbone_options")
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

    def describe(self, model: nn.Module) -> DetectorSpec | None:
        """A torchvision detector pkd did not build: its levels from one forward of its backbone."""
        if not isinstance(model, GeneralizedRCNN | RetinaNet | FCOS):
            return None
        levels = probe_levels(model.backbone)
        return _spec(model, {name: stride for name, (stride, _) in levels.items()})


def _start_fcos_regression_alive(model: FCOS, bias: float = 1.0) -> None:
    """Starts FCOS's box regression at boxes one anchor wide instead of points.

    torchvision's FCOS regresses the four box sides through a ReLU from a bias initialised
    at 0, with a GIoU loss. From random init, the first updates (through the centreness branch
    it shares a tower with) can push every foreground output below zero; the ReLU then passes
    no gradient, the predicted boxes are points and the regression loss stays at exactly 1.0
    for the rest of training (reported for other FCOS implementations too, e.g.
    tianzhi0549/FCOS#310, open-mmlab/mmrotate#490). We saw it in about half of our runs from
    scratch, depending on the batch. A bias of 1 (box sides of one anchor size, 8 px at stride
    8) keeps the outputs positive while the rest of the detector learns.
    """
    with torch.no_grad():
        model.head.regression_head.bbox_reg.bias.fill_(bias)
