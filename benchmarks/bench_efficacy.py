"""Does distillation help, and which loss? The demo's comparison over seeds, with weight sweeps.

Trains the demo preset's student alone and with each of the preset's feature losses (PKD, MSE,
CWD) from the same teacher, and prints:

- with ``--sweep F1 F2 ...``: for each loss, one run per weight ``preset weight x F`` on
  ``--sweep-seed``, and the weight chosen for each loss by the same rule: the highest
  validation mAP reached during the run (the best checkpoint's). The test split is not looked
  at. Without ``--sweep``, the preset's weights are used;
- test-split mAP mean +- std over ``--seeds`` (best validation checkpoint of each run), and
  the per-seed gains over the student alone and over MSE, mean +- std;
- mean validation mAP at 25 / 50 / 75 / 100 % of the schedule, and the first step at which
  each distilled student's validation mAP reaches the student alone's final one (per seed;
  the paper claims faster convergence);
- the wall time.

Runs are named by what they train (``alone``, ``pkd_w2``, ``mse_w0.01`` ... with ``-seed1``
for seed 1), in the same folders as the demo's, ``<workdir>/runs/<preset>/``: finished runs
are reused and interrupted ones resumed, so ``pkd demo`` counts as seed 0 and a sweep can be
extended without redoing what is done.

    python benchmarks/bench_efficacy.py --calibrate          # each loss at init, and the weights equal to PKD's
    python benchmarks/bench_efficacy.py --sweep 0.5 1 2      # sweep on seed 0, then seeds 0 1 2
    python benchmarks/bench_efficacy.py --preset scratch     # the random-init regime
    python benchmarks/bench_efficacy.py --pairing index      # the reference's level pairing
    python benchmarks/bench_efficacy.py --jobs 2             # two runs at a time, one thread each

With ``--jobs N`` the runs that do not depend on each other (the sweep and the runs of the
student alone first, then the chosen weights on the other seeds) train N at a time, each in
its own process with one thread: on 2 cores two one-thread runs finish 1.4x sooner than the
same runs one after the other with two threads. A run's numbers depend (in the last digits)
on its thread count, which changes the order of floating-point sums.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from pkd.demo import (
    demo_dataset,
    demo_teacher,
    first_step_reaching,
    get_preset,
    run_name,
    student_run_dir,
    train_student,
)
from pkd.metrics_log import validation_curve

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


def _one_thread() -> None:
    torch.set_num_threads(1)


def _train(
    settings, digits, run_dir: Path, distill: dict | None, seed: int, teacher: Path, progress: bool | None
) -> None:
    """One student run (pickled to a worker process with ``--jobs``)."""
    label = f"{run_name(distill)}, seed {seed}"
    train_student(
        settings, digits, run_dir, seed=seed, distill=distill, teacher=teacher, label=label, progress=progress
    )


def train_all(tasks: list[tuple[Path, dict | None, int]], settings, digits, teacher: Path, jobs: int) -> None:
    """Trains ``(run_dir, distill, seed)`` runs, ``jobs`` at a time (finished runs are reused)."""
    if jobs <= 1:
        for task in tasks:
            _train(settings, digits, *task, teacher, progress=None)
        return
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or CUDA state inherited
    # No progress bars: the lines of several runs interleave; each line names its run.
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_one_thread) as pool:
        futures = [pool.submit(_train, settings, digits, *task, teacher, False) for task in tasks]
        for future in futures:
            future.result()  # re-raises a failed run's error here


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
    distiller = Distiller(student, teacher_model, loss="pkd")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", default="default", help="demo preset (quick, default, full, retinanet, yolo, scratch)"
    )
    parser.add_argument("--workdir", type=Path, default=Path("demo"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sweep", type=float, nargs="+", help="factors of each loss's preset weight to try")
    parser.add_argument("--sweep-seed", type=int, default=0, help="seed of the sweep runs")
    parser.add_argument("--losses", nargs="+", help="which of the preset's losses (default: all)")
    parser.add_argument("--pairing", default="stride", choices=("stride", "index"))
    parser.add_argument("--teacher", type=Path, help="teacher checkpoint (default: the preset's teacher)")
    parser.add_argument("--calibrate", action="store_true", help="only print the losses at initialisation")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at a time, one thread each (default 1)")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")

    started = time.time()
    settings = get_preset(args.preset)
    digits = demo_dataset(settings, args.workdir)
    teacher = demo_teacher(settings, digits, args.workdir, teacher=args.teacher)
    if args.calibrate:
        calibrate(settings, digits, teacher)
        return
    losses = args.losses or list(settings.distill)
    suffix = "" if args.pairing == "stride" else "_index"
    suffix += "" if args.teacher is None else f"_teacher-{args.teacher.parent.name}"

    def run_dir_of(distill: dict | None, seed: int) -> Path:
        return student_run_dir(args.workdir, args.preset, run_name(distill) + (suffix if distill else ""), seed)

    def run(distill: dict | None, seed: int) -> dict:
        run_dir = run_dir_of(distill, seed)
        results = json.loads((run_dir / "results.json").read_text())
        return {"test": results["test"], "curve": validation_curve(run_dir), "dir": run_dir}

    def train(runs: list[tuple[dict | None, int]]) -> None:
        tasks = [(run_dir_of(distill, seed), distill, seed) for distill, seed in runs]
        train_all(tasks, settings, digits, teacher, args.jobs)

    bases = {loss: {**settings.distill[loss], "pairing": args.pairing} for loss in losses}
    candidates = {
        loss: [{**base, "weight": round(base["weight"] * factor, 6)} for factor in args.sweep] if args.sweep else [base]
        for loss, base in bases.items()
    }
    # First what does not depend on the sweep's outcome: the sweep, and the student alone on every seed.
    train([(None, seed) for seed in args.seeds] + [(c, args.sweep_seed) for cs in candidates.values() for c in cs])

    chosen: dict[str, dict] = {}
    sweep_rows: list[str] = []
    for loss in losses:
        if not args.sweep:
            chosen[loss] = bases[loss]
            continue
        scores = [max(v for _, v in run(c, args.sweep_seed)["curve"]) for c in candidates[loss]]
        best = max(range(len(scores)), key=lambda i: scores[i])
        chosen[loss] = candidates[loss][best]
        cells = ", ".join(f"{c['weight']:g}: {v:.3f}" for c, v in zip(candidates[loss], scores, strict=True))
        sweep_rows.append(f"| {loss} | {cells} | {chosen[loss]['weight']:g} |")
    train([(chosen[loss], seed) for seed in args.seeds for loss in losses])

    results: dict[str, list[dict]] = {"alone": [run(None, seed) for seed in args.seeds]}
    results.update({loss: [run(chosen[loss], seed) for seed in args.seeds] for loss in losses})

    total = settings.student_train["steps"]
    print(f"\npreset {args.preset}: {settings.description}")
    print(f"teacher {teacher}; student {settings.student['name']}, {total} steps; pairing {args.pairing}")
    machine = platform.processor() or platform.machine()
    threads = 1 if args.jobs > 1 else torch.get_num_threads()
    runs_at = f"{threads} thread(s) per run, {args.jobs} at a time"
    print(f"seeds {args.seeds}; torch {torch.__version__}, {runs_at}, {machine}\n")
    if sweep_rows:
        print(f"Sweep on seed {args.sweep_seed} (weight: best validation mAP):\n")
        print("| loss | weights tried | chosen |\n|---|---|---|")
        print("\n".join(sweep_rows) + "\n")
    alone = results["alone"]
    header = "| run | test mAP | test AP50 | " + " | ".join(f"val mAP @{int(f * 100)}%" for f in FRACTIONS)
    print(header + " | reaches alone's final val mAP at step |")
    print("|---|---|---|" + "---|" * len(FRACTIONS) + "---|")
    for name, runs in results.items():
        label = name if name == "alone" else f"{name} w={chosen[name]['weight']:g}"
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
