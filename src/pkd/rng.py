"""The global random generators' state (Python, NumPy, torch CPU and CUDA), saved in run checkpoints.

A resumed run restores the state its checkpoint captured, so it draws the same augmentations
and samples an uninterrupted run would have. The state holds only types that
``torch.load(weights_only=True)`` reads back.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from pkd.checkpoint import CheckpointError

__all__ = ["rng_state", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    """Captures the state of Python's, NumPy's global, torch's CPU and all CUDA generators.

    The result holds only tensors, lists, ints, floats, strings and None, so it survives
    ``torch.save`` and ``torch.load(weights_only=True)``. Generators created by the program
    (``torch.Generator``, ``np.random.default_rng``) are not global and are not captured. Under
    DDP each process has its own state; this captures the calling process's.

    Returns:
        A dict for :func:`set_rng_state`.
    """
    version, internal_state, gauss_next = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": [version, list(internal_state), gauss_next],
        "numpy": {
            "name": str(name),
            # uint32 words; int64 holds them exactly and is a dtype every torch version saves.
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restores generator states captured by :func:`rng_state`.

    CUDA states are restored for the devices present in both the saved state and this
    machine (a run resumed on fewer GPUs restores the ones it has).

    Args:
        state: The dict returned by :func:`rng_state` (possibly after a save/load round trip).
    """
    missing = {"python", "numpy", "torch", "cuda"} - set(state)
    if missing:
        raise CheckpointError(f"RNG state lacks {sorted(missing)}; expected the dict returned by rng_state()")
    version, internal_state, gauss_next = state["python"]
    random.setstate((version, tuple(internal_state), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].cpu().numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    # torch.set_rng_state wants a CPU ByteTensor; a map_location may have moved it.
    torch.set_rng_state(state["torch"].cpu())
    if torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)
