"""Is the data loader the bottleneck? Loader images/s against training images/s, in one process.

On the embedded digits dataset (generated or reused in ``--data``), it measures

- the training loader alone: decoding, random flip and multi-scale resize, batching, with
  ``--workers`` worker processes, in images per second;
- training alone: forward, backward and optimiser step of the student on batches already in
  memory, in images per second;

and prints their ratio (target >= 3 with 2 workers: the loader then needs at most a third of
the time training does, so it keeps up even while sharing the CPU with training).

    python benchmarks/bench_data.py [--workers 2] [--batches 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from pkd.data import CocoDetection, build_loader, make_digits_dataset, train_transforms
from pkd.models import build_detector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="demo/data/digits", help="digits dataset folder (made if missing)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 160, 192], help="training shorter sides")
    parser.add_argument("--model", default="fcos_resnet18_fpn")
    parser.add_argument("--fpn-channels", type=int, default=128)
    args = parser.parse_args()

    digits = make_digits_dataset(args.data)
    dataset = CocoDetection(
        digits.annotations["train"],
        digits.images["train"],
        transforms=train_transforms(min_sizes=args.sizes, max_size=2 * max(args.sizes)),
    )
    loader = build_loader(
        dataset, batch_size=args.batch_size, train=True, workers=args.workers, distributed=False, seed=0
    )

    iterator = iter(loader)
    next(iterator)  # start the workers
    start = time.perf_counter()
    images_loaded = 0
    batches = []
    for _ in range(args.batches):
        images, targets, _ = next(iterator)
        images_loaded += len(images)
        batches.append((images, targets))
    loader_ips = images_loaded / (time.perf_counter() - start)
    del iterator

    model = build_detector(
        args.model,
        num_classes=dataset.num_classes,
        fpn_channels=args.fpn_channels,
        min_size=max(args.sizes),
        max_size=2 * max(args.sizes),
        skip_resize=True,
    ).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(images, targets):
        losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    step(*batches[0])  # warm-up
    start = time.perf_counter()
    images_trained = 0
    for images, targets in batches[1:]:
        step(images, targets)
        images_trained += len(images)
    train_ips = images_trained / (time.perf_counter() - start)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model} (FPN {args.fpn_channels})")
    print(f"batch {args.batch_size}, training sizes {args.sizes}, {args.workers} loader workers\n")
    print("| measurement | images/s |")
    print("|---|---|")
    print(f"| loader alone | {loader_ips:.1f} |")
    print(f"| training alone | {train_ips:.1f} |")
    print(f"\nloader / training = {loader_ips / train_ips:.1f}  (target >= 3)")


if __name__ == "__main__":
    main()
