"""COCO-format detection dataset for torchvision detectors.

:class:`CocoDetection` reads a COCO annotation file with pycocotools, drops what
:mod:`pkd.data.check` finds unusable (warning once with a summary), maps the file's category
ids to labels (by default contiguous ``1..K``; 0 is the background, as torchvision's detectors expect),
and returns ``(image, target)`` pairs whose boxes are ``tv_tensors.BoundingBoxes``, so that
``torchvision.transforms.v2`` moves them with the pixels.

An image that cannot be decoded when it is loaded does not stop training: ``__getitem__``
warns and returns None, and :func:`collate` drops it and counts it.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import box_convert

from pkd.data.check import clean_coco
from pkd.data.coco_records import Problem, load_coco_json

__all__ = ["CocoDetection", "Sample", "collate"]

Sample = tuple[tv_tensors.Image, dict[str, Any]]
Transforms = Callable[[tv_tensors.Image, dict[str, Any]], tuple[Any, dict[str, Any]]]

# How many ids a warning names before it only counts.
_NAMED_IDS = 5


def _name_ids(problems: Sequence[Problem], attribute: str) -> str:
    ids = [getattr(problem, attribute) for problem in problems]
    shown = ", ".join("?" if value is None else str(value) for value in ids[:_NAMED_IDS])
    return shown + (", ..." if len(ids) > _NAMED_IDS else "")


def _kinds(problems: Sequence[Problem]) -> str:
    kinds = sorted({problem.kind for problem in problems})
    return ", ".join(kinds)


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection dataset returning torchvision-style targets.

    Each sample is ``(image, target)``: ``image`` is a ``tv_tensors.Image`` of dtype uint8 and
    shape ``(3, H, W)`` in RGB (grayscale, RGBA, palette and CMYK files are converted), and
    ``target`` holds

    - ``boxes``: ``tv_tensors.BoundingBoxes`` ``(K, 4)`` float32 in XYXY pixels, clipped to the
      image, ``canvas_size=(H, W)``;
    - ``labels``: int64 ``(K,)`` labels in ``1..num_classes - 1``;
    - ``image_id``: the COCO image id (int);
    - ``area``: float32 ``(K,)``, the annotation's ``area`` (its mask area in COCO) in the
      pixels of the file, not updated by transforms: COCO evaluation reads it from the
      annotation file, training does not use it;
    - ``iscrowd``: int64 ``(K,)``, all zero: crowd regions are removed from training targets
      (they stay in :attr:`coco`, where COCO evaluation uses them as ignore regions).

    Then ``transforms(image, target)`` is applied if given (see :mod:`pkd.data.transforms`).

    Construction runs the checks of :func:`pkd.data.check.clean_coco`: an annotation with a
    non-positive box, a box entirely outside its image, an unknown category or image id, or a
    duplicate id is dropped; an image whose file is missing (when ``check_files``) is dropped
    with its annotations. One warning summarises each; :attr:`problems` lists every problem
    found. Boxes partly outside their image are clipped, not dropped.

    Args:
        annotations: Path of the COCO annotation JSON.
        images: Folder that the images' ``file_name`` are relative to.
        transforms: Called as ``transforms(image, target)`` on every sample; returns the pair.
        label_map: Category id -> label, e.g. from a saved run so that evaluation and export
            use the labels the model was trained with, or the labels pretrained weights predict
            (distinct, >= 1, gaps allowed). It must cover every category of the file. None
            numbers the file's categories ``1..K`` in order of their ids.
        drop_empty: Drop images without any non-crowd annotation (False keeps them: images
            with nothing to detect teach the detector what background looks like).
        check_files: Drop images whose file does not exist.

    Attributes:
        coco: The pycocotools index of the cleaned annotations (crowd regions included), the
            ground truth for ``COCOeval``.
        ids: Image ids in sample order (sorted).
        label_map: Category id -> label.
        label_to_category: Label -> category id, the inverse of ``label_map``, to write
            predictions back in the file's category ids.
        class_names: Label -> category name.
        problems: Every problem found in the annotation file.

    Example:
        >>> dataset = CocoDetection("annotations/val.json", "images/val")  # doctest: +SKIP
        >>> image, target = dataset[0]  # doctest: +SKIP
        >>> image.shape, target["boxes"].shape, target["labels"].shape  # doctest: +SKIP
        (torch.Size([3, 480, 640]), torch.Size([4, 4]), torch.Size([4]))
    """

    def __init__(
        self,
        annotations: str | os.PathLike,
        images: str | os.PathLike,
        *,
        transforms: Transforms | None = None,
        label_map: Mapping[int, int] | None = None,
        drop_empty: bool = False,
        check_files: bool = True,
    ) -> None:
        self.annotations_path = Path(annotations)
        self.images_dir = Path(images)
        self.transforms = transforms
        cleaned = clean_coco(load_coco_json(self.annotations_path), self.images_dir, check_files=check_files)
        self.problems: list[Problem] = cleaned.problems
        self._warn_dropped(cleaned.dropped_images, cleaned.dropped_annotations, cleaned.annotations_of_dropped_images)

        self.coco = COCO()
        self.coco.dataset = cleaned.data
        # createIndex prints progress lines that would interleave with the training log.
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()

        names = {category["id"]: category["name"] for category in cleaned.data["categories"]}
        self.label_map = self._resolve_label_map(label_map, sorted(names))
        self.label_to_category = {label: category_id for category_id, label in self.label_map.items()}
        self.class_names = {
            label: names.get(category_id, f"category {category_id}")
            for label, category_id in sorted(self.label_to_category.items())
        }

        ids = sorted(self.coco.imgs)
        if drop_empty:
            ids = [image_id for image_id in ids if self._training_annotations(image_id)]
        self.ids: list[int] = ids

    def _resolve_label_map(self, label_map: Mapping[int, int] | None, category_ids: list[int]) -> dict[int, int]:
        if label_map is None:
            return {category_id: label for label, category_id in enumerate(category_ids, start=1)}
        # Keys come back as strings from a JSON-saved run.
        resolved = {int(category_id): int(label) for category_id, label in label_map.items()}
        labels = sorted(resolved.values())
        # Gaps are fine: a model's own label space may have them (torchvision's COCO weights: 1..90).
        if len(set(labels)) != len(labels) or (labels and labels[0] < 1):
            raise ValueError(f"label_map must map category ids to distinct labels >= 1; got labels {labels}")
        uncovered = [category_id for category_id in category_ids if category_id not in resolved]
        if uncovered:
            raise ValueError(
                f"{self.annotations_path} has categories {uncovered} that label_map does not cover "
                f"(it maps category ids {sorted(resolved)}); the model was trained on other categories"
            )
        return resolved

    def _warn_dropped(self, images: list[Problem], annotations: list[Problem], with_images: int) -> None:
        if images:
            warnings.warn(
                f"{self.annotations_path}: dropped {len(images)} image(s) ({_kinds(images)}; image ids "
                f"{_name_ids(images, 'image_id')}) and their {with_images} annotation(s); "
                "run `pkd check-data` for the full list",
                stacklevel=3,
            )
        if annotations:
            warnings.warn(
                f"{self.annotations_path}: dropped {len(annotations)} annotation(s) ({_kinds(annotations)}; "
                f"annotation ids {_name_ids(annotations, 'annotation_id')}); run `pkd check-data` for the full list",
                stacklevel=3,
            )

    @property
    def num_classes(self) -> int:
        """Number of classes including the background, as torchvision's detectors count them."""
        return max(self.label_map.values(), default=0) + 1

    def _training_annotations(self, image_id: int) -> list[dict[str, Any]]:
        return [annotation for annotation in self.coco.imgToAnns[image_id] if not annotation.get("iscrowd", 0)]

    def __len__(self) -> int:
        return len(self.ids)

    def aspect_ratios(self) -> list[float]:
        """Width / height of every image in sample order, from the JSON (no image is decoded)."""
        return [self.coco.imgs[image_id]["width"] / self.coco.imgs[image_id]["height"] for image_id in self.ids]

    def _load_image(self, image_id: int) -> tv_tensors.Image | None:
        path = self.images_dir / self.coco.imgs[image_id]["file_name"]
        # PIL, not torchvision.io.decode_image: torchvision deprecates its decoders since 0.29,
        # and PIL also reads the BMP and TIFF files that some datasets hold.
        try:
            with Image.open(path) as file:
                pixels = np.asarray(file.convert("RGB"))
        # A corrupt or vanished file must not end a training run; PIL raises many types here
        # (OSError, SyntaxError, ValueError, DecompressionBombError, ...).
        except Exception as error:
            warnings.warn(f"skipping image {image_id} ({path}): cannot load it: {error}", stacklevel=3)
            return None
        return tv_tensors.Image(torch.from_numpy(pixels.copy()).permute(2, 0, 1))

    def _target(self, image_id: int, height: int, width: int) -> dict[str, Any]:
        annotations = self._training_annotations(image_id)
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes = box_convert(boxes, "xywh", "xyxy")
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        # Only an image whose file has another size than its record can turn a box empty here.
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        labels = torch.tensor([self.label_map[a["category_id"]] for a in annotations], dtype=torch.int64)
        area = torch.tensor([a["area"] for a in annotations], dtype=torch.float32)
        return {
            "boxes": tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=(height, width)),
            "labels": labels[keep],
            "image_id": image_id,
            "area": area[keep],
            "iscrowd": torch.zeros(int(keep.sum()), dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> Sample | None:
        """Loads sample ``index``.

        Returns:
            ``(image, target)`` as described in the class docstring (after ``transforms``), or
            None when the image file cannot be loaded (a warning names the image id and file).
        """
        image_id = self.ids[index]
        image = self._load_image(image_id)
        if image is None:
            return None
        height, width = image.shape[-2:]
        record = self.coco.imgs[image_id]
        if (record["width"], record["height"]) != (width, height):
            warnings.warn(
                f"image {image_id} ({record['file_name']}) is {width}x{height} but recorded as "
                f"{record['width']}x{record['height']}; its boxes are clipped to the file's size",
                stacklevel=2,
            )
        target = self._target(image_id, height, width)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate(batch: Sequence[Sample | None]) -> tuple[list[Tensor], list[dict[str, Any]], int]:
    """Collates detection samples into lists, dropping the ones that failed to load.

    Args:
        batch: Samples from :class:`CocoDetection`; None for an image that could not be loaded.

    Returns:
        ``(images, targets, skipped)``: the images (each ``(3, H, W)``, sizes may differ, as
        torchvision's detectors take them), their targets, and how many samples were None.
    """
    samples = [sample for sample in batch if sample is not None]
    images = [image for image, _ in samples]
    targets = [target for _, target in samples]
    return images, targets, len(batch) - len(samples)
