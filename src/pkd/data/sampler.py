"""Batching for detection: aspect-ratio grouped batches and the data loaders built on them.

Detectors pad every image of a batch to the largest height and the largest width in it. A
batch that mixes portrait and landscape images is therefore mostly padding; batching images
of similar aspect ratio together avoids that. :func:`group_by_aspect_ratio` assigns each
image a group, :class:`GroupedBatchSampler` forms batches within groups, and
:func:`build_loader` puts it together with the samplers for single-process and DDP runs.

Shuffling is seeded and follows the epoch: call :func:`set_epoch` (or
``loader.batch_sampler.sampler.set_epoch(epoch)``) before each training epoch, in DDP and
without it alike, so every epoch has its own order and a resumed run replays the order of
the epoch it resumes.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler

from pkd.data.coco import collate

__all__ = [
    "DEFAULT_ASPECT_RATIO_BINS",
    "GroupedBatchSampler",
    "ShardSampler",
    "build_loader",
    "group_by_aspect_ratio",
    "set_epoch",
]

# Bin edges of width / height, a factor sqrt(2) apart: portrait (< 1) and landscape (>= 1)
# never share a batch, and within each, images differ in shape by at most about sqrt(2).
DEFAULT_ASPECT_RATIO_BINS = (0.5, 2**-0.5, 1.0, 2**0.5, 2.0)


def group_by_aspect_ratio(ratios: Sequence[float], bins: Sequence[float] = DEFAULT_ASPECT_RATIO_BINS) -> list[int]:
    """Assigns each image the group of its aspect ratio.

    Args:
        ratios: Width / height of every image, e.g. ``CocoDetection.aspect_ratios()``.
        bins: Increasing bin edges; group ``g`` holds ratios in ``[bins[g-1], bins[g])``, group 0
            those below ``bins[0]`` and group ``len(bins)`` those from ``bins[-1]`` up.

    Returns:
        One group id in ``0..len(bins)`` per image.
    """
    edges = list(bins)
    if any(edge <= 0 for edge in edges) or edges != sorted(set(edges)):
        raise ValueError(f"bins must be strictly increasing positive ratios, got {edges}")
    groups = []
    for index, ratio in enumerate(ratios):
        if not ratio > 0:
            raise ValueError(f"aspect ratio of image {index} must be positive, got {ratio}")
        groups.append(bisect.bisect_right(edges, ratio))
    return groups


class GroupedBatchSampler(Sampler[list[int]]):
    """Yields batches of indices whose images all belong to the same group.

    Indices are taken in the order of ``sampler`` and put into a per-group bucket; a full
    bucket becomes a batch. At the end of the epoch the partly filled buckets become smaller
    batches, so every index that ``sampler`` yields is in exactly one batch.

    The number of batches is fixed by ``len(sampler)`` alone: ``min(n, ceil(n / batch_size) +
    groups - 1)`` for ``n = len(sampler)`` and ``groups`` distinct ids in ``group_ids``, the
    most that the leftover buckets can make. When an epoch's order makes fewer, the largest
    batches are halved until the count is reached. That keeps ``len()`` exact, and in DDP (a
    ``DistributedSampler`` inside, the same ``n`` on every rank) every rank runs the same
    number of steps, so no rank waits forever for the others' gradients.

    Args:
        sampler: Yields dataset indices, e.g. ``DistributedSampler`` or ``RandomSampler``.
        group_ids: Group of every dataset index (see :func:`group_by_aspect_ratio`).
        batch_size: Largest batch size.
    """

    def __init__(self, sampler: Sampler[int], group_ids: Sequence[int], batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self._groups = len(set(self.group_ids))

    def _num_batches(self, samples: int) -> int:
        if samples == 0:
            return 0
        return min(samples, math.ceil(samples / self.batch_size) + self._groups - 1)

    def __len__(self) -> int:
        return self._num_batches(len(self.sampler))

    def __iter__(self) -> Iterator[list[int]]:
        buckets: dict[int, list[int]] = {}
        batches: list[list[int]] = []
        samples = 0
        for index in self.sampler:
            samples += 1
            bucket = buckets.setdefault(self.group_ids[index], [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                batches.append(bucket)
                buckets[self.group_ids[index]] = []
        batches.extend(bucket for bucket in buckets.values() if bucket)
        target = self._num_batches(samples)
        while len(batches) < target:
            largest = max(range(len(batches)), key=lambda position: len(batches[position]))
            batch = batches[largest]
            half = (len(batch) + 1) // 2
            batches[largest : largest + 1] = [batch[:half], batch[half:]]
        yield from batches


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + num_replicas, ...``: one shard of a dataset, without padding.

    For distributed evaluation. ``DistributedSampler`` repeats indices so that all ranks have
    the same length, which would evaluate some images twice; evaluation needs no lockstep, so
    here the shards simply differ in length by at most one.

    Args:
        length: Size of the dataset.
        num_replicas: Number of processes.
        rank: This process's rank in ``0..num_replicas - 1``.
    """

    def __init__(self, length: int, num_replicas: int, rank: int) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.length = length
        self.num_replicas = num_replicas
        self.rank = rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    workers: int,
    distributed: bool,
    seed: int,
    group_aspect_ratio: bool = True,
) -> DataLoader:
    """Builds the data loader of a training or evaluation split.

    Training shuffles with a ``DistributedSampler`` seeded with ``seed`` (with one replica when
    not distributed; see :func:`set_epoch`) and, with ``group_aspect_ratio``, batches images of
    similar aspect ratio (the dataset must have ``aspect_ratios()``, like
    :class:`~pkd.data.CocoDetection`). In DDP the sampler pads the dataset by repeating a few
    indices so every rank has as many samples, hence as many steps. Evaluation keeps file order,
    each rank taking an unpadded shard (:class:`ShardSampler`).

    Args:
        dataset: Yields ``(image, target)`` samples, or None for unloadable ones.
        batch_size: Images per batch (per process in DDP).
        train: Training (shuffled, grouped) or evaluation (in order).
        workers: Loader worker processes; 0 loads in the main process. Workers persist across
            epochs.
        distributed: Shard across the ranks of the initialised default process group.
        seed: Seed of the shuffle and of the workers' random augmentations (with ``workers=0``
            the augmentations draw from the global torch generator: seed that).
        group_aspect_ratio: Batch training images by aspect ratio.

    Returns:
        A loader whose batches are ``(images, targets, skipped)`` (see
        :func:`~pkd.data.collate`). Its sampler is ``loader.batch_sampler.sampler``.
    """
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if train:
        # One replica without DDP: the same seeded, epoch-driven shuffle in both cases.
        sampler: Sampler[int] = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
        if group_aspect_ratio:
            groups = group_by_aspect_ratio(dataset.aspect_ratios())
            batch_sampler: Sampler[list[int]] = GroupedBatchSampler(sampler, groups, batch_size)
        else:
            batch_sampler = BatchSampler(sampler, batch_size, drop_last=False)
    else:
        sampler = ShardSampler(len(dataset), world_size, rank) if distributed else SequentialSampler(dataset)
        batch_sampler = BatchSampler(sampler, batch_size, drop_last=False)
    # Worker seeds derive from this generator; the rank offset gives each rank its own
    # augmentation stream.
    generator = torch.Generator().manual_seed(seed + rank)
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        generator=generator,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Sets the epoch of the loader's shuffling sampler, if it has one (call before each epoch).

    Args:
        loader: A loader from :func:`build_loader` (any loader whose sampler may have
            ``set_epoch``).
        epoch: The epoch about to start.
    """
    batch_sampler = loader.batch_sampler
    sampler = batch_sampler.sampler if batch_sampler is not None else loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
