"""Ultralytics YOLO detectors (YOLOv8, YOLO11, YOLO26) as pkd detectors, student or teacher.

``build_detector("yolo11n", num_classes=11)`` builds Ultralytics' own ``DetectionModel`` from
its model yaml (random init) and wraps it in :class:`YoloDetector`, which speaks the detector
convention the rest of pkd knows (:mod:`pkd.detector`): a list of images in, losses (training)
or boxes / scores / labels in image coordinates (eval) out, a ``transform`` that makes the
batch and a ``backbone`` that returns the maps the Detect head reads (strides 8, 16, 32). So a
YOLO model distils from a torchvision teacher, teaches a torchvision student, or pairs with
another YOLO family (YOLO11 -> YOLO26), and is measured with pkd's COCO pipeline and
pycocotools like every other detector.

Licence: Ultralytics is AGPL-3.0. pkd (Apache-2.0) imports it only here, only when a YOLO
model is named; using a YOLO model through pkd puts your use under Ultralytics' licence.
``pip install "pkd[yolo]"`` installs it.

Nothing reaches the network: before Ultralytics is first imported its settings and cache
folder is pointed to ``~/.cache/pkd/ultralytics`` (unless ``YOLO_CONFIG_DIR`` is set) and
``YOLO_OFFLINE=1`` is set; pkd calls only the model, its loss and its NMS, never the trainer,
predictor or plotting code that would check fonts, assets or AMP online. Tested with
ultralytics 8.4.190 (``pkd[yolo]`` pins ``>=8.4,<8.5``).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_convert, clip_boxes_to_image

from pkd.checkpoint import PickledFileError
from pkd.detector import DetectorSpec, ExportSpec, Family, Level
from pkd.io import atomic_path
from pkd.weights import load_pickled_modules, module_state_dict, read_weights

__all__ = ["YOLO_NAME", "YoloDetector", "YoloFamily", "YoloFeatures", "build_yolo", "is_yolo_name", "save_ultralytics"]

#: ``yolov8n``, ``yolo11s``, ``yolo26m``, ...: Ultralytics' detection models at one of its scales.
YOLO_NAME = re.compile(r"^(?P<family>yolov8|yolo11|yolo26)(?P<scale>[nsmlx])$")
_OPTIONS = ("score_thresh", "nms_thresh", "detections_per_img", "width", "depth", "end2end")


def names() -> list[str]:
    """The YOLO model names pkd builds by name (a model yaml path works too)."""
    return [f"{family}{scale}" for family in ("yolov8", "yolo11", "yolo26") for scale in "nsmlx"]


def is_yolo_name(name: str) -> bool:
    """Whether ``name`` is a YOLO model pkd builds: ``yolo11n`` etc., or the path of a model yaml."""
    return bool(YOLO_NAME.match(name)) or (name.endswith((".yaml", ".yml")) and "yolo" in Path(name).name.lower())


def _config_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pkd" / "ultralytics"


@contextmanager
def _quiet():
    # Ultralytics logs model summaries and "Overriding model.yaml nc=80" at INFO on every build.
    logger = logging.getLogger("ultralytics")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _ultralytics():
    """Imports Ultralytics offline, with its settings file in a folder pkd chose."""
    os.environ.setdefault("YOLO_CONFIG_DIR", str(_config_dir()))
    os.environ.setdefault("YOLO_OFFLINE", "1")
    try:
        with _quiet():
            import ultralytics
            from ultralytics.nn import tasks
            from ultralytics.utils import DEFAULT_CFG, SETTINGS, nms
    except ImportError as error:
        raise ImportError(
            "YOLO models need Ultralytics (AGPL-3.0): pip install 'pkd[yolo]'; using them puts your use "
            "under Ultralytics' licence"
        ) from error
    if SETTINGS.get("sync", False):
        SETTINGS.update(sync=False)  # no usage analytics from pkd's runs
    return ultralytics, tasks, DEFAULT_CFG, nms


class YoloFeatures(nn.Module):
    """The layers of a YOLO model before its Detect head, returning the maps the head reads.

    Ultralytics layers say where their input comes from (``layer.f``: -1 for the previous
    layer, an index or a list of indices of earlier layers); this walks them in order and keeps
    the outputs later layers or the head need.

    Args:
        model: Ultralytics ``DetectionModel``; its layers are used, not copied.

    Forward:
        ``(N, 3, H, W)`` batch (H, W multiples of 32) -> ``{"p3": (N, C3, H/8, W/8),
        "p4": ..., "p5": ...}``, named by stride (p3 = stride 8).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(list(model.model)[:-1])
        head = model.model[-1]
        last = len(self.layers) - 1
        self.sources = [last if j == -1 else j for j in ([head.f] if isinstance(head.f, int) else head.f)]
        needed = {j for layer in self.layers for j in ([layer.f] if isinstance(layer.f, int) else layer.f)}
        self.keep = {j for j in needed if j != -1} | set(self.sources)
        self.names = [f"p{round(math.log2(float(s)))}" for s in head.stride]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        outputs: list[Tensor | None] = []
        for layer in self.layers:
            if layer.f != -1:
                x = outputs[layer.f] if isinstance(layer.f, int) else [x if j == -1 else outputs[j] for j in layer.f]
            x = layer(x)
            outputs.append(x if layer.i in self.keep else None)
        return OrderedDict((name, outputs[j]) for name, j in zip(self.names, self.sources, strict=True))


class YoloDetector(nn.Module):
    """An Ultralytics YOLO detection model behind pkd's detector convention.

    ``forward(images, targets)`` takes a list of ``(3, H, W)`` images in [0, 1] and, in
    training, targets with ``boxes`` ``(K, 4)`` xyxy pixels and ``labels`` ``(K,)`` in
    ``1..num_classes - 1`` (pkd's contiguous labels; 0 is torchvision's background and YOLO's
    class ``label - 1``). The batch is made by torchvision's ``GeneralizedRCNNTransform`` with
    mean 0 and std 1 (YOLO's input is plain [0, 1] pixels) and padding to a multiple of 32, the
    largest stride: eval images are resized to ``min_size`` / ``max_size`` and boxes mapped back,
    exactly as for pkd's torchvision detectors, so mAPs compare.

    Training returns the model's own criterion (Ultralytics ``v8DetectionLoss``, or
    ``E2ELoss`` for YOLO26's one-to-one head), per image: ``{"loss_box", "loss_cls",
    "loss_dfl"}`` with Ultralytics' gains (box 7.5, cls 0.5, dfl 1.5). YOLO26's one-to-many /
    one-to-one mix stays at its initial 0.8 / 0.2: Ultralytics decays it per epoch from its
    trainer, which pkd does not run. Eval returns ``[{"boxes", "scores", "labels"}]`` after
    Ultralytics' NMS, or none for an end-to-end head (YOLO26 by default).

    ``state_dict()`` is ``{"model." + key: ...}`` over the Ultralytics model's own keys.

    Args:
        model: Ultralytics ``DetectionModel``.
        min_size: shorter side at evaluation (and in training unless ``skip_resize``).
        max_size: longer side limit.
        skip_resize: in training, keep the size the data pipeline made.
        score_thresh: minimum score of a returned detection.
        nms_thresh: NMS IoU threshold (Ultralytics' default 0.7).
        detections_per_img: maximum detections per image.
        end2end: use YOLO26's NMS-free one-to-one head for predictions (default: when it has one).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        min_size: int | tuple[int, ...] = 640,
        max_size: int = 640,
        skip_resize: bool = False,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.7,
        detections_per_img: int = 100,
        end2end: bool | None = None,
    ) -> None:
        super().__init__()
        _, _, default_cfg, self._nms = _ultralytics()
        self.model = model
        self.model.args = copy.copy(default_cfg)  # the criterion reads its box / cls / dfl gains here
        head = model.model[-1]
        has_one2one = getattr(head, "one2one_cv2", None) is not None
        if end2end and not has_one2one:
            raise ValueError("end2end needs a model with a one-to-one head (YOLO26); this one has none")
        model.end2end = has_one2one if end2end is None else end2end
        self.num_classes = int(head.nc) + 1
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        self.transform = GeneralizedRCNNTransform(
            min_size,
            max_size,
            [0.0, 0.0, 0.0],
            [1.0, 1.0, 1.0],
            size_divisible=int(max(head.stride)),
            _skip_resize=skip_resize,
        )
        # A view over model.model's layers kept out of the module tree, so each weight has one
        # state_dict key; tapping and calling it is what pkd's distiller does with ``backbone``.
        self.__dict__["backbone"] = YoloFeatures(model)
        self._criterion = None

    @property
    def head(self) -> nn.Module:
        return self.model.model[-1]

    @property
    def end2end(self) -> bool:
        return bool(self.model.end2end)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._criterion = None  # holds tensors on the old device
        return self

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        """Losses in training, detections in eval (see the class docstring)."""
        if self.training and targets is None:
            raise ValueError("targets are needed in training mode")
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        batch, targets = self.transform(images, targets)
        levels = self.backbone(batch.tensors)
        preds = self.head(list(levels.values()))
        if self.training:
            return self._losses(preds, targets, batch.tensors.shape[-2:])
        detections = self._detections(preds[0], batch.image_sizes)
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    def _losses(self, preds: Any, targets: list[dict[str, Tensor]], size: torch.Size) -> dict[str, Tensor]:
        if self._criterion is None:
            self._criterion = self.model.init_criterion()
        height, width = size
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=targets[0]["boxes"].device)
        boxes = torch.cat([t["boxes"] for t in targets]).float()
        batch = {
            "batch_idx": torch.cat([torch.full((len(t["boxes"]),), i) for i, t in enumerate(targets)]).to(boxes),
            "cls": (torch.cat([t["labels"] for t in targets]) - 1).to(boxes).view(-1, 1),
            "bboxes": box_convert(boxes, "xyxy", "cxcywh") / scale,
        }
        total, _ = self._criterion(preds, batch)  # (box, cls, dfl) x batch size
        total = total / len(targets)
        return {"loss_box": total[0], "loss_cls": total[1], "loss_dfl": total[2]}

    def _detections(self, decoded: Tensor, image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        results = self._nms.non_max_suppression(
            decoded,
            conf_thres=self.score_thresh,
            iou_thres=self.nms_thresh,
            max_det=self.detections_per_img,
            nc=self.num_classes - 1,
            end2end=self.end2end,
        )
        return [
            {
                "boxes": clip_boxes_to_image(r[:, :4], size),
                "scores": r[:, 4],
                "labels": r[:, 5].long() + 1,
            }
            for r, size in zip(results, image_sizes, strict=True)
        ]


def _model_dict(name: str, width: float | None, depth: float | None) -> dict[str, Any]:
    _, tasks, _, _ = _ultralytics()
    source = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    # "yolo11n.yaml" is Ultralytics' packaged config; a path with a folder must exist.
    if source == name and len(Path(name).parts) > 1 and not Path(name).is_file():
        raise FileNotFoundError(f"YOLO model yaml {name} does not exist")
    with _quiet():
        spec = tasks.yaml_model_load(source)
    if width is not None or depth is not None:
        scales = spec.get("scales") or {}
        scale = spec.get("scale") or next(iter(scales), None)
        base_depth, base_width, max_channels = scales[scale] if scale in scales else (1.0, 1.0, 1024)
        spec["scales"] = {scale or "n": [depth or base_depth, width or base_width, max_channels]}
        spec["scale"] = scale or "n"
    return spec


def _ultralytics_model(path: Path) -> nn.Module:
    """The model in an Ultralytics ``.pt`` (its EMA weights when it has them), loaded without running code.

    The file is a pickle of Ultralytics' model objects; it is read with ``weights_only=True``
    and an allowlist of torch's and Ultralytics' module classes and Ultralytics' argument
    namespace (:func:`pkd.weights.load_pickled_modules`): a file that names anything else is
    refused by name before any of it is unpickled.
    """
    _ultralytics()
    from ultralytics.utils import IterableSimpleNamespace

    checkpoint = load_pickled_modules(
        path, packages=("ultralytics.nn",), classes=(IterableSimpleNamespace,), what="an Ultralytics checkpoint"
    )
    models = [checkpoint.get(key) for key in ("ema", "model")] if isinstance(checkpoint, dict) else []
    models = [model for model in models if isinstance(model, nn.Module)]
    if not models:
        raise ValueError(f"{path} is not an Ultralytics checkpoint (no 'model' or 'ema' module)")
    return models[0]


def _ultralytics_state_dict(path: Path) -> dict[str, Tensor]:
    """The float32 weights of an Ultralytics ``.pt`` (saved in float16 by Ultralytics' trainer)."""
    state_dict = module_state_dict(_ultralytics_model(path))
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def ultralytics_classes(path: str | Path) -> dict[int, str] | None:
    """The classes of a YOLO weights file, pkd label (YOLO class + 1) -> name; None for a state_dict."""
    try:
        read_weights(path)
    except PickledFileError:
        names = vars(_ultralytics_model(Path(path))).get("names")
        if isinstance(names, dict) and all(type(k) is int and isinstance(v, str) for k, v in names.items()):
            return {index + 1: name for index, name in names.items()}
    return None


def _load(detector: YoloDetector, path: Path) -> None:
    own = detector.state_dict()
    native = False
    try:
        state_dict, _ = read_weights(path)
    except PickledFileError:
        state_dict, native = _ultralytics_state_dict(path), True
    if not set(state_dict) & set(own):  # keys of Ultralytics' DetectionModel, without our "model." prefix
        state_dict = {f"model.{k}": v for k, v in state_dict.items()}
    head = f"model.model.{len(detector.model.model) - 1}."
    missing = [k for k in own if k not in state_dict]
    mismatched = [k for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    # An Ultralytics model trained on other classes fits except for the head's class layers.
    tolerated = native and all(k.startswith(head) for k in missing + mismatched)
    if (missing or mismatched) and not tolerated:
        examples = ", ".join((missing + mismatched)[:3])
        raise ValueError(
            f"weights in {path} do not fit this YOLO model: {len(missing)} missing, {len(mismatched)} of another "
            f"shape (e.g. {examples}); build the model the weights were trained with (name, width, num_classes)"
        )
    kept = {k: v for k, v in state_dict.items() if k in own and k not in mismatched}
    detector.load_state_dict(kept, strict=not tolerated)
    if mismatched:
        logging.getLogger("pkd").warning(
            "%s: %d head tensors of another class count left at random init", path, len(mismatched)
        )


def build_yolo(
    name: str,
    *,
    num_classes: int,
    weights: str | Path | None = None,
    weights_backbone: str | Path | None = None,
    min_size: int | tuple[int, ...] = 640,
    max_size: int = 640,
    skip_resize: bool = False,
    norm: str = "auto",
    **options: Any,
) -> YoloDetector:
    """Builds an Ultralytics YOLO detection model, random init or with local weights.

    Args:
        name: ``yolov8n`` ... ``yolo11x``, ``yolo26n`` ... (Ultralytics' model yaml at that
            scale) or the path of a model yaml.
        num_classes: classes including the background, as for every pkd detector (YOLO's
            ``nc`` is one less).
        weights: a local file: a pkd checkpoint or export of this model, a plain state_dict,
            or an Ultralytics ``.pt`` (read without running code from it, see
            :func:`pkd.weights.load_pickled_modules`; a model trained on other classes keeps its
            weights except the head's class layers).
        weights_backbone: not supported for YOLO models (an error when given).
        min_size: shorter side at evaluation.
        max_size: longer side limit.
        skip_resize: see :class:`YoloDetector`.
        norm: ``"auto"`` or ``"batch"`` (YOLO models use BatchNorm).
        **options: ``width`` / ``depth`` (multiples replacing the scale's, any width), ``end2end``,
            ``score_thresh``, ``nms_thresh``, ``detections_per_img``.

    Example:
        >>> model = build_yolo("yolo11n", num_classes=3, min_size=64, max_size=64, width=0.125)
        >>> [(k, tuple(v.shape)) for k, v in model.backbone(torch.zeros(1, 3, 64, 64)).items()]
        [('p3', (1, 32, 8, 8)), ('p4', (1, 32, 4, 4)), ('p5', (1, 32, 2, 2))]
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ValueError(
            f"{', '.join(unknown)}: not options of YOLO models (they take {', '.join(_OPTIONS)}; FPN width, backbone "
            "and trainable layers are torchvision options)"
        )
    if not is_yolo_name(name):
        raise ValueError(
            f"unknown YOLO model {name!r}: yolov8<scale>, yolo11<scale> or yolo26<scale> (scale n/s/m/l/x)"
        )
    if weights_backbone is not None:
        raise ValueError("YOLO models take weights (a whole model), not weights_backbone")
    if norm not in ("auto", "batch"):
        raise ValueError(f"YOLO models use BatchNorm; norm {norm!r} is not available for them")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes}")
    _, tasks, _, _ = _ultralytics()
    spec = _model_dict(name, options.pop("width", None), options.pop("depth", None))
    with _quiet():
        model = tasks.DetectionModel(spec, nc=num_classes - 1, verbose=False)
    detector = YoloDetector(model, min_size=min_size, max_size=max_size, skip_resize=skip_resize, **options)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
        _load(detector, path)
    detector.pkd_spec = _spec(detector)
    return detector


def _spec(detector: YoloDetector) -> DetectorSpec:
    head = detector.head
    # The Detect head's first conv of each branch reads one level: its input channels are the level's.
    channels = [int(branch[0].conv.in_channels) for branch in head.cv2]
    return DetectorSpec(
        family="yolo",
        levels={
            name: Level(int(stride), count)
            for name, stride, count in zip(detector.backbone.names, head.stride.tolist(), channels, strict=True)
        },
        image_mean=(0.0, 0.0, 0.0),
        image_std=(1.0, 1.0, 1.0),
        distill_weight=10.0,
        weight_reason="a one-stage dense detector: the reference configs use 10 with a one-stage teacher",
        export=ExportSpec(native_format="ultralytics", raw_outputs=_raw_outputs(detector)),
    )


def _raw_outputs(detector: YoloDetector) -> tuple[str, ...]:
    """The Detect head's box and class branches, per level: its outputs before decoding and top-k."""
    head = f"model.model.{len(detector.model.model) - 1}"
    branches = [b for b in ("cv2", "cv3", "one2one_cv2", "one2one_cv3") if getattr(detector.head, b, None) is not None]
    return tuple(f"{head}.{b}.{level}" for b in branches for level in range(len(getattr(detector.head, b))))


class YoloFamily(Family):
    """Ultralytics YOLOv8, YOLO11 and YOLO26 (:func:`build_yolo`); ``pip install "pkd[yolo]"``, AGPL-3.0."""

    name = "yolo"
    options = (*_OPTIONS, "norm")
    pattern = "or the path of an Ultralytics model yaml"

    def names(self) -> list[str]:
        return names()

    def matches(self, name: str) -> bool:
        return is_yolo_name(name)

    def build(self, name: str, **options: Any) -> nn.Module:
        return build_yolo(name, **options)

    def describe(self, model: nn.Module) -> DetectorSpec | None:
        return _spec(model) if isinstance(model, YoloDetector) else None

    def weights_classes(self, name: str, weights: str | Path) -> dict[int, str] | None:
        return ultralytics_classes(weights)

    def export_native(self, model: nn.Module, path: Path, class_names=None) -> Path:
        return save_ultralytics(model, path, class_names)


def save_ultralytics(detector: YoloDetector, path: str | Path, class_names: dict[int, str] | None = None) -> Path:
    """Writes the YOLO model as an Ultralytics ``.pt`` that ``ultralytics.YOLO(path)`` loads.

    This file is a pickle (Ultralytics' format, whole Python objects). pkd reads it back, as
    any Ultralytics ``.pt``, with ``weights_only=True`` and an allowlist of the classes it holds.

    Args:
        detector: the trained model.
        path: where to write.
        class_names: pkd label (1..) -> name; YOLO's ``names`` become ``{label - 1: name}``.
    """
    ultralytics, _, _, _ = _ultralytics()
    model = copy.deepcopy(detector.model).float().eval()
    count = detector.num_classes - 1
    names = {i: str(i) for i in range(count)}
    names.update({int(label) - 1: str(name) for label, name in (class_names or {}).items()})
    model.names = names
    model.args = {"task": "detect", "imgsz": int(max(detector.transform.min_size))}
    path = Path(path)
    with atomic_path(path) as temp:
        torch.save({"model": model, "train_args": dict(model.args), "version": ultralytics.__version__}, temp)
    return path
