"""Tests of pkd.families: the registry, describe(), and every family's declaration."""

import importlib.util

import pytest
import torch
import torchvision

from pkd.detector import DetectorSpec, Level
from pkd.distiller import Distiller
from pkd.families import FAMILIES, describe, family_for, family_of
from pkd.features import probe_levels
from pkd.models import build_detector

TINY = dict(num_classes=3, min_size=64, max_size=64)
BUILDS = [
    ("fcos_resnet18_fpn", {"fpn_channels": 32}, 10.0),
    ("fasterrcnn_resnet18_fpn_v2", {"fpn_channels": 32}, 6.0),
    ("retinanet_timm_resnet18_fpn_v2", {"fpn_channels": 32}, 10.0),
    ("fasterrcnn_mobilenet_v3_large_fpn", {}, 6.0),
]
if importlib.util.find_spec("ultralytics") is not None:
    BUILDS += [("yolo11n", {"width": 0.125}, 10.0), ("yolo26n", {"width": 0.125}, 10.0)]
if importlib.util.find_spec("transformers") is not None:
    _DETR = {
        "backbone": "test_efficientnet",
        "hf_config": {"encoder_hidden_dim": 32, "d_model": 32, "decoder_layers": 2},
    }
    BUILDS += [("rtdetr_r18", _DETR, 10.0), ("deimv2_s", _DETR, 10.0)]


@pytest.mark.parametrize("name, options, weight", BUILDS)
def test_declared_levels_are_what_the_feature_module_returns(name, options, weight):
    model = build_detector(name, **TINY, **options)
    spec = describe(model)
    probed = probe_levels(
        torch.nn.Module.get_submodule(model, spec.features) if "." in spec.features else getattr(model, spec.features),
        256,
    )
    assert {k: Level(*v) for k, v in probed.items()} == dict(spec.levels)
    assert spec.distill_weight == weight and spec.weight_reason
    assert list(spec.image_mean) == [float(v) for v in model.transform.image_mean]
    assert family_for(name) is family_of(model) is FAMILIES[spec.family]


def test_a_torchvision_detector_built_by_torchvision_is_described_too():
    model = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    spec = describe(model)
    assert spec.family == "torchvision" and spec.strides == {"0": 8, "1": 16, "2": 32, "p6": 64, "p7": 128}
    assert spec.channels["0"] == 256 and spec.distill_weight == 10.0


def test_describe_looks_through_wrappers_and_refuses_strangers():
    student = build_detector("fcos_resnet18_fpn", **TINY, fpn_channels=32)
    teacher = build_detector("fasterrcnn_resnet18_fpn", **TINY, fpn_channels=32)
    assert describe(Distiller(student, teacher)) is describe(student)
    with pytest.raises(TypeError, match="cannot tell what a Linear is"):
        describe(torch.nn.Linear(2, 2))


def test_unknown_name_lists_every_family():
    with pytest.raises(ValueError, match=r"unknown detector 'nope'.*torchvision: .*fcos_resnet18_fpn"):
        family_for("nope")


def test_options_of_another_family_are_named():
    with pytest.raises(ValueError, match="width: yolo options, not options of fcos_resnet18_fpn"):
        build_detector("fcos_resnet18_fpn", **TINY, width=0.5)
    # A keyword two families share is each one's own.
    assert build_detector("fcos_resnet18_fpn", **TINY, score_thresh=0.1).score_thresh == 0.1
    assert build_detector("fasterrcnn_resnet18_fpn", **TINY, box_score_thresh=0.1).roi_heads.score_thresh == 0.1


def test_a_family_registered_outside_pkd_distils_from_a_torchvision_teacher(monkeypatch):
    import toy_family

    monkeypatch.setitem(FAMILIES, "toy", toy_family.ToyFamily())
    student = build_detector("toy_net", **TINY)
    assert isinstance(describe(student), DetectorSpec)
    teacher = build_detector("fcos_resnet18_fpn", **TINY, fpn_channels=32)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller = Distiller(student, teacher, connectors=True)
    assert [p.name for p in distiller.pairs] == ["s8", "s16"] and distiller.weight == 10.0
    assert distiller.renormalise  # the toy normalises with mean 0.5 / std 0.25, FCOS with ImageNet's
    optimizer = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.01)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])}] * 2
    for _ in range(2):
        losses = distiller(images, targets)
        assert set(losses) == {"loss_box", "loss_distill/s8", "loss_distill/s16"}
        assert all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert len(distiller.eval()([torch.rand(3, 64, 64)])[0]["boxes"]) == 1
