"""Tests of pkd.families.torchvision: detector builders on torchvision, never downloading."""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from pkd.families.torchvision import detector_names, is_two_stage, parse_detector_name
from pkd.models import build_detector, count_parameters

TINY = dict(num_classes=3, min_size=64, max_size=64)


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def norms_of(module):
    return {type(m) for m in module.modules() if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d | nn.GroupNorm)}


@pytest.mark.parametrize(
    "name, expected",
    [
        ("fasterrcnn_resnet18_fpn", "FasterRCNN"),
        ("fasterrcnn_resnet18_fpn_v2", "FasterRCNN"),
        ("maskrcnn_resnet18_fpn", "MaskRCNN"),
        ("retinanet_resnet34_fpn", "RetinaNet"),
        ("retinanet_resnet18_fpn_v2", "RetinaNet"),
        ("fcos_resnet18_fpn", "FCOS"),
        ("fasterrcnn_mobilenet_v3_large_fpn", "FasterRCNN"),
    ],
)
def test_builds_and_detects(name, expected):
    model = build_detector(name, **TINY)
    assert type(model).__name__ == expected
    model.eval()
    with torch.no_grad():
        (detections,) = model([torch.rand(3, 64, 80)])
    assert set(detections) >= {"boxes", "scores", "labels"}
    assert is_two_stage(model) == name.startswith(("fasterrcnn", "maskrcnn"))


@pytest.mark.parametrize(
    "name", ["fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn"]
)
def test_same_architecture_as_torchvision_builder(name):
    ours = build_detector(name, num_classes=5).state_dict()
    theirs = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=5).state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_other_depth_and_fpn_width():
    small = build_detector("retinanet_resnet18_fpn", fpn_channels=64, **TINY)
    large = build_detector("retinanet_resnet50_fpn", **TINY)
    assert small.backbone.out_channels == 64
    assert large.backbone.out_channels == 256
    assert count_parameters(small) < count_parameters(large) / 2
    # backbone= overrides the name's backbone
    overridden = build_detector("retinanet_resnet50_fpn", backbone="resnet18", fpn_channels=64, **TINY)
    assert list(overridden.state_dict()) == list(small.state_dict())


def test_norm_follows_weights():
    assert norms_of(build_detector("fcos_resnet18_fpn", **TINY).backbone.body) == {nn.BatchNorm2d}
    frozen = build_detector("fcos_resnet18_fpn", norm="frozen", **TINY)
    assert norms_of(frozen.backbone.body) == {FrozenBatchNorm2d}
    group = build_detector("fcos_resnet18_fpn", norm="group", **TINY)
    assert norms_of(group.backbone.body) == {nn.GroupNorm}
    # From random init every backbone stage trains.
    assert all(p.requires_grad for p in build_detector("fcos_resnet18_fpn", **TINY).parameters())


def test_skip_resize_and_sizes_reach_the_transform():
    model = build_detector("fcos_resnet18_fpn", skip_resize=True, num_classes=3, min_size=(64, 96), max_size=128)
    assert model.transform._skip_resize is True
    assert model.transform.min_size == (64, 96) and model.transform.max_size == 128


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="Known detectors by family: .*fcos_resnet18_fpn"):
        build_detector("yolo_resnet18_fpn", **TINY)
    with pytest.raises(ValueError, match="known backbones"):
        build_detector("fcos_resnet18_fpn", backbone="vgg16", **TINY)
    with pytest.raises(ValueError, match="unknown norm"):
        build_detector("fcos_resnet18_fpn", norm="layer", **TINY)
    with pytest.raises(ValueError, match="multiple of 32"):
        build_detector("fcos_resnet18_fpn", fpn_channels=48, **TINY)
    with pytest.raises(ValueError, match="num_classes"):
        build_detector("fcos_resnet18_fpn", num_classes=1)
    with pytest.raises(ValueError, match="no FCOS v2"):
        build_detector("fcos_resnet18_fpn_v2", **TINY)
    assert "retinanet_resnet101_fpn_v2" in detector_names()
    assert parse_detector_name("maskrcnn_resnet34_fpn_v2") == ("maskrcnn", "resnet34", True)


@pytest.mark.parametrize("wrap", ["plain", "pkd", "model_key"])
def test_weights_from_a_local_file(tmp_path, wrap):
    source = build_detector("fcos_resnet18_fpn", fpn_channels=32, **TINY)
    state = source.state_dict()
    meta = {"detector": "fcos_resnet18_fpn", "num_classes": 3, "build": {"fpn_channels": 32}, "label_map": {}}
    meta["class_names"] = {}
    export = {"format": "pkd", "version": 1, "kind": "export", "state_dict": state, "meta": meta}
    payload = {"plain": state, "pkd": export, "model_key": {"model": state}}
    path = tmp_path / "weights.pt"
    torch.save(payload[wrap], path)
    loaded = build_detector("fcos_resnet18_fpn", fpn_channels=32, weights=path, **TINY)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_frozen_norm_weights_are_detected(tmp_path):
    frozen = build_detector("fcos_resnet18_fpn", fpn_channels=32, norm="frozen", **TINY)
    torch.save(frozen.state_dict(), tmp_path / "frozen.pt")
    loaded = build_detector("fcos_resnet18_fpn", fpn_channels=32, weights=tmp_path / "frozen.pt", **TINY)
    assert norms_of(loaded.backbone.body) == {FrozenBatchNorm2d}


def test_bad_weight_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_detector("fcos_resnet18_fpn", weights=tmp_path / "missing.pt", **TINY)
    other = build_detector("fcos_resnet18_fpn", fpn_channels=64, **TINY)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="do not fit this model.*shape mismatch"):
        build_detector("fcos_resnet18_fpn", fpn_channels=32, weights=tmp_path / "other.pt", **TINY)
    (tmp_path / "truncated.pt").write_bytes(open(tmp_path / "other.pt", "rb").read()[:1000])
    with pytest.raises(ValueError, match="truncated"):
        build_detector("fcos_resnet18_fpn", fpn_channels=64, weights=tmp_path / "truncated.pt", **TINY)
    torch.save({"epoch": 3}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="no state_dict"):
        build_detector("fcos_resnet18_fpn", weights=tmp_path / "foreign.pt", **TINY)


def test_backbone_weights_from_a_classification_network(tmp_path):
    classifier = torchvision.models.resnet18(num_classes=10)
    torch.save(classifier.state_dict(), tmp_path / "resnet18.pt")
    model = build_detector("retinanet_resnet18_fpn", fpn_channels=32, weights_backbone=tmp_path / "resnet18.pt", **TINY)
    assert torch.equal(model.backbone.body.conv1.weight, classifier.conv1.weight)
    assert norms_of(model.backbone.body) == {nn.BatchNorm2d}


def test_torchvision_weights_only_for_its_own_networks():
    with pytest.raises(ValueError, match="resnet50 FPN detectors only"):
        build_detector("retinanet_resnet18_fpn", weights="DEFAULT", **TINY)


def test_fcos_from_scratch_starts_with_live_box_regression(tmp_path):
    """A regression bias of 0 lets the ReLU-ed box regression die (GIoU loss stuck at 1.0)."""
    model = build_detector("fcos_resnet18_fpn", **TINY)
    assert torch.all(model.head.regression_head.bbox_reg.bias == 1.0)
    # Weights that are loaded are left as they are.
    torch.nn.init.zeros_(model.head.regression_head.bbox_reg.bias)
    torch.save(model.state_dict(), tmp_path / "fcos.pt")
    loaded = build_detector("fcos_resnet18_fpn", weights=tmp_path / "fcos.pt", **TINY)
    assert torch.all(loaded.head.regression_head.bbox_reg.bias == 0.0)
    images = [torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0]]), "labels": torch.tensor([1])}]
    losses = build_detector("fcos_resnet18_fpn", **TINY)(images, targets)
    assert losses["bbox_regression"] < 0.99  # boxes, not points: the loss has a gradient
