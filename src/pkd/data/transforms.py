"""Training and evaluation transforms on ``torchvision.transforms.v2``.

The samples of :class:`pkd.data.CocoDetection` carry their boxes as
``tv_tensors.BoundingBoxes``, so every geometric transform here moves the boxes with the
pixels. Both pipelines take and return ``(image, target)``.

Who resizes:

- **Training**: :func:`train_transforms` resizes (multi-scale, shorter side drawn from
  ``min_sizes``). The detector must then be built with torchvision's ``_skip_resize=True``
  (a keyword of the detection transform that every torchvision detector forwards), so
  that in training mode its own transform only normalises and pads, and this resize is the
  one used. A distillation teacher fed the same resized images then sees exactly the
  student's pixels, as PKD requires.
- **Evaluation**: :func:`eval_transforms` only converts to float; the detector's own
  transform resizes to its ``min_size`` / ``max_size`` (``_skip_resize`` has no effect in
  eval mode) and maps the predicted boxes back to the original image size, which is what
  COCO evaluation needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.transforms import v2

__all__ = ["eval_transforms", "train_transforms"]


def _per_box_fields(sample: Any) -> tuple[torch.Tensor, ...]:
    """The target tensors with one row per box, which SanitizeBoundingBoxes filters with the boxes."""
    _, target = sample
    return tuple(target[key] for key in ("labels", "area", "iscrowd") if key in target)


def train_transforms(*, min_sizes: Sequence[int], max_size: int, flip_prob: float = 0.5) -> v2.Compose:
    """Augmentation for training: random horizontal flip and multi-scale resize.

    Args:
        min_sizes: Candidate lengths of the shorter image side; one is drawn per image
            (e.g. ``(640, 672, 704, 736, 768, 800)`` for COCO, as in the detectron schedules).
        max_size: Upper bound of the longer side after the resize.
        flip_prob: Probability of a horizontal flip.

    Returns:
        A transform ``(image, target) -> (image, target)``: ``image`` float32 ``(3, H', W')``
        in ``[0, 1]``; boxes flipped and scaled with the pixels; boxes narrower or lower than
        one pixel removed together with their ``labels``, ``area`` and ``iscrowd`` entries.
    """
    if not min_sizes or any(size <= 0 for size in min_sizes):
        raise ValueError(f"min_sizes must be positive lengths, got {list(min_sizes)}")
    if max_size < max(min_sizes):
        raise ValueError(f"max_size ({max_size}) must be at least the largest of min_sizes ({max(min_sizes)})")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(p=flip_prob),
            v2.RandomShortestSize(min_size=list(min_sizes), max_size=max_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.SanitizeBoundingBoxes(labels_getter=_per_box_fields),
        ]
    )


def eval_transforms() -> v2.Compose:
    """Evaluation transform: uint8 image to float32 in ``[0, 1]``, nothing else.

    The detector resizes at evaluation (see the module docstring), and its predictions come
    back in the coordinates of the file, which COCO evaluation expects.

    Returns:
        A transform ``(image, target) -> (image, target)`` with a float32 ``(3, H, W)`` image.
    """
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])
