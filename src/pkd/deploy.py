"""Deploying a pkd run's student: ``pkd export --format onnx``.

:func:`export_run_onnx` writes the student's PyTorch export, exports the whole detector to
ONNX (:mod:`pkd.export`), checks the graph against PyTorch with ONNX Runtime on real images
(:mod:`pkd.verify`) and keeps it only when nothing differs. The pieces work on any detector
without a run: :func:`pkd.export.export_onnx`, :func:`pkd.verify.verify_onnx` and
:class:`pkd.onnx_runner.OnnxDetector`. Speed is measured by ``benchmarks/bench_onnx.py``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pkd.export import DeployError, detector_metadata, drop_raw_outputs, export_onnx
from pkd.families import describe
from pkd.features import submodule
from pkd.verify import BOX_TOLERANCE, SCORE_THRESHOLD, SCORE_TOLERANCE, Comparison, verify_onnx

__all__ = ["DeployError", "RunExport", "export_run_onnx", "load_images"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


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
    score_thresh: float | None = None,
) -> RunExport:
    """Exports a pkd run's student to ONNX, verified against PyTorch with ONNX Runtime.

    Writes the PyTorch export first (``out`` with suffix ``.pt``, as :func:`pkd.checkpoint.export_student`),
    exports the ONNX graph with its raw outputs next to it, runs both on ``count`` real images
    and compares the raw outputs and the detections (:func:`pkd.verify.verify_onnx`). When
    nothing differs the graph goes to ``out`` without its raw outputs; otherwise it is left at
    ``<stem>.unverified.onnx`` for inspection, the PyTorch export stays, and
    :class:`DeployError` says what differs. A detector whose family declares a fixed input
    size (:attr:`pkd.detector.ExportSpec.fixed_size`) is traced at that size only.

    Args:
        source: A run folder's ``best.pt`` / ``last.pt``, or an exported student.
        out: The ONNX file, e.g. ``student.onnx``.
        images: A folder of images, or ``(3, H, W)`` tensors in [0, 1], to verify on (default:
            the run's validation images, from its config).
        count: How many images of the folder.
        image_size: ``(H, W)`` traced (default: the family's fixed size, else the detector's
            ``min_size`` square).
        batch_size: Images per call of the graph.
        dynamic_size: Whether the graph takes any image size (not for a fixed-size family).
        score_threshold: See :func:`pkd.verify.verify_onnx`.
        box_tolerance: See :func:`pkd.verify.verify_onnx`.
        score_tolerance: See :func:`pkd.verify.verify_onnx`.
        score_thresh: The lowest score the graph returns (default: the detector's own), set
            on the module :attr:`pkd.detector.ExportSpec.thresholds_at` names.

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
    spec = describe(detector).export
    if score_thresh is not None:
        owner = submodule(detector, spec.thresholds_at)
        if not hasattr(owner, "score_thresh"):
            raise DeployError(f"{meta['detector']} has no score threshold to set (--score-thresh)")
        if not 0 <= score_thresh <= 1:
            raise DeployError(f"--score-thresh is a score in [0, 1], got {score_thresh}")
        owner.score_thresh = score_thresh
    fixed_size = spec.fixed_size
    if fixed_size is not None:
        if image_size is not None and tuple(image_size) != tuple(fixed_size):
            raise DeployError(f"{meta['detector']} takes {fixed_size[0]}x{fixed_size[1]} images only; drop --size")
        image_size, dynamic_size = tuple(fixed_size), False
    elif image_size is None:
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
        raw_outputs=True,
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
        what = "disagrees with PyTorch" if comparison.disagrees else "could not be compared with PyTorch"
        raise DeployError(
            f"the ONNX export {what} on {described}: {comparison.summary()}. "
            f"Kept the PyTorch export {pytorch} and the ONNX graph at {unverified} (not {out})"
        )
    drop_raw_outputs(unverified, out)
    unverified.unlink()
    return RunExport(out, pytorch, out.stat().st_size, comparison, described)
