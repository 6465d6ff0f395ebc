"""Tests of pkd.data.yolo_format: COCO splits written in the layout Ultralytics' trainer reads."""

import json
import os

import pytest
import yaml

from pkd.data.yolo_format import write_yolo_dataset


def _lines(path):
    return [float(v) for line in path.read_text().splitlines() for v in line.split()]


def test_boxes_classes_and_names(coco_files, tmp_path):
    pair = (coco_files.annotations, coco_files.images)
    data_yaml = write_yolo_dataset({"train": pair, "val": pair}, tmp_path / "yolo")
    described = yaml.safe_load(data_yaml.read_text())
    # Classes in order of the category ids (3, 7, 11), as pkd numbers them, with their names.
    assert described["names"] == {0: "cat", 1: "dog", 2: "bird"}
    assert described["train"] == "images/train" and described["val"] == "images/val"
    labels = tmp_path / "yolo" / "labels" / "train"
    # rgb.png, 40x30: cat [5, 5, 10, 8] and bird [20.5, 10, 15, 15]; the crowd region is left out.
    assert _lines(labels / "rgb.txt") == pytest.approx(
        [0, 10 / 40, 9 / 30, 10 / 40, 8 / 30, 2, 28 / 40, 17.5 / 30, 15 / 40, 15 / 30], abs=1e-6
    )
    assert _lines(labels / "palette.txt") == [0, 0.5, 0.5, 1.0, 1.0]
    assert (labels / "empty.txt").read_text() == ""  # a background image stays, without boxes
    image = tmp_path / "yolo" / "images" / "val" / "rgb.png"
    assert image.read_bytes() == (coco_files.images / "rgb.png").read_bytes()


def test_ultralytics_reads_the_layout(coco_files, tmp_path):
    pytest.importorskip("ultralytics")
    from ultralytics.data.utils import check_det_dataset, img2label_paths

    pair = (coco_files.annotations, coco_files.images)
    data_yaml = write_yolo_dataset({"train": pair, "val": pair, "test": pair}, tmp_path / "yolo")
    checked = check_det_dataset(str(data_yaml), autodownload=False)
    assert checked["nc"] == 3 and checked["names"] == {0: "cat", 1: "dog", 2: "bird"}
    images = sorted((tmp_path / "yolo" / "images" / "test").iterdir())
    assert len(images) == 5 and all(label.endswith(".txt") for label in img2label_paths([str(i) for i in images]))
    assert all(os.path.isfile(label) for label in img2label_paths([str(i) for i in images]))


def test_a_second_write_replaces_the_first(coco_files, tmp_path):
    pair = (coco_files.annotations, coco_files.images)
    write_yolo_dataset({"train": pair, "val": pair}, tmp_path / "yolo")
    coco_files.data["images"] = coco_files.data["images"][:1]
    coco_files.data["annotations"] = [a for a in coco_files.data["annotations"] if a["image_id"] == 1]
    coco_files.write()
    write_yolo_dataset({"train": pair, "val": pair}, tmp_path / "yolo")
    assert [p.name for p in (tmp_path / "yolo" / "labels" / "train").iterdir()] == ["rgb.txt"]


def test_errors(coco_files, tmp_path):
    pair = (coco_files.annotations, coco_files.images)
    with pytest.raises(ValueError, match="missing: val"):
        write_yolo_dataset({"train": pair}, tmp_path / "yolo")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**coco_files.data, "categories": [{"id": 3, "name": "cat"}]}))
    with pytest.raises(ValueError, match="other categories"):
        write_yolo_dataset({"train": pair, "val": (other, coco_files.images)}, tmp_path / "yolo")
