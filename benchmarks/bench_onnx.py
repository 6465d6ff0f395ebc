"""Images per second of an exported student: PyTorch eager against ONNX Runtime, as a ratio.

Two cases, each exported with :func:`pkd.export.export_onnx`, checked against PyTorch with
:func:`pkd.verify.verify_onnx`, then timed with ``torch.utils.benchmark.Timer`` by
:func:`compare_speed` (one image per call, the same images and the same number of threads for
both, rounds alternating between the two runtimes so that a shared machine's drift hits both
alike):

- ``demo``: the demo's PKD student (FCOS on EfficientNet-Lite0, FPN 128) on test images of
  the digits dataset (128x128), from ``--run`` (default ``demo/runs/default/pkd_w2``; run
  ``make demo`` first);
- ``coco``: the same architecture with random weights on one COCO-sized input, 800x1333
  (``min_size 800, max_size 1333``, torchvision's COCO setting); random weights give few
  detections, so post-processing costs less than with trained ones.

    OMP_NUM_THREADS=1 python benchmarks/bench_onnx.py --threads 1
    python benchmarks/bench_onnx.py --threads 2 --cases coco

Prints one line per case: images/s of each runtime and ONNX Runtime / PyTorch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import benchmark

from pkd.build import load_detector
from pkd.deploy import load_images
from pkd.export import detector_metadata, drop_raw_outputs, export_onnx
from pkd.models import build_detector
from pkd.onnx_runner import OnnxDetector
from pkd.verify import verify_onnx


def seconds_per_pass(timer: benchmark.Timer) -> float:
    """One timed pass of ``timer``'s statement, in seconds."""
    return timer.timeit(1).median


def _timer(run: Callable[[list[Tensor]], Any], images: Sequence[Tensor], threads: int, label: str) -> benchmark.Timer:
    return benchmark.Timer(
        stmt="for image in images: run([image])",
        globals={"run": run, "images": images},
        num_threads=threads,
        label=label,
    )


@torch.no_grad()
def compare_speed(
    detector: nn.Module, path: Path, images: Sequence[Tensor], *, threads: int, rounds: int = 3
) -> dict[str, float]:
    """Images per second of the PyTorch detector (eager, CPU) and of its ONNX file in ONNX Runtime.

    Both run the same images one at a time with ``threads`` threads (``Timer(num_threads=...)``
    for torch, intra-op threads for ONNX Runtime). One untimed pass each warms them up; then
    rounds alternate between the two so that a change in the machine's load hits both alike,
    and the median pass of each is reported.

    Returns:
        ``{"pytorch_images_per_s", "onnx_images_per_s", "onnx_speedup"}`` (the last is ONNX
        Runtime over PyTorch).
    """
    detector = detector.eval().cpu()
    runtime = OnnxDetector(path, threads=threads)
    timers = {"pytorch": _timer(detector, images, threads, "PyTorch"), "onnx": _timer(runtime, images, threads, "ORT")}
    for timer in timers.values():
        seconds_per_pass(timer)  # warm-up: lazy initialisation, allocator
    passes: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            passes[name].append(seconds_per_pass(timer))
    speed = {f"{name}_images_per_s": len(images) / statistics.median(times) for name, times in passes.items()}
    return {**speed, "onnx_speedup": speed["onnx_images_per_s"] / speed["pytorch_images_per_s"]}


def demo_case(run: Path, count: int, out: Path):
    """The demo's PKD student and the first ``count`` test images of its dataset."""
    from pkd.checkpoint import load_checkpoint

    checkpoint = run / "best.pt"
    if not checkpoint.is_file():
        raise SystemExit(f"{checkpoint} does not exist: run `make demo` first, or pass --run")
    detector, meta = load_detector(checkpoint)
    config = load_checkpoint(checkpoint)["config"]
    folder = Path(config["data"]["test"]["images"])
    if not folder.is_absolute():
        folder = next((p / folder for p in [Path.cwd(), *run.resolve().parents] if (p / folder).is_dir()), folder)
    images = load_images(folder, count)
    side = int(detector.transform.min_size[-1])
    metadata = detector_metadata(detector, meta)
    path = export_onnx(detector, out / "demo.onnx", image_size=(side, side), metadata=metadata, raw_outputs=True)
    return f"demo PKD student {meta['detector']}, {len(images)} test images {side}x{side}", detector, path, images


def coco_case(count: int, out: Path):
    """The demo student's architecture, random weights, on ``count`` random 800x1333 images."""
    torch.manual_seed(0)
    detector = build_detector(
        "fcos_timm_tf_efficientnet_lite0_fpn", num_classes=81, fpn_channels=128, min_size=800, max_size=1333
    ).eval()
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 800, 1333, generator=generator) for _ in range(count)]
    path = export_onnx(detector, out / "coco.onnx", image_size=(800, 1333), raw_outputs=True)
    return f"FCOS EfficientNet-Lite0 FPN 128, random weights, {count} images 800x1333", detector, path, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["demo", "coco"], choices=("demo", "coco"))
    parser.add_argument("--run", type=Path, default=Path("demo/runs/default/pkd_w2"), help="the demo's PKD run")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads of both runtimes")
    parser.add_argument("--images", type=int, default=20, help="demo images per round (coco: a quarter)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; medians are compared")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, threads {args.threads} (torch.set_num_threads and ORT intra-op)")
    with tempfile.TemporaryDirectory() as folder:
        for case in args.cases:
            if case == "demo":
                title, detector, path, images = demo_case(args.run, args.images, Path(folder))
            else:
                title, detector, path, images = coco_case(max(2, args.images // 4), Path(folder))
            comparison = verify_onnx(path, detector, images[:4], score_threshold=0.05)
            path = drop_raw_outputs(path, path.with_name(f"{path.stem}.deployed.onnx"))  # as `pkd export` ships it
            speed = compare_speed(detector, path, images, threads=args.threads, rounds=args.rounds)
            print(
                f"{title}: PyTorch {speed['pytorch_images_per_s']:.2f} images/s, "
                f"ONNX Runtime {speed['onnx_images_per_s']:.2f} images/s, ratio {speed['onnx_speedup']:.2f}x "
                f"({path.stat().st_size / 1e6:.1f} MB; check: {comparison.summary()})"
            )


if __name__ == "__main__":
    main()
