"""A detector family outside pkd, in a few lines: the proof that a family is a plug-in.

``register()`` adds it to :data:`pkd.families.FAMILIES`; ``build_detector("toy_net", ...)``
then builds it, and the distiller, the engine and export ask it nothing but its spec.
"""

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from pkd.detector import DetectorSpec, Family, Level
from pkd.families import FAMILIES


class ToyDetector(nn.Module):
    """Two strided convs (strides 8 and 16) and a one-box-per-image head."""

    def __init__(self, num_classes, min_size, max_size):
        super().__init__()
        self.transform = GeneralizedRCNNTransform(min_size, max_size, [0.5] * 3, [0.25] * 3, size_divisible=16)
        self.backbone = nn.ModuleDict({"p3": nn.Conv2d(3, 8, 8, stride=8), "p4": nn.Conv2d(8, 8, 2, stride=2)})
        self.backbone.forward = self._features
        self.head = nn.Linear(8, 4 + num_classes)

    def _features(self, batch):
        p3 = self.backbone["p3"](batch)
        return OrderedDict(p3=p3, p4=self.backbone["p4"](p3))

    def forward(self, images, targets=None):
        batch, targets = self.transform(images, targets)
        output = self.head(self.backbone(batch.tensors)["p4"].mean((2, 3)))
        if self.training:
            boxes = torch.stack([t["boxes"][0] for t in targets])
            return {"loss_box": nn.functional.l1_loss(output[:, :4], boxes)}
        return [
            {"boxes": o[None, :4], "scores": o[4:].softmax(0).amax()[None], "labels": o[4:].argmax()[None]}
            for o in output
        ]


class ToyFamily(Family):
    name = "toy"

    def names(self):
        return ["toy_net"]

    def build(self, name, *, num_classes, min_size=800, max_size=1333, **unused):
        model = ToyDetector(num_classes, min_size, max_size)
        levels = {"p3": Level(stride=8, channels=8), "p4": Level(stride=16, channels=8)}
        model.pkd_spec = DetectorSpec("toy", levels, (0.5,) * 3, (0.25,) * 3, 2.0, "a toy: any weight")
        return model


def register():
    FAMILIES["toy"] = ToyFamily()
