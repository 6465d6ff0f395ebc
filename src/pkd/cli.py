"""The ``pkd`` command: parses arguments and calls the library (nothing else lives here)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pkd.demo_presets import PRESETS

__all__ = ["main"]


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML run config (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=0.02 (repeatable)",
    )


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_arguments(parser)
    parser.add_argument("--output", help="run folder (overrides the config's output)")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--no-resume", action="store_true", help="start afresh even if the run folder has last.pt")
    resume.add_argument(
        "--resume-from",
        choices=("last", "best"),
        default="last",
        help="checkpoint of the run folder to continue from (default last; best: e.g. when last.pt is damaged)",
    )
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars")


def _print_metrics(title: str, metrics: dict[str, float]) -> None:
    from pkd.evaluation import COCO_METRICS

    print(title)
    for name in COCO_METRICS:
        if name in metrics:
            print(f"  {name:<10} {metrics[name]:.4f}")


def _load_run_config(args: argparse.Namespace, *, distill: bool):
    from pkd.config import ConfigError, load_config

    overrides = list(args.overrides) + ([f"output={args.output}"] if getattr(args, "output", None) else [])
    config = load_config(args.config, overrides)
    if distill and config.teacher is None:
        raise ConfigError(f"{args.config}: `pkd distill` needs a teacher section (and usually a distill section)")
    if not distill and (config.teacher is not None or config.distill is not None):
        raise ConfigError(f"{args.config}: has a teacher/distill section; use `pkd distill` for it")
    return config


def _train(args: argparse.Namespace, *, distill: bool) -> int:
    from pkd.engine import fit
    from pkd.plots import plot_run

    config = _load_run_config(args, distill=distill)
    results = fit(config, resume=False if args.no_resume else args.resume_from, progress=args.progress)
    if results is None:  # not the main process of a DDP run
        return 0
    print(f"run folder: {config.output} (curves: {plot_run(config.output).name})")
    if "val" in results:
        _print_metrics(f"best validation (step {results['best_step']}):", results["val"])
    if "test" in results:
        _print_metrics("test (best checkpoint):", results["test"])
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    return _train(args, distill=False)


def cmd_distill(args: argparse.Namespace) -> int:
    return _train(args, distill=True)


def cmd_tune(args: argparse.Namespace) -> int:
    from pkd.config import load_config
    from pkd.tune import tune

    overrides = list(args.overrides) + ([f"output={args.output}"] if args.output else [])
    config = load_config(args.config, overrides)
    result = tune(
        config,
        trials=args.trials,
        jobs=args.jobs,
        space=args.space or None,
        sampler=args.sampler,
        grid_points=args.grid_points,
        prune=args.prune,
        seed=args.seed,
    )
    print(f"\n{result.table()}\n")
    print(f"trials: {result.csv}\nplot:   {result.plot}")
    if result.best_config is not None:
        command = "distill" if config.teacher is not None else "train"
        print(f"best:   trial {result.best['trial']}, validation mAP {result.best['val_mAP']:.4f}")
        print(f"train with it: pkd {command} {result.best_config}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pkd.build import build_dataset, load_detector, load_weights_model, resolve_device
    from pkd.config import ConfigError, load_config
    from pkd.data import build_loader
    from pkd.data.check import load_coco_json
    from pkd.evaluation import evaluate

    config = load_config(args.config, args.overrides)
    split = getattr(config.data, args.split)
    if split is None:
        raise ConfigError(f"data.{args.split}: this config has no {args.split} split")
    if args.onnx is not None:
        from pkd.onnx_runner import OnnxDetector

        model = OnnxDetector(args.onnx)
        meta = {"detector": f"{model.metadata.get('detector', 'detector')} (ONNX Runtime, {args.onnx})"}
        meta["label_map"] = model.metadata.get("label_map") or None
        device = resolve_device("cpu")
    elif args.checkpoint is not None:
        model, meta = load_detector(args.checkpoint)
        device = resolve_device(config.train.device)
    else:
        categories = {c["id"]: c["name"] for c in load_coco_json(split.annotations).get("categories", [])}
        sizes = dict(eval_size=config.data.eval_size, max_size=config.data.max_size)
        model, meta = load_weights_model(config.model, categories, **sizes)
        meta["detector"] = f"{meta['detector']} ({config.model.weights})"
        device = resolve_device(config.train.device)
    dataset = build_dataset(config.data, args.split, label_map=meta["label_map"])
    loader = build_loader(
        dataset, batch_size=config.train.batch_size, train=False, workers=config.data.workers, distributed=False, seed=0
    )
    metrics = evaluate(model.to(device), loader, device, progress=sys.stderr.isatty())
    _print_metrics(f"{meta['detector']} on {args.split} ({len(dataset)} images):", metrics)
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def _export_ultralytics(exported: Path, out: Path) -> None:
    from pkd.build import load_detector
    from pkd.families import describe, family_of

    model, meta = load_detector(exported)
    if describe(model).export.native_format != "ultralytics":
        raise ValueError(f"--ultralytics is for YOLO students; this one is a {meta['detector']}")
    native = family_of(model).export_native(model, Path(out), meta.get("class_names"))
    print(f"and in Ultralytics' format (a pickle, for ultralytics.YOLO) to {native}")


def cmd_export(args: argparse.Namespace) -> int:
    from pkd.checkpoint import checkpoint_summary, export_student, load_checkpoint

    source = Path(args.run)
    if source.is_dir():
        source = source / f"{args.which}.pt"
    checkpoint = load_checkpoint(source)
    if args.format == "pt":
        out = export_student(checkpoint, args.out, half=args.half)
        print(f"{checkpoint_summary(checkpoint)}\nexported the student to {out}")
        if args.ultralytics:
            _export_ultralytics(out, args.ultralytics)
        return 0
    from pkd.deploy import export_run_onnx

    if args.half:
        raise ValueError("--half is for --format pt (the ONNX graph keeps float32 weights)")
    print(checkpoint_summary(checkpoint))
    done = export_run_onnx(
        source,
        args.out,
        images=args.images,
        count=args.verify_images,
        image_size=tuple(args.size) if args.size else None,
        batch_size=args.batch,
        dynamic_size=not args.fixed_size,
        score_threshold=args.verify_threshold,
        score_thresh=args.score_thresh,
    )
    print(f"exported the student to {done.pytorch} (PyTorch) and {done.onnx} (ONNX, {done.size_bytes / 1e6:.1f} MB)")
    print(f"verified with ONNX Runtime on {done.images}: {done.comparison.summary()}")
    if not done.comparison.compared and args.score_thresh is None:
        # A weak student's scores all sit below its detector's threshold: the graph is right and returns nothing.
        print(
            "note: no detection on these images in PyTorch or ONNX Runtime: every score is below the detector's own "
            "score threshold; export with --score-thresh (e.g. 0.05) for a graph that returns lower-scored boxes"
        )
    if args.ultralytics:
        _export_ultralytics(done.pytorch, args.ultralytics)
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from pkd.data import check_data_main

    return check_data_main(args.annotations, args.images)


def cmd_data_digits(args: argparse.Namespace) -> int:
    from pkd.data import make_digits_dataset, preview

    dataset = make_digits_dataset(
        args.out,
        seed=args.seed,
        train_images=args.train_images,
        val_images=args.val_images,
        test_images=args.test_images,
        image_size=tuple(args.image_size),
        digit_size=tuple(args.digit_size),
        overwrite=args.overwrite,
    )
    for split in ("train", "val", "test"):
        print(f"{split}: {dataset.annotations[split]} (images in {dataset.images[split]})")
    if args.preview:
        split = "train"
        out = preview(dataset.annotations[split], dataset.images[split], Path(args.out) / "preview.png")
        print(f"preview: {out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from pkd.analysis import format_table, inspect_pair
    from pkd.analysis_plots import save_analysis_figures
    from pkd.config import load_config

    config = load_config(args.config, args.overrides)
    analysis = inspect_pair(
        config,
        student_checkpoint=args.student_checkpoint,
        teacher_checkpoint=args.teacher_checkpoint,
        batches=args.batches,
        split=args.split,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    analysis.save(out / "analysis.json")
    figures = save_analysis_figures(analysis, out)
    print(format_table(analysis))
    print(f"\nnumbers: {out / 'analysis.json'}")
    for name, path in figures.items():
        print(f"{name}: {path}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from pkd.plots import plot_run, plot_runs

    if len(args.runs) == 1 and args.out is None:
        print(f"curves: {plot_run(args.runs[0])}")
    else:
        for run in args.runs:
            plot_run(run)
        print(f"mAP of {len(args.runs)} runs: {plot_runs(args.runs, args.out or 'runs_map.png')}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pkd.demo import run_demo

    preset = "quick" if args.quick else "full" if args.full else "scratch" if args.scratch else args.preset
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    report = run_demo(
        preset, args.workdir, teacher=args.teacher, seed=args.seed, jobs=args.jobs, progress=args.progress
    )
    print(f"\n{report.table()}\n")
    print(f"report: {report.report}\nplot:   {report.plot}\nwall time: {report.wall_time_s / 60:.1f} min")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pkd",
        description="Distil object detectors with the Pearson correlation coefficient (PKD, NeurIPS 2022).",
    )
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train one detector (e.g. a teacher)", description=cmd_train.__doc__)
    _add_run_arguments(train)
    train.set_defaults(handler=cmd_train)

    distill = commands.add_parser("distill", help="train a student with a frozen teacher's FPN features")
    _add_run_arguments(distill)
    distill.set_defaults(handler=cmd_distill)

    from pkd.search_space import SPEC_FORMS

    tune = commands.add_parser(
        "tune",
        help="search the distillation weight and learning rate (or any config key) on the validation split",
        description="Trains one run per trial (Optuna, TPE or grid, pruning trials behind the others' validation "
        "curves) and writes RUN/tune/: study.db (run again to continue it), trial_K/, trials.csv, trials.png and "
        "best.yaml, the config to train with. See docs/tune.md.",
    )
    _add_config_arguments(tune)
    tune.add_argument("--trials", type=int, required=True, help="trials in the study in all (completed or pruned)")
    tune.add_argument("--jobs", type=int, default=1, help="trials at a time, one process and thread each (default 1)")
    tune.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="KEY=SPEC",
        help=f"a searched config key (repeatable); SPEC: {SPEC_FORMS}. Default: train.lr=around and, when "
        "distilling, distill.weight=around (the config's value / 4 to x 4)",
    )
    tune.add_argument("--sampler", default="tpe", choices=("tpe", "grid"), help="Optuna sampler (default tpe)")
    tune.add_argument("--grid-points", type=int, default=3, help="values per range with --sampler grid (default 3)")
    tune.add_argument("--no-prune", dest="prune", action="store_false", help="train every trial to the end")
    tune.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    tune.add_argument("--output", help="run folder; the study goes into OUTPUT/tune (default: the config's output)")
    tune.set_defaults(handler=cmd_tune)

    evaluate = commands.add_parser(
        "eval",
        help="COCO box mAP of a model on a split of a config's data",
        description="Evaluates --checkpoint, --onnx, or else the config's model.weights: a torchvision weights "
        "enum, a state_dict (e.g. on a timm backbone), an Ultralytics .pt or a pkd checkpoint.",
    )
    _add_config_arguments(evaluate)
    model = evaluate.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", type=Path, help="run checkpoint or exported student")
    model.add_argument("--onnx", type=Path, help="ONNX file of `pkd export --format onnx`, run with ONNX Runtime")
    evaluate.add_argument("--split", default="val", choices=("val", "test"), help="which split (default val)")
    evaluate.add_argument("--json", help="also write the metrics to this JSON file")
    evaluate.set_defaults(handler=cmd_eval)

    export = commands.add_parser(
        "export",
        help="write the student alone: a plain torchvision state_dict, or an ONNX graph checked with ONNX Runtime",
        description="--format pt writes the student's weights; --format onnx writes them too (OUT with .pt) "
        "and the whole detector as an ONNX graph (pre- and post-processing inside), run with ONNX Runtime "
        "on real images and compared with PyTorch (backbone and head outputs before any threshold, then the "
        "detections) before it is kept.",
    )
    export.add_argument("run", help="run folder (or a checkpoint file)")
    export.add_argument("--out", required=True, type=Path, help="output file, e.g. student.pt or student.onnx")
    export.add_argument("--which", default="best", choices=("best", "last"), help="checkpoint of the run folder")
    export.add_argument("--format", default="pt", choices=("pt", "onnx"), help="what to write (default pt)")
    export.add_argument("--half", action="store_true", help="store the weights as float16 (half the size; pt only)")
    onnx = export.add_argument_group("onnx")
    onnx.add_argument("--images", type=Path, help="images to verify on (default: the run's validation images)")
    onnx.add_argument("--verify-images", type=int, default=8, metavar="N", help="how many of them (default 8)")
    onnx.add_argument(
        "--verify-threshold", type=float, default=0.3, metavar="SCORE", help="detections compared (default 0.3)"
    )
    onnx.add_argument(
        "--score-thresh",
        type=float,
        metavar="SCORE",
        help="lowest score the exported graph returns (default: the detector's own, e.g. 0.2 for FCOS)",
    )
    onnx.add_argument(
        "--size", type=int, nargs=2, metavar=("H", "W"), help="image size traced (default: the eval size, square)"
    )
    onnx.add_argument("--fixed-size", action="store_true", help="the graph takes --size only (default: any size)")
    onnx.add_argument("--batch", type=int, default=1, help="images per call, fixed in the graph (default 1)")
    export.add_argument(
        "--ultralytics", type=Path, metavar="PATH", help="YOLO students: also write an Ultralytics .pt (a pickle)"
    )
    export.set_defaults(handler=cmd_export)

    check = commands.add_parser("check-data", help="validate a COCO-format dataset before a long run")
    check.add_argument("annotations", type=Path, help="instances JSON")
    check.add_argument("--images", type=Path, help="images folder (file_name is relative to it)")
    check.set_defaults(handler=cmd_check_data)

    inspect = commands.add_parser(
        "inspect", help="feature and gradient analysis of a teacher/student pair (figures + analysis.json)"
    )
    _add_config_arguments(inspect)
    inspect.add_argument("--student-checkpoint", type=Path, help="trained student (default: the config's model)")
    inspect.add_argument("--teacher-checkpoint", type=Path, help="teacher checkpoint (default: the config's teacher)")
    inspect.add_argument("--batches", type=int, default=4, help="batches of the split to analyse (default 4)")
    inspect.add_argument("--split", default="val", choices=("train", "val", "test"))
    inspect.add_argument("--out", required=True, type=Path, help="output folder")
    inspect.set_defaults(handler=cmd_inspect)

    plot = commands.add_parser("plot", help="training curves of a run (curves.png), or the mAP of several runs")
    plot.add_argument("runs", nargs="+", type=Path, help="run folders")
    plot.add_argument("--out", type=Path, help="PNG comparing the runs' validation mAP (default runs_map.png)")
    plot.set_defaults(handler=cmd_plot)

    demo = commands.add_parser(
        "demo",
        help="PKD on real images on a CPU: a teacher, and a student alone / + PKD / + MSE / + CWD, with a report",
        description="Trains (or reuses) a teacher and four students on the embedded digits dataset and "
        "reports their test mAP. Reuses and resumes what earlier calls did in --workdir.",
    )
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke run of every stage (minutes; numbers not meaningful)")
    size.add_argument("--full", action="store_true", help="longer student schedule for clearer numbers")
    size.add_argument(
        "--scratch", action="store_true", help="the earlier default: teacher and student from random init"
    )
    size.add_argument("--preset", default="default", help=f"a preset by name ({', '.join(PRESETS)})")
    demo.add_argument("--workdir", type=Path, default=Path("demo"), help="dataset, runs and report (default ./demo)")
    demo.add_argument("--teacher", type=Path, help="use this pkd checkpoint as the teacher instead of training one")
    demo.add_argument("--seed", type=int, default=0, help="seed of the student runs")
    demo.add_argument(
        "--jobs", type=int, help="students trained at a time (default 2 on 2+ cores, each with half the threads)"
    )
    demo.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars")
    demo.set_defaults(handler=cmd_demo)

    data = commands.add_parser("data", help="build the embedded datasets")
    data_commands = data.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    digits = data_commands.add_parser(
        "digits", help="handwritten digits on real photographs (scikit-learn/scikit-image data, no download)"
    )
    digits.add_argument("--out", required=True, type=Path, help="output folder")
    digits.add_argument("--seed", type=int, default=0)
    digits.add_argument("--train-images", type=int, default=2000)
    digits.add_argument("--val-images", type=int, default=300)
    digits.add_argument("--test-images", type=int, default=300)
    digits.add_argument("--image-size", type=int, nargs=2, default=(128, 192), metavar=("MIN", "MAX"))
    digits.add_argument("--digit-size", type=int, nargs=2, default=(12, 48), metavar=("MIN", "MAX"))
    digits.add_argument("--overwrite", action="store_true", help="replace a dataset made with other parameters")
    digits.add_argument("--preview", action="store_true", help="also write OUT/preview.png with boxes drawn")
    digits.set_defaults(handler=cmd_data_digits)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pkd`` console script."""
    args = build_parser().parse_args(argv)
    from pkd.runtime import tune_malloc

    tune_malloc()  # before torch allocates anything; see pkd.runtime
    from pkd.checkpoint import CheckpointError
    from pkd.config import ConfigError
    from pkd.engine import RunInterrupted

    try:
        return args.handler(args)
    except RunInterrupted as interrupted:
        print(f"\n{interrupted}", file=sys.stderr)
        return 130
    except (ConfigError, CheckpointError, FileNotFoundError, FileExistsError, ValueError) as error:
        if args.traceback:
            raise
        print(f"pkd {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
