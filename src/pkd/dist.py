"""Distributed data parallel helpers: the few lines around ``torch.distributed`` that training needs.

Launch one process per GPU with ``torchrun``, which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; without them everything here runs as a
single process and every collective is a no-op::

    torchrun --nproc_per_node 4 -m pkd.cli train --config run.yaml

    info = init_distributed()                 # process group + this rank's device
    seed_everything(cfg.seed, info.rank)
    model = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    ...
    losses = reduce_mean(loss_dict)          # the same averaged numbers on every rank, for logging
    predictions = gather_to_main(my_predictions)
    if info.is_main:
        save_run_checkpoint(run_dir, {"model": unwrap(model).student.state_dict(), ...}, is_best=...)
    cleanup()

Processes on CUDA talk over NCCL and processes on the CPU over gloo (which is how the tests run
two processes on one machine).
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "barrier",
    "cleanup",
    "gather_to_main",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "reduce_mean",
    "seed_everything",
    "set_deterministic",
    "unwrap",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a (possibly single-process) run."""

    rank: int  # global rank, 0 .. world_size - 1
    local_rank: int  # rank on this machine; picks the GPU
    world_size: int  # number of processes in the run
    device: torch.device  # the device this process computes on
    backend: str | None  # "nccl" or "gloo"; None when no process group was initialised
    is_main: bool  # rank 0: logs, evaluates the gathered predictions and saves checkpoints

    @property
    def distributed(self) -> bool:
        """Whether a process group is in use."""
        return self.backend is not None


def _is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Joins the process group that ``torchrun`` set up, or describes a single process.

    Without ``RANK`` and ``WORLD_SIZE`` in the environment no process group is created and the
    run is one process on ``device``. Under ``torchrun`` the process group is initialised from
    the environment, with NCCL when the device is CUDA and gloo on the CPU, and a CUDA process
    uses GPU ``LOCAL_RANK`` (made the current device, which the object collectives rely on).
    Calling it again once the group exists returns the same description.

    Args:
        device: ``"cuda"``, ``"cpu"`` or a ``torch.device``; None picks CUDA when available.
            Under ``torchrun`` a CUDA device without an index becomes ``cuda:LOCAL_RANK``.

    Returns:
        The rank, local rank, world size, device and backend of this process.

    Raises:
        RuntimeError: If the environment is half set up, CUDA is requested but missing, or
            ``LOCAL_RANK`` names a GPU this machine does not have.
    """
    requested = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if requested.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(requested)!r} requested but CUDA is not available; use device='cpu'")
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return DistInfo(rank=0, local_rank=0, world_size=1, device=requested, backend=None, is_main=True)

    missing = [
        name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ
    ]
    if missing:
        raise RuntimeError(f"distributed environment incomplete, {missing} not set; launch with torchrun")
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])

    if requested.type == "cuda":
        if requested.index is not None and requested.index != local_rank:
            # Every rank would otherwise share one GPU, silently.
            raise RuntimeError(
                f"device {str(requested)!r} given under torchrun, but this process has LOCAL_RANK {local_rank}; "
                "pass device='cuda' and each process takes GPU LOCAL_RANK"
            )
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        device_used = torch.device("cuda", local_rank)
        torch.cuda.set_device(device_used)
        backend = "nccl"
    else:
        device_used = requested
        backend = "gloo"

    if not _is_distributed():
        torch_dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        device=device_used,
        backend=torch_dist.get_backend(),
        is_main=rank == 0,
    )


def cleanup() -> None:
    """Destroys the process group, if any (call once at the end of a run)."""
    if _is_distributed():
        torch_dist.destroy_process_group()


def get_rank() -> int:
    """Global rank of this process; 0 when not distributed."""
    return torch_dist.get_rank() if _is_distributed() else 0


def get_world_size() -> int:
    """Number of processes; 1 when not distributed."""
    return torch_dist.get_world_size() if _is_distributed() else 1


def is_main_process() -> bool:
    """Whether this process is rank 0 (always true when not distributed)."""
    return get_rank() == 0


def _uses_nccl() -> bool:
    return torch_dist.get_backend() == "nccl"


def barrier() -> None:
    """Waits for every process; a no-op when not distributed."""
    if not _is_distributed():
        return
    if _uses_nccl():
        # Naming the device keeps NCCL from guessing one (and warning, or hanging on the wrong GPU).
        torch_dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        torch_dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process.

    Objects are pickled and sent as byte tensors (:func:`torch.distributed.all_gather_object`):
    on gloo through the CPU, on NCCL through the current CUDA device, which
    :func:`init_distributed` set to this rank's GPU. Move tensors inside ``obj`` to the CPU
    first: a pickled CUDA tensor is rebuilt on the sender's GPU index on every receiver.

    Args:
        obj: Any picklable object (e.g. this rank's predictions).

    Returns:
        ``[obj_of_rank_0, obj_of_rank_1, ...]``; ``[obj]`` when not distributed.
    """
    if not _is_distributed():
        return [obj]
    gathered: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every process's ``obj``, in rank order, on rank 0 only (e.g. predictions to evaluate).

    Uses :func:`torch.distributed.gather_object`, with the same device handling as
    :func:`all_gather_objects` (CPU tensors inside ``obj``, please); only rank 0 holds the
    whole list in memory.

    Args:
        obj: Any picklable object.

    Returns:
        The list of objects on rank 0, None on the other ranks; ``[obj]`` when not distributed.
    """
    if not _is_distributed():
        return [obj]
    is_main = torch_dist.get_rank() == 0
    gathered: list[Any] | None = [None] * torch_dist.get_world_size() if is_main else None
    torch_dist.gather_object(obj, gathered, dst=0)
    return gathered


def _communication_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if _uses_nccl() else torch.device("cpu")


def reduce_mean(value: Tensor | Mapping[str, Tensor | float]) -> Tensor | dict[str, float]:
    """Averages a tensor, or a dict of scalars, over all processes (for logging).

    Must be called by every process with the same dict keys. A dict is sent as one float64
    tensor (one collective, not one per loss).

    Args:
        value: A tensor of any shape, or a dict of scalar tensors or numbers (e.g. the losses).

    Returns:
        For a tensor: the mean over processes, detached, on the tensor's device and dtype.
        For a dict: a dict of Python floats with the same keys. When not distributed the
        values are returned as they are (a detached tensor, or floats).
    """
    if isinstance(value, Tensor):
        if not _is_distributed():
            return value.detach()
        total = value.detach().to(_communication_device(), copy=True)
        torch_dist.all_reduce(total, op=torch_dist.ReduceOp.SUM)
        return (total / torch_dist.get_world_size()).to(value.device, value.dtype)
    if not isinstance(value, Mapping):
        raise TypeError(f"reduce_mean takes a tensor or a dict of scalars, got {type(value).__name__}")
    # Sorted keys: every rank must lay out the stacked values in the same order.
    keys = sorted(value)
    scalars = []
    for key in keys:
        item = torch.as_tensor(value[key]).detach()
        if item.numel() != 1:
            raise ValueError(f"reduce_mean: {key!r} has shape {tuple(item.shape)}; dict values must be scalars")
        scalars.append(item.reshape(()).to("cpu", torch.float64))
    if not keys:
        return {}
    stacked = torch.stack(scalars)
    if _is_distributed():
        stacked = stacked.to(_communication_device())
        torch_dist.all_reduce(stacked, op=torch_dist.ReduceOp.SUM)
        stacked /= torch_dist.get_world_size()
    return dict(zip(keys, stacked.tolist(), strict=True))


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seeds Python's ``random``, NumPy's global generator and torch (CPU and all GPUs).

    Each rank gets ``seed + rank``, like nanoGPT, so that random augmentations differ between
    processes instead of repeating the same flips on every GPU. That is safe for the model:
    :class:`~torch.nn.parallel.DistributedDataParallel` broadcasts rank 0's initial weights,
    and :class:`~torch.utils.data.DistributedSampler` shuffles with its own ``seed + epoch``,
    identical on all ranks. (Run seeds 0 and 1 therefore share a stream between rank 1 of one
    and rank 0 of the other, which matters for nothing but side-by-side replays.)
    DataLoader workers are seeded by torch from this process's generator.

    Args:
        seed: The run's seed.
        rank: This process's global rank.

    Returns:
        The seed this process used.
    """
    process_seed = seed + rank
    random.seed(process_seed)
    np.random.seed(process_seed % 2**32)  # NumPy accepts 32-bit seeds only
    torch.manual_seed(process_seed)  # also seeds every CUDA device
    return process_seed


def set_deterministic(enabled: bool) -> None:
    """Asks torch for deterministic kernels, for runs that repeat bit for bit (on the CPU).

    ``warn_only=True`` because some detection kernels (e.g. ``roi_align``'s CUDA backward) have
    no deterministic version: they warn instead of stopping the run. cuDNN autotuning is turned
    off when enabled, since it picks kernels by timing; it is left as it is when disabled
    (detection inputs change size, where autotuning rarely pays off). ``CUBLAS_WORKSPACE_CONFIG``
    is set, unless already set, as cuBLAS requires for deterministic results; it only takes
    effect if CUDA has not been used yet.

    Args:
        enabled: Turn determinism on or off.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (any depth).

    Save ``unwrap(model).state_dict()``, not ``model.state_dict()``, whose keys carry a
    ``module.`` prefix that a plain model does not load.
    """
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    return model
