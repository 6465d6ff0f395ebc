"""COCO box mAP of a detector with pycocotools: ``evaluate`` over a loader, ``coco_metrics`` of results.

Each process of a DDP run predicts its shard of the split; the predictions are gathered on rank
0, which alone computes the metrics.
"""

from __future__ import annotations

import contextlib
import io

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from tqdm.auto import tqdm

from pkd.dist import gather_to_main

__all__ = ["COCO_METRICS", "coco_metrics", "evaluate"]

#: The 12 numbers of pycocotools' COCOeval.summarize(), in its order (-1: no such objects).
COCO_METRICS = (
    "mAP",
    "AP50",
    "AP75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)


def coco_metrics(coco_gt: COCO, detections: list[dict], image_ids: list[int]) -> dict[str, float]:
    """pycocotools' 12 box metrics of ``detections`` (COCO result dicts) on ``image_ids``.

    Returns:
        ``{name: value}`` for the names of :data:`COCO_METRICS`; all 0 without detections.
    """
    if not detections:
        return dict.fromkeys(COCO_METRICS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the table
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(COCO_METRICS, evaluator.stats, strict=True)}


@torch.no_grad()
def evaluate(model: nn.Module, data_loader, device: torch.device, *, progress: bool = False) -> dict[str, float] | None:
    """COCO box mAP of a detector on a :class:`~pkd.data.CocoDetection` loader.

    Each process predicts its shard; predictions are gathered on rank 0, which returns the
    metrics (other ranks return None).

    Args:
        model: detector (or distiller), put in eval mode here and left in eval mode.
        data_loader: evaluation loader whose ``dataset`` is a ``CocoDetection``.
        device: where the model is.
        progress: show a progress bar.

    Returns:
        ``{metric: value}`` (:data:`COCO_METRICS`) on rank 0.
    """
    model.eval()
    dataset = data_loader.dataset
    detections = []
    for images, targets, _ in tqdm(data_loader, desc="eval", leave=False, disable=not progress):
        outputs = model([image.to(device) for image in images])
        for target, output in zip(targets, outputs, strict=True):
            boxes = output["boxes"].float().cpu()
            boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
            scores, labels = output["scores"].tolist(), output["labels"].tolist()
            for box, score, label in zip(boxes.tolist(), scores, labels, strict=True):
                if int(label) not in dataset.label_to_category:
                    continue  # a class this split does not have (pretrained weights predict more)
                detections.append(
                    {
                        "image_id": int(target["image_id"]),
                        "category_id": dataset.label_to_category[int(label)],
                        "bbox": [round(x, 2) for x in box],
                        "score": round(float(score), 5),
                    }
                )
    gathered = gather_to_main(detections)
    if gathered is None:
        return None
    return coco_metrics(dataset.coco, [d for part in gathered for d in part], dataset.ids)
