"""The embedded detection dataset on disk: handwritten digits on real photographs, no download.

:func:`make_digits_dataset` writes the images that :mod:`pkd.data.digit_images` renders as a
COCO dataset (PNG files, one annotation JSON per split, ``meta.json`` with the parameters),
checks it, and reuses it when asked for the same one again. It is small enough to train and
distil detectors on a CPU in minutes, and hard enough (textured backgrounds, varied sizes,
colours and contrast, partial overlaps) that a better detector scores visibly better.
:func:`preview` draws a montage of any COCO dataset with its boxes.

The same seed and parameters give byte-identical PNG and JSON files (with the same library
versions): every image comes from its own random generator seeded by ``(seed, split, index)``.

Example:
    >>> digits = make_digits_dataset("data/digits", train_images=100)  # doctest: +SKIP
    >>> digits.annotations["train"], digits.images["train"]  # doctest: +SKIP
    (PosixPath('data/digits/annotations/train.json'), PosixPath('data/digits/train'))
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_convert
from tqdm import tqdm

from pkd.data.check import check_dataset, format_problems
from pkd.data.digit_images import GENERATOR_VERSION, INK_THRESHOLD, PHOTOS, SPLITS, render_image
from pkd.io import fsync_directory, remove_stale_temps, temp_path

__all__ = ["DigitsDataset", "make_digits_dataset", "preview"]

# zlib level of the PNGs: level 3 writes twice as fast as the default 6 and files 2 % larger.
_PNG_COMPRESSION = 3


@dataclass(frozen=True)
class DigitsDataset:
    """Paths of a generated digits dataset.

    Attributes:
        root: The dataset folder.
        annotations: Split name -> COCO annotation JSON.
        images: Split name -> folder of the split's PNG images.
        meta: The ``meta.json`` recording the generation parameters.
    """

    root: Path
    annotations: dict[str, Path] = field(default_factory=dict)
    images: dict[str, Path] = field(default_factory=dict)
    meta: Path | None = None

    @classmethod
    def at(cls, root: Path) -> DigitsDataset:
        """The paths of the dataset in ``root`` (whether it exists or not)."""
        return cls(
            root=root,
            annotations={split: root / "annotations" / f"{split}.json" for split in SPLITS},
            images={split: root / split for split in SPLITS},
            meta=root / "meta.json",
        )


def _split_images(
    split: str, count: int, seed: int, params: dict[str, Any], images_dir: Path, progress: tqdm
) -> dict[str, Any]:
    """Writes the PNGs of one split and returns its COCO dict."""
    images, annotations = [], []
    for index in range(count):
        pixels, objects = render_image(
            seed,
            split,
            index,
            image_size=params["image_size"],
            digit_size=params["digit_size"],
            objects=params["objects"],
        )
        height, width = pixels.shape[:2]
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        Image.fromarray(pixels).save(images_dir / file_name, format="PNG", compress_level=_PNG_COMPRESSION)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        # Integer pixel boxes stay integers in the JSON: x1/y1 are exclusive, so width = x1 - x0.
        boxes = box_convert(torch.tensor([digit.box for digit in objects]).reshape(-1, 4), "xyxy", "xywh")
        for digit, bbox in zip(objects, boxes.tolist(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": digit.label + 1,
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                    "digit_sample": digit.sample,
                }
            )
        progress.update()
    categories = [{"id": digit + 1, "name": str(digit), "supercategory": "digit"} for digit in range(10)]
    return {
        "info": {"description": f"pkd digits, {split} split", "version": str(GENERATOR_VERSION)},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def _read_meta(root: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("generator") == "pkd.data.digits" else None


def _check_range(name: str, value: Sequence[int], minimum: int) -> tuple[int, int]:
    low, high = (int(v) for v in value)
    if not minimum <= low <= high:
        raise ValueError(f"{name} must be a range (low, high) with {minimum} <= low <= high, got {tuple(value)}")
    return low, high


def make_digits_dataset(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    train_images: int = 2000,
    val_images: int = 300,
    test_images: int = 300,
    image_size: tuple[int, int] = (128, 192),
    digit_size: tuple[int, int] = (12, 48),
    objects: tuple[int, int] = (1, 6),
    overwrite: bool = False,
) -> DigitsDataset:
    """Generates the digits dataset, or reuses it when ``out_dir`` already holds the same one.

    Writes ``out_dir/<split>/NNNNNN.png``, ``out_dir/annotations/<split>.json`` (COCO: category
    ids 1..10 named ``"0"``..``"9"``; each annotation also records its ``digit_sample``, the
    index into ``load_digits()``) and ``out_dir/meta.json`` with the parameters. Everything is
    written to a temporary sibling folder first and renamed into place when complete and
    checked, so an interrupted run never leaves a dataset that looks complete, and processes
    that generate the same dataset at once (DDP ranks) end up sharing one copy.

    Args:
        out_dir: Folder of the dataset.
        seed: Seed of every random choice except the fixed split of digit samples.
        train_images: Number of training images.
        val_images: Number of validation images.
        test_images: Number of test images.
        image_size: Range (inclusive) that each image's height and width are drawn from.
        digit_size: Range (inclusive) of glyph heights in pixels.
        objects: Range (inclusive) of digits per image (fewer when they do not fit).
        overwrite: Replace a dataset generated with other parameters. Without it that is an
            error, so that a cached dataset is never silently replaced under a finished run.

    Returns:
        The paths of the dataset.

    Raises:
        FileExistsError: ``out_dir`` holds a digits dataset with other parameters and not
            ``overwrite``, or holds files that are not a digits dataset (never deleted).
        RuntimeError: The generated dataset fails :func:`~pkd.data.check.check_dataset`.
    """
    root = Path(out_dir)
    image_size = _check_range("image_size", image_size, 8)
    digit_size = _check_range("digit_size", digit_size, 4)
    objects = _check_range("objects", objects, 0)
    if digit_size[0] > image_size[0]:
        raise ValueError(f"digit_size {digit_size} must start no higher than image_size {image_size}")
    counts = {"train": int(train_images), "val": int(val_images), "test": int(test_images)}
    if any(count < 0 for count in counts.values()):
        raise ValueError(f"image counts must be non-negative, got {counts}")
    params = {
        "seed": int(seed),
        **{f"{split}_images": count for split, count in counts.items()},
        "image_size": list(image_size),
        "digit_size": list(digit_size),
        "objects": list(objects),
    }
    wanted = {"generator": "pkd.data.digits", "version": GENERATOR_VERSION, "params": params}

    if _holds(root, wanted):
        return DigitsDataset.at(root)
    existing = _read_meta(root)
    if root.exists() and any(root.iterdir()):
        if existing is None:
            raise FileExistsError(f"{root} exists and is not a pkd digits dataset; refusing to touch it")
        if not overwrite:
            raise FileExistsError(
                f"{root} holds a digits dataset generated with {existing.get('params')} "
                f"(version {existing.get('version')}), not {params} (version {GENERATOR_VERSION}); "
                "pass overwrite=True to replace it or choose another folder"
            )

    root.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(root)  # what generators killed before their rename left behind
    partial = temp_path(root)
    try:
        _generate(partial, seed, counts, params)
        meta = {**wanted, "ink_threshold": INK_THRESHOLD, "photos": list(PHOTOS)}
        (partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _move_into_place(partial, root, wanted)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return DigitsDataset.at(root)


def _generate(folder: Path, seed: int, counts: dict[str, int], params: dict[str, Any]) -> None:
    """Writes and checks all splits in ``folder``."""
    (folder / "annotations").mkdir(parents=True)
    with tqdm(total=sum(counts.values()), desc="digits dataset", unit="img", disable=None) as progress:
        for split, count in counts.items():
            (folder / split).mkdir()
            coco = _split_images(split, count, seed, params, folder / split, progress)
            annotations = folder / "annotations" / f"{split}.json"
            annotations.write_text(json.dumps(coco, separators=(",", ":")))
            problems = check_dataset(annotations, folder / split)
            if problems:
                raise RuntimeError(f"the generated {split} split has problems:\n{format_problems(problems)}")


def _holds(root: Path, wanted: dict[str, Any]) -> bool:
    """Whether ``root`` holds the complete dataset that ``wanted`` (generator, version, params) describes."""
    existing = _read_meta(root)
    return existing is not None and {key: existing.get(key) for key in wanted} == wanted


def _move_into_place(partial: Path, root: Path, wanted: dict[str, Any]) -> None:
    """Renames the finished ``partial`` folder to ``root``, replacing an older dataset there."""
    if _holds(root, wanted):
        # Another process finished the same dataset first; it may be reading it already.
        return
    retired = None
    if root.exists():
        if any(root.iterdir()):
            retired = temp_path(root)
            root.rename(retired)
        else:
            root.rmdir()
    try:
        partial.rename(root)
    except OSError:
        # Another process renamed its copy of the same dataset into place in between.
        if not _holds(root, wanted):
            raise
    fsync_directory(root.parent)
    if retired is not None:
        shutil.rmtree(retired)


# Ten colours that stay apart from each other (the "tab10" palette).
_PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def preview(
    annotations: str | os.PathLike,
    images: str | os.PathLike,
    out_png: str | os.PathLike,
    *,
    count: int = 16,
    seed: int = 0,
    cell: int = 256,
) -> Path:
    """Writes a montage of random images of a COCO dataset with their boxes and class names.

    Works for any COCO-format dataset, not only the digits. Each image is scaled to fit a
    square cell before its boxes are drawn, so that lines and names are as thick in every cell.

    Args:
        annotations: Path of the COCO annotation JSON.
        images: Folder of the images.
        out_png: Path of the PNG to write.
        count: Number of images shown (fewer if the dataset is smaller).
        seed: Seed of the choice of images.
        cell: Size in pixels of the square cell that each image is scaled to fit.

    Returns:
        The path of the written PNG.
    """
    from torchvision.transforms.v2 import functional as F
    from torchvision.utils import draw_bounding_boxes, make_grid

    from pkd.data.coco import CocoDetection

    dataset = CocoDetection(annotations, images)
    chosen = np.random.default_rng(seed).choice(len(dataset), size=min(count, len(dataset)), replace=False)
    white = torch.full((3, cell, cell), 255, dtype=torch.uint8)
    cells = []
    for index in sorted(int(i) for i in chosen):
        sample = dataset[index]
        if sample is None:
            cells.append(white)
            continue
        pixels, target = sample
        scale = cell / max(pixels.shape[-2:])
        size = [max(1, round(side * scale)) for side in pixels.shape[-2:]]
        picture = F.resize(pixels.as_subclass(torch.Tensor), size, antialias=True)
        labels = target["labels"].tolist()
        picture = draw_bounding_boxes(
            picture,
            target["boxes"].as_subclass(torch.Tensor) * scale,
            labels=[dataset.class_names[label] for label in labels],
            colors=[_PALETTE[(label - 1) % len(_PALETTE)] for label in labels],
            width=2,
            label_colors="white",
            fill_labels=True,
        )
        framed = white.clone()
        framed[:, : picture.shape[1], : picture.shape[2]] = picture
        cells.append(framed)
    columns = max(1, math.ceil(math.sqrt(len(cells))))
    montage = make_grid(cells or [white], nrow=columns, padding=0, pad_value=255)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    # PIL writes it: torchvision.io's encoders are deprecated since torchvision 0.29.
    F.to_pil_image(montage).save(out_png, format="PNG")
    return out_png
