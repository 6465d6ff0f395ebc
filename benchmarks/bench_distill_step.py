"""Cost of a distillation step against its parts, in one process.

For a Faster R-CNN R50-FPN teacher and a RetinaNet R18-FPN student at batch 4, 512x512
(randomly initialised, so nothing is downloaded), it times:

- one plain student training step (forward, backward, SGD step),
- one distillation training step (the same, plus the teacher's backbone + FPN and PKD),
- one forward of the teacher's backbone + FPN (what distillation adds),
- one full teacher forward (transform, backbone, RPN, RoI heads, post-processing),

and prints ``distill_step / (student_step + teacher_features)`` (the overhead of the
distillation machinery itself: taps, re-normalisation, the loss; target <= 1.05) and
``teacher_full_forward / teacher_features`` (what skipping the teacher's heads saves).
Measurements are interleaved round by round and the medians compared, so slow drifts of a
shared machine affect all of them alike.

    python benchmarks/bench_distill_step.py [--rounds 5] [--batch 4] [--size 512]
    python benchmarks/bench_distill_step.py --allocator default   # glibc's defaults
    python benchmarks/bench_distill_step.py --pair yolo           # YOLO11s teacher -> YOLO26n student
    python benchmarks/bench_distill_step.py --pair detr           # D-FINE-M teacher -> RT-DETR R18 student

``--pair yolo`` times an Ultralytics YOLO11s teacher and a YOLO26n student (random init, 1x1
connectors from the student's 64/128/256 channels to the teacher's 128/256/512), PKD on strides
8-32; "teacher_full_forward" is then the teacher's whole eval forward with NMS. ``--pair detr``
times a D-FINE-M teacher and an RT-DETR R18 student from ``transformers`` (random init, both
encoders 256 wide, so no connectors), PKD on the hybrid encoders' strides 8-32; the student's
step is its own loss with denoising queries, "teacher_features" the teacher's backbone and
hybrid encoder, "teacher_full_forward" its whole eval forward (decoder and top-k included).

By default glibc's allocator is tuned as the ``pkd`` command tunes it (pkd.runtime.tune_malloc);
with glibc's defaults the distillation step's larger peak memory costs extra page faults.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pkd.distiller import Distiller
from pkd.models import build_detector
from pkd.runtime import tune_malloc

#: --pair: (teacher, student, description).
PAIRS = {
    "torchvision": (
        "fasterrcnn_resnet50_fpn",
        "retinanet_resnet18_fpn",
        "Faster R-CNN R50-FPN teacher, RetinaNet R18-FPN student",
    ),
    "yolo": ("yolo11s", "yolo26n", "YOLO11s teacher, YOLO26n student (Ultralytics)"),
    "detr": ("dfine_m", "rtdetr_r18", "D-FINE-M teacher, RT-DETR R18 student (transformers)"),
}


def make_batch(batch: int, size: int, generator: torch.Generator):
    images = [torch.rand(3, size, size, generator=generator) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        xy = torch.rand(6, 2, generator=generator) * (size - 100)
        wh = torch.rand(6, 2, generator=generator) * 80 + 16
        boxes = torch.cat([xy, xy + wh], dim=1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, 11, (6,), generator=generator)})
    return images, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--allocator", choices=("tuned", "default"), default="tuned", help="glibc malloc settings")
    parser.add_argument("--pair", choices=tuple(PAIRS), default="torchvision", help="teacher and student")
    args = parser.parse_args()
    tuned = args.allocator == "tuned" and tune_malloc()

    torch.manual_seed(0)
    sizes = dict(num_classes=11, min_size=args.size, max_size=args.size)
    teacher_name, student_name, description = PAIRS[args.pair]
    teacher = build_detector(teacher_name, **sizes).eval()
    student = build_detector(student_name, **sizes)
    distiller = Distiller(student, teacher, loss="pkd", connectors=True).train()
    optimizer = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    images, targets = make_batch(args.batch, args.size, torch.Generator().manual_seed(0))
    # The teacher's own input: the batch as the student's transform makes it (same pixels).
    with torch.no_grad():
        batch = student.eval().transform(images)[0].tensors
    student.train()

    def student_step():
        losses = student(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    def distill_step():
        losses = distiller(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    def teacher_features():
        distiller.teacher_features(batch)

    @torch.no_grad()
    def teacher_full_forward():
        teacher(images)

    timed = {
        "student_step": student_step,
        "distill_step": distill_step,
        "teacher_features": teacher_features,
        "teacher_full_forward": teacher_full_forward,
    }
    for fn in timed.values():  # warm-up: allocator, lazy initialisation
        fn()
    times: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(args.rounds):
        for name, fn in timed.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) * 1e3 for name, values in times.items()}

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.size}x{args.size}")
    print(f"allocator: {'tuned (pkd.runtime.tune_malloc)' if tuned else 'glibc defaults'}")
    print(f"{description}, PKD on strides {', '.join(str(p.student_stride) for p in distiller.pairs)}\n")
    print("| measurement | median ms |")
    print("|---|---|")
    for name, value in median.items():
        print(f"| {name} | {value:.0f} |")
    overhead = median["distill_step"] / (median["student_step"] + median["teacher_features"])
    heads = median["teacher_full_forward"] / median["teacher_features"]
    print(f"\ndistill_step / (student_step + teacher_features) = {overhead:.3f}  (target <= 1.05)")
    print(f"teacher_full_forward / teacher_features = {heads:.2f}  (saved by running the teacher's FPN only)")


if __name__ == "__main__":
    main()
