"""Tests of pkd.detector: the protocol every detector family fulfils."""

import importlib.util

import pytest
import torch

from pkd.detector import Detector, Transform
from pkd.models import build_detector

NAMES = ["fcos_resnet18_fpn", "fasterrcnn_resnet18_fpn", "retinanet_timm_resnet18_fpn"]
if importlib.util.find_spec("ultralytics") is not None:
    NAMES.append("yolo11n")


@pytest.mark.parametrize("name", NAMES)
def test_every_family_is_a_pkd_detector(name):
    options = {"width": 0.125} if name.startswith("yolo") else {"fpn_channels": 32}
    model = build_detector(name, num_classes=3, min_size=64, max_size=64, **options)
    assert isinstance(model, Detector) and isinstance(model.transform, Transform)
    batch = model.transform([torch.rand(3, 64, 80)])[0].tensors
    levels = model.backbone(batch)
    assert all(v.dim() == 4 and v.shape[0] == 1 for v in levels.values())


def test_other_modules_are_not_detectors():
    assert not isinstance(torch.nn.Linear(2, 2), Detector)
