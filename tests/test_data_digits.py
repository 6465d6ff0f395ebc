"""Tests of pkd.data.digits: the dataset on disk is valid COCO, matches the renderer, is deterministic and cached."""

import json

import numpy as np
import pytest
from PIL import Image

from pkd.data import check_dataset, make_digits_dataset, preview
from pkd.data import digits as digits_module
from pkd.data.check import Problem
from pkd.data.digit_images import SPLITS, digit_pools, render_image
from pkd.data.digits import DigitsDataset

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
def test_files_match_the_renderer(tiny_digits, split):
    coco = read_json(tiny_digits.annotations[split])
    for image in coco["images"]:
        pixels, objects = render_image(0, split, image["id"] - 1, **TINY)
        with Image.open(tiny_digits.images[split] / image["file_name"]) as file:
            assert np.array_equal(np.asarray(file), pixels)
        annotations = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert len(annotations) == len(objects)
        for annotation, digit in zip(annotations, objects, strict=True):
            x0, y0, x1, y1 = digit.box
            assert annotation["bbox"] == [x0, y0, x1 - x0, y1 - y0]
            assert annotation["category_id"] == digit.label + 1
            assert annotation["digit_sample"] == digit.sample


def test_each_split_uses_only_its_own_digit_samples(tiny_digits):
    pools = digit_pools()
    for split in SPLITS:
        used = {a["digit_sample"] for a in read_json(tiny_digits.annotations[split])["annotations"]}
        assert used and used <= set(pools[split].tolist())


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
    # Boxes are outlined in their class colour, the fifth cell (of a 3x2 grid) left white.
    palette = np.array(digits_module._PALETTE)
    assert (pixels[:, :, None, :] == palette).all(axis=-1).any(axis=-1).sum() > 100
    assert (pixels[256:, 512:] == 255).all()


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
