"""Speed, memory and accuracy of `pkd_loss` against the reference PKD algorithm, in one process.

For the five FPN levels (strides 8-128) of an 800x1333 and a 512x512 input, batch 2 and 8,
C = 256, float32, it times forward + backward of the reference algorithm (permute, mean,
unbiased std, normalise, MSE / 2, autograd backward) and of `pkd_loss`, measures their peak
extra memory (as a multiple of the student features' size), and compares both with the
memory-bandwidth lower bound: read s and t once for the statistics, read them again and write
the gradient, at the bandwidth measured by a large copy in this same run. Ratios, not absolute
times, are what to compare across machines.

    python benchmarks/bench_losses.py                 # CPU (and CUDA when present)
    python benchmarks/bench_losses.py --compile       # also the torch.compile path
    python benchmarks/bench_losses.py --quick         # one small configuration

Peak memory on CPU is the rise of the process's peak resident set size (Linux
/proc/self/status VmHWM, reset through /proc/self/clear_refs) with glibc told to serve large
blocks from mmap, so that freed temporaries are returned and the next allocation shows up;
on CUDA it is torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import statistics
import time

import torch
import torch.nn.functional as F

from pkd.losses import pkd_loss
from pkd.runtime import M_MMAP_MAX, M_MMAP_THRESHOLD, M_TOP_PAD, M_TRIM_THRESHOLD, TUNED_MALLOC, mallopt

STRIDES = (8, 16, 32, 64, 128)


def reference_pkd(student: list[torch.Tensor], teacher: list[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """The reference algorithm of PKD.md, step by step, summed over levels."""

    def norm(x: torch.Tensor) -> torch.Tensor:
        x = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1)
        return (x - x.mean(dim=-1, keepdim=True)) / (x.std(dim=-1, keepdim=True) + eps)

    return sum(F.mse_loss(norm(s), norm(t)) / 2 for s, t in zip(student, teacher, strict=True))


def fpn_shapes(height: int, width: int, batch: int, channels: int = 256) -> list[tuple[int, int, int, int]]:
    # torchvision's FPN: ceil-mode halving from stride 8 (ResNet C3) upwards.
    shapes = []
    h, w = -(-height // 8), -(-width // 8)
    for _ in STRIDES:
        shapes.append((batch, channels, h, w))
        h, w = -(-h // 2), -(-w // 2)
    return shapes


def malloc_mode(mode: str) -> None:
    """Switch glibc's allocator between measuring memory and measuring time.

    ``"memory"``: blocks over 64 KB come from mmap and go back to the OS when freed, so the
    peak resident set size shows the peak of live memory. ``"speed"``: no mmap and no trimming,
    so large blocks are reused from the heap without page faults, as in a long training process
    (with glibc's defaults every tensor over 32 MB is a fresh mmap, faulted in page by page).
    """
    if mode == "memory":
        mallopt(((M_MMAP_MAX, 65536), (M_MMAP_THRESHOLD, 64 * 1024), (M_TRIM_THRESHOLD, 64 * 1024), (M_TOP_PAD, 0)))
    else:
        mallopt(TUNED_MALLOC)  # what the pkd command runs with


def _rss_field(name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(name):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{name} not in /proc/self/status")


def peak_extra_bytes(fn, device: torch.device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current RSS
    before = _rss_field("VmRSS:")
    fn()
    return _rss_field("VmHWM:") - before


def time_ms(fn, device: torch.device, repeat: int, best: bool = False) -> float:
    """Median (or best) wall time of ``fn`` in milliseconds, after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times) if best else statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second moved by a large clone (one read and one write of each byte)."""
    x = torch.randn(64 * 1024 * 1024 // 4 * 4, device=device)  # 256 MB
    ms = time_ms(lambda: x.clone(), device, repeat=10, best=True)
    return 2 * x.numel() * x.element_size() / (ms / 1e3)


def forward_backward(loss_fn, student, teacher):
    def run():
        leaves = [s.detach().requires_grad_() for s in student]
        loss = loss_fn(leaves, teacher)
        loss.backward()
        return [leaf.grad for leaf in leaves]

    return run


def accuracy_row(device: torch.device) -> str:
    """Gradient error vs float64 when channel means are 1000x their standard deviation."""
    generator = torch.Generator().manual_seed(0)
    shape = (2, 64, 64, 64)
    s = torch.randn(shape, generator=generator, dtype=torch.float64)
    t = 0.9 * s + 0.44 * torch.randn(shape, generator=generator, dtype=torch.float64)
    s32 = (s + 1000.0).float().to(device)
    t32 = (t * 3 + 3000.0).float().to(device)
    rows = []
    for name, fn in (("pkd_loss", lambda a, b: pkd_loss(a, b)), ("reference", reference_pkd)):
        (g32,) = forward_backward(fn, [s32], [t32])()
        (g64,) = forward_backward(fn, [s32.double()], [t32.double()])()
        error = ((g32.double() - g64).abs().max() / g64.abs().max()).item()
        rows.append(f"{name}: {error:.1e}")
    return "gradient error / max|g| vs float64, means 1000x std: " + ", ".join(rows)


def make_features(size, batch, device):
    generator = torch.Generator().manual_seed(0)
    student = [torch.randn(shape, generator=generator).to(device) for shape in fpn_shapes(*size, batch)]
    teacher = [(0.5 * s + torch.randn_like(s) * 3 + 10) for s in student]
    return student, teacher


def measure_peaks(configs, device_type: str) -> dict:
    """Peak extra memory of the reference and of pkd_loss per configuration, / feature bytes."""
    malloc_mode("memory")
    device = torch.device(device_type)
    peaks = {}
    for size, batch in configs:
        student, teacher = make_features(size, batch, device)
        feature_bytes = sum(s.numel() * s.element_size() for s in student)
        peaks[size, batch] = [
            peak_extra_bytes(forward_backward(fn, student, teacher), device) / feature_bytes
            for fn in (reference_pkd, lambda a, b: pkd_loss(a, b))
        ]
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="all", help="cpu, cuda or all (cuda only when available)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time pkd_loss(..., compiled=True)")
    parser.add_argument("--quick", action="store_true", help="only 512x512 at batch 2")
    args = parser.parse_args()

    devices = [torch.device("cpu")]
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if args.device == "cuda":
        devices = devices[1:]
    inputs = [(512, 512)] if args.quick else [(800, 1333), (512, 512)]
    configs = [(size, batch) for size in inputs for batch in ([2] if args.quick else [2, 8])]

    ours = lambda a, b: pkd_loss(a, b)  # noqa: E731
    compiled = lambda a, b: pkd_loss(a, b, compiled=True)  # noqa: E731
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for device in devices:
        # Peak memory in a child process whose allocator returns every freed block (see
        # malloc_mode); times here, with an allocator that keeps them, as training does.
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            peaks = pool.apply(measure_peaks, (configs, device.type))
        malloc_mode("speed")
        bandwidth = copy_bandwidth(device)
        print(f"\n## {device.type}: copy bandwidth {bandwidth / 1e9:.1f} GB/s")
        header = (
            "| input | batch | features MB | reference ms | pkd_loss ms | speed-up | "
            "reference peak | pkd_loss peak | lower bound ms | pkd_loss / bound |"
        )
        if args.compile:
            header += " compiled ms | compiled speed-up |"
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        for size, batch in configs:
            student, teacher = make_features(size, batch, device)
            feature_bytes = sum(s.numel() * s.element_size() for s in student)
            ref_ms = time_ms(forward_backward(reference_pkd, student, teacher), device, args.repeat)
            ours_ms = time_ms(forward_backward(ours, student, teacher), device, args.repeat)
            ref_peak, ours_peak = peaks[size, batch]
            # Read s and t twice, write the gradient once: 5 feature-sized transfers.
            bound_ms = 5 * feature_bytes / bandwidth * 1e3
            row = (
                f"| {size[0]}x{size[1]} | {batch} | {feature_bytes / 2**20:.0f} | {ref_ms:.1f} | {ours_ms:.1f} | "
                f"{ref_ms / ours_ms:.1f}x | {ref_peak:.2f}x | {ours_peak:.2f}x | {bound_ms:.1f} | "
                f"{ours_ms / bound_ms:.1f} |"
            )
            if args.compile:
                compiled_ms = time_ms(forward_backward(compiled, student, teacher), device, args.repeat)
                row += f" {compiled_ms:.1f} | {ref_ms / compiled_ms:.1f}x |"
            print(row, flush=True)
            del student, teacher
        print(accuracy_row(device))


if __name__ == "__main__":
    main()
