"""Tests of pkd.data.check: the report of a dataset's problems, the cleaned copy, and check-data."""

import copy

import pytest

from pkd.data.check import (
    BOX_OUTSIDE,
    DEGENERATE_BOX,
    INVALID_JSON,
    MISSING_FILE,
    Problem,
    check_data_main,
    check_dataset,
    clean_coco,
    format_problems,
)


def add_image(data, image_id, file_name="rgb.png", width=40, height=30):
    data["images"].append({"id": image_id, "file_name": file_name, "width": width, "height": height})


def add_annotation(data, annotation_id, image_id=1, category_id=3, bbox=(1, 1, 5, 5)):
    data["annotations"].append(
        {"id": annotation_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox)}
    )


def test_clean_dataset_has_no_problems(coco_files, capsys):
    assert check_dataset(coco_files.annotations, coco_files.images) == []
    assert check_dataset(coco_files.data) == []
    assert check_data_main(coco_files.annotations, coco_files.images) == 0
    assert "no problems found" in capsys.readouterr().out


def test_files_are_checked_only_when_asked(coco_files):
    coco_files.data["images"][0]["file_name"] = "gone.png"
    coco_files.write()
    assert check_dataset(coco_files.annotations) == []
    assert check_dataset(coco_files.annotations, coco_files.images, check_files=False) == []


def test_format_problems_groups_and_limits():
    problems = [Problem(MISSING_FILE, f"file {i} gone", image_id=i) for i in range(7)]
    problems.append(Problem(DEGENERATE_BOX, "flat box", image_id=1, annotation_id=5))
    report = format_problems(problems, limit=3)
    assert report.splitlines()[0] == "8 problems in 2 kind(s)"
    assert "missing_file (7):" in report and "degenerate_box (1):" in report
    assert "file 2 gone" in report and "file 3 gone" not in report
    assert "... and 4 more" in report
    assert format_problems([]) == "no problems found"


def test_check_data_main_reports_and_fails(coco_files, capsys):
    add_annotation(coco_files.data, 24, bbox=(50, 5, 5, 5))
    coco_files.write()
    assert check_data_main(coco_files.annotations, coco_files.images) == 1
    output = capsys.readouterr().out
    assert "box_outside_image (1)" in output and "annotation 24" in output


def test_clean_coco_drops_and_fills_defaults(coco_files):
    data = copy.deepcopy(coco_files.data)
    add_annotation(data, 24, bbox=(50, 5, 5, 5))
    add_image(data, 10, "nope.png")
    add_annotation(data, 26, image_id=10)
    original = copy.deepcopy(data)
    cleaned = clean_coco(data, coco_files.images)
    assert data == original, "the input must not be modified"
    assert [p.annotation_id for p in cleaned.dropped_annotations] == [24]
    assert [p.image_id for p in cleaned.dropped_images] == [10]
    assert cleaned.annotations_of_dropped_images == 1
    kept = {a["id"]: a for a in cleaned.data["annotations"]}
    assert set(kept) == {1, 2, 3, 4, 5, 6}
    assert 10 not in {image["id"] for image in cleaned.data["images"]}
    # COCOeval reads "area" and "iscrowd" of every ground-truth annotation.
    fresh = copy.deepcopy(coco_files.data)
    add_annotation(fresh, 27, bbox=(1, 1, 4, 5))
    added = next(a for a in clean_coco(fresh).data["annotations"] if a["id"] == 27)
    assert added["area"] == 20.0 and added["iscrowd"] == 0


def test_clean_coco_refuses_fatal_problems(coco_files):
    coco_files.data["categories"].append({"id": 3, "name": "again"})
    with pytest.raises(ValueError, match="duplicate_category_id"):
        clean_coco(coco_files.data)


def test_a_file_that_cannot_be_read_is_one_problem(coco_files):
    coco_files.annotations.write_text("{not json")
    assert [p.kind for p in check_dataset(coco_files.annotations)] == [INVALID_JSON]
    assert [p.kind for p in check_dataset(coco_files.annotations.with_name("absent.json"))] == [INVALID_JSON]


def test_every_problem_found_is_reported_at_once(coco_files):
    add_annotation(coco_files.data, 24, bbox=(50, 5, 5, 5))
    add_annotation(coco_files.data, 23, bbox=(1, 1, 0, 5))
    coco_files.write()
    problems = check_dataset(coco_files.annotations, coco_files.images)
    assert {(p.kind, p.annotation_id) for p in problems} == {(BOX_OUTSIDE, 24), (DEGENERATE_BOX, 23)}
