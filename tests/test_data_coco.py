"""Tests of pkd.data.coco: targets, label mapping, dropped records, unloadable images."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from pkd.data import CocoDetection, collate
from pkd.data.check import BOX_OUTSIDE, BOX_PARTLY_OUTSIDE, DEGENERATE_BOX, MISSING_FILE


def load(files, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return CocoDetection(files.annotations, files.images, **kwargs)


def sample_of(dataset, image_id):
    return dataset[dataset.ids.index(image_id)]


def test_label_map_is_contiguous_in_category_id_order(coco_files):
    dataset = load(coco_files)
    assert dataset.label_map == {3: 1, 7: 2, 11: 3}
    assert dataset.class_names == {1: "cat", 2: "dog", 3: "bird"}
    assert dataset.num_classes == 4
    for category_id, label in dataset.label_map.items():
        assert dataset.label_to_category[label] == category_id
    assert sorted(dataset.label_to_category) == list(range(1, dataset.num_classes))


def test_saved_label_map_is_used_and_round_trips_through_json(coco_files):
    saved = json.loads(json.dumps({11: 1, 3: 2, 7: 3, 42: 4}))  # JSON keys come back as strings
    dataset = load(coco_files, label_map=saved)
    assert dataset.label_map == {11: 1, 3: 2, 7: 3, 42: 4}
    assert dataset.class_names == {1: "bird", 2: "cat", 3: "dog", 4: "category 42"}
    image, target = sample_of(dataset, 1)
    assert target["labels"].tolist() == [2, 1]  # categories 3 and 11


def test_label_map_must_cover_the_file_with_distinct_labels(coco_files):
    with pytest.raises(ValueError, match=r"categories \[11\] that label_map does not cover"):
        load(coco_files, label_map={3: 1, 7: 2})
    with pytest.raises(ValueError, match="distinct labels"):
        load(coco_files, label_map={3: 1, 7: 2, 11: 2})
    with pytest.raises(ValueError, match="distinct labels"):
        load(coco_files, label_map={3: 0, 7: 2, 11: 4})
    # A pretrained model's label space (COCO's 1..90 with gaps): its labels are the classes it predicts.
    assert load(coco_files, label_map={3: 17, 7: 18, 11: 16}).num_classes == 19


def test_sample_types_and_shapes(coco_files):
    dataset = load(coco_files)
    image, target = sample_of(dataset, 1)
    assert isinstance(image, tv_tensors.Image)
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 40)
    boxes = target["boxes"]
    assert isinstance(boxes, tv_tensors.BoundingBoxes)
    assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY
    assert boxes.dtype == torch.float32 and boxes.canvas_size == (30, 40)
    assert target["labels"].dtype == torch.int64
    assert target["image_id"] == 1
    assert target["area"].dtype == torch.float32 and target["area"].tolist() == [80.0, 225.0]
    assert target["iscrowd"].dtype == torch.int64
    expected = Image.open(coco_files.images / "rgb.png").convert("RGB")
    assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(np.array(expected)))


def test_boxes_are_xyxy_and_clipped(coco_files):
    coco_files.data["annotations"][1]["bbox"] = [30, 20, 15, 15]  # sticks out right and bottom
    coco_files.data["annotations"].append(
        {"id": 7, "image_id": 2, "category_id": 3, "bbox": [-3, -2, 6, 5], "iscrowd": 0}
    )
    coco_files.write()
    dataset = load(coco_files)
    assert [p.kind for p in dataset.problems] == [BOX_PARTLY_OUTSIDE, BOX_PARTLY_OUTSIDE]
    _, target = sample_of(dataset, 1)
    assert target["boxes"].tolist() == [[5, 5, 15, 13], [30, 20, 40, 30]]
    _, target = sample_of(dataset, 2)
    assert target["boxes"].tolist() == [[1, 2, 4, 6], [0, 0, 3, 3]]
    assert target["area"].tolist() == [12.0, 30.0]  # filled in from the box when missing


def test_crowd_regions_are_removed_from_targets_but_kept_for_evaluation(coco_files):
    dataset = load(coco_files)
    _, target = sample_of(dataset, 1)
    assert len(target["boxes"]) == 2
    assert target["iscrowd"].tolist() == [0, 0]
    assert target["labels"].tolist() == [1, 3]  # cat and bird; the crowd region is a dog
    assert [a["id"] for a in dataset.coco.imgToAnns[1]] == [1, 2, 3]
    assert dataset.coco.anns[3]["iscrowd"] == 1


@pytest.mark.parametrize("drop_empty", [False, True])
def test_empty_images_kept_or_dropped(coco_files, drop_empty):
    # Image 4 has no annotation at all; make image 1 crowd-only, which is empty for training too.
    for annotation in coco_files.data["annotations"]:
        if annotation["image_id"] == 1:
            annotation["iscrowd"] = 1
    coco_files.write()
    dataset = load(coco_files, drop_empty=drop_empty)
    if drop_empty:
        assert dataset.ids == [2, 3, 5]
    else:
        assert dataset.ids == [1, 2, 3, 4, 5]
        _, target = sample_of(dataset, 4)
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
        assert target["area"].shape == (0,) and target["iscrowd"].shape == (0,)
    assert len(dataset) == len(dataset.ids)


@pytest.mark.parametrize("image_id", [2, 3, 4, 5])
def test_other_modes_are_converted_to_rgb(coco_files, image_id):
    dataset = load(coco_files)
    image, _ = sample_of(dataset, image_id)
    record = dataset.coco.imgs[image_id]
    assert image.shape == (3, record["height"], record["width"]) and image.dtype == torch.uint8
    expected = np.array(Image.open(coco_files.images / record["file_name"]).convert("RGB"))
    assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(expected))
    if image_id == 2:  # grayscale: the three channels are equal
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_bad_annotations_are_dropped_with_one_warning(coco_files):
    for annotation_id, bbox in [(20, [1, 1, 0, 5]), (21, [50, 5, 5, 5]), (22, [1, 1, 5, -1])]:
        coco_files.data["annotations"].append({"id": annotation_id, "image_id": 1, "category_id": 3, "bbox": bbox})
    coco_files.write()
    with pytest.warns(UserWarning) as record:
        dataset = CocoDetection(coco_files.annotations, coco_files.images)
    assert len(record) == 1
    message = str(record[0].message)
    assert "dropped 3 annotation(s)" in message and "20, 21, 22" in message
    assert "box_outside_image" in message and "degenerate_box" in message
    assert [p.kind for p in dataset.problems] == [DEGENERATE_BOX, BOX_OUTSIDE, DEGENERATE_BOX]
    _, target = sample_of(dataset, 1)
    assert len(target["boxes"]) == 2


def test_warning_names_only_the_first_few_ids(coco_files):
    for annotation_id in range(100, 120):
        coco_files.data["annotations"].append(
            {"id": annotation_id, "image_id": 1, "category_id": 5, "bbox": [1, 1, 2, 2]}
        )
    coco_files.write()
    with pytest.warns(
        UserWarning, match=r"dropped 20 annotation\(s\) \(unknown_category; .*100, 101, 102, 103, 104, \.\.\.\)"
    ):
        dataset = CocoDetection(coco_files.annotations, coco_files.images)
    assert len(dataset.problems) == 20


def test_missing_image_file_is_dropped_at_construction(coco_files):
    (coco_files.images / "gray.png").unlink()
    with pytest.warns(UserWarning, match=r"dropped 1 image\(s\) \(missing_file; image ids 2\) and their 1 annotation"):
        dataset = CocoDetection(coco_files.annotations, coco_files.images)
    assert 2 not in dataset.ids and 2 not in dataset.coco.imgs
    assert [(p.kind, p.image_id) for p in dataset.problems] == [(MISSING_FILE, 2)]


def test_corrupt_image_is_skipped_with_a_warning_and_counted(coco_files):
    (coco_files.images / "rgba.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage, not an image")
    dataset = load(coco_files)  # the file exists, so construction keeps it
    with pytest.warns(UserWarning, match=r"skipping image 3 \(.*rgba\.png\)"):
        assert sample_of(dataset, 3) is None
    batch = [sample_of(dataset, 1), sample_of(dataset, 2)]
    with pytest.warns(UserWarning, match="skipping image 3"):
        batch.append(sample_of(dataset, 3))
    images, targets, skipped = collate(batch)
    assert skipped == 1 and len(images) == 2 and [t["image_id"] for t in targets] == [1, 2]


def test_truncated_and_vanished_files_do_not_crash(coco_files):
    dataset = load(coco_files)
    data = (coco_files.images / "rgb.png").read_bytes()
    (coco_files.images / "rgb.png").write_bytes(data[: len(data) // 2])
    (coco_files.images / "gray.png").unlink()
    with pytest.warns(UserWarning, match=r"skipping image 1 \(.*rgb\.png\)"):
        assert sample_of(dataset, 1) is None
    with pytest.warns(UserWarning, match=r"skipping image 2 \(.*gray\.png\)"):
        assert sample_of(dataset, 2) is None


def test_check_files_false_keeps_missing_files_until_load(coco_files):
    (coco_files.images / "gray.png").unlink()
    dataset = load(coco_files, check_files=False)
    assert 2 in dataset.ids
    with pytest.warns(UserWarning, match="skipping image 2"):
        assert sample_of(dataset, 2) is None


def test_file_of_another_size_warns_and_clips(coco_files):
    Image.new("RGB", (20, 15)).save(coco_files.images / "rgb.png")
    dataset = load(coco_files)
    with pytest.warns(UserWarning, match=r"image 1 \(rgb\.png\) is 20x15 but recorded as 40x30"):
        image, target = sample_of(dataset, 1)
    assert image.shape == (3, 15, 20)
    assert target["boxes"].canvas_size == (15, 20)
    # The second box, [20.5, 10, 35.5, 25], lies right of the smaller file: clipped to nothing, removed.
    assert target["boxes"].tolist() == [[5, 5, 15, 13]]
    assert target["labels"].tolist() == [1]


def test_aspect_ratios_come_from_the_json(coco_files, monkeypatch):
    dataset = load(coco_files)

    def no_decoding(*args, **kwargs):
        raise AssertionError("aspect_ratios must not open image files")

    monkeypatch.setattr(Image, "open", no_decoding)
    assert dataset.aspect_ratios() == [40 / 30, 32 / 24, 24 / 32, 20 / 20, 16 / 16]


def test_transforms_get_image_and_target(coco_files):
    calls = []

    def transforms(image, target):
        calls.append((type(image), set(target)))
        return image.float() / 255, target

    dataset = load(coco_files, transforms=transforms)
    image, _ = dataset[0]
    assert image.dtype == torch.float32
    assert calls == [(tv_tensors.Image, {"boxes", "labels", "image_id", "area", "iscrowd"})]


def test_unusable_file_raises_a_clear_error(tmp_path, coco_files):
    missing = tmp_path / "nothing.json"
    with pytest.raises(ValueError, match="cannot read annotation file"):
        CocoDetection(missing, coco_files.images)
    coco_files.data["images"].append(dict(coco_files.data["images"][0]))
    coco_files.write()
    with pytest.raises(ValueError, match="duplicate image id 1"):
        CocoDetection(coco_files.annotations, coco_files.images)


def test_collate_of_an_all_failed_batch():
    assert collate([None, None]) == ([], [], 2)
