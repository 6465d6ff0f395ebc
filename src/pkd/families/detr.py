"""The DETR family: RT-DETR, RT-DETRv2, D-FINE and DEIMv2 from Hugging Face ``transformers``.

``build_detector("rtdetr_r18", num_classes=11)`` builds ``transformers``' own
``RTDetrForObjectDetection`` from a config (random init; the names and sizes are in
:mod:`pkd.families.detr_configs`) and wraps it in :class:`DetrDetector`, which speaks pkd's
detector convention (:mod:`pkd.detector`): a list of images in, the model's own losses
(training) or boxes / scores / labels in image pixels (eval) out, a ``transform`` that makes
the batch and a ``backbone`` that returns what is distilled: the hybrid encoder's multi-scale
outputs (``s8``, ``s16``, ``s32``: strides 8, 16, 32, ``encoder_hidden_dim`` channels).

What the models need, and what this wrapper does about it:

- They ignore ``pixel_mask``, so padding would change their outputs: every image is resized
  to one square ``size`` x ``size`` (``min_size``), as their image processors do, in training
  and evaluation, and boxes are mapped back to each image's own pixels
  (``ExportSpec.fixed_size`` says so).
- RT-DETR's image processor does not normalise pixels; the wrapper does it with ImageNet's
  mean and std (the pretrained timm backbone's own, when one is used).
- Classes are 0-based with no background: pkd's label ``k`` (1..num_classes-1) is class
  ``k - 1``, as for YOLO.
- ``freeze_backbone_batch_norms`` is off: frozen statistics suit pretrained backbones only.
- Training uses the model's own loss: Hungarian matching, auxiliary and encoder losses, and
  denoising queries (the model's default). ``transformers >= 5.18`` is required: earlier
  releases computed the main loss over the denoising queries too (PR #48528).

A timm backbone (``backbone="tf_efficientnet_lite0"`` with ``weights_backbone=
"efficientnet_lite0.imagenet"``, the offline ImageNet weights of :mod:`pkd.backbones`) is built
from a ``TimmBackboneConfig`` (timm creates it without pretrained weights; a ``backbone=<name>``
with ``use_timm_backbone`` would look the name up on the hub), so nothing asks the hub;
weights of a whole model come from a local Hugging Face folder (``save_pretrained``), a
state_dict, or a pkd checkpoint. Nothing reaches the network.

Licence: ``transformers`` is Apache-2.0, as pkd; ``pip install "pkd[detr]"`` (Python >= 3.11).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_convert

from pkd.backbones import OFFLINE_WEIGHTS, load_backbone_weights, offline_state_dict
from pkd.detector import DetectorSpec, ExportSpec, Family, Level
from pkd.families.detr_configs import DETR_MODELS, KINDS, detr_config
from pkd.weights import read_weights

__all__ = ["DetrDetector", "DetrFamily", "DetrFeatures", "SquareTransform", "build_detr"]

_OPTIONS = ("backbone", "hf_config", "score_thresh", "detections_per_img")
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_MIN_VERSION = (5, 18)
#: Parts of transformers' loss names that say which output a term is of (auxiliary decoder layers,
#: denoising queries, encoder proposals, the pre-refinement boxes), not what it measures.
_LOSS_SUFFIXES = ("aux", "dn", "enc", "pre")


def _transformers():
    """Imports ``transformers`` (offline), checking the release computes the loss right."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            'DETR models need Hugging Face transformers: pip install "pkd[detr]" (Python >= 3.11)'
        ) from error
    version = tuple(int(part) for part in importlib.metadata.version("transformers").split(".")[:2])
    if version < _MIN_VERSION:
        raise ImportError(
            f"transformers {transformers.__version__} computes the DETR loss over denoising queries too; "
            'pip install "transformers>=5.18" (or "pkd[detr]")'
        )
    return transformers


class SquareTransform(nn.Module):
    """Resizes every image to ``size`` x ``size``, normalises it, and maps boxes both ways.

    Fulfils :class:`pkd.detector.Transform`. ``min_size`` / ``max_size`` / ``size_divisible``
    are there for code that reads torchvision's transform (export metadata): all ``size``.

    Args:
        size: the square side every image is resized to (a multiple of 32).
        image_mean: per-channel mean of [0, 1] pixels.
        image_std: per-channel std.
    """

    def __init__(self, size: int, image_mean: tuple[float, ...], image_std: tuple[float, ...]) -> None:
        super().__init__()
        self.size = size
        self.min_size, self.max_size, self.size_divisible = (size,), size, 32
        self.image_mean, self.image_std = list(image_mean), list(image_std)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        """``(ImageList of (N, 3, size, size), targets with boxes in that batch's pixels)``."""
        mean = torch.tensor(self.image_mean, device=images[0].device).view(3, 1, 1)
        std = torch.tensor(self.image_std, device=images[0].device).view(3, 1, 1)
        square = (self.size, self.size)
        batch = torch.stack(
            [
                functional.interpolate(((image - mean) / std)[None], size=square, mode="bilinear", align_corners=False)[
                    0
                ]
                for image in images
            ]
        )
        if targets is not None:
            targets = [
                {**target, "boxes": target["boxes"] * self._scale(square, image.shape[-2:], target["boxes"])}
                for image, target in zip(images, targets, strict=True)
            ]
        return ImageList(batch, [square] * len(images)), targets

    @staticmethod
    def _scale(to_size, from_size, like: Tensor) -> Tensor:
        # torch.tensor of the sizes (not Python floats) keeps them symbolic when traced for ONNX.
        height = torch.tensor(to_size[0], dtype=torch.float32, device=like.device) / torch.tensor(
            from_size[0], dtype=torch.float32, device=like.device
        )
        width = torch.tensor(to_size[1], dtype=torch.float32, device=like.device) / torch.tensor(
            from_size[1], dtype=torch.float32, device=like.device
        )
        return torch.stack([width, height, width, height])

    def postprocess(self, detections: list[dict[str, Tensor]], image_sizes: list, original_sizes: list) -> list:
        """Boxes from the square batch back to each original image's pixels."""
        for detection, size, original in zip(detections, image_sizes, original_sizes, strict=True):
            detection["boxes"] = detection["boxes"] * self._scale(original, size, detection["boxes"])
        return detections


class DetrFeatures(nn.Module):
    """The backbone, input projections and hybrid encoder of a ``transformers`` DETR: what is distilled.

    A view over the detection model's own modules (not copied, not registered twice).

    Forward:
        ``(N, 3, H, W)`` normalised batch -> ``{"s8": (N, D, H/8, W/8), "s16": ..., "s32": ...}``
        (``D`` = ``encoder_hidden_dim``), named by stride.
    """

    def __init__(self, detr: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.__dict__["detr"] = detr
        self.names = names

    def encode(self, batch: Tensor) -> Any:
        """The encoder's own output object (``last_hidden_state`` or ``feature_maps``: the maps)."""
        core = self.detr.model
        if hasattr(core, "conv_encoder"):  # DEIMv2: backbone and projections in one module
            projected = core.conv_encoder(batch)
        else:
            mask = torch.ones(batch.shape[0], *batch.shape[-2:], dtype=torch.long, device=batch.device)
            projected = [core.encoder_input_proj[i](maps) for i, (maps, _) in enumerate(core.backbone(batch, mask))]
        return core.encoder(projected)

    def forward(self, batch: Tensor) -> OrderedDict[str, Tensor]:
        output = self.encode(batch)
        maps = output.feature_maps if hasattr(output, "feature_maps") else output.last_hidden_state
        return OrderedDict(zip(self.names, maps, strict=True))


@contextlib.contextmanager
def _encoder_returns(encoder: nn.Module, maps: list[Tensor]):
    """While inside, the model's encoder returns ``maps`` (computed already, by :class:`DetrFeatures`)."""
    given = types.SimpleNamespace(last_hidden_state=maps, feature_maps=maps, hidden_states=None, attentions=None)
    encoder.forward = lambda *args, **kwargs: given
    try:
        yield
    finally:
        del encoder.forward


class DetrDetector(nn.Module):
    """A ``transformers`` RT-DETR / RT-DETRv2 / D-FINE / DEIMv2 behind pkd's detector convention.

    ``forward(images, targets)`` takes a list of ``(3, H, W)`` images in [0, 1] and, in
    training, targets with ``boxes`` ``(K, 4)`` xyxy pixels and ``labels`` ``(K,)`` in
    ``1..num_classes - 1``. Training runs :attr:`backbone` (so the distiller sees the encoder's
    levels), then the model's decoder and loss on those levels, and returns the loss terms
    summed by kind (``loss_vfl``, ``loss_bbox``, ``loss_giou``, and D-FINE / DEIMv2's
    ``loss_fgl``, ``loss_ddf``...; auxiliary, encoder and denoising terms included, weighted as
    the model weighs them): their sum is the model's loss. Eval returns the top
    ``detections_per_img`` (query, class) pairs by sigmoid score, as the model's
    post-processing does, above ``score_thresh``, boxes in each image's pixels.

    ``state_dict()`` is ``{"detr." + key: ...}`` over the ``transformers`` model's own keys.

    Args:
        detr: the ``...ForObjectDetection`` model.
        size: the square side images are resized to.
        image_mean: pixel mean the batch is normalised with.
        image_std: pixel std.
        score_thresh: minimum score of a returned detection.
        detections_per_img: maximum detections per image.
    """

    def __init__(
        self,
        detr: nn.Module,
        *,
        size: int,
        image_mean: tuple[float, ...] = _IMAGENET[0],
        image_std: tuple[float, ...] = _IMAGENET[1],
        score_thresh: float = 0.05,
        detections_per_img: int = 100,
    ) -> None:
        super().__init__()
        self.detr = detr
        config = detr.config
        self.num_classes = int(config.num_labels) + 1
        self.score_thresh, self.detections_per_img = score_thresh, detections_per_img
        self.transform = SquareTransform(size, image_mean, image_std)
        names = [f"s{int(stride)}" for stride in config.feat_strides]
        # A view kept out of the module tree, so each weight has one state_dict key.
        self.__dict__["backbone"] = DetrFeatures(detr, names)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        """Losses in training, detections in eval (see the class docstring)."""
        if self.training and targets is None:
            raise ValueError("targets are needed in training mode")
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        batch, targets = self.transform(images, targets)
        if self.training:
            return self._losses(batch.tensors, targets)
        output = self.detr(pixel_values=batch.tensors)
        detections = self._detections(output.logits, output.pred_boxes, batch.tensors.shape[-1])
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    def _losses(self, batch: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        maps = list(self.backbone(batch).values())
        side = batch.shape[-1]
        labels = [
            {"class_labels": t["labels"].long() - 1, "boxes": box_convert(t["boxes"].float(), "xyxy", "cxcywh") / side}
            for t in targets
        ]
        # The decoder and loss run on the levels just computed, not on a second pass of the encoder.
        with _encoder_returns(self.detr.model.encoder, maps):
            output = self.detr(pixel_values=None, inputs_embeds=maps[0], labels=labels)
        losses: dict[str, Tensor] = {}
        for key, value in output.loss_dict.items():
            kind = "_".join(part for part in key.split("_") if not part.isdigit() and part not in _LOSS_SUFFIXES)
            losses[kind] = losses[kind] + value if kind in losses else value
        return losses

    def _detections(self, logits: Tensor, boxes: Tensor, side: int) -> list[dict[str, Tensor]]:
        classes = logits.shape[-1]
        scores = logits.sigmoid().flatten(1)  # (N, queries * classes)
        count = min(self.detections_per_img, scores.shape[1])
        detections = []
        for image_scores, image_boxes in zip(scores, boxes, strict=True):
            top, index = image_scores.topk(count)
            keep = top > self.score_thresh
            top, index = top[keep], index[keep]
            xyxy = box_convert(image_boxes[torch.div(index, classes, rounding_mode="floor")], "cxcywh", "xyxy")
            detections.append({"boxes": xyxy.clamp(0, 1) * side, "scores": top, "labels": index % classes + 1})
        return detections


def _timm_backbone(transformers: Any, name: str) -> tuple[Any, list[int], dict]:
    """A ``TimmBackboneConfig`` for a timm model's stride 8 / 16 / 32 levels, and its channels.

    Raises:
        ValueError: an unknown timm model, or one without those strides.
    """
    import timm

    model = name.removeprefix("timm_")
    if model not in timm.list_models():
        raise ValueError(f"unknown timm backbone {model!r} (see timm.list_models())")
    with torch.device("meta"):
        probe = timm.create_model(model, features_only=True, pretrained=False)
    strides, channels = list(probe.feature_info.reduction()), list(probe.feature_info.channels())
    if not {8, 16, 32} <= set(strides):
        raise ValueError(f"timm backbone {model!r} has levels at strides {strides}; DETRs need 8, 16 and 32")
    indices = [strides.index(s) for s in (8, 16, 32)]
    config = transformers.TimmBackboneConfig(backbone=model, out_indices=indices, features_only=True)
    return config, [channels[i] for i in indices], dict(probe.pretrained_cfg)


def _backbone_state_dict(weights_backbone: str | Path, model: str) -> tuple[dict[str, Tensor], str]:
    if str(weights_backbone) in OFFLINE_WEIGHTS:
        architecture, state_dict = offline_state_dict(str(weights_backbone))
        if architecture != model:
            raise ValueError(f"weights_backbone {weights_backbone!r} are for timm's {architecture!r}, not {model!r}")
        return state_dict, str(weights_backbone)
    path = Path(weights_backbone)
    if not path.is_file():
        raise ValueError(
            f"weights_backbone {str(weights_backbone)!r}: give a local .pt/.pth state_dict of the timm model or one "
            f"of {', '.join(OFFLINE_WEIGHTS)}"
        )
    return read_weights(path)[0], str(path)


def _hf_folder_norm(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The normalisation a saved image processor applies (None: no processor file)."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    processor = json.loads(path.read_text())
    if not processor.get("do_normalize", False):
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return tuple(processor["image_mean"]), tuple(processor["image_std"])


def build_detr(
    name: str,
    *,
    num_classes: int,
    weights: str | Path | None = None,
    weights_backbone: str | Path | None = None,
    min_size: int | tuple[int, ...] = 640,
    max_size: int = 640,
    skip_resize: bool = False,
    norm: str = "auto",
    backbone: str | None = None,
    hf_config: dict[str, Any] | None = None,
    **options: Any,
) -> DetrDetector:
    """Builds a ``transformers`` DETR by name, random init or with local weights, offline.

    Args:
        name: see :data:`pkd.families.detr_configs.DETR_MODELS` (``rtdetr_r18``, ``dfine_s``, ...).
        num_classes: classes including the background, as for every pkd detector.
        weights: a local Hugging Face folder (``save_pretrained``: ``config.json`` and weights;
            its architecture wins over ``name``'s, its head is re-initialised for another class
            count), a state_dict of the ``transformers`` model or of this wrapper, or a pkd
            checkpoint or export.
        weights_backbone: with ``backbone``: a local state_dict of the timm model, or an offline
            name of :data:`pkd.backbones.OFFLINE_WEIGHTS` (``"efficientnet_lite0.imagenet"``).
        min_size: the square side images are resized to (the last one if several).
        max_size: unused (the side is ``min_size``); accepted as for every family.
        skip_resize: unused: DETRs always see the square size (they ignore padding masks).
        norm: ``"auto"`` or ``"batch"``.
        backbone: a timm model (``tf_efficientnet_lite0``; ``timm_`` prefix allowed) replacing
            the model's own backbone, its stride 8, 16, 32 levels feeding the encoder.
        hf_config: fields of the ``transformers`` config to change (``backbone_config``: a dict).
        **options: ``score_thresh``, ``detections_per_img``.

    Example:
        >>> tiny = {"encoder_hidden_dim": 32, "d_model": 32, "decoder_layers": 1, "num_queries": 20}
        >>> model = build_detr("rtdetr_r18", num_classes=3, min_size=64, backbone="test_efficientnet", hf_config=tiny)
        >>> [(k, tuple(v.shape)) for k, v in model.backbone(torch.zeros(1, 3, 64, 64)).items()]
        [('s8', (1, 32, 8, 8)), ('s16', (1, 32, 4, 4)), ('s32', (1, 32, 2, 2))]
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not options of DETR models (they take {', '.join(_OPTIONS)})")
    if name not in DETR_MODELS:
        raise ValueError(f"unknown DETR model {name!r}; known: {', '.join(DETR_MODELS)}")
    if norm not in ("auto", "batch"):
        raise ValueError(f"DETR models keep their own norms; norm {norm!r} is not available for them")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes}")
    if weights_backbone is not None and backbone is None:
        raise ValueError("weights_backbone needs a timm backbone (backbone: tf_efficientnet_lite0, ...)")
    size = int(min_size if isinstance(min_size, int) else min_size[-1])
    if size % 32:
        raise ValueError(f"DETR models resize images to a square whose side is a multiple of 32, got {size}")
    transformers = _transformers()
    kind = DETR_MODELS[name][0]
    model_class = getattr(transformers, KINDS[kind][1])
    changes = dict(hf_config or {})
    timm_config, mean_std = None, _IMAGENET
    if backbone is not None:
        timm_config, channels, pretrained = _timm_backbone(transformers, backbone)
        changes.setdefault("encoder_in_channels", channels)
        mean_std = (tuple(pretrained.get("mean", _IMAGENET[0])), tuple(pretrained.get("std", _IMAGENET[1])))
    folder = Path(weights) if weights is not None and Path(weights).is_dir() else None
    if folder is not None:
        detr = _from_folder(model_class, folder, num_classes - 1, changes)
        mean_std = _hf_folder_norm(folder) or mean_std
    else:
        config = detr_config(transformers, name, num_classes - 1, changes, timm_config)
        detr = model_class(config)
    if timm_config is not None and weights_backbone is not None and folder is None:
        body = detr.model.conv_encoder.model if kind == "deimv2" else detr.model.backbone.model
        load_backbone_weights(body._backbone, *_backbone_state_dict(weights_backbone, timm_config.backbone))
    detector = DetrDetector(detr, size=size, image_mean=mean_std[0], image_std=mean_std[1], **options)
    if weights is not None and folder is None:
        _load(detector, Path(weights))
    detector.pkd_spec = _spec(detector)
    return detector.train()


def _from_folder(model_class: Any, folder: Path, num_labels: int, changes: dict[str, Any]) -> nn.Module:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (no config.json)")
    kwargs = {**changes, "num_labels": num_labels, "ignore_mismatched_sizes": True}
    return model_class.from_pretrained(str(folder), local_files_only=True, **kwargs)


def _load(detector: DetrDetector, path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"weights {str(path)!r} do not exist (a file, or a Hugging Face model folder)")
    state_dict, _ = read_weights(path)
    own = detector.state_dict()
    if not set(state_dict) & set(own):  # the transformers model's own keys, without our "detr." prefix
        state_dict = {f"detr.{k}": v for k, v in state_dict.items()}
    missing = [k for k in own if k not in state_dict]
    mismatched = [k for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or mismatched:
        raise ValueError(
            f"weights in {path} do not fit {type(detector.detr).__name__}: {len(missing)} missing, "
            f"{len(mismatched)} of another shape (e.g. {', '.join((missing + mismatched)[:3])}); "
            "build the model they were trained with"
        )
    detector.load_state_dict({k: state_dict[k] for k in own})


def _raw_outputs(detector: DetrDetector) -> tuple[str, ...]:
    """The encoder's levels and its per-anchor class scores: what the model computes before it
    picks its queries. The queries' own outputs are left out: near-equal anchor scores may be
    picked in another order by ONNX Runtime, which permutes the queries, not the detections."""
    model = detector.detr.model
    return tuple(f"detr.model.{name}" for name in ("encoder", "enc_score_head") if hasattr(model, name))


def _spec(detector: DetrDetector) -> DetectorSpec:
    config = detector.detr.config
    side = detector.transform.size
    return DetectorSpec(
        family="detr",
        levels={
            name: Level(int(stride), int(config.encoder_hidden_dim))
            for name, stride in zip(detector.backbone.names, config.feat_strides, strict=True)
        },
        image_mean=tuple(float(v) for v in detector.transform.image_mean),
        image_std=tuple(float(v) for v in detector.transform.image_std),
        distill_weight=10.0,
        weight_reason="a one-stage set-prediction detector (no RoI stage): the one-stage reference weight, 10",
        export=ExportSpec(fixed_size=(side, side), raw_outputs=_raw_outputs(detector)),
    )


class DetrFamily(Family):
    """RT-DETR, RT-DETRv2, D-FINE and DEIMv2 from ``transformers`` (:func:`build_detr`); ``pip install "pkd[detr]"``."""

    name = "detr"
    options = (*_OPTIONS, "norm")

    def names(self) -> list[str]:
        return list(DETR_MODELS)

    def build(self, name: str, **options: Any) -> nn.Module:
        return build_detr(name, **options)

    def describe(self, model: nn.Module) -> DetectorSpec | None:
        return _spec(model) if isinstance(model, DetrDetector) else None
