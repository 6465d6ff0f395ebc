"""Tests of pkd.data.digits: the embedded dataset is valid, tight, deterministic, and cached."""

import json

import numpy as np
import pytest
from PIL import Image

from pkd.data import check_dataset, make_digits_dataset, preview
from pkd.data import digits as digits_module
from pkd.data.check import Problem
from pkd.data.digits import (
    MIN_CONTRAST,
    MIN_VISIBLE,
    PHOTOS,
    SPLITS,
    DigitsDataset,
    digit_pools,
    load_photos,
    render_image,
)

TINY = {"image_size": (64, 80), "digit_size": (12, 24)}  # as the tiny_digits fixture
SMALL = {"train_images": 3, "val_images": 2, "test_images": 2, "image_size": (40, 56), "digit_size": (10, 16)}


def read_json(path):
    return json.loads(path.read_text())


def all_files(root):
    return {path.relative_to(root): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_tiny_dataset_is_valid_coco(tiny_digits):
    assert tiny_digits == DigitsDataset.at(tiny_digits.root)
    meta = read_json(tiny_digits.meta)
    assert meta["params"]["train_images"] == 12 and meta["params"]["image_size"] == [64, 80]
    for split, count in zip(SPLITS, (12, 6, 6), strict=True):
        assert check_dataset(tiny_digits.annotations[split], tiny_digits.images[split]) == []
        coco = read_json(tiny_digits.annotations[split])
        assert coco["categories"] == [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]
        assert len(coco["images"]) == count
        for image in coco["images"]:
            assert 64 <= image["width"] <= 80 and 64 <= image["height"] <= 80
            with Image.open(tiny_digits.images[split] / image["file_name"]) as file:
                assert file.size == (image["width"], image["height"]) and file.mode == "RGB"
            objects = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
            assert 1 <= len(objects) <= 6
        for annotation in coco["annotations"]:
            assert annotation["iscrowd"] == 0
            assert annotation["area"] == annotation["bbox"][2] * annotation["bbox"][3]


@pytest.mark.parametrize("split", SPLITS)
def test_files_match_the_renderer_and_boxes_are_tight_around_visible_ink(tiny_digits, split):
    coco = read_json(tiny_digits.annotations[split])
    labels = digits_module._digits()[1]
    for image in coco["images"]:
        pixels, objects = render_image(0, split, image["id"] - 1, **TINY)
        with Image.open(tiny_digits.images[split] / image["file_name"]) as file:
            assert np.array_equal(np.asarray(file), pixels)
        annotations = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert len(annotations) == len(objects)
        for annotation, digit in zip(annotations, objects, strict=True):
            x0, y0, x1, y1 = digit.box
            assert annotation["bbox"] == [x0, y0, x1 - x0, y1 - y0]
            assert annotation["category_id"] == digit.label + 1 == labels[annotation["digit_sample"]] + 1
        assert_tight_and_visible(objects)


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


def test_crowded_images_keep_every_digit_visible():
    # Large digits in small images: placements collide often, so the overlap rules are exercised.
    counts = []
    for index in range(40):
        pixels, objects = render_image(3, "train", index, image_size=(48, 64), digit_size=(16, 40), objects=(4, 8))
        assert pixels.shape[2] == 3 and 48 <= min(pixels.shape[:2]) and max(pixels.shape[:2]) <= 64
        assert_tight_and_visible(objects)
        counts.append(len(objects))
    assert max(counts) >= 4


def test_digit_samples_are_disjoint_across_splits(tiny_digits):
    pools = digit_pools()
    assert sum(len(pool) for pool in pools.values()) == 1797
    assert len(np.unique(np.concatenate(list(pools.values())))) == 1797
    labels = digits_module._digits()[1]
    for split, pool in pools.items():
        assert set(labels[pool]) == set(range(10)), f"{split} lacks a class"
        used = {a["digit_sample"] for a in read_json(tiny_digits.annotations[split])["annotations"]}
        assert used <= set(pool.tolist())
    assert len(pools["train"]) / 1797 == pytest.approx(0.7, abs=0.01)
    pools["train"][:] = -1
    assert (digit_pools()["train"] >= 0).all(), "callers get copies"


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    first = make_digits_dataset(tmp_path / "a", seed=5, **SMALL)
    second = make_digits_dataset(tmp_path / "b", seed=5, **SMALL)
    third = make_digits_dataset(tmp_path / "c", seed=6, **SMALL)
    files = all_files(first.root)
    assert len(files) == 3 + 1 + 7  # annotation files, meta, images
    assert files == all_files(second.root)
    other = all_files(third.root)
    assert files.keys() == other.keys()
    for name, data in files.items():
        if name.suffix == ".png" or name.parent.name == "annotations":
            assert data != other[name], name


def test_second_call_reuses_the_cache(tmp_path, monkeypatch):
    dataset = make_digits_dataset(tmp_path / "d", **SMALL)
    before = all_files(dataset.root)

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached dataset must be reused")

    monkeypatch.setattr(digits_module, "_generate", no_generation)
    assert make_digits_dataset(tmp_path / "d", **SMALL) == dataset
    assert all_files(dataset.root) == before


def test_other_parameters_need_overwrite(tmp_path):
    dataset = make_digits_dataset(tmp_path / "d", **SMALL)
    changed = {**SMALL, "train_images": 4}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_digits_dataset(tmp_path / "d", **changed)
    assert read_json(dataset.meta)["params"]["train_images"] == 3
    make_digits_dataset(tmp_path / "d", overwrite=True, **changed)
    assert read_json(dataset.meta)["params"]["train_images"] == 4
    assert len(list(dataset.images["train"].iterdir())) == 4
    assert sorted(path.name for path in tmp_path.iterdir()) == ["d"], "no temporary folder left behind"


def test_a_folder_that_is_not_a_dataset_is_never_touched(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not a pkd digits dataset"):
            make_digits_dataset(folder, overwrite=overwrite, **SMALL)
    assert (folder / "thesis.tex").read_text() == "precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert make_digits_dataset(empty, **SMALL).annotations["train"].is_file()


def test_interrupted_generation_leaves_no_dataset(tmp_path, monkeypatch):
    real_render = digits_module.render_image

    def interrupted(seed, split, index, **kwargs):
        if split == "val":
            raise KeyboardInterrupt
        return real_render(seed, split, index, **kwargs)

    monkeypatch.setattr(digits_module, "render_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_digits_dataset(tmp_path / "d", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_a_dataset_failing_its_check_is_not_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(digits_module, "check_dataset", lambda *args: [Problem("degenerate_box", "made up")])
    with pytest.raises(RuntimeError, match="generated train split has problems"):
        make_digits_dataset(tmp_path / "d", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_a_copy_finished_by_another_process_is_kept(tmp_path):
    wanted = {"generator": "pkd.data.digits", "version": 1, "params": {"seed": 0}}
    root, partial = tmp_path / "d", tmp_path / ".d.partial"
    for folder, marker in ((root, "theirs"), (partial, "ours")):
        folder.mkdir()
        (folder / "meta.json").write_text(json.dumps(wanted))
        (folder / "marker").write_text(marker)
    digits_module._move_into_place(partial, root, wanted)
    assert (root / "marker").read_text() == "theirs"


def test_preview_writes_a_montage(tiny_digits, tmp_path):
    out = preview(tiny_digits.annotations["val"], tiny_digits.images["val"], tmp_path / "p" / "val.png", count=5)
    assert out.stat().st_size > 0
    with Image.open(out) as montage:
        assert montage.size == (3 * 256, 2 * 256)
        pixels = np.asarray(montage)
    assert pixels.std() > 10


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
            colour = digits_module._ink_colour(rng, float(background))
            assert abs(colour @ luma - background) >= MIN_CONTRAST - 1e-6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": (80, 64)}, "image_size"),
        ({"digit_size": (0, 10)}, "digit_size"),
        ({"objects": (3, 2)}, "objects"),
        ({"digit_size": (70, 80), "image_size": (64, 80)}, "must start no higher"),
        ({"val_images": -1}, "non-negative"),
    ],
)
def test_bad_parameters(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_digits_dataset(tmp_path / "d", **kwargs)
