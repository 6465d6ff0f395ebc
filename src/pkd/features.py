"""Tapping FPN levels out of a detector, their strides, and pairing teacher and student levels.

A :class:`FeatureTap` records what a submodule (by default the detector's ``backbone``, which
in torchvision is the backbone + FPN and returns every level at once) outputs during a forward
pass, only inside a ``with`` block. Each level's stride is computed from the input and feature
sizes, so a Faster R-CNN FPN (strides 4-64) and a RetinaNet FPN (strides 8-128) can be paired
by what their levels mean (:func:`pair_levels` with ``pairing="stride"``) rather than by
position, which is what the reference implementation does.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FeatureTap", "LevelPair", "as_levels", "build_connectors", "level_strides", "pair_levels", "submodule"]


def submodule(model: nn.Module, path: str) -> nn.Module:
    """The submodule of ``model`` at a dotted ``path`` (``""`` is the model itself).

    A model wrapped in ``DistributedDataParallel`` (or anything with a ``.module``) is looked
    through, so ``"backbone"`` finds ``model.module.backbone`` too.
    """
    module = model
    for part in [p for p in path.split(".") if p]:
        if not hasattr(module, part) and hasattr(module, "module"):
            module = module.module
        if not hasattr(module, part):
            children = [name for name, _ in module.named_children()]
            raise ValueError(f"{type(module).__name__} has no submodule {part!r} (path {path!r}); it has {children}")
        module = getattr(module, part)
    if not isinstance(module, nn.Module):
        raise ValueError(f"{path!r} is a {type(module).__name__}, not an nn.Module")
    return module


def as_levels(output: Any) -> OrderedDict[str, Tensor]:
    """A module's feature output as an ordered ``{level name: (N, C, H, W)}`` dict.

    torchvision's FPN backbones return an ``OrderedDict`` already; a single tensor becomes
    ``{"0": x}`` and a list or tuple ``{"0": x0, "1": x1, ...}``.
    """
    if isinstance(output, Tensor):
        return OrderedDict([("0", output)])
    if isinstance(output, Mapping):
        return OrderedDict((str(k), v) for k, v in output.items() if isinstance(v, Tensor) and v.dim() == 4)
    if isinstance(output, Sequence):
        return OrderedDict((str(i), v) for i, v in enumerate(output) if isinstance(v, Tensor) and v.dim() == 4)
    raise TypeError(f"cannot read feature levels from a {type(output).__name__}")


def level_strides(input_size: Sequence[int], feature_sizes: Mapping[str, Sequence[int]]) -> OrderedDict[str, int]:
    """Stride of each level, from the input's and the levels' spatial sizes.

    Convolutions and poolings with stride 2 and "same" padding give ``ceil(size / 2)``, so a
    level of stride ``s`` has ``ceil(H / s) x ceil(W / s)`` positions. The stride is the power
    of two that reproduces both sizes; when several do (small inputs: a 64-pixel image has 1x1
    levels at strides 64 and 128), the smallest one above the previous level's stride is taken,
    since FPN levels are ordered from fine to coarse. Sizes no power of two explains give the
    rounded ratio.

    Args:
        input_size: ``(H, W)`` of the image batch the module saw (after padding).
        feature_sizes: ``{level: (h, w)}`` in the module's output order.

    Returns:
        ``{level: stride}`` in the same order.
    """
    height, width = int(input_size[0]), int(input_size[1])
    strides: OrderedDict[str, int] = OrderedDict()
    previous = 0
    for name, (h, w) in feature_sizes.items():
        limit = max(height, width) * 2
        candidates = [
            2**k for k in range(0, int(math.log2(limit)) + 1) if -(-height // 2**k) == h and -(-width // 2**k) == w
        ]
        if candidates:
            larger = [s for s in candidates if s > previous]
            stride = larger[0] if larger else candidates[0]
        else:
            stride = max(1, round(max(height / h, width / w)))
        strides[name] = stride
        previous = stride
    return strides


class FeatureTap:
    """Records a submodule's input and output during forward passes inside a ``with`` block.

    The hook is registered on entry and removed on exit, also when the block raises, so a
    model is never left with a stray hook. What the last call inside the block produced stays
    readable after the block.

    Args:
        model: the model to tap (a detector, or a DDP-wrapped one).
        path: dotted path of the submodule; ``"backbone"`` is the backbone + FPN of
            torchvision's detectors, whose output is every FPN level at once.

    Example:
        >>> detector = build_detector("fcos_resnet18_fpn", num_classes=3, min_size=64, max_size=64, fpn_channels=64)
        >>> with FeatureTap(detector) as tap:
        ...     _ = detector.eval()([torch.rand(3, 64, 64)])
        >>> {name: tuple(x.shape) for name, x in tap.levels.items()}["0"], dict(tap.strides)
        ((1, 64, 8, 8), {'0': 8, '1': 16, '2': 32, 'p6': 64, 'p7': 128})
    """

    def __init__(self, model: nn.Module, path: str = "backbone") -> None:
        self.module = submodule(model, path)
        self.path = path
        self.input: Tensor | None = None
        self.levels: OrderedDict[str, Tensor] = OrderedDict()
        self._handle = None

    def _record(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.input = args[0] if args and isinstance(args[0], Tensor) else None
        self.levels = as_levels(output)

    def __enter__(self) -> FeatureTap:
        if self._handle is not None:
            raise RuntimeError("this FeatureTap is already active")
        self.input = None
        self.levels = OrderedDict()
        self._handle = self.module.register_forward_hook(self._record)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._handle.remove()
        self._handle = None

    @property
    def strides(self) -> OrderedDict[str, int]:
        """``{level: stride}`` of the last recorded call, from its input and feature sizes."""
        if self.input is None or not self.levels:
            raise RuntimeError(f"nothing recorded at {self.path!r}: run the model inside the with block first")
        return level_strides(self.input.shape[-2:], {k: v.shape[-2:] for k, v in self.levels.items()})


@dataclass(frozen=True)
class LevelPair:
    """One distilled pair: a student FPN level and the teacher level it imitates."""

    student: str
    teacher: str
    student_stride: int
    teacher_stride: int

    @property
    def name(self) -> str:
        """``"s8"`` when both strides are 8; ``"s8_t4"`` for student stride 8 against teacher stride 4."""
        if self.student_stride == self.teacher_stride:
            return f"s{self.student_stride}"
        return f"s{self.student_stride}_t{self.teacher_stride}"


def _resolve_level(strides: Mapping[str, int], key: str | int, side: str) -> str:
    if isinstance(key, str) and key in strides:
        return key
    if isinstance(key, int) and not isinstance(key, bool):
        for name, stride in strides.items():
            if stride == key:
                return name
    raise ValueError(f"the {side} has no level {key!r}; its levels (name: stride) are {dict(strides)}")


def pair_levels(
    student_strides: Mapping[str, int],
    teacher_strides: Mapping[str, int],
    pairing: str | Sequence[tuple[str | int, str | int]] = "stride",
    *,
    levels: Sequence[int] | None = None,
    max_levels: int = 4,
) -> list[LevelPair]:
    """Chooses which student level imitates which teacher level.

    Args:
        student_strides: ``{level: stride}`` of the student, fine to coarse.
        teacher_strides: same for the teacher.
        pairing: ``"stride"`` pairs levels of equal stride (e.g. 8, 16, 32, 64 for a Faster
            R-CNN teacher, strides 4-64, and a RetinaNet student, 8-128); ``"index"`` pairs the
            first levels of each by position, as the reference does (stride 4 with 8 in that
            example; the loss resizes); or an explicit list of ``(student, teacher)`` levels,
            each a level name or a stride.
        levels: which pairs to keep: strides for ``"stride"`` pairing, positions for
            ``"index"``; by default the first ``max_levels``.
        max_levels: number of pairs by default; the reference distils four levels and leaves
            the coarsest out.

    Returns:
        The pairs, fine to coarse.

    Raises:
        ValueError: no common stride, a requested level that does not exist, or an unknown
            pairing.
    """
    student_names = list(student_strides)
    teacher_names = list(teacher_strides)
    if isinstance(pairing, str) and pairing == "stride":
        by_stride = {stride: name for name, stride in teacher_strides.items()}
        common = [(name, by_stride[stride]) for name, stride in student_strides.items() if stride in by_stride]
        if not common:
            raise ValueError(
                f"student and teacher FPNs share no stride (student {list(student_strides.values())}, "
                f"teacher {list(teacher_strides.values())}); use pairing='index' to pair levels by position"
            )
        if levels is not None:
            available = [student_strides[s] for s, _ in common]
            unknown = [stride for stride in levels if stride not in available]
            if unknown:
                raise ValueError(f"levels {unknown} are not strides both models have; common strides: {available}")
            common = [(s, t) for s, t in common if student_strides[s] in levels]
        else:
            common = common[:max_levels]
        chosen = common
    elif isinstance(pairing, str) and pairing == "index":
        count = min(len(student_names), len(teacher_names))
        positions = list(levels) if levels is not None else list(range(min(count, max_levels)))
        bad = [i for i in positions if not 0 <= i < count]
        if bad:
            raise ValueError(f"level positions {bad} out of range: the models have {count} levels in common")
        chosen = [(student_names[i], teacher_names[i]) for i in positions]
    elif isinstance(pairing, str):
        raise ValueError(f"pairing must be 'stride', 'index' or a list of (student, teacher) levels, got {pairing!r}")
    else:
        chosen = [
            (_resolve_level(student_strides, s, "student"), _resolve_level(teacher_strides, t, "teacher"))
            for s, t in pairing
        ]
    if not chosen:
        raise ValueError("no level pairs to distil")
    return [LevelPair(s, t, student_strides[s], teacher_strides[t]) for s, t in chosen]


def build_connectors(
    pairs: Sequence[LevelPair], student_channels: Mapping[str, int], teacher_channels: Mapping[str, int]
) -> nn.ModuleDict:
    """A learnable 1x1 conv per pair whose channel counts differ, mapping student to teacher channels.

    Connectors belong to the student side during training and are not part of the exported
    student.

    Returns:
        ``nn.ModuleDict`` keyed by :attr:`LevelPair.name` (pairs with equal channels have none).
    """
    connectors = nn.ModuleDict()
    for pair in pairs:
        c_in, c_out = student_channels[pair.student], teacher_channels[pair.teacher]
        if c_in != c_out:
            connectors[pair.name] = nn.Conv2d(c_in, c_out, kernel_size=1)
    return connectors


@torch.no_grad()
def probe_levels(module: nn.Module, size: int = 256, device: torch.device | None = None) -> dict[str, tuple]:
    """Runs ``module`` once on a blank ``(1, 3, size, size)`` image in eval mode.

    Used to learn a feature extractor's levels, strides and channels before training. ``size``
    should be a multiple of the coarsest stride so the strides come out exact.

    Returns:
        ``{level: (stride, channels)}`` in output order.
    """
    was_training = module.training
    if device is None:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
    try:
        module.eval()
        levels = as_levels(module(torch.zeros(1, 3, size, size, device=device)))
    finally:
        module.train(was_training)
    strides = level_strides((size, size), {k: v.shape[-2:] for k, v in levels.items()})
    return {name: (strides[name], x.shape[1]) for name, x in levels.items()}
