"""Process-level settings that make PyTorch training on a CPU faster.

glibc's allocator serves every block over its mmap threshold (128 KB, rising to at most
32 MB as blocks are freed) with a fresh ``mmap`` and unmaps it on ``free``. A detector's
activations are tens of MB each and are freed and reallocated at every step, so with the
defaults each step pays to fault in and zero those pages again. :func:`tune_malloc` keeps
large blocks in the heap instead (see ``benchmarks/bench_malloc.py`` and
``docs/performance.md`` for what it measured here).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["tune_malloc"]

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


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
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False
    return all(
        mallopt(option, value) == 1
        for option, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))
    )
