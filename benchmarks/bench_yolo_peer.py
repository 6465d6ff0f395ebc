"""The peer: Ultralytics' own trainer and its own distillation, on the demo's data, measured by pkd.

Ultralytics (>= 8.4) distils a YOLO student from a YOLO teacher inside its trainer
(``model.train(distill_model=teacher.pt, dis=weight)``: a score-weighted MSE on the maps its
Detect head reads, through 1x1 projectors; same family only). This script trains that peer on
the same data as pkd's YOLO runs, for the same number of images seen, and measures every run
the way pkd's own are measured (``pkd eval``: pycocotools COCO mAP of the run's ``best.pt`` on
the test split), so its row can stand in pkd's tables:

1. the preset's digits dataset, written once in the YOLO layout (:mod:`pkd.data.yolo_format`);
2. with ``--lr0`` / ``--dis`` lists: every combination trained on ``--tune-seed``, and the one with
   the best validation mAP chosen (the rule by which ``pkd tune`` chooses pkd's values; a grid,
   because Ultralytics' trainer does not report to an Optuna trial);
3. the chosen values on ``--seeds``: test mAP per seed, mean +- std.

Ultralytics counts epochs, pkd steps: ``epochs = steps x batch / training images`` (the ``yolo``
preset's 1250 student steps of batch 8 on the demo's 2000 images = 5 epochs; 2500 steps = 10).
``--set KEY=VALUE`` passes any other argument of Ultralytics' trainer (``warmup_epochs``,
``mosaic``, ``close_mosaic``, ``optimizer``, ...) and is part of the runs' folder name, so runs
of other settings never mix. Finished runs are reused; an
interrupted one resumes from its ``last.pt`` (Ultralytics' ``resume=True``).

    # the student alone, Ultralytics' defaults, 10 epochs:
    python benchmarks/bench_yolo_peer.py --workdir demo --steps 2500
    # the yolo preset's budget (5 epochs), stepping every batch, lr0 chosen on validation, 3 seeds:
    python benchmarks/bench_yolo_peer.py --workdir demo --lr0 0.002 0.004 --set nbs=8 --set optimizer=AdamW \\
        --set warmup_epochs=1 --seeds 0 1 2
    # distilled from the preset's pkd-trained YOLO11s, written by `pkd export RUN --ultralytics T.pt`:
    python benchmarks/bench_yolo_peer.py --workdir demo --lr0 0.004 --teacher T.pt --dis 1.5 6 24 --set nbs=8 \\
        --set optimizer=AdamW --set warmup_epochs=1 --jobs 2 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import statistics
from pathlib import Path

import yaml

from pkd.cli import main as pkd_main
from pkd.config import config_from_dict, config_to_dict, save_config
from pkd.data.yolo_format import write_yolo_dataset
from pkd.demo import demo_dataset, get_preset, student_config
from pkd.runtime import worker_pool


def yolo_data(settings, digits, workdir: Path) -> Path:
    """The preset's dataset in the YOLO layout (written once per dataset)."""
    out = Path(workdir) / "yolo_data" / Path(digits.annotations["train"]).parent.name
    data_yaml = out / "data.yaml"
    if not data_yaml.is_file():
        splits = {split: (digits.annotations[split], digits.images[split]) for split in ("train", "val", "test")}
        write_yolo_dataset(splits, out)
    return data_yaml


def train_ultralytics(data_yaml: Path, run_dir: Path, student: str, arguments: dict) -> Path:
    """One run of Ultralytics' trainer in ``run_dir`` (resumed from its ``last.pt`` if interrupted); its best.pt."""
    from ultralytics import YOLO

    best, last = run_dir / "weights" / "best.pt", run_dir / "weights" / "last.pt"
    if (run_dir / "finished").is_file():
        return best
    if last.is_file():
        YOLO(str(last)).train(resume=True)
    else:
        fixed = dict(device="cpu", workers=0, amp=False, plots=False, pretrained=False, deterministic=True)
        place = dict(project=str(run_dir.parent), name=run_dir.name, exist_ok=True, verbose=False)
        YOLO(f"{student}.yaml").train(data=str(data_yaml), **fixed, **place, **arguments)
    (run_dir / "finished").write_text("")
    return best


def pkd_map(settings, digits, weights: Path, student: str, split: str) -> dict:
    """``pkd eval`` of an Ultralytics file on a split of the preset's data: COCO mAP and the rest."""
    out = weights.parent.parent / f"pkd_eval_{split}.json"
    if not out.is_file():
        values = config_to_dict(student_config(settings, digits, weights.parent.parent / "pkd_eval", seed=0))
        values["model"] = {"name": student, "weights": str(weights)}
        config = save_config(config_from_dict(values), weights.parent.parent / "pkd_eval.yaml")
        if pkd_main(["eval", str(config), "--split", split, "--json", str(out)]) != 0:
            raise SystemExit(f"pkd eval failed on {weights}")
    return json.loads(out.read_text())


def run_one(settings, digits, data_yaml: Path, run_dir: Path, student: str, arguments: dict) -> dict:
    """Trains (or reuses) one run; its validation and test metrics as pkd measures them."""
    best = train_ultralytics(data_yaml, run_dir, student, arguments)
    return {split: pkd_map(settings, digits, best, student, split) for split in ("val", "test")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="yolo", help="demo preset whose data and sizes are used (default yolo)")
    parser.add_argument("--workdir", type=Path, default=Path("demo"))
    parser.add_argument("--student", default="yolo11n", help="Ultralytics model yaml name (default yolo11n)")
    parser.add_argument("--teacher", type=Path, help="Ultralytics .pt teacher: distil with Ultralytics' trainer")
    parser.add_argument("--dis", type=float, nargs="+", default=[6.0], help="distillation weights (default 6)")
    parser.add_argument("--lr0", type=float, nargs="+", help="initial learning rates (default Ultralytics')")
    parser.add_argument("--steps", type=int, help="pkd steps to match (default: the preset's student steps)")
    parser.add_argument("--batch", type=int, help="batch size (default: the preset's)")
    parser.add_argument("--imgsz", type=int, help="training image size (default: the preset's eval_size)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any trainer argument")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tune-seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, one thread each")
    args = parser.parse_args()

    settings = get_preset(args.preset)
    digits = demo_dataset(settings, args.workdir)
    data_yaml = yolo_data(settings, digits, args.workdir)
    batch = args.batch or settings.student_train["batch_size"]
    steps = args.steps or settings.student_train["steps"]
    train_images = settings.data["train_images"]
    epochs = max(1, round(steps * batch / train_images))
    if epochs * train_images != steps * batch:
        print(f"note: {steps} steps of {batch} = {steps * batch} images; {epochs} epochs = {epochs * train_images}")
    extra = {}
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep:
            parser.error(f"--set {item}: expected KEY=VALUE")
        extra[key] = yaml.safe_load(text)
    base = {"epochs": epochs, "batch": batch, "imgsz": args.imgsz or settings.sizes["eval_size"], **extra}
    tag = hashlib.sha1(json.dumps(base, sort_keys=True).encode()).hexdigest()[:6]
    root = Path(args.workdir) / "runs" / args.preset / f"ultralytics_{args.student}_{tag}"
    root.mkdir(parents=True, exist_ok=True)
    (root / "arguments.json").write_text(json.dumps(base, indent=2) + "\n")

    grid = [{}]
    if args.lr0:
        grid = [{"lr0": lr} for lr in args.lr0]
    if args.teacher:
        teacher = str(args.teacher.resolve())
        grid = [{**g, "distill_model": teacher, "dis": d} for g, d in itertools.product(grid, args.dis)]

    def name(values: dict, seed: int) -> str:
        parts = ["distill" if "dis" in values else "alone"]
        parts += [f"dis{values['dis']:g}"] if "dis" in values else []
        parts += [f"lr{values['lr0']:g}"] if "lr0" in values else []
        return "_".join(parts) + f"-seed{seed}"

    def run_all(tasks: list[tuple[dict, int]]) -> list[dict]:
        calls = [
            (settings, digits, data_yaml, root / name(v, s), args.student, {**base, **v, "seed": s}) for v, s in tasks
        ]
        if args.jobs <= 1:
            return [run_one(*call) for call in calls]
        with worker_pool(args.jobs) as pool:
            return [future.result() for future in [pool.submit(run_one, *call) for call in calls]]

    chosen = grid[0]
    if len(grid) > 1:
        found = run_all([(values, args.tune_seed) for values in grid])
        print(f"\ngrid on seed {args.tune_seed} (pkd's val mAP of each run's best.pt):\n")
        print("| values | val mAP | test mAP |\n|---|---|---|")
        for values, metrics in zip(grid, found, strict=True):
            print(f"| {name(values, args.tune_seed)} | {metrics['val']['mAP']:.3f} | {metrics['test']['mAP']:.3f} |")
        chosen = grid[max(range(len(grid)), key=lambda i: found[i]["val"]["mAP"])]
    results = run_all([(chosen, seed) for seed in args.seeds])
    tests = [r["test"]["mAP"] for r in results]
    spread = f" ± {statistics.stdev(tests):.3f}" if len(tests) > 1 else ""
    print(f"\nUltralytics' trainer, {args.student}, {json.dumps(base)}, chosen {name(chosen, 0).rsplit('-', 1)[0]}")
    print(f"seeds {args.seeds}: test mAP {statistics.mean(tests):.3f}{spread}; per seed {[round(t, 4) for t in tests]}")
    print(f"runs under {root}")


if __name__ == "__main__":
    main()
