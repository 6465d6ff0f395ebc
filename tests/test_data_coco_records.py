"""Tests of pkd.data.coco_records: every kind of problem is found, with the ids it concerns."""

import dataclasses

import pytest

from pkd.data import coco_records
from pkd.data.coco_records import (
    ANNOTATION_DROPPING_KINDS,
    FATAL_KINDS,
    IMAGE_DROPPING_KINDS,
    KINDS,
    Problem,
    inspect_coco,
    load_coco_json,
)


def problems_of(data, images=None):
    return [finding.problem for finding in inspect_coco(data, images, "header")]


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
    coco_records.BAD_CATEGORY: (lambda d, f: d["categories"].append({"id": 99}), None, None),
    coco_records.DUPLICATE_CATEGORY_ID: (lambda d, f: d["categories"].append({"id": 3, "name": "again"}), None, None),
    coco_records.BAD_IMAGE: (lambda d, f: d["images"].append({"id": 9, "file_name": "rgb.png"}), 9, None),
    coco_records.DUPLICATE_IMAGE_ID: (lambda d, f: add_image(d, 2, "gray.png", 32, 24), 2, None),
    coco_records.MISSING_FILE: (lambda d, f: add_image(d, 10, "nope.png"), 10, None),
    coco_records.UNREADABLE_IMAGE: (lambda d, f: (corrupt_file(f), add_image(d, 11, "corrupt.png")), 11, None),
    coco_records.SIZE_MISMATCH: (lambda d, f: d["images"][1].update(width=33), 2, None),
    coco_records.BAD_ANNOTATION: (lambda d, f: add_annotation(d, 20, bbox=(1, 2, 3)), 1, 20),
    coco_records.DUPLICATE_ANNOTATION_ID: (lambda d, f: add_annotation(d, 4, image_id=3), 3, 4),
    coco_records.UNKNOWN_IMAGE: (lambda d, f: add_annotation(d, 21, image_id=999), 999, 21),
    coco_records.UNKNOWN_CATEGORY: (lambda d, f: add_annotation(d, 22, category_id=5), 1, 22),
    coco_records.DEGENERATE_BOX: (lambda d, f: add_annotation(d, 23, bbox=(1, 1, 0, 5)), 1, 23),
    coco_records.BOX_OUTSIDE: (lambda d, f: add_annotation(d, 24, bbox=(50, 5, 5, 5)), 1, 24),
    coco_records.BOX_PARTLY_OUTSIDE: (lambda d, f: add_annotation(d, 25, bbox=(35, 25, 10, 10)), 1, 25),
}


def test_every_kind_is_covered_by_a_breakage():
    assert set(BREAKAGES) | {coco_records.INVALID_JSON, coco_records.MISSING_SECTION} == KINDS


@pytest.mark.parametrize("kind", sorted(BREAKAGES))
def test_each_problem_is_found_with_its_ids(coco_files, kind):
    edit, image_id, annotation_id = BREAKAGES[kind]
    edit(coco_files.data, coco_files)
    problems = problems_of(coco_files.data, coco_files.images)
    assert [problem.kind for problem in problems] == [kind]
    assert problems[0].image_id == image_id
    assert problems[0].annotation_id == annotation_id
    assert problems[0].message


def test_all_problems_are_reported_at_once(coco_files):
    for edit, _, _ in BREAKAGES.values():
        edit(coco_files.data, coco_files)
    problems = problems_of(coco_files.data, coco_files.images)
    assert {problem.kind for problem in problems} == set(BREAKAGES)
    found = {(problem.kind, problem.image_id, problem.annotation_id) for problem in problems}
    expected = {(kind, image_id, annotation_id) for kind, (_, image_id, annotation_id) in BREAKAGES.items()}
    assert expected <= found


def test_missing_section_and_a_file_that_is_not_a_coco_object(coco_files):
    del coco_files.data["categories"]
    coco_files.data["images"] = {}
    problems = problems_of(coco_files.data, coco_files.images)
    assert [p.kind for p in problems] == [coco_records.MISSING_SECTION, coco_records.MISSING_SECTION]
    assert "'images'" in problems[0].message and "'categories'" in problems[1].message
    (problem,) = problems_of([1, 2])
    assert problem.kind == coco_records.INVALID_JSON


def test_load_coco_json_says_why_a_file_cannot_be_used(coco_files):
    coco_files.annotations.write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        load_coco_json(coco_files.annotations)
    with pytest.raises(ValueError, match="cannot read"):
        load_coco_json(coco_files.annotations.with_name("absent.json"))
    coco_files.annotations.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_coco_json(coco_files.annotations)


def test_annotation_of_a_dropped_image_is_not_reported_twice(coco_files):
    coco_files.data["images"][0]["file_name"] = "gone.png"
    problems = problems_of(coco_files.data, coco_files.images)
    assert [(p.kind, p.image_id) for p in problems] == [(coco_records.MISSING_FILE, 1)]


def test_small_overhang_is_tolerated(coco_files):
    add_annotation(coco_files.data, 30, bbox=(-0.4, 0, 40.8, 30.3))
    assert problems_of(coco_files.data, coco_files.images) == []


def test_kind_sets_partition_the_dropping_kinds():
    assert FATAL_KINDS | IMAGE_DROPPING_KINDS | ANNOTATION_DROPPING_KINDS <= KINDS
    assert not FATAL_KINDS & IMAGE_DROPPING_KINDS
    assert not FATAL_KINDS & ANNOTATION_DROPPING_KINDS
    assert not IMAGE_DROPPING_KINDS & ANNOTATION_DROPPING_KINDS
    informative = KINDS - FATAL_KINDS - IMAGE_DROPPING_KINDS - ANNOTATION_DROPPING_KINDS
    assert informative == {coco_records.SIZE_MISMATCH, coco_records.BOX_PARTLY_OUTSIDE}


def test_problem_is_frozen():
    problem = Problem(coco_records.MISSING_FILE, "gone", image_id=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        problem.kind = "other"
