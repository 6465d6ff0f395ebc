"""Deploying a student: ONNX export, checked against PyTorch with ONNX Runtime, and its speed.

The exported graph is the whole detector, pre- and post-processing included::

    images        float32 (N, 3, H, W)  RGB in [0, 1], N fixed at export (1 by default),
                                        H and W dynamic (or fixed with ``dynamic_size=False``)
    -> boxes      float32 (K, 4)        x1, y1, x2, y2 in pixels of the input images
       scores     float32 (K,)
       labels     int64   (K,)          contiguous labels 1..num_classes-1 (0 is the background)
       image_index int64  (K,)          which image of the batch each detection belongs to

Normalisation (the backbone's mean and std), resizing to the detector's ``min_size`` /
``max_size``, padding, box decoding, score thresholding and NMS all happen inside the graph,
so a caller feeds decoded RGB pixels scaled to [0, 1] and reads boxes in the coordinates of
what it fed. The class names, the label -> dataset category map, the normalisation and the
input contract are in the file's metadata (``onnx.load(path).metadata_props``, keys
``pkd.*``; :func:`read_metadata`).

:func:`export_onnx` takes any eval-mode ``nn.Module`` that maps a list of ``(3, H, W)`` images
to a list of ``{"boxes", "scores", "labels"}`` dicts -- torchvision's detectors and whatever
follows the same contract -- so other detector families reuse it. It uses the TorchScript
exporter, ``torch.onnx.export(..., dynamo=False)``: the ``torch.export``-based exporter that
PyTorch recommends since 2.9 stops on torchvision's data-dependent post-processing (the
number of boxes that survive the score threshold decides a branch in ``batched_nms``; see
docs/performance.md for the error), and tracing also fixes the batch size, because the
detectors loop over the images of a batch in Python.

:func:`compare_detections` and :func:`verify_onnx` check an exported file against the
PyTorch detector on real images; :func:`export_run_onnx` is what ``pkd export --format onnx``
runs (export, verify, keep the file only when it agrees), :class:`OnnxDetector` runs a file
with ONNX Runtime behind the same list-of-images interface (``pkd eval --onnx``), and
:func:`throughput` / :func:`compare_speed` measure images per second.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.onnx import operators
from torchvision.models.detection import transform as detection_transform

from pkd.families import describe
from pkd.features import submodule

__all__ = [
    "BOX_TOLERANCE",
    "OPSET",
    "SCORE_THRESHOLD",
    "SCORE_TOLERANCE",
    "BatchedDetector",
    "Comparison",
    "DeployError",
    "OnnxDetector",
    "RunExport",
    "compare_detections",
    "compare_speed",
    "detector_metadata",
    "export_onnx",
    "export_run_onnx",
    "load_images",
    "read_metadata",
    "throughput",
    "verify_onnx",
]

#: ONNX opset of the exported graphs (17: LayerNormalization, supported by every current ONNX Runtime).
OPSET = 17
#: Detections compared on export: those scoring at least this much in PyTorch.
SCORE_THRESHOLD = 0.3
#: Largest difference of a box coordinate, in input pixels, between matched detections.
BOX_TOLERANCE = 1.0
#: Largest difference of score between matched detections (and the margin around the threshold).
SCORE_TOLERANCE = 0.01

INPUT_NAME = "images"
OUTPUT_NAMES = ("boxes", "scores", "labels", "image_index")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class DeployError(ValueError):
    """An export that cannot be made or that disagrees with PyTorch, or onnx / onnxruntime missing."""


def _require(module: str) -> Any:
    """Imports an optional dependency of ``pkd[onnx]`` with an error that says how to get it."""
    from importlib import import_module

    try:
        return import_module(module)
    except ImportError as error:
        raise DeployError(
            f"{module} is not installed: ONNX export needs the onnx extra (pip install 'pkd[onnx]')"
        ) from error


# ---------------------------------------------------------------------------------------------
# Export


class BatchedDetector(nn.Module):
    """The exported graph's forward: a batch tensor in, flat detection tensors out.

    ONNX has no lists of dicts, so the detector's per-image outputs are concatenated and
    ``image_index`` says which image each detection came from.

    Args:
        detector: An eval-mode module mapping a list of ``(3, H, W)`` float images to a list
            of dicts with ``boxes`` ``(K, 4)``, ``scores`` ``(K,)`` and ``labels`` ``(K,)``.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Detections of a batch.

        Args:
            images: ``(N, 3, H, W)`` float RGB in [0, 1].

        Returns:
            ``boxes`` ``(K, 4)``, ``scores`` ``(K,)``, ``labels`` ``(K,)`` int64 and
            ``image_index`` ``(K,)`` int64, the detections of all N images one after another.
        """
        outputs = self.detector(list(images.unbind(0)))
        boxes = torch.cat([output["boxes"] for output in outputs])
        scores = torch.cat([output["scores"] for output in outputs])
        labels = torch.cat([output["labels"].to(torch.int64) for output in outputs])
        image_index = torch.cat(
            [torch.zeros_like(output["labels"], dtype=torch.int64) + index for index, output in enumerate(outputs)]
        )
        return boxes, scores, labels, image_index


def _resize_as_eager(
    image: Tensor, self_min_size: int, self_max_size: int, target: dict | None = None, fixed_size=None
) -> tuple[Tensor, dict | None]:
    """torchvision's evaluation resize, traced so that ONNX picks the size PyTorch eager picks.

    Eager torchvision computes the scale in Python floats (float64) and the resized size as
    ``floor(side * scale)``; its tracing path computes both in float32, so a side such as
    ``111 * (112 / 111)`` becomes 112 in the graph where eager gets 111.99999999999999 -> 111
    (or the reverse): the image one pixel larger or smaller, and detections a pixel and a
    percent of score off (3 of 8 test images of the quick demo, sized 97-128 px for a
    ``min_size`` of 112). This computes the size in float64 on 1-D tensors (the exporter casts
    0-d results to float32) and resizes to it; the interpolation is the same bilinear one.

    Args:
        image: ``(3, H, W)``.
        self_min_size: The transform's ``min_size[-1]``.
        self_max_size: The transform's ``max_size``.
        target: None at evaluation (anything else goes to torchvision's own resize).
        fixed_size: The transform's ``fixed_size`` (not None: torchvision's own resize).

    Returns:
        The resized ``(3, H', W')`` image and ``target``.
    """
    if target is not None or fixed_size is not None or not torch.jit.is_tracing():
        return _TORCHVISION_RESIZE(image, self_min_size, self_max_size, target, fixed_size)
    shape = operators.shape_as_tensor(image)[-2:].to(torch.float64)
    limits = torch.tensor([float(self_min_size), float(self_max_size)], dtype=torch.float64)
    scale = torch.minimum(limits[:1] / shape.min(0, keepdim=True)[0], limits[1:] / shape.max(0, keepdim=True)[0])
    size = torch.floor(shape * scale).to(torch.int64)
    resized = torch.nn.functional.interpolate(
        image[None], size=[size[0], size[1]], mode="bilinear", align_corners=False
    )
    return resized[0], target


_TORCHVISION_RESIZE = detection_transform._resize_image_and_masks


@contextlib.contextmanager
def _eager_resize():
    """While tracing, torchvision's detection transform resizes with :func:`_resize_as_eager`."""
    detection_transform._resize_image_and_masks = _resize_as_eager
    try:
        yield
    finally:
        detection_transform._resize_image_and_masks = _TORCHVISION_RESIZE


def detector_metadata(detector: nn.Module, meta: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The ``pkd.*`` metadata of a torchvision detector (and of its pkd checkpoint's ``meta``).

    Args:
        detector: A torchvision detector (its ``transform`` holds normalisation and resizing).
        meta: A pkd checkpoint's ``meta`` (detector name, classes, label map), if any.

    Returns:
        String keys and values for :func:`export_onnx`'s ``metadata``.
    """
    metadata: dict[str, Any] = {}
    transform = getattr(detector, "transform", None)
    if transform is not None:
        metadata["image_mean"] = [float(value) for value in transform.image_mean]
        metadata["image_std"] = [float(value) for value in transform.image_std]
        metadata["resize"] = {
            "min_size": [int(size) for size in transform.min_size],
            "max_size": int(transform.max_size),
            "size_divisible": int(transform.size_divisible),
        }
    owner = submodule(detector, describe(detector).export.thresholds_at)
    for attribute in ("score_thresh", "nms_thresh", "detections_per_img"):
        if hasattr(owner, attribute):
            metadata[attribute] = getattr(owner, attribute)
    if meta is not None:
        metadata["detector"] = meta["detector"]
        metadata["num_classes"] = meta["num_classes"]
        metadata["class_names"] = {int(k): v for k, v in meta.get("class_names", {}).items()}
        metadata["label_map"] = {int(k): int(v) for k, v in meta.get("label_map", {}).items()}
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}


def _describe_input(batch_size: int, image_size: tuple[int, int], dynamic_size: bool) -> str:
    height, width = image_size
    size = "H and W any size (dynamic axes)" if dynamic_size else f"H={height}, W={width} fixed"
    return (
        f"float32 ({batch_size}, 3, H, W), RGB in [0, 1], batch of {batch_size} fixed at export, {size}; "
        "normalisation and resizing happen inside the graph"
    )


def export_onnx(
    detector: nn.Module,
    path: str | os.PathLike,
    *,
    image_size: tuple[int, int] = (512, 512),
    batch_size: int = 1,
    dynamic_size: bool = True,
    metadata: Mapping[str, str] | None = None,
    opset: int = OPSET,
) -> Path:
    """Exports a detector, pre- and post-processing included, to an ONNX file.

    The detector is traced on a random batch of ``image_size`` with PyTorch's TorchScript
    exporter (``torch.onnx.export(..., dynamo=False)``; the module docstring says why). The
    graph's input and outputs are described in the module docstring and in the file's
    ``pkd.input`` / ``pkd.outputs`` metadata. The file is written atomically.

    Args:
        detector: Eval-mode module: a list of ``(3, H, W)`` float images in [0, 1] -> a list of
            dicts with ``boxes`` ``(K, 4)`` xyxy pixels, ``scores`` ``(K,)``, ``labels`` ``(K,)``.
            It is put in eval mode.
        path: Output ``.onnx`` file.
        image_size: ``(H, W)`` of the example batch traced; with ``dynamic_size=False`` the
            only size the graph accepts.
        batch_size: Images per call, fixed in the graph (the detectors loop over a batch in
            Python, which tracing unrolls).
        dynamic_size: Whether H and W are dynamic axes.
        metadata: Extra string metadata (e.g. :func:`detector_metadata`), stored under ``pkd.<key>``.
        opset: ONNX opset version.

    Returns:
        The path written.

    Raises:
        DeployError: onnx missing, or a batch size or image size below 1.
    """
    onnx = _require("onnx")
    if batch_size < 1 or min(image_size) < 1:
        raise DeployError(f"batch_size and image_size must be positive, got {batch_size} and {image_size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    detector.eval()
    graph = BatchedDetector(detector).eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(batch_size, 3, *image_size, generator=generator)
    dynamic_axes = {name: {0: "detections"} for name in OUTPUT_NAMES}
    if dynamic_size:
        dynamic_axes[INPUT_NAME] = {2: "height", 3: "width"}
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings():
            # Tracing warns about every Python number it records as a constant (torchvision's
            # ONNX paths are written for it) and that this exporter is the legacy one.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            for message in ("To copy construct from a tensor", "Exporting aten::index", "Constant folding"):
                warnings.filterwarnings("ignore", message=message, category=UserWarning)
            with torch.no_grad(), _eager_resize():
                torch.onnx.export(
                    graph,
                    (example,),
                    str(temp),
                    dynamo=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=list(OUTPUT_NAMES),
                    dynamic_axes=dynamic_axes,
                    do_constant_folding=True,
                )
        model = onnx.load(str(temp))
        entries = {
            "exporter": f"torch {torch.__version__} torch.onnx.export(dynamo=False), opset {opset}",
            "input": _describe_input(batch_size, image_size, dynamic_size),
            "outputs": "boxes float32 (K, 4) xyxy in input pixels; scores float32 (K,); labels int64 (K,); "
            "image_index int64 (K,): the image of the batch each detection belongs to",
            "batch_size": str(batch_size),
            "image_size": "dynamic" if dynamic_size else f"{image_size[0]}x{image_size[1]}",
            "example_size": f"{image_size[0]}x{image_size[1]}",
            **dict(metadata or {}),
        }
        del model.metadata_props[:]
        for key, value in entries.items():
            prop = model.metadata_props.add()
            prop.key, prop.value = f"pkd.{key}", value
        onnx.checker.check_model(model)
        onnx.save(model, str(temp))
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``pkd.*`` metadata of an exported file, JSON values decoded, without the prefix.

    Example: ``read_metadata("student.onnx")["class_names"]`` -> ``{1: "0", 2: "1", ...}``.
    """
    onnx = _require("onnx")
    model = onnx.load(str(path), load_external_data=False)
    metadata: dict[str, Any] = {}
    for prop in model.metadata_props:
        if not prop.key.startswith("pkd."):
            continue
        key = prop.key.removeprefix("pkd.")
        try:
            value = json.loads(prop.value)
        except json.JSONDecodeError:
            value = prop.value
        if key in ("class_names", "label_map") and isinstance(value, dict):
            value = {int(k): v for k, v in value.items()}
        metadata[key] = value
    return metadata


# ---------------------------------------------------------------------------------------------
# ONNX Runtime


def session_options(threads: int | None = None):
    """ONNX Runtime options with ``threads`` intra-op threads (default: torch's thread count)."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class OnnxDetector(nn.Module):
    """An exported file run by ONNX Runtime (CPU) behind the detectors' list-of-images interface.

    ``OnnxDetector("student.onnx")([image])`` returns what the PyTorch detector returns, so
    :func:`pkd.engine.evaluate` measures its mAP as it does a detector's. It has no parameters;
    ``eval()`` / ``to()`` are accepted and change nothing.

    Args:
        path: An ONNX file written by :func:`export_onnx`.
        threads: Intra-op threads of ONNX Runtime (default: ``torch.get_num_threads()``).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        super().__init__()
        ort = _require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file {self.path} does not exist")
        self.metadata = read_metadata(self.path)
        self.session = ort.InferenceSession(
            str(self.path), sess_options=session_options(threads), providers=["CPUExecutionProvider"]
        )
        shape = self.session.get_inputs()[0].shape
        self.batch_size = shape[0] if isinstance(shape[0], int) else 1

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The graph's raw outputs for one batch.

        Args:
            images: float32 ``(batch_size, 3, H, W)``.

        Returns:
            ``boxes`` ``(K, 4)``, ``scores`` ``(K,)``, ``labels`` ``(K,)``, ``image_index`` ``(K,)``.
        """
        return tuple(self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images}))

    def forward(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Detections of each image, as torchvision's detectors return them.

        Args:
            images: ``(3, H, W)`` float tensors in [0, 1]. A file exported for a batch of
                ``batch_size > 1`` takes them in groups of that many of the same size (the
                last group padded with copies).

        Returns:
            One dict per image: ``boxes`` ``(K, 4)`` float32, ``scores`` ``(K,)`` float32,
            ``labels`` ``(K,)`` int64.
        """
        results = []
        for start in range(0, len(images), self.batch_size):
            group = [image.detach().cpu().float() for image in images[start : start + self.batch_size]]
            if len({tuple(image.shape) for image in group}) > 1:
                raise DeployError(
                    f"{self.path} takes batches of {self.batch_size} images of one size; got sizes "
                    f"{sorted({tuple(image.shape[-2:]) for image in group})} (export with batch_size=1)"
                )
            count = len(group)
            group += [group[-1]] * (self.batch_size - count)
            boxes, scores, labels, image_index = self.run(torch.stack(group).numpy())
            for index in range(count):
                keep = image_index == index
                results.append(
                    {
                        "boxes": torch.from_numpy(boxes[keep]),
                        "scores": torch.from_numpy(scores[keep]),
                        "labels": torch.from_numpy(labels[keep]),
                    }
                )
        return results


# ---------------------------------------------------------------------------------------------
# Verification


@dataclass
class Comparison:
    """How an exported file's detections compare with the PyTorch detector's on some images.

    A PyTorch detection scoring at least ``score_threshold`` is *matched* by an ONNX detection
    of the same label whose score is within ``score_tolerance`` and whose box coordinates are
    all within ``box_tolerance`` pixels. *Missing*: PyTorch detections without a match;
    *extra*: ONNX detections scoring at least ``score_threshold + score_tolerance`` left
    unmatched (the margin lets a detection right at the threshold fall on either side).
    """

    images: int = 0
    compared: int = 0  # PyTorch detections at or above the threshold
    matched: int = 0
    missing: list[str] = field(default_factory=list)  # descriptions, for the error message
    extra: list[str] = field(default_factory=list)
    max_box_difference: float = 0.0  # pixels, over matched detections
    max_score_difference: float = 0.0
    score_threshold: float = SCORE_THRESHOLD
    box_tolerance: float = BOX_TOLERANCE
    score_tolerance: float = SCORE_TOLERANCE

    @property
    def ok(self) -> bool:
        """Something was compared, and every detection above the threshold has its match, both ways."""
        return self.compared > 0 and not self.missing and not self.extra

    def summary(self) -> str:
        """One line: what was compared and how close it was (or the first disagreements)."""
        text = (
            f"{self.images} images, {self.matched}/{self.compared} PyTorch detections with score >= "
            f"{self.score_threshold:g} matched by ONNX Runtime (same label, boxes within {self.box_tolerance:g} px, "
            f"scores within {self.score_tolerance:g}; max differences {self.max_box_difference:.2g} px, "
            f"{self.max_score_difference:.2g})"
        )
        if not self.compared:
            text += (
                "; nothing to compare: no PyTorch detection reached the threshold (lower it, e.g. "
                "--verify-threshold 0.05, or verify on images with objects the detector finds)"
            )
        if self.missing:
            text += f"; {len(self.missing)} missing in ONNX, e.g. {'; '.join(self.missing[:2])}"
        if self.extra:
            text += f"; {len(self.extra)} only in ONNX, e.g. {'; '.join(self.extra[:2])}"
        return text


def _describe(image: int, box: Tensor, score: float, label: int) -> str:
    coordinates = ", ".join(f"{value:.1f}" for value in box.tolist())
    return f"image {image}: label {label} score {score:.3f} box [{coordinates}]"


def compare_detections(
    reference: Mapping[str, Tensor],
    candidate: Mapping[str, Tensor],
    comparison: Comparison,
    *,
    image: int = 0,
) -> Comparison:
    """Matches one image's ONNX detections (``candidate``) to PyTorch's (``reference``).

    Greedy, highest PyTorch score first: each reference detection takes the unmatched
    candidate of the same label, score within ``comparison.score_tolerance``, whose largest
    coordinate difference is smallest, if that is within ``comparison.box_tolerance``.

    Args:
        reference: ``boxes`` ``(K, 4)``, ``scores`` ``(K,)``, ``labels`` ``(K,)`` from PyTorch.
        candidate: The same from ONNX Runtime.
        comparison: Updated in place (counts, worst differences, disagreements).
        image: Index of the image, for the descriptions.

    Returns:
        ``comparison``.
    """
    threshold, score_tolerance = comparison.score_threshold, comparison.score_tolerance
    ref_boxes, ref_scores, ref_labels = (reference[k].detach().cpu() for k in ("boxes", "scores", "labels"))
    boxes, scores, labels = (candidate[k].detach().cpu() for k in ("boxes", "scores", "labels"))
    ref_boxes, boxes = ref_boxes.double(), boxes.double()
    # ONNX detections just under the threshold may still match a PyTorch one just above it.
    usable = scores >= threshold - score_tolerance
    used = torch.zeros(len(scores), dtype=torch.bool)
    comparison.images += 1
    for index in torch.argsort(ref_scores, descending=True, stable=True).tolist():
        score, label = float(ref_scores[index]), int(ref_labels[index])
        if score < threshold:
            break
        comparison.compared += 1
        allowed = usable & ~used & (labels == label) & ((scores - score).abs() <= score_tolerance)
        distance = (boxes - ref_boxes[index]).abs().amax(dim=1) if len(boxes) else torch.zeros(0)
        distance = torch.where(allowed, distance, torch.full_like(distance, float("inf")))
        best = int(distance.argmin()) if len(distance) else -1
        if best < 0 or distance[best] > comparison.box_tolerance:
            comparison.missing.append(_describe(image, ref_boxes[index], score, label))
            continue
        used[best] = True
        comparison.matched += 1
        comparison.max_box_difference = max(comparison.max_box_difference, float(distance[best]))
        comparison.max_score_difference = max(comparison.max_score_difference, abs(float(scores[best]) - score))
    for index in torch.nonzero(~used & (scores >= threshold + score_tolerance)).flatten().tolist():
        comparison.extra.append(_describe(image, boxes[index], float(scores[index]), int(labels[index])))
    return comparison


@torch.no_grad()
def verify_onnx(
    path: str | os.PathLike,
    detector: nn.Module,
    images: Sequence[Tensor],
    *,
    score_threshold: float = SCORE_THRESHOLD,
    box_tolerance: float = BOX_TOLERANCE,
    score_tolerance: float = SCORE_TOLERANCE,
) -> Comparison:
    """Runs an exported file with ONNX Runtime (CPU) and the PyTorch detector on the same images.

    Args:
        path: The ONNX file.
        detector: The PyTorch detector it was exported from (put in eval mode).
        images: ``(3, H, W)`` float tensors in [0, 1], real images preferably (random pixels
            give few confident detections).
        score_threshold: Detections compared: PyTorch's with at least this score.
        box_tolerance: Largest coordinate difference of matched boxes, in pixels.
        score_tolerance: Largest score difference of matched detections.

    Returns:
        The :class:`Comparison`; ``comparison.ok`` says whether they agree.
    """
    detector.eval()
    runtime = OnnxDetector(path)
    comparison = Comparison(
        score_threshold=score_threshold, box_tolerance=box_tolerance, score_tolerance=score_tolerance
    )
    device = next(iter(detector.parameters()), torch.empty(0)).device
    for index, image in enumerate(images):
        reference = detector([image.to(device)])[0]
        compare_detections(reference, runtime([image])[0], comparison, image=index)
    return comparison


def load_images(folder: str | os.PathLike, count: int = 8) -> list[Tensor]:
    """The first ``count`` images of a folder (by file name), as float ``(3, H, W)`` RGB in [0, 1].

    Raises:
        DeployError: The folder does not exist or holds no image files.
    """
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise DeployError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not files:
        raise DeployError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for file in files:
        with Image.open(file) as opened:
            pixels = np.asarray(opened.convert("RGB"))
        images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255)
    return images


def _run_images_folder(checkpoint: Mapping[str, Any], source: Path) -> Path:
    """The validation (else test) images folder of the run a checkpoint comes from.

    Relative paths in a run's config are relative to where it was launched; besides the
    current folder, the folders above the run are tried.
    """
    data = (checkpoint.get("config") or {}).get("data") or {}
    for split in ("val", "test"):
        section = data.get(split)
        if not section:
            continue
        folder = Path(section["images"])
        candidates = [folder] if folder.is_absolute() else [folder, *(p / folder for p in source.resolve().parents)]
        for candidate in candidates:
            if candidate.is_dir():
                return candidate
        raise DeployError(
            f"the {split} images of {source} ({folder}) are not found; give the images to verify with (--images DIR)"
        )
    raise DeployError(f"{source} has no validation or test split in its config; give images to verify (--images DIR)")


# ---------------------------------------------------------------------------------------------
# A pkd run


@dataclass
class RunExport:
    """What :func:`export_run_onnx` wrote and measured."""

    onnx: Path
    pytorch: Path
    size_bytes: int
    comparison: Comparison
    images: str  # where the verification images came from


def export_run_onnx(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    images: str | os.PathLike | Sequence[Tensor] | None = None,
    count: int = 8,
    image_size: tuple[int, int] | None = None,
    batch_size: int = 1,
    dynamic_size: bool = True,
    score_threshold: float = SCORE_THRESHOLD,
    box_tolerance: float = BOX_TOLERANCE,
    score_tolerance: float = SCORE_TOLERANCE,
) -> RunExport:
    """Exports a pkd run's student to ONNX, verified against PyTorch with ONNX Runtime.

    Writes the PyTorch export first (``out`` with suffix ``.pt``, as :func:`pkd.checkpoint.export_student`),
    exports the ONNX graph next to it, runs both on ``count`` real images and keeps the ONNX
    file at ``out`` only when they agree (:class:`Comparison`). When they disagree the
    graph is left at ``<stem>.unverified.onnx`` for inspection, the PyTorch export stays, and
    :class:`DeployError` says what differs.

    Args:
        source: A run folder's ``best.pt`` / ``last.pt``, or an exported student.
        out: The ONNX file, e.g. ``student.onnx``.
        images: A folder of images, or ``(3, H, W)`` tensors in [0, 1], to verify on (default:
            the run's validation images, from its config).
        count: How many images of the folder.
        image_size: ``(H, W)`` traced (default: the detector's ``min_size`` square).
        batch_size: Images per call of the graph.
        dynamic_size: Whether the graph takes any image size.
        score_threshold: See :func:`verify_onnx`.
        box_tolerance: See :func:`verify_onnx`.
        score_tolerance: See :func:`verify_onnx`.

    Returns:
        The paths, the ONNX file's size and the comparison.

    Raises:
        DeployError: ONNX and PyTorch disagree, no images, or onnx / onnxruntime missing.
        CheckpointError: ``source`` is not a pkd checkpoint.
    """
    from pkd.build import load_detector
    from pkd.checkpoint import export_student, load_checkpoint

    source, out = Path(source), Path(out)
    if out.suffix != ".onnx":
        raise DeployError(f"the ONNX output must end in .onnx, got {out}")
    checkpoint = load_checkpoint(source)
    if images is None:
        folder = _run_images_folder(checkpoint, source)
        images, described = load_images(folder, count), str(folder)
    elif isinstance(images, str | os.PathLike):
        described = str(images)
        images = load_images(images, count)
    else:
        described = f"{len(images)} given images"
    pytorch = export_student(checkpoint, out.with_suffix(".pt"))
    detector, meta = load_detector(pytorch)
    if image_size is None:
        side = int(detector.transform.min_size[-1])
        image_size = (side, side)
    unverified = out.with_name(f"{out.stem}.unverified.onnx")
    export_onnx(
        detector,
        unverified,
        image_size=image_size,
        batch_size=batch_size,
        dynamic_size=dynamic_size,
        metadata=detector_metadata(detector, meta),
    )
    comparison = verify_onnx(
        unverified,
        detector,
        images,
        score_threshold=score_threshold,
        box_tolerance=box_tolerance,
        score_tolerance=score_tolerance,
    )
    if not comparison.ok:
        raise DeployError(
            f"the ONNX export disagrees with PyTorch on {described}: {comparison.summary()}. "
            f"Kept the PyTorch export {pytorch} and the ONNX graph at {unverified} (not {out})"
        )
    os.replace(unverified, out)
    return RunExport(out, pytorch, out.stat().st_size, comparison, described)


# ---------------------------------------------------------------------------------------------
# Speed


def throughput(run: Callable[[Tensor], Any], images: Sequence[Tensor], *, warmup: int = 2, rounds: int = 3) -> float:
    """Images per second of ``run(image)`` over ``images``, one image per call.

    Args:
        run: Called with each ``(3, H, W)`` image.
        images: The images; every round runs them all.
        warmup: Calls before timing (lazy initialisation, allocator warm-up).
        rounds: Timed passes over ``images``; the median pass is reported.

    Returns:
        ``len(images)`` / the median pass time.
    """
    for index in range(warmup):
        run(images[index % len(images)])
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for image in images:
            run(image)
        times.append(time.perf_counter() - start)
    return len(images) / statistics.median(times)


@torch.no_grad()
def compare_speed(
    detector: nn.Module,
    path: str | os.PathLike,
    images: Sequence[Tensor],
    *,
    threads: int | None = None,
    warmup: int = 2,
    rounds: int = 3,
) -> dict[str, float]:
    """Images per second of the PyTorch detector (eager, CPU) and of its ONNX file in ONNX Runtime.

    Both run the same images one at a time with the same number of threads, alternating
    rounds so that a change in the machine's load hits both alike.

    Args:
        detector: The PyTorch detector (moved to the CPU, eval mode).
        path: Its ONNX export.
        images: ``(3, H, W)`` float tensors in [0, 1].
        threads: Threads for both (default: ``torch.get_num_threads()``).
        warmup: See :func:`throughput`.
        rounds: See :func:`throughput`.

    Returns:
        ``{"threads", "pytorch_images_per_s", "onnx_images_per_s", "onnx_speedup"}`` (the last
        is ONNX Runtime over PyTorch).
    """
    previous = torch.get_num_threads()
    threads = threads or previous
    torch.set_num_threads(threads)
    try:
        detector = detector.eval().cpu()
        runtime = OnnxDetector(path, threads=threads)
        torch_speeds, onnx_speeds = [], []
        for round_index in range(rounds):
            first = round_index == 0
            torch_speeds.append(throughput(lambda x: detector([x]), images, warmup=warmup if first else 0, rounds=1))
            onnx_speeds.append(throughput(lambda x: runtime([x]), images, warmup=warmup if first else 0, rounds=1))
    finally:
        torch.set_num_threads(previous)
    pytorch_speed, onnx_speed = statistics.median(torch_speeds), statistics.median(onnx_speeds)
    return {
        "threads": threads,
        "pytorch_images_per_s": pytorch_speed,
        "onnx_images_per_s": onnx_speed,
        "onnx_speedup": onnx_speed / pytorch_speed,
    }
