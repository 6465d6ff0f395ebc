"""Checks of COCO-format detection datasets: the report, the cleaned copy, and ``pkd check-data``.

:func:`check_dataset` reports *every* problem that :func:`~pkd.data.coco_records.inspect_coco`
finds in an annotation file (and optionally its image folder) as a :class:`Problem`. The same
walk backs :class:`pkd.data.CocoDetection` through :func:`clean_coco`, which drops what cannot
be used and keeps the rest, so a file that ``pkd check-data`` calls clean is exactly a file the
dataset loads without dropping anything. The kinds of problem, and what each does to a
dataset, are listed in :mod:`pkd.data.coco_records` (and re-exported here).

Example:
    >>> problems = check_dataset("annotations/val.json", "images/val")  # doctest: +SKIP
    >>> print(format_problems(problems))  # doctest: +SKIP
    2 problems in 2 kinds
      box_outside_image (1): ...
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pkd.data.coco_records import (
    ANNOTATION_DROPPING_KINDS,
    BAD_ANNOTATION,
    BAD_CATEGORY,
    BAD_IMAGE,
    BOX_OUTSIDE,
    BOX_PARTLY_OUTSIDE,
    DEGENERATE_BOX,
    DUPLICATE_ANNOTATION_ID,
    DUPLICATE_CATEGORY_ID,
    DUPLICATE_IMAGE_ID,
    FATAL_KINDS,
    IMAGE_DROPPING_KINDS,
    INVALID_JSON,
    KINDS,
    MISSING_FILE,
    MISSING_SECTION,
    OUTSIDE_TOLERANCE,
    SIZE_MISMATCH,
    UNKNOWN_CATEGORY,
    UNKNOWN_IMAGE,
    UNREADABLE_IMAGE,
    FileCheck,
    Problem,
    inspect_coco,
    load_coco_json,
)

__all__ = [
    "ANNOTATION_DROPPING_KINDS",
    "BAD_ANNOTATION",
    "BAD_CATEGORY",
    "BAD_IMAGE",
    "BOX_OUTSIDE",
    "BOX_PARTLY_OUTSIDE",
    "CleanedCoco",
    "DEGENERATE_BOX",
    "DUPLICATE_ANNOTATION_ID",
    "DUPLICATE_CATEGORY_ID",
    "DUPLICATE_IMAGE_ID",
    "FATAL_KINDS",
    "IMAGE_DROPPING_KINDS",
    "INVALID_JSON",
    "KINDS",
    "MISSING_FILE",
    "MISSING_SECTION",
    "OUTSIDE_TOLERANCE",
    "Problem",
    "SIZE_MISMATCH",
    "UNKNOWN_CATEGORY",
    "UNKNOWN_IMAGE",
    "UNREADABLE_IMAGE",
    "check_data_main",
    "check_dataset",
    "clean_coco",
    "format_problems",
    "load_coco_json",
]


@dataclass(frozen=True)
class CleanedCoco:
    """The result of :func:`clean_coco`.

    Attributes:
        data: A COCO dict without the dropped records, with ``area`` and ``iscrowd`` filled in
            where the file left them out (COCO evaluation needs both).
        problems: Every problem found, including those that drop nothing.
        dropped_images: The problems that dropped an image (with the image's annotations).
        dropped_annotations: The problems that dropped a single annotation.
        annotations_of_dropped_images: How many annotations went with the dropped images.
    """

    data: dict[str, Any]
    problems: list[Problem]
    dropped_images: list[Problem]
    dropped_annotations: list[Problem]
    annotations_of_dropped_images: int


def check_dataset(
    annotations: str | os.PathLike | Mapping[str, Any],
    images: str | os.PathLike | None = None,
    *,
    check_files: bool = True,
) -> list[Problem]:
    """Finds every problem in a COCO-format detection dataset.

    Checks that the JSON has its ``images``, ``annotations`` and ``categories`` lists and each
    record its required keys with values of the right type; that ids are unique; that each
    annotation refers to a known image and category and has a box with positive width and
    height inside its image; and, when ``images`` is given and ``check_files`` is true, that
    every image file exists, can be opened, and has the recorded width and height (from the
    file's header: pixels are not decoded, so a file whose body alone is corrupt passes here
    and is caught when :class:`pkd.data.CocoDetection` loads it).

    Args:
        annotations: Path of the annotation JSON, or the already parsed dict.
        images: Folder the records' ``file_name`` are relative to; None skips the file checks.
        check_files: Whether to check the image files (when ``images`` is given).

    Returns:
        Every problem found, in file order (sections, categories, images, annotations); empty
        when the dataset is clean.
    """
    if isinstance(annotations, Mapping):
        data = annotations
    else:
        try:
            data = load_coco_json(annotations)
        except ValueError as error:
            return [Problem(INVALID_JSON, str(error))]
    files: FileCheck = "header" if check_files else "none"
    return [finding.problem for finding in inspect_coco(data, images, files)]


def clean_coco(
    data: Mapping[str, Any], images: str | os.PathLike | None = None, *, check_files: bool = True
) -> CleanedCoco:
    """Drops the records that cannot be used, as the dataset does, and says what was dropped.

    Runs the checks of :func:`check_dataset`, except that image files are only tested for
    existence (opening every header of a large dataset at each start would be slow; a file
    that cannot be decoded is skipped when it is loaded).

    Args:
        data: A parsed COCO dict; it is not modified.
        images: Folder of the image files; None skips the file checks.
        check_files: Whether to drop images whose file does not exist.

    Returns:
        The cleaned copy and the problems, see :class:`CleanedCoco`.

    Raises:
        ValueError: When the file has a problem of a kind in :data:`FATAL_KINDS`; the message
            lists them all.
    """
    findings = inspect_coco(data, images, "exists" if check_files else "none")
    problems = [finding.problem for finding in findings]
    fatal = [problem for problem in problems if problem.kind in FATAL_KINDS]
    if fatal:
        raise ValueError("the annotation file cannot be used:\n" + format_problems(fatal))
    drop_images = {f.index for f in findings if f.problem.kind in IMAGE_DROPPING_KINDS}
    drop_annotations = {f.index for f in findings if f.problem.kind in ANNOTATION_DROPPING_KINDS}
    kept_images = [dict(image) for index, image in enumerate(data["images"]) if index not in drop_images]
    kept_image_ids = {image["id"] for image in kept_images}
    kept_annotations = []
    with_dropped_images = 0
    for index, annotation in enumerate(data["annotations"]):
        if index in drop_annotations:
            continue
        if annotation["image_id"] not in kept_image_ids:
            with_dropped_images += 1
            continue
        annotation = dict(annotation)
        # COCOeval reads both keys of every ground-truth annotation.
        annotation.setdefault("iscrowd", 0)
        annotation.setdefault("area", float(annotation["bbox"][2] * annotation["bbox"][3]))
        kept_annotations.append(annotation)
    cleaned = dict(data)
    cleaned.update(images=kept_images, annotations=kept_annotations, categories=[dict(c) for c in data["categories"]])
    return CleanedCoco(
        data=cleaned,
        problems=problems,
        dropped_images=[p for p in problems if p.kind in IMAGE_DROPPING_KINDS],
        dropped_annotations=[p for p in problems if p.kind in ANNOTATION_DROPPING_KINDS],
        annotations_of_dropped_images=with_dropped_images,
    )


def format_problems(problems: list[Problem], limit: int = 5) -> str:
    """A readable report of problems, grouped by kind with counts.

    Args:
        problems: As returned by :func:`check_dataset`.
        limit: How many messages to show per kind; the rest are counted.

    Returns:
        The report, several lines; ``"no problems found"`` when ``problems`` is empty.
    """
    if not problems:
        return "no problems found"
    counts = Counter(problem.kind for problem in problems)
    lines = [f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {len(counts)} kind(s)"]
    for kind, count in counts.most_common():
        messages = [problem.message for problem in problems if problem.kind == kind]
        lines.append(f"  {kind} ({count}):")
        lines.extend(f"    - {message}" for message in messages[:limit])
        if count > limit:
            lines.append(f"    ... and {count - limit} more")
    return "\n".join(lines)


def check_data_main(annotations: str | os.PathLike, images: str | os.PathLike | None = None) -> int:
    """Entry point of ``pkd check-data``: prints the report of :func:`check_dataset`.

    Args:
        annotations: Path of the annotation JSON.
        images: Folder of the image files; None checks the JSON only.

    Returns:
        The process exit code: 0 when the dataset is clean, 1 otherwise.
    """
    problems = check_dataset(annotations, images)
    if problems:
        print(f"{annotations}: {format_problems(problems)}")
        return 1
    scope = "annotations and image files" if images is not None else "annotations (image files not checked)"
    print(f"{annotations}: no problems found in {scope}")
    return 0
