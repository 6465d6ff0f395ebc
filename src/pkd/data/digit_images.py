"""One image of the embedded digits dataset: handwritten digits pasted on a photograph.

The digits are the 1,797 samples of ``sklearn.datasets.load_digits`` (8x8, grey levels
0..16, ten classes); the backgrounds are crops of the photographs that ``skimage.data`` and
``sklearn.datasets.load_sample_images`` ship (:data:`PHOTOS`), so nothing is downloaded.
:mod:`pkd.data.digits` writes many such images to disk as a COCO dataset.

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
seed) into disjoint train/val/test pools (:func:`digit_pools`), so test digits are never
seen in training, with any seed. Every other choice comes from one random generator per
image (:func:`render_image`), so any image can be regenerated alone.

Example:
    >>> image, objects = render_image(seed=0, split="train", index=0)
    >>> image.shape[2], image.dtype, 1 <= len(objects) <= 6
    (3, dtype('uint8'), True)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "GENERATOR_VERSION",
    "INK_THRESHOLD",
    "MAX_COVER",
    "MAX_IOU",
    "MIN_CONTRAST",
    "MIN_VISIBLE",
    "PHOTOS",
    "SPLITS",
    "DigitObject",
    "compose_digits_image",
    "digit_pools",
    "load_photos",
    "render_image",
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

# Bump when a change to this module changes its output, so cached datasets are regenerated.
GENERATOR_VERSION = 1
# Seed of the split of the digit samples into pools; fixed so test digits stay unseen across seeds.
_POOL_SEED = 20220707
_POOL_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}
_PLACEMENT_ATTEMPTS = 30
_COLOUR_ATTEMPTS = 20
# Crops are taken at a zoom between these factors (output pixels per photo pixel).
_ZOOM_RANGE = (0.5, 2.0)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


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
    # Integer sums rather than torchvision.ops.box_iou: this runs for each placement attempt on
    # a handful of boxes, where building tensors would cost more than the arithmetic.
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
