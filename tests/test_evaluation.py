"""Tests of pkd.evaluation: pycocotools' metrics, and evaluate over a loader."""

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from pkd.evaluation import COCO_METRICS, coco_metrics, evaluate


def perfect_detections(coco, image_ids):
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in coco.loadAnns(coco.getAnnIds(imgIds=image_ids))
    ]


def test_coco_metrics_match_pycocotools(tiny_digits):
    coco = COCO(str(tiny_digits.annotations["val"]))
    ids = sorted(coco.getImgIds())
    assert coco_metrics(coco, perfect_detections(coco, ids), ids)["mAP"] == pytest.approx(1.0)
    # Hand-made predictions: shifted boxes, one wrong class, one missing, and a false positive.
    detections = perfect_detections(coco, ids)
    for k, d in enumerate(detections):
        d["bbox"] = [d["bbox"][0] + k % 3, d["bbox"][1], d["bbox"][2], d["bbox"][3] - k % 2]
        d["score"] = 1.0 - 0.01 * k
    detections[0]["category_id"] = 1 + detections[0]["category_id"] % 10
    del detections[1]
    detections.append({"image_id": ids[0], "category_id": 3, "bbox": [0, 0, 10, 10], "score": 0.99})
    ours = coco_metrics(coco, detections, ids)
    evaluator = COCOeval(coco, coco.loadRes(detections), iouType="bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert [ours[name] for name in COCO_METRICS] == pytest.approx(list(evaluator.stats))
    assert 0 < ours["mAP"] < 1
    assert coco_metrics(coco, [], ids) == dict.fromkeys(COCO_METRICS, 0.0)


class GroundTruth(nn.Module):
    """A 'detector' that returns the annotations of the images it is shown, in loader order."""

    def __init__(self, dataset):
        super().__init__()
        self.dataset = dataset
        self.position = 0

    def forward(self, images):
        outputs = []
        for _ in images:
            _, target = self.dataset[self.position]
            self.position += 1
            outputs.append(
                {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(len(target["labels"]))}
            )
        return outputs


def test_evaluate_gives_one_for_perfect_predictions(tiny_digits):
    from pkd.data import CocoDetection, build_loader, eval_transforms

    dataset = CocoDetection(tiny_digits.annotations["val"], tiny_digits.images["val"], transforms=eval_transforms())
    loader = build_loader(dataset, batch_size=4, train=False, workers=0, distributed=False, seed=0)
    metrics = evaluate(GroundTruth(dataset), loader, torch.device("cpu"))
    assert metrics["mAP"] == pytest.approx(1.0) and metrics["AR100"] == pytest.approx(1.0)


class MoreClasses(GroundTruth):
    """Ground truth plus a confident box of a class the split does not have (a COCO model on a subset)."""

    def forward(self, images):
        outputs = super().forward(images)
        for output in outputs:
            output["boxes"] = torch.cat([output["boxes"], torch.tensor([[0.0, 0.0, 20.0, 20.0]])])
            output["labels"] = torch.cat([output["labels"], torch.tensor([99])])
            output["scores"] = torch.cat([output["scores"], torch.ones(1)])
        return outputs


def test_evaluate_leaves_out_classes_the_split_does_not_have(tiny_digits):
    from pkd.data import CocoDetection, build_loader, eval_transforms

    dataset = CocoDetection(tiny_digits.annotations["val"], tiny_digits.images["val"], transforms=eval_transforms())
    loader = build_loader(dataset, batch_size=4, train=False, workers=0, distributed=False, seed=0)
    metrics = evaluate(MoreClasses(dataset), loader, torch.device("cpu"))
    assert metrics["mAP"] == pytest.approx(1.0)
