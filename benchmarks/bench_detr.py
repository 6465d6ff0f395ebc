"""A DETR on the demo's digits task: alone and with PKD from the demo's FCOS teacher, and as a teacher.

Uses the ``default`` demo preset's data and teacher (trained once under ``--workdir``, or given
with ``--teacher``), and runs, one after the other, on the test split's best-validation
checkpoint:

- ``alone``: a DETR student (``--student``, on the EfficientNet-Lite0 ImageNet backbone) alone;
- ``pkd``: the same student with PKD from the FCOS Lite2 teacher (128 channels each side);
- ``fcos_alone`` / ``fcos_pkd``: the demo's FCOS Lite0 student alone and with PKD from the
  DETR student of ``alone`` as its teacher.

    OMP_NUM_THREADS=1 python benchmarks/bench_detr.py --runs alone pkd --steps 600
    OMP_NUM_THREADS=1 python benchmarks/bench_detr.py --runs fcos_alone fcos_pkd

Runs that already finished with the same config are reused (as the demo does).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from pkd.demo import demo_dataset, demo_teacher, get_preset, train_student

RUNS = ("alone", "pkd", "fcos_alone", "fcos_pkd")
#: A DETR that trains on two shared CPU cores: encoder and decoder 128 wide (the published sizes are
#: 256), 50 queries (a digits image holds a handful of objects), 20 denoising queries.
SMALL = {
    "encoder_hidden_dim": 128,
    "d_model": 128,
    "encoder_ffn_dim": 512,
    "decoder_ffn_dim": 512,
    "num_queries": 50,
    "num_denoising": 20,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo"))
    parser.add_argument("--teacher", type=Path, help="the demo's FCOS teacher checkpoint (default: train it)")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--student", default="rtdetr_r18", help="the DETR (a name of pkd.families.detr_configs)")
    parser.add_argument("--steps", type=int, default=600, help="DETR training steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate of the DETR")
    parser.add_argument("--weight", type=float, default=10.0, help="PKD weight, FCOS -> DETR")
    parser.add_argument("--detr-weight", type=float, default=64.0, help="PKD weight, DETR -> FCOS")
    parser.add_argument("--hf-config", type=json.loads, default=SMALL, help="JSON changes of the DETR's config")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    preset = get_preset("default")
    digits = demo_dataset(preset, args.workdir)
    teacher = demo_teacher(preset, digits, args.workdir, teacher=args.teacher)
    detr = replace(
        preset,
        student={
            "name": args.student,
            "backbone": "timm_tf_efficientnet_lite0",
            "weights_backbone": "efficientnet_lite0.imagenet",
            "options": {"hf_config": args.hf_config},
        },
        student_train={
            **preset.student_train,
            "steps": args.steps,
            "batch_size": args.batch,
            "lr": args.lr,
            "weight_decay": 1e-4,
            "warmup_steps": max(args.steps // 10, 1),
            "eval_every": max(args.steps // 8, 1),
        },
    )
    tag = f"{args.student}_s{args.steps}_lr{args.lr:g}" + ("" if args.hf_config == SMALL else "_custom")
    root = args.workdir / "runs" / "detr"
    folders = {
        "alone": root / f"{tag}_alone",
        "pkd": root / f"{tag}_pkd_w{args.weight:g}",
        "fcos_alone": root / "fcos_lite0_alone",
        "fcos_pkd": root / f"fcos_lite0_from_{tag}_pkd_w{args.detr_weight:g}",
    }
    distill = {"loss": "pkd", "connectors": True}
    for run in args.runs:
        if run == "alone":
            train_student(detr, digits, folders[run], seed=args.seed)
        elif run == "pkd":
            train_student(
                detr, digits, folders[run], seed=args.seed, distill={**distill, "weight": args.weight}, teacher=teacher
            )
        elif run == "fcos_alone":
            train_student(preset, digits, folders[run], seed=args.seed)
        else:
            detr_teacher = folders["alone"] / "best.pt"
            train_student(
                preset,
                digits,
                folders[run],
                seed=args.seed,
                distill={**distill, "weight": args.detr_weight},
                teacher=detr_teacher,
            )
        results = json.loads((folders[run] / "results.json").read_text())
        print(f"{run}: {folders[run]} test mAP {results['test']['mAP']:.3f} (AP50 {results['test']['AP50']:.3f})")


if __name__ == "__main__":
    main()
