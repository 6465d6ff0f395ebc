"""Batching for detection: aspect-ratio grouped batches and the data loaders built on them.

Detectors pad every image of a batch to the largest height and the largest width in it. A
batch that mixes portrait and landscape images is therefore mostly padding; batching images
of similar aspect ratio together avoids that. :func:`group_by_aspect_ratio` assigns each
image a group, :class:`GroupedBatchSampler` forms batches within groups, and
:func:`build_loader` puts it together with the samplers for single-process and DDP runs.

Shuffling is seeded and follows the epoch: call :func:`set_epoch` before each training
epoch, in DDP and without it alike, so every epoch has its own order. Training augmentations
are seeded per sample from ``(seed, epoch, index)`` (:class:`SeededSamples`), so they do not
depend on the number of workers or on what was loaded before, and a run resumed in the
middle of an epoch (``set_epoch(loader, epoch, skip_batches=k)``) sees exactly the batches
and augmentations the uninterrupted run saw.
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
    "EpochBatches",
    "GroupedBatchSampler",
    "SeededSamples",
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


class SeededSamples(Dataset):
    """A dataset whose samples are drawn with a random state fixed by ``(seed, epoch, index)``.

    Keys are ``(index, epoch)`` pairs (from :class:`EpochBatches`). The global torch generator,
    which torchvision's random transforms draw from, is seeded from the key for the duration of
    the sample and restored afterwards.

    Args:
        dataset: The dataset to draw from (with ``aspect_ratios()`` when batches are grouped).
        seed: The run's seed.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def aspect_ratios(self) -> list[float]:
        return self.dataset.aspect_ratios()

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        # A cheap integer mix keeps the streams of nearby (seed, epoch, index) unrelated.
        sample_seed = (self.seed * 1_000_003 + epoch * 998_244_353 + index * 2_654_435_761) % 2**63
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.dataset[index]


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Tags each index of a batch sampler with the epoch, and can skip the first batches once.

    Args:
        batch_sampler: Yields lists of indices (its sampler is seeded and follows the epoch).
    """

    def __init__(self, batch_sampler: Sampler[list[int]]) -> None:
        self.batch_sampler = batch_sampler
        self.sampler = batch_sampler.sampler
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip_batches
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        skip, self.skip = self.skip, 0  # a resumed epoch skips once; the next epoch is whole
        for position, batch in enumerate(self.batch_sampler):
            if position >= skip:
                yield [(index, self.epoch) for index in batch]


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
    not distributed; see :func:`set_epoch`), seeds each sample's augmentations from ``(seed,
    epoch, index)`` (:class:`SeededSamples`) and, with ``group_aspect_ratio``, batches images of
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
        seed: Seed of the shuffle and of the random augmentations (the same with any number
            of workers).
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
        batch_sampler = EpochBatches(batch_sampler)
        dataset = SeededSamples(dataset, seed)
    else:
        sampler = ShardSampler(len(dataset), world_size, rank) if distributed else SequentialSampler(dataset)
        batch_sampler = BatchSampler(sampler, batch_size, drop_last=False)
    # Worker seeds derive from this generator (training augmentations are seeded per sample).
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


def set_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Sets the epoch of the loader's shuffling (call before each training epoch).

    Args:
        loader: A loader from :func:`build_loader` (evaluation loaders have nothing to set).
        epoch: The epoch about to start.
        skip_batches: Leave out this epoch's first batches (resuming in the middle of it).
    """
    batch_sampler = loader.batch_sampler
    if isinstance(batch_sampler, EpochBatches):
        batch_sampler.set_epoch(epoch, skip_batches)
        return
    if skip_batches:
        raise ValueError("only training loaders from build_loader can skip batches")
    sampler = batch_sampler.sampler if batch_sampler is not None else loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
