"""Tests of pkd.data.check: every kind of problem is found, with the ids it concerns."""

import copy
import dataclasses

import pytest

from pkd.data import check
from pkd.data.check import (
    ANNOTATION_DROPPING_KINDS,
    FATAL_KINDS,
    IMAGE_DROPPING_KINDS,
    KINDS,
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


def corrupt_file(files, name="corrupt.png"):
    (files.images / name).write_bytes(b"\x89PNG\r\n\x1a\n this is not a png at all")


# Each breaks the clean fixture in one way: kind -> (edit, expected image_id, expected annotation_id).
BREAKAGES = {
    check.BAD_CATEGORY: (lambda d, f: d["categories"].append({"id": 99}), None, None),
    check.DUPLICATE_CATEGORY_ID: (lambda d, f: d["categories"].append({"id": 3, "name": "again"}), None, None),
    check.BAD_IMAGE: (lambda d, f: d["images"].append({"id": 9, "file_name": "rgb.png"}), 9, None),
    check.DUPLICATE_IMAGE_ID: (lambda d, f: add_image(d, 2, "gray.png", 32, 24), 2, None),
    check.MISSING_FILE: (lambda d, f: add_image(d, 10, "nope.png"), 10, None),
    check.UNREADABLE_IMAGE: (lambda d, f: (corrupt_file(f), add_image(d, 11, "corrupt.png")), 11, None),
    check.SIZE_MISMATCH: (lambda d, f: d["images"][1].update(width=33), 2, None),
    check.BAD_ANNOTATION: (lambda d, f: add_annotation(d, 20, bbox=(1, 2, 3)), 1, 20),
    check.DUPLICATE_ANNOTATION_ID: (lambda d, f: add_annotation(d, 4, image_id=3), 3, 4),
    check.UNKNOWN_IMAGE: (lambda d, f: add_annotation(d, 21, image_id=999), 999, 21),
    check.UNKNOWN_CATEGORY: (lambda d, f: add_annotation(d, 22, category_id=5), 1, 22),
    check.DEGENERATE_BOX: (lambda d, f: add_annotation(d, 23, bbox=(1, 1, 0, 5)), 1, 23),
    check.BOX_OUTSIDE: (lambda d, f: add_annotation(d, 24, bbox=(50, 5, 5, 5)), 1, 24),
    check.BOX_PARTLY_OUTSIDE: (lambda d, f: add_annotation(d, 25, bbox=(35, 25, 10, 10)), 1, 25),
}


def test_clean_dataset_has_no_problems(coco_files, capsys):
    assert check_dataset(coco_files.annotations, coco_files.images) == []
    assert check_dataset(coco_files.data) == []
    assert check_data_main(coco_files.annotations, coco_files.images) == 0
    assert "no problems found" in capsys.readouterr().out


def test_every_kind_is_covered_by_a_breakage():
    assert set(BREAKAGES) | {check.INVALID_JSON, check.MISSING_SECTION} == KINDS


@pytest.mark.parametrize("kind", sorted(BREAKAGES))
def test_each_problem_is_found_with_its_ids(coco_files, kind):
    edit, image_id, annotation_id = BREAKAGES[kind]
    edit(coco_files.data, coco_files)
    coco_files.write()
    problems = check_dataset(coco_files.annotations, coco_files.images)
    assert [problem.kind for problem in problems] == [kind]
    assert problems[0].image_id == image_id
    assert problems[0].annotation_id == annotation_id
    assert problems[0].message


def test_all_problems_are_reported_at_once(coco_files):
    for edit, _, _ in BREAKAGES.values():
        edit(coco_files.data, coco_files)
    coco_files.write()
    problems = check_dataset(coco_files.annotations, coco_files.images)
    assert {problem.kind for problem in problems} == set(BREAKAGES)
    found = {(problem.kind, problem.image_id, problem.annotation_id) for problem in problems}
    expected = {(kind, image_id, annotation_id) for kind, (_, image_id, annotation_id) in BREAKAGES.items()}
    assert expected <= found


def test_missing_section_and_invalid_json(coco_files):
    del coco_files.data["categories"]
    coco_files.data["images"] = {}
    coco_files.write()
    problems = check_dataset(coco_files.annotations, coco_files.images)
    assert [p.kind for p in problems] == [check.MISSING_SECTION, check.MISSING_SECTION]
    assert "'images' must be a list" in problems[0].message
    assert "'categories'" in problems[1].message

    coco_files.annotations.write_text("{not json")
    (problem,) = check_dataset(coco_files.annotations)
    assert problem.kind == check.INVALID_JSON and "not valid JSON" in problem.message
    (problem,) = check_dataset(coco_files.annotations.with_name("absent.json"))
    assert problem.kind == check.INVALID_JSON and "cannot read" in problem.message
    coco_files.annotations.write_text("[1, 2]")
    (problem,) = check_dataset(coco_files.annotations)
    assert problem.kind == check.INVALID_JSON and "JSON object" in problem.message


def test_annotation_of_a_dropped_image_is_not_reported_twice(coco_files):
    coco_files.data["images"][0]["file_name"] = "gone.png"
    coco_files.write()
    problems = check_dataset(coco_files.annotations, coco_files.images)
    assert [(p.kind, p.image_id) for p in problems] == [(check.MISSING_FILE, 1)]


def test_files_are_checked_only_when_asked(coco_files):
    coco_files.data["images"][0]["file_name"] = "gone.png"
    coco_files.write()
    assert check_dataset(coco_files.annotations) == []
    assert check_dataset(coco_files.annotations, coco_files.images, check_files=False) == []


def test_small_overhang_is_tolerated(coco_files):
    add_annotation(coco_files.data, 30, bbox=(-0.4, 0, 40.8, 30.3))
    assert check_dataset(coco_files.data, coco_files.images) == []


def test_kind_sets_partition_the_dropping_kinds():
    assert FATAL_KINDS | IMAGE_DROPPING_KINDS | ANNOTATION_DROPPING_KINDS <= KINDS
    assert not FATAL_KINDS & IMAGE_DROPPING_KINDS
    assert not FATAL_KINDS & ANNOTATION_DROPPING_KINDS
    assert not IMAGE_DROPPING_KINDS & ANNOTATION_DROPPING_KINDS
    informative = KINDS - FATAL_KINDS - IMAGE_DROPPING_KINDS - ANNOTATION_DROPPING_KINDS
    assert informative == {check.SIZE_MISMATCH, check.BOX_PARTLY_OUTSIDE}


def test_problem_is_frozen():
    problem = Problem(check.MISSING_FILE, "gone", image_id=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        problem.kind = "other"


def test_format_problems_groups_and_limits():
    problems = [Problem(check.MISSING_FILE, f"file {i} gone", image_id=i) for i in range(7)]
    problems.append(Problem(check.DEGENERATE_BOX, "flat box", image_id=1, annotation_id=5))
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
