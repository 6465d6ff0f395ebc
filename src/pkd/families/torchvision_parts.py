"""torchvision detectors assembled from torchvision's own parts, on another backbone or FPN width.

:func:`assemble` builds a Faster R-CNN, Mask R-CNN, RetinaNet or FCOS the way torchvision's
``*_resnet50_fpn[_v2]`` builders do (same FPN levels, extra blocks, heads and anchors), but on
any ResNet (:func:`resnet_body`) or timm model and with any FPN width (:func:`fpn_backbone`),
so a small student and a large teacher can be built on a CPU. :func:`load_strict` and
:func:`detect_norm` read local weights into the result. Names, defaults and the family's
declaration are :mod:`pkd.families.torchvision`'s.
"""

from __future__ import annotations

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
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import AnchorGenerator, RPNHead
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from pkd.backbones import TimmBackboneWithFPN, build_timm_body
from pkd.checkpoint import CheckpointError
from pkd.weights import read_weights

__all__ = [
    "KINDS",
    "TIMM_PREFIX",
    "assemble",
    "detect_norm",
    "fpn_backbone",
    "is_weights_path",
    "load_strict",
    "norm_layer",
    "read_state_dict",
    "resnet_body",
    "start_fcos_regression_alive",
]

#: torchvision's detector kinds: two-stage (region proposals, then RoI heads) or one-stage (dense heads).
KINDS = {"fasterrcnn": "two-stage", "maskrcnn": "two-stage", "retinanet": "one-stage", "fcos": "one-stage"}
#: ``timm_<model>`` names any timm model with ``features_only`` (``fcos_timm_tf_efficientnet_lite0_fpn``).
TIMM_PREFIX = "timm_"


def norm_layer(norm: str) -> Callable[..., nn.Module]:
    """The backbone norm layer of ``norm``: ``"frozen"``, ``"group"`` (GroupNorm(32)) or BatchNorm."""
    if norm == "frozen":
        return FrozenBatchNorm2d
    if norm == "group":
        return lambda channels: nn.GroupNorm(32, channels)
    return nn.BatchNorm2d


def is_weights_path(value: Any) -> bool:
    """Whether a weights argument names a local file (a Path, or a ``.pt``/``.pth`` name) and not an enum."""
    return isinstance(value, Path) or (isinstance(value, str) and (Path(value).suffix in {".pt", ".pth"}))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a pkd checkpoint or export, a ``{"model": ...}`` dict, or a plain state_dict."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    try:
        return read_weights(path)[0]
    except CheckpointError as error:  # build_detector reports bad arguments, files included, as ValueError
        raise ValueError(str(error)) from None


def load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str, ignore=()) -> None:
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


def resnet_body(
    backbone: str, weights_backbone: str | Path | None, norm: str, trainable_layers: int
) -> tuple[nn.Module, list[int]]:
    """A torchvision ResNet with its first layers frozen, and the channel counts of layer1..4."""
    local = is_weights_path(weights_backbone)
    body = torchvision.models.get_model(
        backbone, weights=None if local else weights_backbone, norm_layer=norm_layer(norm)
    )
    if local:
        load_strict(body, read_state_dict(weights_backbone), str(weights_backbone), ignore=("fc.",))
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


def fpn_backbone(
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
        if is_weights_path(weights_backbone):
            weights = read_state_dict(weights_backbone)
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
        body, resnet_channels = resnet_body(
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
        with_fpn: nn.Module = TimmBackboneWithFPN(
            body, levels, channels, fpn_channels, extra, fpn_norm, channels_last=channels_last
        )
    else:
        returned = [1, 2, 3, 4][-len(wanted) :]
        with_fpn = BackboneWithFPN(
            body,
            return_layers={f"layer{k}": str(i) for i, k in enumerate(returned)},
            in_channels_list=channels,
            out_channels=fpn_channels,
            extra_blocks=extra,
            norm_layer=fpn_norm,
        )
    return with_fpn, detector_kwargs


def assemble(
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
    """Builds a detector from torchvision's parts, as its ``*_resnet50_fpn[_v2]`` builder does.

    Args:
        family: One of :data:`KINDS` (``"fasterrcnn"``, ``"maskrcnn"``, ``"retinanet"``, ``"fcos"``).
        backbone: A torchvision ResNet name, or ``timm_<model>``.
        v2: Build torchvision's v2 variant (GroupNorm/BatchNorm heads, other anchors).
        num_classes: Number of classes including the background.
        weights_backbone: See :func:`pkd.families.torchvision.build_torchvision`.
        norm: The backbone norm, resolved (``"batch"``, ``"frozen"`` or ``"group"``).
        fpn_channels: FPN width.
        trainable_layers: Backbone stages left trainable; None trains every stage of a timm body.
        backbone_options: Keyword arguments of ``timm.create_model`` for a timm body.
        **kwargs: Passed to the torchvision detector class.

    Returns:
        The detector, randomly initialised except for its backbone weights.
    """
    backbone_with_fpn, implied = fpn_backbone(
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
            return RetinaNet(backbone_with_fpn, num_classes, anchor_generator=anchors, head=head, **kwargs)
        return RetinaNet(backbone_with_fpn, num_classes, **kwargs)
    if family == "fcos":
        if v2:
            raise ValueError("torchvision has no FCOS v2; use fcos_<backbone>_fpn")
        return FCOS(backbone_with_fpn, num_classes, **kwargs)
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
    return detector(backbone_with_fpn, num_classes, **kwargs)


def start_fcos_regression_alive(model: FCOS, bias: float = 1.0) -> None:
    """Starts FCOS's box regression at boxes one anchor wide instead of points.

    torchvision's FCOS regresses the four box sides through a ReLU from a bias initialised
    at 0, with a GIoU loss. From random init, the first updates (through the centreness branch
    it shares a tower with) can push every foreground output below zero; the ReLU then passes
    no gradient, the predicted boxes are points and the regression loss stays at exactly 1.0
    for the rest of training (reported for other FCOS implementations too, e.g.
    tianzhi0549/FCOS#310, open-mmlab/mmrotate#490); from scratch it happens in about half of
    the runs, depending on the batch. A bias of 1 (box sides of one anchor size, 8 px at stride
    8) keeps the outputs positive while the rest of the detector learns.
    """
    with torch.no_grad():
        model.head.regression_head.bbox_reg.bias.fill_(bias)
