"""Checking an exported ONNX file against the PyTorch detector it came from, with ONNX Runtime.

Two things are compared on the same images:

- **Raw outputs**, before any score threshold: the tensors of the detector's feature module
  and heads (:func:`pkd.export.raw_output_paths`), which a file exported with
  ``raw_outputs=True`` returns besides its detections. They exist for every detector, trained
  or not, so a student that detects nothing yet is checked as thoroughly as a good one.
- **Detections** above ``score_threshold``, matched one to one (same label, close boxes and
  scores). They check what the raw outputs cannot: box decoding, thresholds, NMS and the
  mapping back to input pixels. None on either side agrees.

A file *disagrees* only when something compared differs; :class:`Comparison` says what.

Why raw outputs rather than the detections with the score threshold lifted: an untrained
detector's candidates have near-equal scores (a random-init RetinaNet's lie within 3e-5 of
each other), so float32 rounding reorders them at the top-k cut and in NMS, and the lists
differ without any fault (279 candidates in ONNX Runtime against 277 in PyTorch on one
image). The raw maps are compared element by element, with no ranking in between.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from pkd.export import record_outputs
from pkd.onnx_runner import OnnxDetector

__all__ = [
    "BOX_TOLERANCE",
    "RAW_TOLERANCE",
    "SCORE_THRESHOLD",
    "SCORE_TOLERANCE",
    "Comparison",
    "compare_detections",
    "compare_raw",
    "verify_onnx",
]

#: Detections compared: those scoring at least this much in PyTorch.
SCORE_THRESHOLD = 0.3
#: Largest difference of a box coordinate, in input pixels, between matched detections.
BOX_TOLERANCE = 1.0
#: Largest difference of score between matched detections (and the margin around the threshold).
SCORE_TOLERANCE = 0.01
#: Largest difference of a raw output, as a fraction of its largest magnitude in PyTorch. Float32
#: rounding stays under 0.002 even in ill-conditioned random nets; a graph that resizes one pixel
#: apart from PyTorch differs by 0.4 or more.
RAW_TOLERANCE = 0.01


@dataclass
class Comparison:
    """How an exported file's outputs compare with the PyTorch detector's on some images.

    Raw outputs agree when each has the same shape in both and differs by at most
    ``raw_tolerance`` times its largest magnitude in PyTorch. A PyTorch detection scoring at
    least ``score_threshold`` is *matched* by an ONNX detection of the same label whose score
    is within ``score_tolerance`` and whose box coordinates are all within ``box_tolerance``
    pixels. *Missing*: PyTorch detections without a match; *extra*: ONNX detections scoring
    at least ``score_threshold + score_tolerance`` left unmatched (the margin lets a
    detection right at the threshold fall on either side).
    """

    images: int = 0
    raw_compared: int = 0  # raw output tensors compared, over all images
    raw_names: list[str] = field(default_factory=list)  # the modules they come from
    max_raw_difference: float = 0.0  # as a fraction of each tensor's largest magnitude
    raw_differences: list[str] = field(default_factory=list)  # descriptions, for the error message
    compared: int = 0  # PyTorch detections at or above the threshold
    matched: int = 0
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    max_box_difference: float = 0.0  # pixels, over matched detections
    max_score_difference: float = 0.0
    score_threshold: float = SCORE_THRESHOLD
    box_tolerance: float = BOX_TOLERANCE
    score_tolerance: float = SCORE_TOLERANCE
    raw_tolerance: float = RAW_TOLERANCE

    @property
    def disagrees(self) -> bool:
        """Something compared differs: a raw output, or a detection missing or extra."""
        return bool(self.raw_differences or self.missing or self.extra)

    @property
    def ok(self) -> bool:
        """Something was compared, and nothing compared differs."""
        return (self.raw_compared > 0 or self.compared > 0) and not self.disagrees

    def summary(self) -> str:
        """One line: what was compared and how close it was (or the first differences)."""
        parts = [f"{self.images} images"]
        if self.raw_compared:
            names = ", ".join(self.raw_names[:4]) + (", ..." if len(self.raw_names) > 4 else "")
            parts.append(
                f"raw outputs before thresholds ({names}: {self.raw_compared} tensors) "
                f"{'differ' if self.raw_differences else 'match'} within {self.raw_tolerance:g} of their scale "
                f"(largest difference {self.max_raw_difference:.2g})"
            )
        else:
            parts.append("no raw outputs in the file (export with raw_outputs=True to compare them)")
        rules = (
            f"same label, boxes within {self.box_tolerance:g} px, scores within {self.score_tolerance:g}; "
            f"max differences {self.max_box_difference:.2g} px, {self.max_score_difference:.2g}"
        )
        if self.compared:
            parts.append(
                f"{self.matched}/{self.compared} PyTorch detections with score >= {self.score_threshold:g} "
                f"matched by ONNX Runtime ({rules})"
            )
        else:
            parts.append(f"no detection with score >= {self.score_threshold:g} in PyTorch")
        if self.raw_differences:
            parts.append(f"{len(self.raw_differences)} raw outputs differ, e.g. {'; '.join(self.raw_differences[:2])}")
        if self.missing:
            parts.append(f"{len(self.missing)} missing in ONNX, e.g. {'; '.join(self.missing[:2])}")
        if self.extra:
            parts.append(f"{len(self.extra)} only in ONNX, e.g. {'; '.join(self.extra[:2])}")
        return "; ".join(parts)


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


def compare_raw(
    reference: Sequence[tuple[str, Tensor]],
    candidate: Sequence[np.ndarray],
    comparison: Comparison,
    *,
    image: int = 0,
) -> Comparison:
    """Compares one image's raw outputs from ONNX Runtime (``candidate``) with PyTorch's.

    Args:
        reference: ``(label, tensor)`` pairs recorded from PyTorch (:func:`pkd.export.record_outputs`).
        candidate: The file's raw outputs, in the same order.
        comparison: Updated in place.
        image: Index of the image, for the descriptions.

    Returns:
        ``comparison``.
    """
    if len(reference) != len(candidate):
        comparison.raw_differences.append(
            f"image {image}: {len(candidate)} raw outputs from ONNX Runtime, {len(reference)} from PyTorch"
        )
        return comparison
    for (label, expected), actual in zip(reference, candidate, strict=True):
        comparison.raw_compared += 1
        module = re.sub(r"\.\d+$", "", label.split("[", 1)[0])  # one name for a head's per-level branches
        if module not in comparison.raw_names:
            comparison.raw_names.append(module)
        expected = expected.detach().cpu().double().numpy()
        actual = np.asarray(actual, dtype=np.float64)
        if expected.shape != actual.shape:
            comparison.raw_differences.append(
                f"image {image}: {label} has shape {tuple(actual.shape)} in ONNX Runtime, {tuple(expected.shape)} "
                "in PyTorch"
            )
            continue
        if not expected.size:
            continue
        # Relative to the tensor's scale: float32 rounding grows with the values, and maps
        # whose values all vanish (random-init features) are compared as closely as the rest.
        scale = float(np.abs(expected).max())
        difference = float(np.abs(actual - expected).max()) / scale if scale > 0 else float(np.abs(actual).max())
        comparison.max_raw_difference = max(comparison.max_raw_difference, difference)
        if not difference <= comparison.raw_tolerance:  # NaN differs too
            comparison.raw_differences.append(
                f"image {image}: {label} differs by {difference:.2g} of its largest magnitude {scale:.3g}"
            )
    return comparison


def _fit(image: Tensor, size: tuple[int, int] | None) -> Tensor:
    """``image`` resized to the one size a fixed-size graph takes (unchanged for a dynamic one)."""
    if size is None or tuple(image.shape[-2:]) == tuple(size):
        return image
    return torch.nn.functional.interpolate(image[None], size=list(size), mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def verify_onnx(
    path: str | os.PathLike,
    detector: nn.Module,
    images: Sequence[Tensor],
    *,
    score_threshold: float = SCORE_THRESHOLD,
    box_tolerance: float = BOX_TOLERANCE,
    score_tolerance: float = SCORE_TOLERANCE,
    raw_tolerance: float = RAW_TOLERANCE,
) -> Comparison:
    """Runs an exported file with ONNX Runtime (CPU) and the PyTorch detector on the same images.

    Each image goes alone (with copies of itself for a graph of a larger batch), resized
    first to the size a fixed-size graph takes. The raw outputs are compared when the file
    has them (``export_onnx(..., raw_outputs=True)``), the detections always.

    Args:
        path: The ONNX file.
        detector: The PyTorch detector it was exported from (put in eval mode).
        images: ``(3, H, W)`` float tensors in [0, 1], real images preferably.
        score_threshold: Detections compared: PyTorch's with at least this score.
        box_tolerance: Largest coordinate difference of matched boxes, in pixels.
        score_tolerance: Largest score difference of matched detections.
        raw_tolerance: Largest difference of a raw output, as a fraction of its largest magnitude.

    Returns:
        The :class:`Comparison`: ``comparison.ok`` says whether they agree, ``disagrees``
        whether something differs.
    """
    detector.eval()
    runtime = OnnxDetector(path)
    comparison = Comparison(
        score_threshold=score_threshold,
        box_tolerance=box_tolerance,
        score_tolerance=score_tolerance,
        raw_tolerance=raw_tolerance,
    )
    paths = (runtime.metadata.get("raw_outputs") or {}).get("paths", []) if runtime.raw_names else []
    device = next(iter(detector.parameters()), torch.empty(0)).device
    for index, image in enumerate(images):
        batch = runtime.batch([_fit(image.detach().cpu().float(), runtime.image_size)])
        with record_outputs(detector, paths) as recorded:
            reference = detector(list(batch.to(device)))[0]
        (boxes, scores, labels, image_index), raw = runtime.run_with_raw(batch.numpy())
        keep = image_index == 0
        candidate = {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
        comparison.images += 1
        compare_detections(reference, {k: torch.from_numpy(v) for k, v in candidate.items()}, comparison, image=index)
        if runtime.raw_names:
            compare_raw(recorded, raw, comparison, image=index)
    return comparison
