"""Does tuning glibc's allocator speed up training on a CPU? Default vs `pkd.runtime.tune_malloc`.

Runs the same short training (the demo student on the digits dataset, batch 16) in fresh child
processes, alternating default and tuned allocator, and prints per variant the time of the first
10 steps, the median step after them, the whole run, and the minor page faults (each one a page
the kernel had to find and zero). Fresh processes matter: the slowdown is in the first steps,
when the heap has not yet grown to the step's peak.

    python benchmarks/bench_malloc.py                  # 2 rounds of 30 steps per variant
    python benchmarks/bench_malloc.py --rounds 3 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def child(steps: int, tuned: bool, data: str, model_name: str) -> None:
    if tuned:
        from pkd.runtime import tune_malloc

        assert tune_malloc(), "tune_malloc was not applied"
    import torch

    from pkd.data import CocoDetection, build_loader, make_digits_dataset, train_transforms
    from pkd.models import build_detector

    digits = make_digits_dataset(data, image_size=(128, 128))
    dataset = CocoDetection(
        digits.annotations["train"], digits.images["train"], transforms=train_transforms(min_sizes=[128], max_size=256)
    )
    loader = build_loader(dataset, batch_size=16, train=True, workers=2, distributed=False, seed=0)
    torch.manual_seed(0)
    model = build_detector(
        model_name, num_classes=dataset.num_classes, fpn_channels=128, min_size=128, max_size=256, skip_resize=True
    ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    batches = iter(loader)
    for _ in range(steps):
        images, targets, _ = next(batches)
        start = time.perf_counter()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"times": times, "minflt": usage.ru_minflt, "sys_s": usage.ru_stime}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--data", default="demo/data/digits-2000-300-300")
    parser.add_argument("--model", default="retinanet_resnet18_fpn")
    parser.add_argument("--child", choices=("default", "tuned"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.steps, args.child == "tuned", args.data, args.model)
        return

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    results: dict[str, list[dict]] = {"default": [], "tuned": []}
    for _ in range(args.rounds):
        for variant in results:
            command = [sys.executable, __file__, "--child", variant, "--steps", str(args.steps)]
            command += ["--data", args.data, "--model", args.model]
            output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
            results[variant].append(json.loads(output.strip().splitlines()[-1]))

    print(f"{args.model}, batch 16, 128 px, {args.steps} steps, {args.rounds} fresh processes per variant\n")
    print("| allocator | first 10 steps s | median later step s | whole run s | minor page faults | system s |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for variant, runs in results.items():
        first = statistics.mean(sum(r["times"][:10]) for r in runs)
        later = statistics.mean(statistics.median(r["times"][10:]) for r in runs)
        total = statistics.mean(sum(r["times"]) for r in runs)
        faults = statistics.mean(r["minflt"] for r in runs)
        system = statistics.mean(r["sys_s"] for r in runs)
        summary[variant] = total
        print(f"| {variant} | {first:.1f} | {later:.2f} | {total:.1f} | {faults:,.0f} | {system:.1f} |")
    print(f"\nwhole run, default / tuned = {summary['default'] / summary['tuned']:.2f}")


if __name__ == "__main__":
    main()
