"""A whole detector, pre- and post-processing included, exported to one ONNX graph.

The graph::

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

With ``raw_outputs=True`` the graph also returns what the detector computes before any
score threshold -- the outputs of its feature module and of the modules its family names in
:attr:`pkd.detector.ExportSpec.raw_outputs` (its heads) -- so that :func:`pkd.verify.verify_onnx`
can compare ONNX Runtime with PyTorch even for a detector that detects nothing yet;
:func:`drop_raw_outputs` removes them once checked.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.onnx import operators
from torchvision.models.detection import transform as detection_transform

from pkd.families import describe
from pkd.features import submodule
from pkd.io import atomic_path

__all__ = [
    "INPUT_NAME",
    "OPSET",
    "OUTPUT_NAMES",
    "BatchedDetector",
    "DeployError",
    "detector_metadata",
    "drop_raw_outputs",
    "export_onnx",
    "raw_output_paths",
    "read_metadata",
    "record_outputs",
    "torchvision_resize_as_eager",
]

#: ONNX opset of the exported graphs (17: LayerNormalization, supported by every current ONNX Runtime).
OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAMES = ("boxes", "scores", "labels", "image_index")
#: Names of the extra outputs of ``export_onnx(..., raw_outputs=True)``: ``raw.0``, ``raw.1``, ...
RAW_PREFIX = "raw."


class DeployError(ValueError):
    """An export that cannot be made or that disagrees with PyTorch, or onnx / onnxruntime missing."""


def require(module: str) -> Any:
    """Imports an optional dependency of ``pkd[onnx]`` with an error that says how to get it."""
    from importlib import import_module

    try:
        return import_module(module)
    except ImportError as error:
        raise DeployError(
            f"{module} is not installed: ONNX export needs the onnx extra (pip install 'pkd[onnx]')"
        ) from error


def _flatten(output: Any, label: str) -> Iterator[tuple[str, Tensor]]:
    """The tensors of a module's output (tensors, dicts, lists, tuples nested), each with a label."""
    if isinstance(output, Tensor):
        yield label, output
    elif isinstance(output, Mapping):
        for key, value in output.items():
            yield from _flatten(value, f"{label}[{key}]")
    elif isinstance(output, list | tuple):
        for index, value in enumerate(output):
            yield from _flatten(value, f"{label}[{index}]")


def raw_output_paths(detector: nn.Module) -> list[str]:
    """Dotted paths of the modules whose outputs are the detector's raw, unthresholded outputs.

    Its feature module (:attr:`pkd.detector.DetectorSpec.features`) and the modules its family
    declares in :attr:`pkd.detector.ExportSpec.raw_outputs`.
    """
    spec = describe(detector)
    return list(dict.fromkeys([spec.features, *spec.export.raw_outputs]))


@contextlib.contextmanager
def record_outputs(model: nn.Module, paths: Sequence[str]) -> Iterator[list[tuple[str, Tensor]]]:
    """Records the output tensors of the submodules at ``paths`` while the block runs.

    Yields a list that receives ``(label, tensor)`` for every tensor each of those modules
    returns, in the order the forward pass calls them (labels such as ``head[cls_logits]``;
    a module called twice appears twice). The hooks are removed on exit, also on error.
    """
    recorded: list[tuple[str, Tensor]] = []
    handles = []

    def hook(path: str):
        return lambda module, inputs, output: recorded.extend(_flatten(output, path))

    try:
        for path in paths:
            handles.append(submodule(model, path).register_forward_hook(hook(path)))
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


class BatchedDetector(nn.Module):
    """The exported graph's forward: a batch tensor in, flat detection tensors out.

    ONNX has no lists of dicts, so the detector's per-image outputs are concatenated and
    ``image_index`` says which image each detection came from.

    Args:
        detector: An eval-mode module mapping a list of ``(3, H, W)`` float images to a list
            of dicts with ``boxes`` ``(K, 4)``, ``scores`` ``(K,)`` and ``labels`` ``(K,)``.
        raw_paths: Submodules whose output tensors are returned after the detections
            (:func:`raw_output_paths`); empty for the graph that is shipped.
    """

    def __init__(self, detector: nn.Module, raw_paths: Sequence[str] = ()) -> None:
        super().__init__()
        self.detector = detector
        self.raw_paths = list(raw_paths)
        self.raw_labels: list[str] = []  # of the last forward's raw outputs

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """Detections of a batch.

        Args:
            images: ``(N, 3, H, W)`` float RGB in [0, 1].

        Returns:
            ``boxes`` ``(K, 4)``, ``scores`` ``(K,)``, ``labels`` ``(K,)`` int64 and
            ``image_index`` ``(K,)`` int64, the detections of all N images one after another;
            then the raw output tensors, if any.
        """
        with record_outputs(self.detector, self.raw_paths) as recorded:
            outputs = self.detector(list(images.unbind(0)))
        self.raw_labels = [label for label, _ in recorded]
        boxes = torch.cat([output["boxes"] for output in outputs])
        scores = torch.cat([output["scores"] for output in outputs])
        labels = torch.cat([output["labels"].to(torch.int64) for output in outputs])
        image_index = torch.cat(
            [torch.zeros_like(output["labels"], dtype=torch.int64) + index for index, output in enumerate(outputs)]
        )
        return (boxes, scores, labels, image_index, *(tensor for _, tensor in recorded))


def _resize_as_eager(original):
    """torchvision's evaluation resize, traced so that ONNX picks the size PyTorch eager picks.

    Eager torchvision computes the scale in Python floats (float64) and the resized size as
    ``floor(side * scale)``; its tracing path computes both in float32, so a side such as
    ``111 * (112 / 111)`` becomes 112 in the graph where eager gets 111.99999999999999 -> 111
    (or the reverse): the image one pixel larger or smaller, and detections a pixel and a
    percent of score off (3 of 8 test images of the quick demo, sized 97-128 px for a
    ``min_size`` of 112). This computes the size in float64 on 1-D tensors (the exporter casts
    0-d results to float32) and resizes to it; the interpolation is the same bilinear one.
    Outside tracing, with targets or with a fixed size, it is ``original``.
    """

    def resize(
        image: Tensor, self_min_size: int, self_max_size: int, target: dict | None = None, fixed_size=None
    ) -> tuple[Tensor, dict | None]:
        if target is not None or fixed_size is not None or not torch.jit.is_tracing():
            return original(image, self_min_size, self_max_size, target, fixed_size)
        shape = operators.shape_as_tensor(image)[-2:].to(torch.float64)
        limits = torch.tensor([float(self_min_size), float(self_max_size)], dtype=torch.float64)
        scale = torch.minimum(limits[:1] / shape.min(0, keepdim=True)[0], limits[1:] / shape.max(0, keepdim=True)[0])
        size = torch.floor(shape * scale).to(torch.int64)
        resized = torch.nn.functional.interpolate(
            image[None], size=[size[0], size[1]], mode="bilinear", align_corners=False
        )
        return resized[0], target

    return resize


@contextlib.contextmanager
def torchvision_resize_as_eager() -> Iterator[None]:
    """Inside the block, torchvision's detection transform resizes as :func:`_resize_as_eager` says.

    torchvision's resize is a module-level function its transform looks up on each call, so
    it is replaced for the block only (the exporter's trace) and restored on exit, also on error.
    """
    original = detection_transform._resize_image_and_masks
    detection_transform._resize_image_and_masks = _resize_as_eager(original)
    try:
        yield
    finally:
        detection_transform._resize_image_and_masks = original


def detector_metadata(detector: nn.Module, meta: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The ``pkd.*`` metadata of a detector (and of its pkd checkpoint's ``meta``).

    Args:
        detector: A detector whose ``transform`` holds normalisation and resizing.
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


def _save(model: Any, path: Path) -> None:
    """Checks an ONNX model and writes it atomically."""
    onnx = require("onnx")
    onnx.checker.check_model(model)
    with atomic_path(path) as temp:
        temp.write_bytes(model.SerializeToString())


def _name_raw_outputs(model: Any, dynamic_size: bool) -> None:
    """Names the graph's outputs after the detections ``raw.0``, ``raw.1``, ... (the exporter numbers them).

    Each becomes an Identity of the traced tensor, which other nodes may read under its own
    name; with a dynamic input size every axis of it is dynamic too (the trace saw one size).
    """
    onnx = require("onnx")
    for index, output in enumerate(model.graph.output[len(OUTPUT_NAMES) :]):
        name = f"{RAW_PREFIX}{index}"
        model.graph.node.append(onnx.helper.make_node("Identity", [output.name], [name], name=f"{name}.identity"))
        output.name = name
        if dynamic_size:
            for axis, dim in enumerate(output.type.tensor_type.shape.dim):
                dim.Clear()
                dim.dim_param = f"{name}_{axis}"


def export_onnx(
    detector: nn.Module,
    path: str | os.PathLike,
    *,
    image_size: tuple[int, int] = (512, 512),
    batch_size: int = 1,
    dynamic_size: bool = True,
    metadata: Mapping[str, str] | None = None,
    opset: int = OPSET,
    raw_outputs: bool = False,
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
        raw_outputs: Also return the raw outputs of :func:`raw_output_paths` (``raw.0``, ...,
            listed in the ``pkd.raw_outputs`` metadata), for :func:`pkd.verify.verify_onnx`.
            The detector's family must be known to :func:`pkd.families.describe`.

    Returns:
        The path written.

    Raises:
        DeployError: onnx missing, or a batch size or image size below 1.
    """
    onnx = require("onnx")
    if batch_size < 1 or min(image_size) < 1:
        raise DeployError(f"batch_size and image_size must be positive, got {batch_size} and {image_size}")
    path = Path(path)
    detector.eval()
    graph = BatchedDetector(detector, raw_output_paths(detector) if raw_outputs else ()).eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(batch_size, 3, *image_size, generator=generator)
    dynamic_axes: dict[str, dict[int, str]] = {name: {0: "detections"} for name in OUTPUT_NAMES}
    if dynamic_size:
        dynamic_axes[INPUT_NAME] = {2: "height", 3: "width"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # Tracing warns about every Python number it records as a constant (torchvision's
        # ONNX paths are written for it) and that this exporter is the legacy one.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        for message in ("To copy construct from a tensor", "Exporting aten::index", "Constant folding"):
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        with torch.no_grad(), torchvision_resize_as_eager():
            torch.onnx.export(
                graph,
                (example,),
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
    model = onnx.load_from_string(buffer.getvalue())
    if raw_outputs:
        _name_raw_outputs(model, dynamic_size)
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
    if raw_outputs:
        entries["raw_outputs"] = json.dumps({"paths": graph.raw_paths, "labels": graph.raw_labels})
    del model.metadata_props[:]
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = f"pkd.{key}", value
    _save(model, path)
    return path


def drop_raw_outputs(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Writes ``source`` without its raw outputs (and their metadata) to ``path``, atomically.

    What goes is the outputs and the Identity nodes that named them; every node that computes
    the detections is the one that was verified.
    """
    onnx = require("onnx")
    model = onnx.load(str(source))
    kept = [output for output in model.graph.output if not output.name.startswith(RAW_PREFIX)]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    nodes = [n for n in model.graph.node if not (n.output and all(o.startswith(RAW_PREFIX) for o in n.output))]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept_props = [(prop.key, prop.value) for prop in model.metadata_props if prop.key != "pkd.raw_outputs"]
    del model.metadata_props[:]
    for key, value in kept_props:
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    path = Path(path)
    _save(model, path)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``pkd.*`` metadata of an exported file, JSON values decoded, without the prefix.

    Example: ``read_metadata("student.onnx")["class_names"]`` -> ``{1: "0", 2: "1", ...}``.
    """
    onnx = require("onnx")
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
