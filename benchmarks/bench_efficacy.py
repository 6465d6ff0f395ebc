"""Does PKD help? The demo's comparison over several seeds, with sweeps.

Trains the demo preset's student alone, with plain MSE feature imitation, and with PKD (one
run per alpha in ``--alphas``), for each seed in ``--seeds``, from the same teacher, and
prints:

- mean +- std over seeds of the test-split mAP (best validation checkpoint of each run);
- mean validation mAP at 25 / 50 / 75 / 100 % of the schedule (the paper claims faster
  convergence);
- the wall time.

Runs that are exactly the demo's (student alone, and MSE / PKD at the preset's weights with
stride pairing and the preset's teacher) share the demo's folders, ``<workdir>/runs/<preset>/``;
the others live in ``<workdir>/runs/<preset>/efficacy/``. Finished runs are reused (interrupted
ones resumed), so ``pkd demo`` counts as seed 0 and a sweep can be extended without redoing
what is done.

    python benchmarks/bench_efficacy.py                        # default preset, 3 seeds
    python benchmarks/bench_efficacy.py --alphas 0.5 1 2 4 6   # the alpha sweep
    python benchmarks/bench_efficacy.py --pairing index        # the reference's level pairing
    python benchmarks/bench_efficacy.py --teacher runs/my_teacher/best.pt
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from pkd.demo import demo_dataset, demo_teacher, get_preset, student_run_dir, train_student


def validation_curve(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["mAP"]) for r in records if r.get("type") == "val"]


def at_fraction(curve: list[tuple[int, float]], fraction: float, total: int) -> float:
    """Validation mAP of the evaluation closest to ``fraction`` of the schedule."""
    target = fraction * total
    return min(curve, key=lambda point: abs(point[0] - target))[1]


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", help="demo preset (quick, default, full)")
    parser.add_argument("--workdir", type=Path, default=Path("demo"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alphas", type=float, nargs="+", help="PKD weights (default: the preset's)")
    parser.add_argument("--mse-weight", type=float, help="MSE imitation weight (default: the preset's)")
    parser.add_argument("--pairing", default="stride", choices=("stride", "index"))
    parser.add_argument("--teacher", type=Path, help="teacher checkpoint (default: the preset's teacher)")
    parser.add_argument("--no-mse", action="store_true", help="leave out the MSE baseline")
    args = parser.parse_args()

    started = time.time()
    settings = get_preset(args.preset)
    digits = demo_dataset(settings, args.workdir)
    teacher = demo_teacher(settings, digits, args.workdir, teacher=args.teacher)
    pkd_section = settings.distill["pkd"]
    mse_section = settings.distill["mse"]
    alphas = args.alphas or [pkd_section["weight"]]
    variants: dict[str, dict | None] = {"alone": None}
    demo_runs = {"alone": "alone"}  # variants that are exactly the demo's runs reuse their folders
    demo_setup = args.teacher is None and args.pairing == "stride"
    if not args.no_mse:
        weight = args.mse_weight if args.mse_weight is not None else mse_section["weight"]
        variants[f"mse w={weight:g}"] = {**mse_section, "weight": weight, "pairing": args.pairing}
        if demo_setup and weight == mse_section["weight"]:
            demo_runs[f"mse w={weight:g}"] = "mse"
    for alpha in alphas:
        variants[f"pkd alpha={alpha:g}"] = {**pkd_section, "weight": alpha, "pairing": args.pairing}
        if demo_setup and alpha == pkd_section["weight"]:
            demo_runs[f"pkd alpha={alpha:g}"] = "pkd"

    root = args.workdir / "runs" / args.preset / "efficacy"
    if args.teacher is not None:
        root = root / f"teacher-{args.teacher.parent.name}"
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for seed in args.seeds:
        for name, distill in variants.items():
            if name in demo_runs:
                run_dir = student_run_dir(args.workdir, args.preset, demo_runs[name], seed)
            else:
                folder = name.replace(" ", "_").replace("=", "") + ("" if args.pairing == "stride" else "_index")
                run_dir = root / f"{folder}_seed{seed}"
            train_student(
                settings, digits, run_dir, seed=seed, distill=distill, teacher=teacher, label=f"{name}, seed {seed}"
            )
            test = json.loads((run_dir / "results.json").read_text())["test"]
            results[name].append({"test": test, "curve": validation_curve(run_dir)})

    total = settings.student_train["steps"]
    fractions = (0.25, 0.5, 0.75, 1.0)
    print(f"\npreset {args.preset}: {settings.description}")
    print(f"teacher {teacher}; student {settings.student['name']}, {total} steps; pairing {args.pairing}")
    machine = platform.processor() or platform.machine()
    print(f"seeds {args.seeds}; torch {torch.__version__}, {torch.get_num_threads()} threads, {machine}\n")
    print("| run | test mAP | test AP50 | " + " | ".join(f"val mAP @{int(f * 100)}%" for f in fractions) + " |")
    print("|---|---|---|" + "---|" * len(fractions))
    for name, runs in results.items():
        test_map = mean_std([r["test"]["mAP"] for r in runs])
        test_ap50 = mean_std([r["test"]["AP50"] for r in runs])
        curve = [statistics.mean(at_fraction(r["curve"], f, total) for r in runs) for f in fractions]
        print(f"| {name} | {test_map} | {test_ap50} | " + " | ".join(f"{v:.3f}" for v in curve) + " |")
    print(f"\nwall time {(time.time() - started) / 60:.1f} min (finished runs are reused, not retrained)")


if __name__ == "__main__":
    main()
