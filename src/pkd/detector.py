"""The contract between pkd and a detector family: what a detector declares, and what a family does.

The distiller, the engine, ``pkd inspect``, deploy and the command line ask a detector for
nothing but its :class:`DetectorSpec` (:func:`pkd.families.describe`) and the calls of
:class:`Detector`; they never ask which class it is. A *family* (torchvision's FPN detectors,
Ultralytics YOLO, the DETR family from Hugging Face, or your own) is one
:class:`Family` object in one module, registered in the plain dict
:data:`pkd.families.FAMILIES`; :func:`pkd.models.build_detector` is a lookup in it.

The model is Detectron2's ``Backbone.output_shape()`` and timm's ``feature_info``: a detector
*declares* its feature levels (name -> stride, channels), its pixel normalisation, the
distillation weight that suits it as a teacher and why, and what export needs; nothing is
learned by probing a forward pass.

The calling convention is torchvision's, so its detectors fulfil it unchanged and their
state_dicts stay plain torchvision ones: ``self.transform`` makes the batch, ``self.backbone``
(the module at :attr:`DetectorSpec.features`) maps the batch to the levels and is called once
per forward with the batch as its first argument; the heads do the rest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = ["Detector", "DetectorSpec", "ExportSpec", "Family", "Level", "Transform"]


@dataclass(frozen=True)
class Level:
    """One feature level a detector's feature module returns.

    Attributes:
        stride: input pixels per feature position (8 for P3).
        channels: ``C`` of the ``(N, C, H / stride, W / stride)`` map.
    """

    stride: int
    channels: int


@dataclass(frozen=True)
class ExportSpec:
    """What exporting a detector needs to know about it.

    Attributes:
        thresholds_at: dotted path of the submodule holding the post-processing settings
            ``score_thresh``, ``nms_thresh`` and ``detections_per_img`` (``""``: the detector
            itself; the RoI heads for torchvision's two-stage detectors).
        fixed_size: ``(H, W)`` the ONNX graph must be traced at and fed with (None: any size,
            dynamic axes). A family whose models resize every image to one size says so here.
        native_format: the name of the family's own file format that :meth:`Family.export_native`
            writes (``"ultralytics"``), or None.
        raw_outputs: dotted paths of the submodules whose outputs are what the detector computes
            before any score threshold, top-k or NMS (its heads' logits and box regressions).
            Export verification compares them, and the feature module's, between ONNX Runtime
            and PyTorch, so an untrained detector that detects nothing is checked too. Name
            only modules whose outputs do not depend on a ranking (a second stage fed by NMS'd
            proposals does not qualify); ``()``: the feature module alone.
    """

    thresholds_at: str = ""
    fixed_size: tuple[int, int] | None = None
    native_format: str | None = None
    raw_outputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class DetectorSpec:
    """What a detector declares about itself; the only thing pkd asks of it beyond calling it.

    Attributes:
        family: the key of its family in :data:`pkd.families.FAMILIES`.
        levels: ``{level name: Level}`` of what the feature module returns, fine to coarse.
        image_mean: per-channel mean subtracted from [0, 1] pixels by the detector's transform.
        image_std: per-channel std it divides by.
        distill_weight: the distillation weight (alpha) to use when this detector is the teacher
            and the user gives none.
        weight_reason: why that weight (where it comes from).
        export: see :class:`ExportSpec`.
        features: dotted path of the feature module: ``(N, 3, H, W)`` batch -> ``{level: map}``.
    """

    family: str
    levels: Mapping[str, Level]
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    distill_weight: float
    weight_reason: str
    export: ExportSpec = field(default_factory=ExportSpec)
    features: str = "backbone"

    @property
    def strides(self) -> dict[str, int]:
        """``{level: stride}``, fine to coarse."""
        return {name: level.stride for name, level in self.levels.items()}

    @property
    def channels(self) -> dict[str, int]:
        """``{level: channels}``, fine to coarse."""
        return {name: level.channels for name, level in self.levels.items()}


@runtime_checkable
class Transform(Protocol):
    """Turns a list of images (and targets) into the batch the feature module sees, and back.

    torchvision's detection transform is one: resize (eval; training images arrive
    resized by pkd's data pipeline), normalise with ``image_mean`` / ``image_std``, pad to a
    multiple of the coarsest stride.
    """

    image_mean: list[float]
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
        backbone: the feature module (at :attr:`DetectorSpec.features`), ``(N, 3, H, W) batch ->
            {level name: (N, C, H, W)}``, fine to coarse: the features distilled.

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


class Family(ABC):
    """A detector family: builds its detectors by name and declares their :class:`DetectorSpec`.

    Subclass it in one module, import the family's own libraries there only, and register an
    instance in :data:`pkd.families.FAMILIES`. :meth:`build` attaches the spec to the model it
    returns (``model.pkd_spec``); :meth:`describe` declares it for a model of the family that
    pkd did not build (return None for a model that is not of the family).

    Example (a whole family in a few lines; see ``tests/test_families.py``)::

        class Toy(Family):
            name = "toy"
            def names(self): return ["toy_net"]
            def build(self, name, *, num_classes, **options):
                model = ToyDetector(num_classes)
                model.pkd_spec = DetectorSpec("toy", {"p3": Level(8, 16)}, (0.0,) * 3, (1.0,) * 3, 10.0, "...")
                return model
        FAMILIES["toy"] = Toy()
    """

    #: The family's key in :data:`pkd.families.FAMILIES`.
    name: str = ""
    #: Build options this family understands besides the common ones of :meth:`build`.
    options: Sequence[str] = ()
    #: How names beyond :meth:`names` are formed, for error messages (``""``: none).
    pattern: str = ""
    #: Whether other keywords go on to the model's class (which then checks them), as torchvision's do.
    open_options: bool = False

    @abstractmethod
    def names(self) -> list[str]:
        """The detector names this family builds (listed by ``pkd`` and in error messages)."""

    def matches(self, name: str) -> bool:
        """Whether ``name`` is one of this family's detectors."""
        return name in self.names()

    @abstractmethod
    def build(
        self,
        name: str,
        *,
        num_classes: int,
        weights: str | Path | None = None,
        weights_backbone: str | Path | None = None,
        min_size: int | tuple[int, ...] = 800,
        max_size: int = 1333,
        skip_resize: bool = False,
        **options: Any,
    ) -> nn.Module:
        """Builds ``name`` (random init or with weights), with its spec attached as ``pkd_spec``.

        ``num_classes`` counts torchvision's background class too; the common arguments mean
        what they mean for :func:`pkd.models.build_detector`.
        """

    def resolved_options(self, model: nn.Module) -> dict[str, Any]:
        """Build options that ``"auto"`` resolved from the weights, saved so that a checkpoint rebuilds
        the same architecture without them (torchvision: the backbone's norm)."""
        return {}

    def describe(self, model: nn.Module) -> DetectorSpec | None:
        """The spec of a model of this family that pkd did not build, or None if it is not one."""
        return None

    def weights_classes(self, name: str, weights: str | Path) -> dict[int, str] | None:
        """The classes ``weights`` of detector ``name`` predict, label -> name, where the weights say
        (torchvision's enums, Ultralytics files); None where they do not (a plain state_dict)."""
        return None

    def export_native(self, model: nn.Module, path: Path, class_names: Mapping[int, str] | None = None) -> Path:
        """Writes ``model`` in the family's own format (:attr:`ExportSpec.native_format`)."""
        raise ValueError(f"{self.name} detectors have no native export format")
