"""What pkd knows about a detector: one small protocol, torchvision's detection convention.

The distiller, the engine (training, evaluation, checkpoints, export), ``pkd inspect`` and the
command line ask a detector for nothing but what :class:`Detector` lists. torchvision's
detectors fulfil it as they are (so their state_dicts stay plain torchvision ones); another
family is one module that wraps its models to fulfil it and one line in
:data:`pkd.models.OTHER_FAMILIES` (:mod:`pkd.yolo` does it for Ultralytics YOLO, touching no
other module).

The smallest design that works: the convention every torchvision detector already follows
(``self.transform`` makes the batch, ``self.backbone(batch)`` returns the FPN levels, the heads
do the rest), written down. A family whose feature module does not take the batch as its first
argument, or returns something else than ``{level: (N, C, H, W)}``, wraps it (as
:class:`pkd.yolo.YoloFeatures` does for the layers before YOLO's Detect head).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = ["Detector", "Transform"]


@runtime_checkable
class Transform(Protocol):
    """Turns a list of images (and targets) into the batch the backbone sees, and back.

    torchvision's ``GeneralizedRCNNTransform`` is one: resize (eval; training images arrive
    resized by pkd's data pipeline), normalise with ``image_mean`` / ``image_std``, pad to a
    multiple of the coarsest stride.
    """

    image_mean: list[float]  # per-channel mean subtracted from [0, 1] pixels (what the teacher re-normalises by)
    image_std: list[float]

    def __call__(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> tuple[Any, Any]:
        """``(ImageList, targets)``: ``ImageList.tensors`` is the ``(N, 3, H, W)`` batch, targets rescaled."""
        ...

    def postprocess(self, detections: list[dict[str, Tensor]], image_sizes: list, original_sizes: list) -> list:
        """Boxes from batch coordinates back to each input image's."""
        ...


@runtime_checkable
class Detector(Protocol):
    """A detector pkd can train, distil, evaluate, inspect and export.

    Attributes:
        transform: the :class:`Transform` that makes the batch (its normalisation included).
        backbone: a module ``(N, 3, H, W) batch -> {level name: (N, C, H, W)}``, fine to coarse:
            the features distilled. Strides and channels are learned from it by one probe
            forward (:func:`pkd.features.probe_levels`), never declared by name.

    ``forward(images, targets)``: in training mode, ``{loss name: scalar}`` (the detector's own
    losses; pkd sums them); in eval mode, ``[{"boxes": (K, 4) xyxy in input-image pixels,
    "scores": (K,), "labels": (K,) in 1..num_classes-1}]``. ``state_dict()`` is all that is
    saved; the checkpoint's ``meta`` (name, ``num_classes``, build arguments) rebuilds the
    architecture through :func:`pkd.models.build_detector`.
    """

    transform: Transform
    backbone: nn.Module

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]: ...
