"""Shared test fixtures.

- ``tiny_digits`` (session): a tiny embedded digits dataset generated once per test session
  (12 train / 6 val / 6 test images, 64-80 px, digits 12-24 px high), a
  :class:`pkd.data.DigitsDataset` with the paths of each split. For tests that need real
  detection data fast (engine, CLI, data loaders). Treat it as read-only.
- ``coco_files`` (per test): a small hand-made COCO dataset in ``tmp_path``, clean, as a
  :class:`CocoFiles` (annotations path, images folder, and the parsed ``data`` dict). Its
  images cover the file formats the loader must handle, its category ids are not contiguous,
  and it has a crowd annotation and an image without annotations; see :func:`build_coco`.
  Tests break it on purpose by editing ``coco_files.data`` and calling
  ``coco_files.write()``.
"""

from __future__ import annotations

import os

# Under pytest-xdist (`make test`: two workers on two cores) each worker keeps to one thread, or
# the two would each start a thread per core and slow each other far more than twice.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pkd.data.digits import DigitsDataset, make_digits_dataset

#: Python source that makes every socket connection fail: put before a subprocess script that must
#: work offline (the family tests build, train and save detectors under it).
NO_NETWORK = """import socket
def refuse(*args, **kwargs):
    raise OSError("network disabled in this test")
socket.socket.connect = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
"""


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsDataset:
    """A tiny digits dataset, generated once per session."""
    return make_digits_dataset(
        tmp_path_factory.mktemp("tiny_digits") / "digits",
        seed=0,
        train_images=12,
        val_images=6,
        test_images=6,
        image_size=(64, 80),
        digit_size=(12, 24),
    )


@dataclass
class CocoFiles:
    """A COCO dataset on disk: ``annotations`` (JSON path), ``images`` (folder), ``data`` (parsed JSON)."""

    annotations: Path
    images: Path
    data: dict[str, Any] = field(default_factory=dict)

    def write(self) -> Path:
        """Writes ``data`` (after a test has edited it) to the annotation file."""
        self.annotations.write_text(json.dumps(self.data))
        return self.annotations


# The images of build_coco: id -> (file name, PIL mode, (width, height)).
COCO_IMAGES = {
    1: ("rgb.png", "RGB", (40, 30)),
    2: ("gray.png", "L", (32, 24)),
    3: ("rgba.png", "RGBA", (24, 32)),
    4: ("empty.jpg", "RGB", (20, 20)),
    5: ("palette.png", "P", (16, 16)),
}


def assert_png(path: Path, min_size=(300, 200), max_size=(4000, 3000)) -> None:
    """``path`` is a PNG that PIL opens, of a size between ``min_size`` and ``max_size`` (width, height)."""
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert min_size[0] <= width <= max_size[0] and min_size[1] <= height <= max_size[1]


def image_pixels(mode: str, size: tuple[int, int]) -> Image.Image:
    """A deterministic test picture of the given PIL mode and (width, height)."""
    width, height = size
    ramp = (np.arange(height)[:, None] * 7 + np.arange(width)[None, :] * 3) % 256
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "P": 1}[mode]
    pixels = np.stack([(ramp + 60 * c) % 256 for c in range(channels)], axis=-1).astype(np.uint8)
    if mode in ("L", "P"):
        image = Image.fromarray(pixels[:, :, 0])
        return image.convert("P") if mode == "P" else image
    return Image.fromarray(pixels)


def build_coco(root: Path) -> CocoFiles:
    """Writes a small, clean COCO dataset in ``root``.

    Images (see ``COCO_IMAGES``): 1 RGB 40x30 with three annotations (one a crowd region),
    2 grayscale, 3 RGBA, 4 a JPEG without annotations, 5 palette. Categories have ids 11, 3, 7
    (listed out of order) named "bird", "cat", "dog". Boxes are all inside their images.
    """
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    images = []
    for image_id, (file_name, mode, size) in COCO_IMAGES.items():
        image_pixels(mode, size).save(images_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": size[0], "height": size[1]})
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 8], "area": 80.0, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 11, "bbox": [20.5, 10, 15, 15], "area": 225.0, "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 7, "bbox": [0, 0, 40, 30], "area": 1200.0, "iscrowd": 1},
        {"id": 4, "image_id": 2, "category_id": 7, "bbox": [1, 2, 3, 4], "area": 12.0, "iscrowd": 0},
        {"id": 5, "image_id": 3, "category_id": 11, "bbox": [2, 3, 10, 10], "area": 100.0, "iscrowd": 0},
        {"id": 6, "image_id": 5, "category_id": 3, "bbox": [0, 0, 16, 16], "area": 256.0, "iscrowd": 0},
    ]
    categories = [{"id": 11, "name": "bird"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    files = CocoFiles(
        annotations=root / "annotations.json",
        images=images_dir,
        data={"images": images, "annotations": annotations, "categories": categories},
    )
    files.write()
    return files


@pytest.fixture
def coco_files(tmp_path: Path) -> CocoFiles:
    """A small clean COCO dataset in this test's ``tmp_path`` (see :func:`build_coco`)."""
    return build_coco(tmp_path / "coco")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped on machines without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
