"""The embedded detection dataset: handwritten digits on real photographs, no download.

Built only from data that installed packages ship: the 1,797 handwritten digits of
``sklearn.datasets.load_digits`` (8x8, grey levels 0..16, ten classes) pasted onto random
crops of photographs from ``skimage.data`` and ``sklearn.datasets.load_sample_images``.
It is small enough to train and distil detectors on a CPU in minutes, and hard enough
(textured backgrounds, varied sizes, colours and contrast, partial overlaps) that a better
detector scores visibly better.

How an image is made (:func:`compose_digits_image`):

1. Background: a crop of a random photograph at a random zoom, resized to the image's size
   (width and height each drawn from ``image_size``), flipped half of the time.
2. Digits: 1 to 6 by default. Each is a digit sample upscaled bicubically to a glyph height
   drawn from ``digit_size`` (width 75-105 % of it) and turned into an alpha mask whose soft
   edge comes from the grey levels. The ink colour is random but differs in luminance from
   the background under the digit by at least :data:`MIN_CONTRAST`.
3. Overlaps stay partial: a digit is placed only if its ink box has IoU at most
   :data:`MAX_IOU` with every earlier one, covers at most half of a smaller one, and leaves
   at least :data:`MIN_VISIBLE` of every earlier digit's ink visible. Placement is retried a
   few times and the digit left out if it does not fit, so a crowded image can have fewer
   digits than drawn.
4. Box: the tight box of the digit's *visible ink*: the pixels where its alpha, after the
   digits pasted over it, is at least :data:`INK_THRESHOLD` (the pixel is closer to the ink
   colour than to the background).

The 1,797 digit samples are split once (fixed, stratified by class, independent of the
seed) into disjoint train/val/test pools, so test digits are never seen in training, with
any seed. Everything else derives from ``seed``: the same seed and parameters give
byte-identical PNG and JSON files (with the same library versions).

Example:
    >>> digits = make_digits_dataset("data/digits", train_images=100)  # doctest: +SKIP
    >>> digits.annotations["train"], digits.images["train"]  # doctest: +SKIP
    (PosixPath('data/digits/annotations/train.json'), PosixPath('data/digits/train'))
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from pkd.data.check import check_dataset, format_problems
from pkd.io import fsync_directory, remove_stale_temps, temp_path

__all__ = [
    "INK_THRESHOLD",
    "MAX_IOU",
    "MIN_CONTRAST",
    "MIN_VISIBLE",
    "PHOTOS",
    "SPLITS",
    "DigitObject",
    "DigitsDataset",
    "compose_digits_image",
    "digit_pools",
    "render_image",
    "load_photos",
    "make_digits_dataset",
    "preview",
]

SPLITS = ("train", "val", "test")
# Photographs that load without a download (skimage keeps these inside its wheel), and the
# two JPEGs shipped with scikit-learn.
PHOTOS = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "rocket",
    "text",
    "grass",
    "gravel",
    "brick",
    "colorwheel",
    "retina",
    "cell",
    "clock",
    "logo",
    "china",
    "flower",
)

INK_THRESHOLD = 0.5  # a pixel is ink where the digit's (visible) alpha is at least this
MIN_CONTRAST = 0.3  # least |luminance(ink) - mean luminance of the background under the ink|, in [0, 1]
MAX_IOU = 0.3  # largest IoU between the ink boxes of two digits of an image
MAX_COVER = 0.5  # largest fraction of a digit's ink box that another's may cover
MIN_VISIBLE = 0.6  # least fraction of a digit's ink that the digits pasted over it leave visible

# Bump when a change to the generator changes its output, so cached datasets are regenerated.
GENERATOR_VERSION = 1
# Seed of the split of the digit samples into pools; fixed so test digits stay unseen across seeds.
_POOL_SEED = 20220707
_POOL_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}
_PLACEMENT_ATTEMPTS = 30
_COLOUR_ATTEMPTS = 20
# Crops are taken at a zoom between these factors (output pixels per photo pixel).
_ZOOM_RANGE = (0.5, 2.0)
# zlib level of the PNGs: level 3 writes twice as fast as the default 6 and files 2 % larger.
_PNG_COMPRESSION = 3
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


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


@dataclass
class DigitObject:
    """One digit pasted into an image by :func:`compose_digits_image`.

    Attributes:
        label: The digit, 0..9.
        sample: Index of the sample in ``sklearn.datasets.load_digits()``.
        box: Tight box ``(x0, y0, x1, y1)`` of the visible ink, in pixels, ``x1``/``y1``
            exclusive (so the COCO box is ``[x0, y0, x1 - x0, y1 - y0]``).
        visible_ink: Bool ``(H, W)`` mask of the digit's visible ink pixels.
        ink_pixels: Number of ink pixels of the digit before others were pasted over it.
    """

    label: int
    sample: int
    box: tuple[int, int, int, int]
    visible_ink: np.ndarray
    ink_pixels: int


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """Any skimage/sklearn picture as uint8 ``(H, W, 3)``."""
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 4:
        # Transparent parts of the logo become white, as it looks on a page.
        alpha = image[:, :, 3:4].astype(np.float32) / 255
        image = np.round(image[:, :, :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(image[:, :, :3], dtype=np.uint8)


@functools.cache
def load_photos() -> tuple[tuple[str, np.ndarray], ...]:
    """The background photographs of :data:`PHOTOS` as ``(name, uint8 (H, W, 3))``, loaded once."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    sample_images = load_sample_images()
    shipped = {
        Path(name).stem: image for name, image in zip(sample_images.filenames, sample_images.images, strict=True)
    }
    photos = []
    for name in PHOTOS:
        image = shipped[name] if name in shipped else getattr(skimage.data, name)()
        photos.append((name, _as_rgb(np.asarray(image))))
    return tuple(photos)


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def digit_pools() -> dict[str, np.ndarray]:
    """Disjoint pools of digit sample indices for the splits, fixed and stratified by class.

    Returns:
        Split name -> sorted indices into ``sklearn.datasets.load_digits()`` (70 / 15 / 15 %).
    """
    return {split: pool.copy() for split, pool in _pools().items()}


@functools.cache
def _pools() -> dict[str, np.ndarray]:
    _, labels = _digits()
    rng = np.random.default_rng(_POOL_SEED)
    pools: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        train_end = round(len(members) * _POOL_FRACTIONS["train"])
        val_end = train_end + round(len(members) * _POOL_FRACTIONS["val"])
        pools["train"].append(members[:train_end])
        pools["val"].append(members[train_end:val_end])
        pools["test"].append(members[val_end:])
    return {split: np.sort(np.concatenate(parts)) for split, parts in pools.items()}


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random crop of a random photograph, float32 ``(height, width, 3)`` in [0, 1]."""
    photos = load_photos()
    _, photo = photos[rng.integers(len(photos))]
    photo_height, photo_width = photo.shape[:2]
    zoom = math.exp(rng.uniform(math.log(_ZOOM_RANGE[0]), math.log(_ZOOM_RANGE[1])))
    # Small photos (text, page) cannot give a large crop at a low zoom: zoom in further.
    zoom = max(zoom, height / photo_height, width / photo_width)
    crop_height, crop_width = min(photo_height, round(height / zoom)), min(photo_width, round(width / zoom))
    top = rng.integers(photo_height - crop_height + 1)
    left = rng.integers(photo_width - crop_width + 1)
    crop = Image.fromarray(photo[top : top + crop_height, left : left + crop_width])
    pixels = np.asarray(crop.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return np.ascontiguousarray(pixels)


def _digit_alpha(sample: np.ndarray, glyph_height: int, glyph_width: int) -> np.ndarray:
    """Alpha mask float32 of a digit sample upscaled so its 8x8 grid spans the glyph size.

    A blank margin of one grid cell on each side lets strokes that touch the 8x8 border fade
    out instead of ending in a cut; the result is ``(glyph_height * 10/8, glyph_width * 10/8)``.
    """
    padded = np.pad(sample, 1)
    height, width = round(glyph_height * 10 / 8), round(glyph_width * 10 / 8)
    upscaled = np.asarray(Image.fromarray(padded).resize((width, height), Image.Resampling.BICUBIC))
    # The 8x8 digits are blurred; a steeper ramp gives strokes with a soft but short edge.
    return np.clip((upscaled - 0.25) / 0.5, 0.0, 1.0)


def _ink_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _area(box: tuple[int, int, int, int]) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def _too_close(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """Whether two ink boxes overlap more than MAX_IOU allows, or one covers too much of the other."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return False
    intersection = width * height
    iou = intersection / (_area(a) + _area(b) - intersection)
    return iou > MAX_IOU or intersection > MAX_COVER * min(_area(a), _area(b))


def _ink_colour(rng: np.random.Generator, background_luma: float) -> np.ndarray:
    """A random RGB colour whose luminance differs from ``background_luma`` by MIN_CONTRAST or more."""
    for _ in range(_COLOUR_ATTEMPTS):
        colour = rng.random(3, dtype=np.float32)
        if abs(float(colour @ _LUMA) - background_luma) >= MIN_CONTRAST:
            return colour
    # Black or white, whichever is farther: always at least 0.5 away.
    return np.full(3, 0.0 if background_luma > 0.5 else 1.0, dtype=np.float32)


@dataclass
class _Placed:
    """A digit being composed: its sample, ink box, and alpha still visible under later digits."""

    sample: int
    ink_box: tuple[int, int, int, int]
    visible: np.ndarray  # float32 (H, W): alpha times the transparency of every digit pasted over it
    ink_pixels: int  # ink pixels of the digit alone
    visible_pixels: int  # pixels where `visible` is still ink


def compose_digits_image(
    rng: np.random.Generator,
    pool: np.ndarray,
    *,
    height: int,
    width: int,
    digit_size: tuple[int, int] = (12, 48),
    objects: tuple[int, int] = (1, 6),
) -> tuple[np.ndarray, list[DigitObject]]:
    """Composes one image: digits from ``pool`` pasted on a photograph crop.

    Args:
        rng: Source of every random choice (the image is a function of its state).
        pool: Indices into ``load_digits()`` to draw the digits from.
        height: Image height in pixels.
        width: Image width in pixels.
        digit_size: Range (inclusive) of glyph heights in pixels.
        objects: Range (inclusive) of the number of digits to try to place.

    Returns:
        ``(image, objects)``: uint8 ``(height, width, 3)`` RGB and the digits that were placed,
        in pasting order, each with its visible ink mask and the tight box around it.
    """
    samples, labels = _digits()
    canvas = _background(rng, height, width)
    placed: list[_Placed] = []
    for _ in range(rng.integers(objects[0], objects[1] + 1)):
        for _ in range(_PLACEMENT_ATTEMPTS):
            sample = int(pool[rng.integers(len(pool))])
            glyph_height = int(rng.integers(digit_size[0], digit_size[1] + 1))
            glyph_width = max(1, round(glyph_height * rng.uniform(0.75, 1.05)))
            patch = _digit_alpha(samples[sample], glyph_height, glyph_width)
            # Keep the soft edge but not the blank margin around it.
            extent, ink = _ink_box(patch > 0), _ink_box(patch >= INK_THRESHOLD)
            if ink is None:
                continue
            patch = patch[extent[1] : extent[3], extent[0] : extent[2]]
            if patch.shape[0] > height or patch.shape[1] > width:
                continue
            top = int(rng.integers(height - patch.shape[0] + 1))
            left = int(rng.integers(width - patch.shape[1] + 1))
            dx, dy = left - extent[0], top - extent[1]
            box = (ink[0] + dx, ink[1] + dy, ink[2] + dx, ink[3] + dy)
            if any(_too_close(box, other.ink_box) for other in placed):
                continue
            # Everything the new digit changes lies in its window: work there only.
            window = (slice(top, top + patch.shape[0]), slice(left, left + patch.shape[1]))
            covered = [other.visible[window] * (1 - patch) for other in placed]
            still_visible = [
                other.visible_pixels
                - np.count_nonzero(other.visible[window] >= INK_THRESHOLD)
                + np.count_nonzero(after >= INK_THRESHOLD)
                for other, after in zip(placed, covered, strict=True)
            ]
            if any(count < MIN_VISIBLE * other.ink_pixels for count, other in zip(still_visible, placed, strict=True)):
                continue
            ink_mask = patch >= INK_THRESHOLD
            colour = _ink_colour(rng, float((canvas[window][ink_mask] @ _LUMA).mean()))
            canvas[window] = canvas[window] * (1 - patch[:, :, None]) + colour * patch[:, :, None]
            for other, after, count in zip(placed, covered, still_visible, strict=True):
                other.visible[window] = after
                other.visible_pixels = count
            visible = np.zeros((height, width), dtype=np.float32)
            visible[window] = patch
            ink_pixels = int(np.count_nonzero(ink_mask))
            placed.append(_Placed(sample, box, visible, ink_pixels, ink_pixels))
            break
    image = np.clip(np.round(canvas * 255), 0, 255).astype(np.uint8)
    results = []
    for digit in placed:
        visible_ink = digit.visible >= INK_THRESHOLD
        box = _ink_box(visible_ink)
        results.append(DigitObject(int(labels[digit.sample]), digit.sample, box, visible_ink, digit.ink_pixels))
    return image, results


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # One generator per image: an image does not depend on the draws made for the others.
    return np.random.default_rng([seed, SPLITS.index(split), index])


def render_image(
    seed: int,
    split: str,
    index: int,
    *,
    image_size: tuple[int, int] = (128, 192),
    digit_size: tuple[int, int] = (12, 48),
    objects: tuple[int, int] = (1, 6),
) -> tuple[np.ndarray, list[DigitObject]]:
    """Image ``index`` (0-based) of ``split`` exactly as :func:`make_digits_dataset` writes it.

    Each image has its own random generator, so any image can be regenerated alone, with the
    visible ink mask of every digit (which the files do not keep).

    Args:
        seed: The dataset's seed.
        split: ``"train"``, ``"val"`` or ``"test"``.
        index: Position of the image in the split (its image id minus one).
        image_size: Range (inclusive) that the image's height and width are drawn from.
        digit_size: Range (inclusive) of glyph heights in pixels.
        objects: Range (inclusive) of the number of digits to try to place.

    Returns:
        ``(image, objects)`` as from :func:`compose_digits_image`.
    """
    rng = _image_rng(seed, split, index)
    height = int(rng.integers(image_size[0], image_size[1] + 1))
    width = int(rng.integers(image_size[0], image_size[1] + 1))
    return compose_digits_image(
        rng, _pools()[split], height=height, width=width, digit_size=digit_size, objects=objects
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
        for digit in objects:
            x0, y0, x1, y1 = digit.box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": digit.label + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
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

    Works for any COCO-format dataset, not only the digits.

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
    from pkd.data.coco import CocoDetection

    dataset = CocoDetection(annotations, images)
    chosen = np.random.default_rng(seed).choice(len(dataset), size=min(count, len(dataset)), replace=False)
    columns = max(1, math.ceil(math.sqrt(len(chosen))))
    rows = max(1, math.ceil(len(chosen) / columns))
    montage = Image.new("RGB", (columns * cell, rows * cell), (255, 255, 255))
    font = ImageFont.load_default()
    for position, index in enumerate(sorted(int(i) for i in chosen)):
        sample = dataset[index]
        if sample is None:
            continue
        pixels, target = sample
        picture = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        scale = cell / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))))
        draw = ImageDraw.Draw(picture)
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
            colour = _PALETTE[(label - 1) % len(_PALETTE)]
            x0, y0, x1, y1 = (value * scale for value in box)
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=2)
            name = dataset.class_names[label]
            text_box = draw.textbbox((x0, y0), name, font=font)
            draw.rectangle(text_box, fill=colour)
            draw.text((x0, y0), name, fill=(255, 255, 255), font=font)
        montage.paste(picture, ((position % columns) * cell, (position // columns) * cell))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    montage.save(out_png, format="PNG")
    return out_png
