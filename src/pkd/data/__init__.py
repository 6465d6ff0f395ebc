"""Data for detector training: COCO-format datasets, their checks, transforms, batching, and
the embedded digits dataset.

- :class:`CocoDetection` and :func:`collate` (``coco.py``): samples with
  ``tv_tensors`` boxes and contiguous labels; unloadable images are skipped and counted.
- :func:`train_transforms`, :func:`eval_transforms` (``transforms.py``).
- :func:`build_loader`, :class:`GroupedBatchSampler`, :func:`group_by_aspect_ratio`,
  :func:`set_epoch` (``sampler.py``): aspect-ratio grouped batches, DDP sharding.
- :func:`check_dataset`, :func:`format_problems`, :class:`Problem` (``check.py``).
- :func:`make_digits_dataset`, :func:`preview` (``digits.py``): handwritten digits on
  photographs, generated from data that scikit-learn and scikit-image ship; one image is
  rendered by ``digit_images.py``.
- :func:`write_yolo_dataset` (``yolo_format.py``): COCO splits in the layout Ultralytics'
  trainer reads (images linked, not copied).
"""

from pkd.data.check import Problem, check_data_main, check_dataset, format_problems
from pkd.data.coco import CocoDetection, collate
from pkd.data.digits import DigitsDataset, make_digits_dataset, preview
from pkd.data.sampler import GroupedBatchSampler, ShardSampler, build_loader, group_by_aspect_ratio, set_epoch
from pkd.data.transforms import eval_transforms, train_transforms
from pkd.data.yolo_format import write_yolo_dataset

__all__ = [
    "CocoDetection",
    "DigitsDataset",
    "GroupedBatchSampler",
    "Problem",
    "ShardSampler",
    "build_loader",
    "check_data_main",
    "check_dataset",
    "collate",
    "eval_transforms",
    "format_problems",
    "group_by_aspect_ratio",
    "make_digits_dataset",
    "preview",
    "set_epoch",
    "train_transforms",
    "write_yolo_dataset",
]
