"""A COCO dataset written in the YOLO format, for Ultralytics' own trainer.

Ultralytics trains from a ``data.yaml`` that names image folders; each image ``.../images/S/x.jpg``
has its boxes in ``.../labels/S/x.txt``, one ``class cx cy w h`` line per box, class 0-based and
coordinates divided by the image's width and height. :func:`write_yolo_dataset` writes that
layout next to nothing else: the images are linked, not copied, so the COCO dataset stays the one
source of truth. Classes are the COCO categories in order of their ids, named as in the JSON:
the order in which pkd numbers them (label ``i + 1`` is YOLO class ``i``), and the names by which
``pkd eval`` matches an Ultralytics file's classes to a split's categories.

Example::

    data_yaml = write_yolo_dataset({"train": (ann, images), "val": (val_ann, val_images)}, "yolo_data")
    ultralytics.YOLO("yolo11n.yaml").train(data=str(data_yaml), epochs=10)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import yaml
from torchvision.ops import box_convert

from pkd.data.coco_records import load_coco_json
from pkd.io import atomic_write_text

__all__ = ["write_yolo_dataset"]


def _link(source: Path, target: Path) -> None:
    """``target`` -> ``source`` (a copy where the filesystem has no symbolic links)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    try:
        target.symlink_to(source.resolve())
    except OSError:
        shutil.copy2(source, target)


def _label_lines(annotations: list[dict], width: float, height: float, class_of: dict[int, int]) -> list[str]:
    """``class cx cy w h`` lines (normalised to the image) of one image's non-crowd boxes."""
    kept = [a for a in annotations if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0]
    if not kept:
        return []
    boxes = box_convert(torch.tensor([a["bbox"] for a in kept], dtype=torch.float64), "xywh", "cxcywh")
    boxes = (boxes / torch.tensor([width, height, width, height], dtype=torch.float64)).clamp(0, 1)
    return [
        f"{class_of[a['category_id']]} " + " ".join(f"{v:.6f}" for v in box.tolist())
        for a, box in zip(kept, boxes, strict=True)
    ]


def write_yolo_dataset(splits: dict[str, tuple[str | os.PathLike, str | os.PathLike]], out: str | os.PathLike) -> Path:
    """Writes COCO splits in the YOLO layout and returns the ``data.yaml`` Ultralytics trains from.

    Args:
        splits: Split name (``train``, ``val``, ``test``) -> ``(annotations JSON, images folder)``.
            ``train`` and ``val`` are required by Ultralytics' trainer; every split must have the
            same categories.
        out: Folder to write ``images/<split>/`` (links), ``labels/<split>/`` and ``data.yaml`` in.

    Returns:
        The path of ``data.yaml``.

    Raises:
        ValueError: A split is missing, the splits' categories differ, or an annotation names a
            category or image that the file does not define.
    """
    missing = [name for name in ("train", "val") if name not in splits]
    if missing:
        raise ValueError(f"a YOLO dataset needs train and val splits; missing: {', '.join(missing)}")
    out = Path(out)
    categories: dict[int, str] | None = None
    for split, (annotation_file, images) in splits.items():
        data = load_coco_json(annotation_file)
        found = {int(c["id"]): str(c["name"]) for c in data.get("categories", [])}
        if categories is None:
            categories = found
        elif found != categories:
            raise ValueError(f"split {split!r} has other categories than the first split: {found} vs {categories}")
        class_of = {category: index for index, category in enumerate(sorted(found))}
        by_image: dict[int, list[dict]] = {int(image["id"]): [] for image in data.get("images", [])}
        for annotation in data.get("annotations", []):
            if annotation["image_id"] not in by_image or annotation["category_id"] not in class_of:
                raise ValueError(
                    f"{annotation_file}: annotation {annotation.get('id')} names an undefined image or category"
                )
            by_image[annotation["image_id"]].append(annotation)
        # Leftovers of an earlier write (another dataset in the same folder) would be trained on.
        for kind in ("images", "labels"):
            shutil.rmtree(out / kind / split, ignore_errors=True)
        for image in data.get("images", []):
            name = Path(image["file_name"])
            _link(Path(images) / name, out / "images" / split / name)
            lines = _label_lines(by_image[int(image["id"])], image["width"], image["height"], class_of)
            label = (out / "labels" / split / name).with_suffix(".txt")
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("".join(line + "\n" for line in lines))
    names = {index: categories[category] for index, category in enumerate(sorted(categories or {}))}
    description = {"path": str(out.resolve()), **{split: f"images/{split}" for split in splits}, "names": names}
    data_yaml = out / "data.yaml"
    atomic_write_text(data_yaml, yaml.safe_dump(description, sort_keys=False))
    return data_yaml
