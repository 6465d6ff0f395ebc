"""Tests of pkd.data.digit_images: one image's digits are visible, boxed tightly, and drawn from their split's pool."""

import numpy as np
import pytest

from pkd.data import digit_images
from pkd.data.digit_images import MIN_CONTRAST, MIN_VISIBLE, PHOTOS, SPLITS, digit_pools, load_photos, render_image

TINY = {"image_size": (64, 80), "digit_size": (12, 24)}  # as the tiny_digits fixture


def assert_tight_and_visible(objects):
    """Each box is tight around its digit's visible ink, and enough of each digit shows."""
    for digit in objects:
        x0, y0, x1, y1 = digit.box
        ink = digit.visible_ink
        rows, cols = np.nonzero(ink)
        assert ink.sum() >= MIN_VISIBLE * digit.ink_pixels > 0
        # Every visible ink pixel inside the box, and ink on each of its four edges.
        assert rows.min() == y0 and rows.max() == y1 - 1
        assert cols.min() == x0 and cols.max() == x1 - 1
        assert ink[y0, x0:x1].any() and ink[y1 - 1, x0:x1].any()
        assert ink[y0:y1, x0].any() and ink[y0:y1, x1 - 1].any()
    # A pixel is visible ink of one digit at most: the one pasted last over it.
    for first in range(len(objects)):
        for later in range(first + 1, len(objects)):
            assert not (objects[first].visible_ink & objects[later].visible_ink).any()


@pytest.mark.parametrize("split", SPLITS)
def test_boxes_are_tight_around_visible_ink(split):
    labels = digit_images._digits()[1]
    pool = set(digit_pools()[split].tolist())
    for index in range(6):
        pixels, objects = render_image(0, split, index, **TINY)
        assert pixels.dtype == np.uint8 and pixels.shape[2] == 3
        assert 64 <= min(pixels.shape[:2]) and max(pixels.shape[:2]) <= 80
        assert 1 <= len(objects) <= 6
        for digit in objects:
            assert digit.sample in pool and digit.label == labels[digit.sample]
        assert_tight_and_visible(objects)


def test_an_image_is_a_function_of_its_seed_split_and_index():
    first, first_objects = render_image(4, "val", 3, **TINY)
    again, again_objects = render_image(4, "val", 3, **TINY)
    other, _ = render_image(5, "val", 3, **TINY)
    assert np.array_equal(first, again) and [d.box for d in first_objects] == [d.box for d in again_objects]
    assert first.shape != other.shape or not np.array_equal(first, other)


def test_crowded_images_keep_every_digit_visible():
    # Large digits in small images: placements collide often, so the overlap rules are exercised.
    counts = []
    for index in range(40):
        pixels, objects = render_image(3, "train", index, image_size=(48, 64), digit_size=(16, 40), objects=(4, 8))
        assert pixels.shape[2] == 3 and 48 <= min(pixels.shape[:2]) and max(pixels.shape[:2]) <= 64
        assert_tight_and_visible(objects)
        counts.append(len(objects))
    assert max(counts) >= 4


def test_digit_samples_are_disjoint_across_splits():
    pools = digit_pools()
    assert sum(len(pool) for pool in pools.values()) == 1797
    assert len(np.unique(np.concatenate(list(pools.values())))) == 1797
    labels = digit_images._digits()[1]
    for split, pool in pools.items():
        assert set(labels[pool]) == set(range(10)), f"{split} lacks a class"
    assert len(pools["train"]) / 1797 == pytest.approx(0.7, abs=0.01)
    pools["train"][:] = -1
    assert (digit_pools()["train"] >= 0).all(), "callers get copies"


def test_every_photo_loads_as_rgb():
    photos = load_photos()
    assert [name for name, _ in photos] == list(PHOTOS)
    for name, photo in photos:
        assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3, name
        assert min(photo.shape[:2]) >= 64 and photo.std() > 5, name


def test_ink_colour_stands_out_from_any_background():
    rng = np.random.default_rng(0)
    luma = np.array([0.299, 0.587, 0.114])
    for background in np.linspace(0, 1, 41):
        for _ in range(5):
            colour = digit_images._ink_colour(rng, float(background))
            assert abs(colour @ luma - background) >= MIN_CONTRAST - 1e-6
