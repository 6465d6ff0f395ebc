"""The records of a COCO annotation file, inspected one by one: every problem, with its ids.

:func:`inspect_coco` walks a parsed COCO dict (sections, categories, images and their files,
annotations) and returns every problem it finds as a :class:`Finding`, never stopping at the
first. :mod:`pkd.data.check` turns the findings into a report (:func:`~pkd.data.check.check_dataset`)
or a cleaned copy (:func:`~pkd.data.check.clean_coco`); because both use this one walk, a file
that ``pkd check-data`` calls clean is exactly a file the dataset loads without dropping anything.

What each kind of problem does to a dataset (the sets below are the single source of truth):

- :data:`FATAL_KINDS` make the file unusable (the dataset raises): unreadable JSON, a
  missing top-level section, a malformed category, a duplicate category or image id (which
  record would the annotations mean?).
- :data:`IMAGE_DROPPING_KINDS` drop the image and its annotations: a malformed image record,
  a missing or unreadable image file.
- :data:`ANNOTATION_DROPPING_KINDS` drop one annotation: a malformed record, a duplicate
  annotation id (the first record with the id is kept), an unknown image or category id, a
  box with non-positive width or height, a box entirely outside its image.
- The rest only inform: a box partly outside its image is clipped to it; an image whose file
  has another size than its record says is loaded at the file's size.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

__all__ = [
    "ANNOTATION_DROPPING_KINDS",
    "BAD_ANNOTATION",
    "BAD_CATEGORY",
    "BAD_IMAGE",
    "BOX_OUTSIDE",
    "BOX_PARTLY_OUTSIDE",
    "DEGENERATE_BOX",
    "DUPLICATE_ANNOTATION_ID",
    "DUPLICATE_CATEGORY_ID",
    "DUPLICATE_IMAGE_ID",
    "FATAL_KINDS",
    "FileCheck",
    "Finding",
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
    "inspect_coco",
    "load_coco_json",
]

# Kinds of problem. Each Problem's `kind` is one of these strings.
INVALID_JSON = "invalid_json"  # the annotation file cannot be read or is not a JSON object
MISSING_SECTION = "missing_section"  # "images", "annotations" or "categories" missing or not a list
BAD_CATEGORY = "bad_category"  # a category record lacks "id"/"name" or has a wrong type
DUPLICATE_CATEGORY_ID = "duplicate_category_id"
BAD_IMAGE = "bad_image"  # an image record lacks "id"/"file_name"/"width"/"height" or has a bad value
DUPLICATE_IMAGE_ID = "duplicate_image_id"
MISSING_FILE = "missing_file"  # the image file does not exist
UNREADABLE_IMAGE = "unreadable_image"  # the image file exists but its header cannot be read
SIZE_MISMATCH = "size_mismatch"  # the file's width/height differ from the record's
BAD_ANNOTATION = "bad_annotation"  # an annotation lacks "id"/"image_id"/"category_id"/"bbox" or has a bad value
DUPLICATE_ANNOTATION_ID = "duplicate_annotation_id"
UNKNOWN_IMAGE = "unknown_image"  # an annotation's image_id is not in "images"
UNKNOWN_CATEGORY = "unknown_category"  # an annotation's category_id is not in "categories"
DEGENERATE_BOX = "degenerate_box"  # bbox width or height <= 0
BOX_OUTSIDE = "box_outside_image"  # bbox does not intersect its image at all
BOX_PARTLY_OUTSIDE = "box_partly_outside_image"  # bbox sticks out of its image by more than OUTSIDE_TOLERANCE

KINDS = frozenset(
    {
        INVALID_JSON,
        MISSING_SECTION,
        BAD_CATEGORY,
        DUPLICATE_CATEGORY_ID,
        BAD_IMAGE,
        DUPLICATE_IMAGE_ID,
        MISSING_FILE,
        UNREADABLE_IMAGE,
        SIZE_MISMATCH,
        BAD_ANNOTATION,
        DUPLICATE_ANNOTATION_ID,
        UNKNOWN_IMAGE,
        UNKNOWN_CATEGORY,
        DEGENERATE_BOX,
        BOX_OUTSIDE,
        BOX_PARTLY_OUTSIDE,
    }
)
FATAL_KINDS = frozenset({INVALID_JSON, MISSING_SECTION, BAD_CATEGORY, DUPLICATE_CATEGORY_ID, DUPLICATE_IMAGE_ID})
IMAGE_DROPPING_KINDS = frozenset({BAD_IMAGE, MISSING_FILE, UNREADABLE_IMAGE})
ANNOTATION_DROPPING_KINDS = frozenset(
    {BAD_ANNOTATION, DUPLICATE_ANNOTATION_ID, UNKNOWN_IMAGE, UNKNOWN_CATEGORY, DEGENERATE_BOX, BOX_OUTSIDE}
)

# Boxes converted from polygons or rounded by annotation tools overhang their image by a
# fraction of a pixel; reporting those would bury the real problems. Clipping happens anyway.
OUTSIDE_TOLERANCE = 0.5

SECTIONS = ("images", "annotations", "categories")
IMAGE_KEYS = ("id", "file_name", "width", "height")
ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")
CATEGORY_KEYS = ("id", "name")

FileCheck = Literal["none", "exists", "header"]


@dataclass(frozen=True)
class Problem:
    """One problem found in a dataset.

    Attributes:
        kind: One of the kind constants of this module (e.g. :data:`BOX_OUTSIDE`).
        message: A sentence saying what is wrong and where (record index, file, values).
        image_id: The image the problem concerns, if known.
        annotation_id: The annotation the problem concerns, if any and known.
    """

    kind: str
    message: str
    image_id: int | None = None
    annotation_id: int | None = None


@dataclass(frozen=True)
class Finding:
    """A problem together with the list index of the record it was found in (None: the whole file).

    Each kind belongs to one section (the image kinds to "images", ...), so the index names the record.

    Attributes:
        problem: What is wrong.
        index: Position of the record in its section's list, or None for a problem of the file.
    """

    problem: Problem
    index: int | None = None


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `"id": true` is a broken file, not id 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_coco_json(annotations: str | os.PathLike) -> dict[str, Any]:
    """Reads a COCO annotation file.

    Args:
        annotations: Path of the JSON file.

    Returns:
        The parsed JSON object.

    Raises:
        ValueError: When the file cannot be read, is not JSON, or is not a JSON object.
    """
    path = Path(annotations)
    try:
        with path.open("rb") as file:
            data = json.load(file)
    except OSError as error:
        raise ValueError(f"cannot read annotation file {path}: {error}") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"annotation file {path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"annotation file {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _missing_keys(record: Any, keys: tuple[str, ...]) -> list[str]:
    return [key for key in keys if key not in record]


def _describe_id(value: Any) -> int | None:
    return value if _is_int(value) else None


def _inspect_categories(categories: list[Any], findings: list[Finding]) -> set[int]:
    """Checks category records; returns the valid category ids."""
    seen: dict[int, int] = {}
    for index, category in enumerate(categories):
        where = f"categories[{index}]"
        if not isinstance(category, dict):
            message = f"{where} must be an object, got {type(category).__name__}"
            findings.append(Finding(Problem(BAD_CATEGORY, message), index))
            continue
        missing = _missing_keys(category, CATEGORY_KEYS)
        if missing:
            message = f"{where} lacks required key(s) {', '.join(missing)}"
            findings.append(Finding(Problem(BAD_CATEGORY, message), index))
            continue
        if not _is_int(category["id"]) or not isinstance(category["name"], str):
            message = f"{where} needs an integer 'id' and a string 'name', got {category['id']!r}, {category['name']!r}"
            findings.append(Finding(Problem(BAD_CATEGORY, message), index))
            continue
        category_id = category["id"]
        if category_id in seen:
            message = f"{where}: duplicate category id {category_id} (first at categories[{seen[category_id]}])"
            findings.append(Finding(Problem(DUPLICATE_CATEGORY_ID, message), index))
            continue
        seen[category_id] = index
    return set(seen)


def _image_record_error(image: Any) -> str | None:
    """Says what is wrong with one image record, or None when it is well-formed."""
    if not isinstance(image, dict):
        return f"must be an object, got {type(image).__name__}"
    missing = _missing_keys(image, IMAGE_KEYS)
    if missing:
        return f"lacks required key(s) {', '.join(missing)}"
    if not _is_int(image["id"]):
        return f"'id' must be an integer, got {image['id']!r}"
    if not isinstance(image["file_name"], str) or not image["file_name"]:
        return f"'file_name' must be a non-empty string, got {image['file_name']!r}"
    for key in ("width", "height"):
        if not _is_number(image[key]) or image[key] <= 0:
            return f"'{key}' must be a positive number, got {image[key]!r}"
    return None


def _read_size(path: Path) -> tuple[int, int]:
    """Width and height from the file's header; PIL decodes no pixels until asked."""
    with Image.open(path) as image:
        return image.size


def _inspect_images(
    images: list[Any], images_dir: Path | None, files: FileCheck, findings: list[Finding]
) -> tuple[dict[int, dict[str, Any]], set[int]]:
    """Checks image records and files; returns usable images by id, and the ids of dropped ones."""
    usable: dict[int, dict[str, Any]] = {}
    first_index: dict[int, int] = {}
    dropped: set[int] = set()
    for index, image in enumerate(images):
        where = f"images[{index}]"
        image_id = _describe_id(image.get("id")) if isinstance(image, dict) else None
        error = _image_record_error(image)
        if error is not None:
            findings.append(Finding(Problem(BAD_IMAGE, f"{where} {error}", image_id=image_id), index))
            if image_id is not None:
                dropped.add(image_id)
            continue
        if image_id in first_index:
            message = f"{where}: duplicate image id {image_id} (first at images[{first_index[image_id]}])"
            findings.append(Finding(Problem(DUPLICATE_IMAGE_ID, message, image_id=image_id), index))
            continue
        first_index[image_id] = index
        if images_dir is not None and files != "none":
            path = images_dir / image["file_name"]
            if not path.is_file():
                message = f"{where}: image {image_id} file {path} does not exist"
                findings.append(Finding(Problem(MISSING_FILE, message, image_id=image_id), index))
                dropped.add(image_id)
                continue
            if files == "header":
                try:
                    width, height = _read_size(path)
                # Whatever PIL raises (OSError, SyntaxError, DecompressionBombError, ...), the
                # file cannot be used, and the report must go on to the next image.
                except Exception as error:
                    message = f"{where}: image {image_id} file {path} cannot be read: {error}"
                    findings.append(Finding(Problem(UNREADABLE_IMAGE, message, image_id=image_id), index))
                    dropped.add(image_id)
                    continue
                if (width, height) != (image["width"], image["height"]):
                    message = (
                        f"{where}: image {image_id} is recorded as {image['width']}x{image['height']} "
                        f"(width x height) but file {path} is {width}x{height}"
                    )
                    findings.append(Finding(Problem(SIZE_MISMATCH, message, image_id=image_id), index))
        usable[image_id] = image
    return usable, dropped


def _annotation_record_error(annotation: Any) -> str | None:
    """Says what is wrong with one annotation record, or None when it is well-formed."""
    if not isinstance(annotation, dict):
        return f"must be an object, got {type(annotation).__name__}"
    missing = _missing_keys(annotation, ANNOTATION_KEYS)
    if missing:
        return f"lacks required key(s) {', '.join(missing)}"
    for key in ("id", "image_id", "category_id"):
        if not _is_int(annotation[key]):
            return f"'{key}' must be an integer, got {annotation[key]!r}"
    bbox = annotation["bbox"]
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return f"'bbox' must be 4 finite numbers [x, y, width, height], got {bbox!r}"
    if "iscrowd" in annotation and annotation["iscrowd"] not in (0, 1):
        return f"'iscrowd' must be 0 or 1, got {annotation['iscrowd']!r}"
    if "area" in annotation and (not _is_number(annotation["area"]) or annotation["area"] < 0):
        return f"'area' must be a non-negative number, got {annotation['area']!r}"
    return None


def _annotation_problem(
    annotation: dict[str, Any],
    where: str,
    images: dict[int, dict[str, Any]],
    dropped_images: set[int],
    category_ids: set[int],
) -> tuple[str, str] | None:
    """The kind and message of what is wrong with a well-formed, first-of-its-id annotation."""
    annotation_id, image_id = annotation["id"], annotation["image_id"]
    if annotation["category_id"] not in category_ids:
        return (
            UNKNOWN_CATEGORY,
            f"{where}: annotation {annotation_id} has unknown category id {annotation['category_id']}",
        )
    image = images.get(image_id)
    if image is None:
        # An annotation of an image dropped for its own problem goes with it: no second report.
        if image_id in dropped_images:
            return None
        return UNKNOWN_IMAGE, f"{where}: annotation {annotation_id} refers to unknown image id {image_id}"
    x, y, width, height = annotation["bbox"]
    box = f"box {annotation['bbox']} [x, y, w, h]"
    if width <= 0 or height <= 0:
        return DEGENERATE_BOX, f"{where}: annotation {annotation_id} of image {image_id} has non-positive size: {box}"
    image_width, image_height = image["width"], image["height"]
    size = f"{image_width}x{image_height}"
    if x >= image_width or y >= image_height or x + width <= 0 or y + height <= 0:
        return BOX_OUTSIDE, f"{where}: annotation {annotation_id} {box} lies entirely outside image {image_id} ({size})"
    tolerance = OUTSIDE_TOLERANCE
    if x < -tolerance or y < -tolerance or x + width > image_width + tolerance or y + height > image_height + tolerance:
        return (
            BOX_PARTLY_OUTSIDE,
            f"{where}: annotation {annotation_id} {box} sticks out of image {image_id} ({size}); it is clipped",
        )
    return None


def _inspect_annotations(
    annotations: list[Any],
    images: dict[int, dict[str, Any]],
    dropped_images: set[int],
    category_ids: set[int],
    findings: list[Finding],
) -> None:
    first_index: dict[int, int] = {}
    for index, annotation in enumerate(annotations):
        where = f"annotations[{index}]"
        annotation_id = image_id = None
        if isinstance(annotation, dict):
            annotation_id, image_id = _describe_id(annotation.get("id")), _describe_id(annotation.get("image_id"))
        error = _annotation_record_error(annotation)
        if error is not None:
            found: tuple[str, str] | None = (BAD_ANNOTATION, f"{where} {error}")
        elif annotation_id in first_index:
            first = first_index[annotation_id]
            found = (
                DUPLICATE_ANNOTATION_ID,
                f"{where}: duplicate annotation id {annotation_id} (first at annotations[{first}])",
            )
        else:
            first_index[annotation_id] = index
            found = _annotation_problem(annotation, where, images, dropped_images, category_ids)
        if found is not None:
            kind, message = found
            problem = Problem(kind, message, image_id=image_id, annotation_id=annotation_id)
            findings.append(Finding(problem, index))


def inspect_coco(data: Any, images_dir: str | os.PathLike | None, files: FileCheck) -> list[Finding]:
    """Walks a parsed COCO dict and returns every finding, in file order.

    Args:
        data: The parsed annotation file (anything: a non-mapping is itself a finding).
        images_dir: Folder the records' ``file_name`` are relative to; None skips the file checks.
        files: What to check of each image file: ``"none"``, ``"exists"``, or ``"header"``
            (exists, can be opened, and has the recorded width and height; no pixel is decoded).

    Returns:
        The findings in the order sections, categories, images, annotations; empty when clean.
    """
    findings: list[Finding] = []
    if not isinstance(data, Mapping):
        return [Finding(Problem(INVALID_JSON, f"the annotations must be a JSON object, got {type(data).__name__}"))]
    for section in SECTIONS:
        if section not in data:
            findings.append(Finding(Problem(MISSING_SECTION, f"the annotation file has no '{section}' list")))
        elif not isinstance(data[section], list):
            message = f"'{section}' must be a list, got {type(data[section]).__name__}"
            findings.append(Finding(Problem(MISSING_SECTION, message)))
    if findings:
        return findings
    category_ids = _inspect_categories(data["categories"], findings)
    images_dir = Path(images_dir) if images_dir is not None else None
    images, dropped_images = _inspect_images(data["images"], images_dir, files, findings)
    _inspect_annotations(data["annotations"], images, dropped_images, category_ids, findings)
    return findings
