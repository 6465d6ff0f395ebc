"""Process-level settings that make PyTorch training on a CPU faster.

:func:`worker_pool`: independent runs (a study's trials, the demo's students) in spawned
processes with few threads each. PyTorch's intra-op threads scale poorly on small convolutions:
on 2 cores two one-thread runs finish about 1.4x sooner than the same runs one after the other
with two threads (benchmarks/bench_efficacy.py, docs/results.md).

glibc's allocator serves every block over its mmap threshold (128 KB, rising to at most
32 MB as blocks are freed) with a fresh ``mmap`` and unmaps it on ``free``. A detector's
activations are tens of MB each and are freed and reallocated at every step, so with the
defaults each step pays to fault in and zero those pages again. :func:`tune_malloc` keeps
large blocks in the heap instead (see ``benchmarks/bench_malloc.py`` and
``docs/performance.md`` for what it measured here).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

__all__ = ["TUNED_MALLOC", "WorkerPool", "mallopt", "tune_malloc", "usable_cores", "worker_pool"]

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4

#: What :func:`tune_malloc` sets: no mmap-backed blocks, trim above 1 GiB, grow by 64 MiB.
TUNED_MALLOC = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20))


def mallopt(options: Iterable[tuple[int, int]]) -> bool:
    """Calls the C library's ``mallopt(option, value)`` for each pair, unconditionally.

    Returns:
        Whether every call succeeded (False where the C library has no ``mallopt``).
    """
    try:
        function = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):  # macOS and others: no mallopt
        return False
    # A list, not a generator: every option is set even after one fails. musl's mallopt is a
    # stub that returns 0, so it reports False.
    return all([function(option, value) == 1 for option, value in options])


def tune_malloc() -> bool:
    """Tells glibc to reuse freed large blocks instead of returning them to the OS.

    Sets ``M_MMAP_MAX=0`` (no mmap-backed blocks), ``M_TRIM_THRESHOLD=1 GiB`` and
    ``M_TOP_PAD=64 MiB``: the heap grows to the training step's peak once and stays there.
    Call it early, before the first large tensor. Skipped (returning False) when the C
    library is not glibc, when ``PKD_TUNE_MALLOC=0``, or when the user already set one of
    glibc's ``MALLOC_*`` tunables in the environment (theirs wins).

    Returns:
        Whether the settings were applied.
    """
    if os.environ.get("PKD_TUNE_MALLOC", "1") == "0":
        return False
    if any(key.startswith("MALLOC_") for key in os.environ) or "GLIBC_TUNABLES" in os.environ:
        return False
    return mallopt(TUNED_MALLOC)


_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


_stopping = None  # in a worker: the pool's "stop" event (set by the process that made the pool)


def _start_worker(threads: int, stopping) -> None:
    import torch

    global _stopping
    _stopping = stopping
    torch.set_num_threads(threads)


def _unless_stopping(function, args, kwargs):
    if _stopping is not None and _stopping.is_set():
        raise RuntimeError("not started: the pool was stopping")
    return function(*args, **kwargs)


class WorkerPool:
    """What :func:`worker_pool` yields: ``submit(function, *args, **kwargs)`` -> a Future."""

    def __init__(self, executor: ProcessPoolExecutor) -> None:
        self.executor = executor

    def submit(self, function, /, *args, **kwargs):
        return self.executor.submit(_unless_stopping, function, args, kwargs)


@contextmanager
def worker_pool(jobs: int, threads: int = 1) -> Iterator[WorkerPool]:
    """``jobs`` worker processes of ``threads`` threads each, for runs that do not depend on each other.

    The workers are spawned, not forked: a fresh interpreter inherits no threads and no CUDA
    state. Each starts when work is first submitted to it and reads OMP/MKL's thread variables
    then, so they stay set to ``threads`` for the whole ``with`` block (and are restored after).

    Stopping: Ctrl-C reaches the whole process group, so every worker's run saves its checkpoint
    and stops; ``kill PID`` (SIGTERM) reaches this process only, so inside the block it is passed
    on to the workers as SIGINT. When the block ends by an exception, work not yet started never
    starts (a stopped study or demo must not go on training its queued runs) and the running work
    is waited for.

    Args:
        jobs: Number of worker processes.
        threads: PyTorch (and OpenMP / MKL) threads in each.

    Yields:
        The pool: ``pool.submit(function, *args)`` with picklable functions and arguments.
    """
    context = multiprocessing.get_context("spawn")
    stopping = context.Event()  # given to the workers at their start: events cannot travel with the work

    def interrupt_workers(signum, frame) -> None:
        stopping.set()
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGINT)
        raise KeyboardInterrupt

    saved = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
    os.environ.update(dict.fromkeys(_THREAD_VARIABLES, str(threads)))
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, interrupt_workers) if main_thread else None
    executor = ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker, initargs=(threads, stopping))
    try:
        yield WorkerPool(executor)
    except BaseException:
        stopping.set()
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    else:
        executor.shutdown(wait=True)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
