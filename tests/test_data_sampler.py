"""Tests of pkd.data.sampler: grouped batches, sharding, and the loaders."""

import itertools
import math

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler

from pkd.data import CocoDetection, build_loader, eval_transforms, group_by_aspect_ratio, set_epoch
from pkd.data.sampler import DEFAULT_ASPECT_RATIO_BINS, GroupedBatchSampler, ShardSampler


def test_group_by_aspect_ratio_bins():
    assert group_by_aspect_ratio([0.3, 0.5, 0.9, 1.0, 1.2, 1.5, 3.0]) == [0, 1, 2, 3, 3, 4, 5]
    assert group_by_aspect_ratio([0.8, 1.0, 1.2], bins=[1.0]) == [0, 1, 1]
    assert max(group_by_aspect_ratio([100.0])) == len(DEFAULT_ASPECT_RATIO_BINS)


@pytest.mark.parametrize(
    ("ratios", "bins", "message"),
    [([1.0], [1.0, 0.5], "strictly increasing"), ([1.0], [0.0, 1.0], "positive"), ([1.0, -2.0], [1.0], "image 1")],
)
def test_group_by_aspect_ratio_rejects_bad_input(ratios, bins, message):
    with pytest.raises(ValueError, match=message):
        group_by_aspect_ratio(ratios, bins=bins)


def check_epoch(batches, group_ids, batch_size):
    """Every batch homogeneous and at most batch_size; returns the indices in order."""
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        assert len({group_ids[index] for index in batch}) == 1, batch
    return [index for batch in batches for index in batch]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
def test_grouped_batches_cover_every_index_once(seed, batch_size):
    generator = torch.Generator().manual_seed(seed)
    size = int(torch.randint(1, 40, (), generator=generator))
    groups = torch.randint(0, 1 + seed % 4, (size,), generator=generator).tolist()
    sampler = GroupedBatchSampler(RandomSampler(range(size), generator=generator), groups, batch_size)
    for _ in range(2):  # two epochs
        batches = list(sampler)
        indices = check_epoch(batches, groups, batch_size)
        assert sorted(indices) == list(range(size))
        assert len(batches) == len(sampler)


def test_batch_count_is_fixed_even_when_the_order_gives_fewer_leftovers():
    # Two groups, batch 4: an order whose leftovers happen to fill whole batches yields 2
    # batches naturally, but len() must not depend on the order: a batch is split in two.
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    sampler = GroupedBatchSampler(SequentialSampler(range(8)), groups, 4)
    assert len(sampler) == 3
    batches = list(sampler)
    assert batches == [[0, 1], [2, 3], [4, 5, 6, 7]]


def test_tiny_epochs_have_one_sample_per_batch_at_most_as_many_batches_as_samples():
    groups = [0, 1, 2, 3, 0]
    sampler = GroupedBatchSampler(SequentialSampler(range(2)), groups, 8)
    assert len(sampler) == 2 and list(sampler) == [[0], [1]]
    assert len(GroupedBatchSampler(SequentialSampler(range(0)), groups, 8)) == 0


@pytest.mark.parametrize("size", [24, 25])
def test_grouped_batches_with_a_distributed_sampler(size):
    groups = [(index * 7) % 3 for index in range(size)]
    for epoch in range(2):
        per_rank, steps = [], []
        for rank in range(2):
            inner = DistributedSampler(range(size), num_replicas=2, rank=rank, shuffle=True, seed=3)
            inner.set_epoch(epoch)
            sampler = GroupedBatchSampler(inner, groups, 4)
            batches = list(sampler)
            assert len(batches) == len(sampler)
            per_rank.append(check_epoch(batches, groups, 4))
            steps.append(len(batches))
        assert steps[0] == steps[1], "the same number of steps on each rank, or DDP would hang"
        assert len(per_rank[0]) == len(per_rank[1]) == math.ceil(size / 2)
        if size % 2 == 0:
            assert not set(per_rank[0]) & set(per_rank[1])
            assert sorted(per_rank[0] + per_rank[1]) == list(range(size))
        else:  # DistributedSampler pads with one repeated index
            assert set(per_rank[0]) | set(per_rank[1]) == set(range(size))


def test_shard_sampler_splits_without_padding():
    shards = [list(ShardSampler(10, 3, rank)) for rank in range(3)]
    assert sorted(itertools.chain(*shards)) == list(range(10))
    assert [len(ShardSampler(10, 3, rank)) for rank in range(3)] == [4, 3, 3]
    with pytest.raises(ValueError, match="rank"):
        ShardSampler(10, 2, 2)


def digits_dataset(tiny_digits, split="train"):
    return CocoDetection(tiny_digits.annotations[split], tiny_digits.images[split], transforms=eval_transforms())


def loader_order(loader):
    return [[target["image_id"] for target in targets] for _, targets, _ in loader]


def test_training_loader_is_grouped_seeded_and_follows_the_epoch(tiny_digits):
    dataset = digits_dataset(tiny_digits)
    groups = dict(zip(dataset.ids, group_by_aspect_ratio(dataset.aspect_ratios()), strict=True))
    kwargs = {"batch_size": 3, "train": True, "workers": 0, "distributed": False}
    loader = build_loader(dataset, seed=1, **kwargs)
    assert isinstance(loader.batch_sampler.batch_sampler, GroupedBatchSampler)
    assert isinstance(loader.batch_sampler.sampler, DistributedSampler)
    first = loader_order(loader)
    assert len(first) == len(loader)
    for batch in first:
        assert len({groups[image_id] for image_id in batch}) == 1
    assert sorted(itertools.chain(*first)) == dataset.ids
    images, targets, skipped = next(iter(loader))
    assert skipped == 0 and all(image.dtype == torch.float32 for image in images)

    assert loader_order(loader) == first, "without set_epoch an epoch repeats its order"
    assert loader_order(build_loader(dataset, seed=1, **kwargs)) == first, "same seed, same order"
    set_epoch(loader, 1)
    assert loader_order(loader) != first
    assert loader_order(build_loader(dataset, seed=2, **kwargs)) != first


def test_ungrouped_and_evaluation_loaders(tiny_digits):
    dataset = digits_dataset(tiny_digits, "val")
    loader = build_loader(
        dataset, batch_size=4, train=True, workers=0, distributed=False, seed=0, group_aspect_ratio=False
    )
    assert [len(batch) for batch in loader_order(loader)] == [4, 2]
    evaluation = build_loader(dataset, batch_size=4, train=False, workers=0, distributed=False, seed=0)
    assert loader_order(evaluation) == [dataset.ids[:4], dataset.ids[4:]]
    set_epoch(evaluation, 3)  # no shuffling sampler: nothing to do, no error


def test_loader_with_a_worker(tiny_digits):
    dataset = digits_dataset(tiny_digits, "val")
    loader = build_loader(dataset, batch_size=2, train=True, workers=1, distributed=False, seed=0)
    assert loader.persistent_workers and loader.num_workers == 1
    assert loader.pin_memory == torch.cuda.is_available()
    assert sorted(itertools.chain(*loader_order(loader))) == dataset.ids


def test_distributed_loaders_in_a_one_process_group(tiny_digits, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        dataset = digits_dataset(tiny_digits, "val")
        train = build_loader(dataset, batch_size=2, train=True, workers=0, distributed=True, seed=0)
        assert train.batch_sampler.sampler.num_replicas == 1
        assert sorted(itertools.chain(*loader_order(train))) == dataset.ids
        evaluation = build_loader(dataset, batch_size=2, train=False, workers=0, distributed=True, seed=0)
        assert isinstance(evaluation.batch_sampler.sampler, ShardSampler)
        assert list(itertools.chain(*loader_order(evaluation))) == dataset.ids
    finally:
        dist.destroy_process_group()


def train_digits_dataset(tiny_digits):
    from pkd.data import train_transforms

    return CocoDetection(
        tiny_digits.annotations["train"],
        tiny_digits.images["train"],
        transforms=train_transforms(min_sizes=[48, 64, 80], max_size=120),
    )


def loader_samples(loader):
    return [
        (target["image_id"], tuple(image.shape), target["boxes"].tolist())
        for images, targets, _ in loader
        for image, target in zip(images, targets, strict=True)
    ]


def test_augmentations_are_seeded_per_sample_whatever_the_workers(tiny_digits):
    dataset = train_digits_dataset(tiny_digits)
    kwargs = {"batch_size": 3, "train": True, "distributed": False, "seed": 5}
    in_process = build_loader(dataset, workers=0, **kwargs)
    torch.manual_seed(123)  # the global generator does not matter
    first = loader_samples(in_process)
    torch.manual_seed(456)
    assert loader_samples(in_process) == first
    assert loader_samples(build_loader(dataset, workers=2, **kwargs)) == first
    # The random multi-scale resize really varies between samples.
    assert len({shape for _, shape, _ in first}) > 1


def test_resuming_mid_epoch_replays_the_remaining_batches(tiny_digits):
    dataset = train_digits_dataset(tiny_digits)
    kwargs = {"batch_size": 3, "train": True, "workers": 0, "distributed": False, "seed": 7}
    loader = build_loader(dataset, **kwargs)
    set_epoch(loader, 2)
    whole = [loader_samples([batch]) for batch in loader]
    resumed = build_loader(dataset, **kwargs)
    set_epoch(resumed, 2, skip_batches=2)
    assert len(resumed) == len(whole) - 2
    assert [loader_samples([batch]) for batch in resumed] == whole[2:]
    assert len(resumed) == len(whole), "the skip applies to one pass only"
    with pytest.raises(ValueError, match="only training loaders"):
        set_epoch(build_loader(dataset, batch_size=2, train=False, workers=0, distributed=False, seed=0), 0, 1)
