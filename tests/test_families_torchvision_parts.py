"""Tests of pkd.families.torchvision_parts: detectors assembled from torchvision's parts, weights read strictly."""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from pkd.families.torchvision_parts import assemble, detect_norm, fpn_backbone, load_strict, norm_layer, resnet_body


@pytest.mark.parametrize(
    ("family", "levels"),
    [("fcos", ["0", "1", "2", "p6", "p7"]), ("fasterrcnn", ["0", "1", "2", "3", "pool"])],
)
def test_fpn_backbone_returns_the_levels_the_kind_reads(family, levels):
    backbone, implied = fpn_backbone(
        family,
        "resnet18",
        False,
        weights_backbone=None,
        norm="batch",
        fpn_channels=32,
        trainable_layers=5,
        backbone_options=None,
    )
    features = backbone(torch.rand(1, 3, 128, 128))
    assert list(features) == levels and implied == {}
    assert all(feature.shape[1] == 32 for feature in features.values())
    # Every level halves the previous one (the MaxPool / P6, P7 extra levels included).
    sizes = [feature.shape[-1] for feature in features.values()]
    assert sizes == [sizes[0] // 2**k for k in range(len(sizes))]


@pytest.mark.parametrize("norm", ["batch", "frozen", "group"])
def test_detect_norm_reads_back_the_norm_a_body_was_built_with(norm):
    body, channels = resnet_body("resnet18", None, norm, trainable_layers=5)
    assert channels == [64, 128, 256, 512]
    assert detect_norm(body.state_dict()) == norm
    expected = {"batch": nn.BatchNorm2d, "frozen": FrozenBatchNorm2d, "group": nn.GroupNorm}[norm]
    assert isinstance(body.bn1, expected) and isinstance(norm_layer(norm)(64), expected)


def test_resnet_body_freezes_its_first_stages():
    body, _ = resnet_body("resnet18", None, "batch", trainable_layers=2)
    trainable = {name.split(".")[0] for name, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    with pytest.raises(ValueError, match="trainable_backbone_layers"):
        resnet_body("resnet18", None, "batch", trainable_layers=6)


def test_load_strict_says_what_does_not_fit():
    model = torchvision.models.resnet18(num_classes=10)
    state = model.state_dict()
    load_strict(model, {k: v for k, v in state.items() if not k.startswith("fc.")}, "mine.pt", ignore=("fc.",))
    broken = dict(state)
    broken.pop("conv1.weight")
    broken["extra.weight"] = torch.zeros(1)
    broken["fc.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match="mine.pt") as error:
        load_strict(model, broken, "mine.pt")
    for word in ("missing", "unexpected", "shape mismatch"):
        assert word in str(error.value)


def test_assemble_rejects_group_norm_heads_of_odd_width():
    with pytest.raises(ValueError, match="fpn_channels"):
        assemble(
            "fcos",
            "resnet18",
            False,
            num_classes=3,
            weights_backbone=None,
            norm="batch",
            fpn_channels=48,
            trainable_layers=5,
        )
