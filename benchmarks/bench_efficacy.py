"""Does distillation help, and which loss? The demo's comparison over seeds, each method tuned by ``pkd tune``.

Trains the demo preset's student alone and with each of the preset's feature losses (PKD, MSE,
CWD) from the same teacher, and prints:

- with ``--tune N``: for each method (the student alone too), a ``pkd tune`` study of N trials
  on ``--tune-seed`` (:func:`pkd.tune.tune`: Optuna's TPE by default, pruning on the
  validation curve), and the values it chose, by the same rule for every method: the highest
  validation mAP reached during a trial. The test split is not looked at. The default space is
  ``pkd tune``'s: the learning rate and the loss weight, each from the preset's value / 4 to
  x 4 (the student alone: the learning rate); ``--space KEY=SPEC`` searches other ranges or
  keys (``distill.*`` keys are left out for the student alone). Without ``--tune``, the
  preset's values are used;
- test-split mAP mean +- std over ``--seeds`` (best validation checkpoint of each run), and
  the per-seed gains over the student alone and over MSE, mean +- std;
- mean validation mAP at 25 / 50 / 75 / 100 % of the schedule, and the first step at which
  each distilled student's validation mAP reaches the student alone's final one (per seed;
  the paper claims faster convergence);
- the wall time.

Runs are named by what they train (``alone``, ``pkd_w2``, ``mse_w0.01``, ``pkd_w23.4_lr0.0003``
... with ``-seed1`` for seed 1), in the same folders as the demo's, ``<workdir>/runs/<preset>/``,
and each method's study in ``tune_<method>[-<space>]/tune/``: finished runs and trials are
reused and interrupted ones resumed, so ``pkd demo`` counts as seed 0 and a study can be
extended (a larger ``--tune``) without redoing what is done.

    python benchmarks/bench_efficacy.py --seeds 2 3 4 --use alone:train.lr=2.09e-4 --use pkd:train.lr=3.09e-4 \\
        --use pkd:distill.weight=101.8                       # more seeds at the values an earlier --tune chose
    python benchmarks/bench_efficacy.py --calibrate          # each loss at init, and the weights equal to PKD's
    python benchmarks/bench_efficacy.py --preset yolo --teacher T.pt --weight pkd=10 --weight mse=0.05 \\
        --tune 4 --space distill.weight=around               # another teacher: each weight from its --calibrate value
    python benchmarks/bench_efficacy.py --tune 12 --jobs 2   # tune each method on seed 0, then seeds 0 1 2
    python benchmarks/bench_efficacy.py --tune 5 --sampler grid --grid-points 5 --space distill.weight=around
                                                             # the earlier weight sweep: preset x 1/4 ... 4
    python benchmarks/bench_efficacy.py --preset scratch     # the random-init regime
    python benchmarks/bench_efficacy.py --pairing index      # the reference's level pairing
    python benchmarks/bench_efficacy.py --jobs 2             # two runs at a time (one thread each on 2 cores)

With ``--jobs N`` the runs that do not depend on each other (the trials of a study, the runs
of the student alone, the chosen values on every seed) train N at a time, each in its own
process (a study's trials with one thread, the other runs with cores / N threads, as
``pkd demo`` trains its students): on 2 cores two one-thread runs finish 1.4x sooner than the
same runs one after the other with two threads. A run's numbers depend (in the last digits) on its
thread count, which changes the order of floating-point sums.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from pkd.config import config_to_dict
from pkd.demo import (
    StudentRun,
    demo_dataset,
    demo_teacher,
    first_step_reaching,
    get_preset,
    run_name,
    student_config,
    student_run_dir,
    train_students,
)
from pkd.demo_presets import PRESETS
from pkd.metrics_log import validation_curve
from pkd.runtime import usable_cores
from pkd.tune import SAMPLERS, tune

FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def at_fraction(curve: list[tuple[int, float]], fraction: float, total: int) -> float:
    """Validation mAP of the evaluation closest to ``fraction`` of the schedule."""
    target = fraction * total
    return min(curve, key=lambda point: abs(point[0] - target))[1]


def mean_std(values: list[float], signed: bool = False) -> str:
    sign = "+" if signed else ""
    if len(values) == 1:
        return f"{values[0]:{sign}.3f}"
    return f"{statistics.mean(values):{sign}.3f} ± {statistics.stdev(values):.3f}"


def tuned_name(distill: dict | None, params: dict) -> str:
    """A run's name: :func:`run_name` of its distill section, then the other tuned values (``_lr0.0003``)."""
    extra = "".join(
        f"_{key.rsplit('.', 1)[-1]}{value:g}" if isinstance(value, float) else f"_{key.rsplit('.', 1)[-1]}{value}"
        for key, value in params.items()
    )
    return run_name(distill) + extra


def split_params(distill: dict | None, params: dict) -> tuple[dict | None, dict]:
    """Tuned ``distill.*`` values go into the distill section (so the run name says them), the rest stay."""
    if distill is None:
        return None, dict(params)
    inside = {key.split(".", 1)[1]: value for key, value in params.items() if key.startswith("distill.")}
    return {**distill, **inside}, {key: value for key, value in params.items() if not key.startswith("distill.")}


def calibrate(settings, digits, teacher: Path, batches: int = 5, batch_size: int = 8) -> None:
    """Prints each loss at the student's initialisation and the weight that equals PKD's there.

    On ``batches`` training batches (evaluation-mode resizing, no flips): the loss summed over
    the distilled level pairs, as the Distiller computes it, averaged over the batches.
    """
    from pkd.build import load_detector
    from pkd.data import CocoDetection, eval_transforms
    from pkd.distiller import Distiller
    from pkd.losses import LOSSES
    from pkd.models import build_detector

    train_set = CocoDetection(digits.annotations["train"], digits.images["train"], transforms=eval_transforms())
    torch.manual_seed(0)
    student_settings = {k: v for k, v in settings.student.items() if k != "name"}
    size = settings.sizes["eval_size"]
    student = build_detector(
        settings.student["name"], num_classes=train_set.num_classes, min_size=size, max_size=size, **student_settings
    )
    teacher_model, _ = load_detector(teacher)
    # The preset's connectors (1x1 convs where channel counts differ, e.g. YOLO), at their initialisation.
    distiller = Distiller(
        student, teacher_model, loss="pkd", connectors=settings.distill["pkd"].get("connectors", False)
    )
    totals = {name: 0.0 for name in settings.distill}
    with torch.no_grad():
        for index in range(batches):
            images = [train_set[index * batch_size + k][0] for k in range(batch_size)]
            students, teachers = distiller.paired_features(images)
            for name, section in settings.distill.items():
                loss = LOSSES[section["loss"]]
                totals[name] += sum(float(loss(students[p], teachers[p])) for p in students) / batches
    pkd_weight = settings.distill["pkd"]["weight"]
    print(f"\nlosses at initialisation ({batches} batches of {batch_size}, pairs {list(students)}):")
    for name, value in totals.items():
        equal = pkd_weight * totals["pkd"] / value
        print(f"- {name}: {value:.4g}; weight equal to PKD x {pkd_weight:g}: {equal:.3g}")


def config_value(config, key: str):
    """The value of a dotted key in a config (None where a section is missing)."""
    node = config_to_dict(config)
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def off_preset(config, params: dict) -> dict:
    """``params`` less the values ``config`` already has (kept out of run names: the demo's runs are reused)."""
    return {key: value for key, value in params.items() if value != config_value(config, key)}


def format_values(distill: dict | None, params: dict) -> str:
    """``w=64, lr=0.00025``: the weight and the other tuned values of a run."""
    values = ({"w": distill["weight"]} if distill else {}) | {k.rsplit(".", 1)[-1]: v for k, v in params.items()}
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def parse_use(items: list[str], methods: list[str], error) -> list[tuple[str, str, object]]:
    """``pkd:distill.weight=101.8`` -> ``("pkd", "distill.weight", 101.8)``; ``error(message)`` on a bad item."""
    parsed = []
    for item in items:
        method, sep, rest = item.partition(":")
        key, eq, text = rest.partition("=")
        if not (sep and eq and key and text):
            error(f"--use {item!r}: expected METHOD:KEY=VALUE, e.g. pkd:distill.weight=101.8")
        if method not in methods:
            error(f"--use {item!r}: method {method!r} is not one of {', '.join(methods)}")
        if method == "alone" and key.startswith("distill."):
            error(f"--use {item!r}: the student alone has no distill section")
        parsed.append((method, key, yaml.safe_load(text)))
    return parsed


def with_weights(settings, items: list[str], error):
    """The preset with ``--weight LOSS=W`` items as its losses' weights; ``error(message)`` on a bad item."""
    distill = {name: dict(section) for name, section in settings.distill.items()}
    for item in items:
        name, _, text = item.partition("=")
        if name not in distill:
            error(f"--weight {item!r}: {name!r} is not one of the preset's losses ({', '.join(distill)})")
        try:  # float(), not YAML: YAML reads 1e-2 as a string
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            error(f"--weight {item!r}: expected LOSS=W with W a positive number, e.g. mse=0.05")
        distill[name]["weight"] = value
    return replace(settings, distill=distill)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", help=f"demo preset ({', '.join(PRESETS)})")
    parser.add_argument("--workdir", type=Path, default=Path("demo"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tune", type=int, metavar="N", help="tune each method with pkd tune: N trials")
    parser.add_argument("--tune-seed", type=int, default=0, help="seed of the tuning trials (default 0)")
    parser.add_argument(
        "--use",
        action="append",
        default=[],
        metavar="METHOD:KEY=VALUE",
        help="train METHOD with this value instead of tuning it, e.g. the values an earlier --tune chose "
        "(pkd:distill.weight=101.8); not with --tune",
    )
    parser.add_argument(
        "--weight",
        action="append",
        default=[],
        metavar="LOSS=W",
        help="start LOSS at weight W instead of the preset's (the centre of --space distill.weight=around; "
        "e.g. --calibrate's weights for another --teacher)",
    )
    parser.add_argument(
        "--space", action="append", default=[], metavar="KEY=SPEC", help="pkd tune's --space (default: lr and weight)"
    )
    parser.add_argument("--sampler", default="tpe", choices=SAMPLERS, help="pkd tune's --sampler")
    parser.add_argument("--grid-points", type=int, default=3, help="pkd tune's --grid-points")
    parser.add_argument("--losses", nargs="+", help="which of the preset's losses (default: all)")
    parser.add_argument("--pairing", default="stride", choices=("stride", "index"))
    parser.add_argument("--teacher", type=Path, help="teacher checkpoint (default: the preset's teacher)")
    parser.add_argument("--calibrate", action="store_true", help="only print the losses at initialisation")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at a time (default 1)")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.tune and args.use:
        parser.error("--use gives the values --tune would choose: use one or the other")

    started = time.time()
    settings = with_weights(get_preset(args.preset), args.weight, parser.error)
    uses = parse_use(args.use, ["alone", *(args.losses or settings.distill)], parser.error)  # before any training
    digits = demo_dataset(settings, args.workdir)
    teacher = demo_teacher(settings, digits, args.workdir, teacher=args.teacher)
    if args.calibrate:
        calibrate(settings, digits, teacher)
        return
    losses = args.losses or list(settings.distill)
    methods = ["alone", *losses]
    bases: dict[str, dict | None] = {"alone": None}
    bases.update({loss: {**settings.distill[loss], "pairing": args.pairing} for loss in losses})
    suffix = "" if args.pairing == "stride" else "_index"
    suffix += "" if args.teacher is None else f"_teacher-{args.teacher.parent.name}"
    suffixes = {method: "" if method == "alone" else suffix for method in methods}

    def run_dir_of(method: str, params: dict, seed: int) -> Path:
        name = tuned_name(*split_params(bases[method], params)) + suffixes[method]
        return student_run_dir(args.workdir, args.preset, name, seed)

    def run(run_dir: Path) -> dict:
        results = json.loads((run_dir / "results.json").read_text())
        return {"test": results["test"], "curve": validation_curve(run_dir), "dir": run_dir}

    # Each method's own values, chosen by the same rule: pkd tune's best validation mAP on --tune-seed.
    chosen: dict[str, dict] = {method: {} for method in methods}
    for method in methods:
        given = {key: value for m, key, value in uses if m == method}
        if given:
            config = student_config(settings, digits, args.workdir, seed=0, distill=bases[method], teacher=teacher)
            for key in given:
                if config_value(config, key) is None:
                    parser.error(f"--use {method}:{key}: {method}'s config has no key {key}")
            chosen[method] = off_preset(config, given)
    tune_rows: list[str] = []
    if args.tune:
        custom = args.space or args.sampler != "tpe"
        study_tag = hashlib.sha1(repr((args.space, args.sampler, args.grid_points)).encode()).hexdigest()[:6]
        for method in methods:
            items = [item for item in args.space if method != "alone" or not item.startswith("distill.")]
            if args.space and not items:
                continue  # only distill.* keys searched: nothing to tune for the student alone
            name = f"tune_{method}{suffixes[method]}" + (f"-{study_tag}" if custom else "")
            output = student_run_dir(args.workdir, args.preset, name, args.tune_seed)
            config = student_config(
                settings, digits, output, seed=args.tune_seed, distill=bases[method], teacher=teacher
            )
            print(f"tuning {method}: {args.tune} trials, {output / 'tune'}", flush=True)
            study = tune(
                config,
                trials=args.tune,
                jobs=args.jobs,
                space=items or None,
                sampler=args.sampler,
                grid_points=args.grid_points,
                seed=args.tune_seed,
            )
            if study.best is None:
                raise SystemExit(f"no trial of {method} completed; see {study.csv}")
            chosen[method] = off_preset(config, study.params())
            states = [row["state"] for row in study.rows]
            values = format_values(*split_params(bases[method], study.params()))
            tune_rows.append(
                f"| {method} | {states.count('COMPLETE')} / {states.count('PRUNED')} | {study.best['val_mAP']:.3f} "
                f"| {values} | `{study.folder}` |"
            )
    runs = [
        StudentRun(run_dir_of(method, chosen[method], seed), *split_params(bases[method], chosen[method]), seed, label)
        for seed in args.seeds
        for method in methods
        for label in [f"{run_dir_of(method, chosen[method], seed).name}, seed {seed}"]
    ]
    train_students(settings, digits, teacher, runs, jobs=args.jobs, progress=None)
    results = {method: [run(run_dir_of(method, chosen[method], seed)) for seed in args.seeds] for method in methods}
    labels = {
        method: f"{method} {format_values(*split_params(bases[method], chosen[method]))}".strip() for method in methods
    }

    total = settings.student_train["steps"]
    print(f"\npreset {args.preset}: {settings.description}")
    print(f"teacher {teacher}; student {settings.student['name']}, {total} steps; pairing {args.pairing}")
    machine = platform.processor() or platform.machine()
    threads = max(1, usable_cores() // args.jobs) if args.jobs > 1 else torch.get_num_threads()
    runs_at = f"{threads} thread(s) per run, {args.jobs} at a time"
    print(f"seeds {args.seeds}; torch {torch.__version__}, {runs_at}, {machine}\n")
    if tune_rows:
        space = (
            " ".join(f"--space {item}" for item in args.space) or "the default space (lr, weight: preset / 4 ... x 4)"
        )
        print(f"pkd tune on seed {args.tune_seed}, {args.tune} trials per method, {args.sampler}, {space}:\n")
        print("| method | trials completed / pruned | best val mAP | chosen | study |\n|---|---|---|---|---|")
        print("\n".join(tune_rows) + "\n")
    alone = results["alone"]
    header = "| run | test mAP | test AP50 | " + " | ".join(f"val mAP @{int(f * 100)}%" for f in FRACTIONS)
    print(header + " | reaches alone's final val mAP at step |")
    print("|---|---|---|" + "---|" * len(FRACTIONS) + "---|")
    for name, runs in results.items():
        label = labels[name]
        test_map = mean_std([r["test"]["mAP"] for r in runs])
        test_ap50 = mean_std([r["test"]["AP50"] for r in runs])
        curve = [statistics.mean(at_fraction(r["curve"], f, total) for r in runs) for f in FRACTIONS]
        reach = [first_step_reaching(r["curve"], a["curve"][-1][1]) for r, a in zip(runs, alone, strict=True)]
        reach_text = ", ".join("never" if s is None else str(s) for s in reach)
        print(f"| {label} | {test_map} | {test_ap50} | " + " | ".join(f"{v:.3f}" for v in curve) + f" | {reach_text} |")
    print("\nPer-seed test mAP differences (mean ± std over seeds):\n")
    for name in losses:
        gain = [r["test"]["mAP"] - a["test"]["mAP"] for r, a in zip(results[name], alone, strict=True)]
        line = f"- {name} - alone: {mean_std(gain, signed=True)}"
        if name != "mse" and "mse" in results:
            over = [r["test"]["mAP"] - m["test"]["mAP"] for r, m in zip(results[name], results["mse"], strict=True)]
            line += f"; {name} - mse: {mean_std(over, signed=True)}"
        print(line)
    per_seed = {name: [round(r["test"]["mAP"], 4) for r in runs] for name, runs in results.items()}
    print(f"\nPer-seed test mAP ({args.seeds}): {json.dumps(per_seed)}")
    print(f"\nwall time {(time.time() - started) / 60:.1f} min (finished runs are reused, not retrained)")


if __name__ == "__main__":
    main()
