"""Tests of pkd.data.transforms: boxes follow the pixels through flips and resizes."""

import pytest
import torch
from torchvision import tv_tensors

from pkd.data import CocoDetection, eval_transforms, train_transforms


def rectangle_sample(height=60, width=80, box=(10, 20, 30, 35)):
    """A black image with one white rectangle and its exact XYXY box, plus a tiny second box."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    x0, y0, x1, y1 = box
    image[:, y0:y1, x0:x1] = 255
    boxes = tv_tensors.BoundingBoxes([list(box), [70, 50, 71, 51]], format="XYXY", canvas_size=(height, width))
    target = {
        "boxes": boxes,
        "labels": torch.tensor([4, 9]),
        "image_id": 7,
        "area": torch.tensor([float((x1 - x0) * (y1 - y0)), 1.0]),
        "iscrowd": torch.tensor([0, 0]),
    }
    return tv_tensors.Image(image), target


def bright_extent(image):
    """XYXY extent (pixel edges) of the pixels brighter than half."""
    rows = torch.nonzero(image[0] > 0.5)
    return (
        rows[:, 1].min().item(),
        rows[:, 0].min().item(),
        rows[:, 1].max().item() + 1,
        rows[:, 0].max().item() + 1,
    )


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_box_follows_the_rectangle(flip_prob, seed):
    torch.manual_seed(seed)
    transform = train_transforms(min_sizes=(30, 45, 90, 120), max_size=200, flip_prob=flip_prob)
    image, target = transform(*rectangle_sample())
    assert image.dtype == torch.float32 and 0.0 <= image.min() and image.max() <= 1.0
    height, width = image.shape[-2:]
    assert target["boxes"].canvas_size == (height, width)
    box = target["boxes"][0].tolist()
    extent = bright_extent(image)
    # Resampling blurs the rectangle's edge by about a pixel; the box and the bright
    # pixels must agree within that.
    assert all(abs(b - e) <= 1.0 for b, e in zip(box, extent, strict=True)), (box, extent)
    scale = width / 80
    expected_x0 = (80 - 30) * scale if flip_prob == 1.0 else 10 * scale
    assert box[0] == pytest.approx(expected_x0, abs=0.5)


def test_multi_scale_resize_draws_the_shorter_side_and_respects_max_size():
    transform = train_transforms(min_sizes=(30, 45), max_size=50, flip_prob=0.5)
    shorter_sides = set()
    for seed in range(20):
        torch.manual_seed(seed)
        image, _ = transform(*rectangle_sample())
        assert max(image.shape[-2:]) <= 50
        shorter_sides.add(min(image.shape[-2:]))
    # 45 would make the longer side 60 > max_size: that draw is capped at longer side 50.
    assert shorter_sides == {30, 37}


def test_degenerate_boxes_are_removed_with_their_labels_area_and_iscrowd():
    torch.manual_seed(0)
    # Downscaling by 4 turns the 1-pixel box into a quarter pixel: it must go, with its entries.
    transform = train_transforms(min_sizes=(15,), max_size=100, flip_prob=0.0)
    image, target = transform(*rectangle_sample())
    assert image.shape[-2:] == (15, 20)
    assert len(target["boxes"]) == 1
    assert target["labels"].tolist() == [4]
    assert target["area"].tolist() == [300.0]
    assert target["iscrowd"].tolist() == [0]
    assert target["image_id"] == 7


def test_eval_transforms_only_convert_to_float():
    image, target = rectangle_sample()
    converted, converted_target = eval_transforms()(image, target)
    assert converted.dtype == torch.float32 and converted.shape == image.shape
    assert torch.equal(converted, image.float() / 255)
    assert torch.equal(converted_target["boxes"], target["boxes"])
    assert converted_target["labels"].tolist() == [4, 9]


def test_dataset_with_train_transforms(coco_files):
    torch.manual_seed(0)
    transform = train_transforms(min_sizes=(60,), max_size=100)
    dataset = CocoDetection(coco_files.annotations, coco_files.images, transforms=transform)
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert image.dtype == torch.float32 and min(image.shape[-2:]) == 60
        assert target["boxes"].canvas_size == tuple(image.shape[-2:])
        assert len(target["boxes"]) == len(target["labels"]) == len(target["area"]) == len(target["iscrowd"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_sizes": (), "max_size": 10}, "min_sizes must be positive"),
        ({"min_sizes": (0, 5), "max_size": 10}, "min_sizes must be positive"),
        ({"min_sizes": (20,), "max_size": 10}, "max_size"),
        ({"min_sizes": (5,), "max_size": 10, "flip_prob": 1.5}, "flip_prob"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train_transforms(**kwargs)
