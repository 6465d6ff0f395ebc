"""Tests of pkd.features: taps that clean up, strides from sizes, level pairing, connectors."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from pkd.features import (
    FeatureTap,
    LevelPair,
    as_levels,
    build_connectors,
    level_strides,
    pair_levels,
    probe_levels,
    submodule,
)
from pkd.models import build_detector

TINY = dict(num_classes=3, min_size=64, max_size=64, fpn_channels=64)
RCNN_STRIDES = OrderedDict([("0", 4), ("1", 8), ("2", 16), ("3", 32), ("pool", 64)])
RETINA_STRIDES = OrderedDict([("0", 8), ("1", 16), ("2", 32), ("p6", 64), ("p7", 128)])


@pytest.fixture(scope="module")
def detectors():
    torch.manual_seed(0)
    return {
        "fasterrcnn": build_detector("fasterrcnn_resnet18_fpn", **TINY).eval(),
        "retinanet": build_detector("retinanet_resnet18_fpn", **TINY).eval(),
        "fcos": build_detector("fcos_resnet18_fpn", **TINY).eval(),
    }


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (256, 256)])
@pytest.mark.parametrize("family, expected", [("fasterrcnn", RCNN_STRIDES), ("retinanet", RETINA_STRIDES)])
def test_tap_records_levels_with_strides_from_sizes(detectors, family, expected, size):
    model = detectors[family]
    with FeatureTap(model) as tap, torch.no_grad():
        model([torch.rand(3, *size)])
    assert list(tap.levels) == list(expected)
    assert tap.strides == expected
    assert tap.input.shape[0] == 1 and tap.input.shape[1] == 3
    # The level sizes really are ceil(input / stride).
    for name, stride in expected.items():
        assert tuple(tap.levels[name].shape[-2:]) == tuple(-(-s // stride) for s in tap.input.shape[-2:])


def test_tap_removes_its_hook_on_exit_even_after_an_error(detectors):
    model = detectors["fcos"]
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureTap(model) as tap:
            assert len(model.backbone._forward_hooks) == 1
            raise RuntimeError("boom")
    assert len(model.backbone._forward_hooks) == 0
    with torch.no_grad():
        model([torch.rand(3, 64, 64)])  # outside the block: nothing recorded
    assert tap.levels == OrderedDict()
    with pytest.raises(RuntimeError, match="nothing recorded"):
        _ = tap.strides


def test_tap_any_module_path_and_wrappers(detectors):
    model = detectors["retinanet"]
    with FeatureTap(model, "backbone.body") as tap, torch.no_grad():
        model([torch.rand(3, 64, 64)])
    assert list(tap.levels) == ["0", "1", "2"]
    assert list(tap.strides.values()) == [8, 16, 32]

    class Wrapper(nn.Module):  # looks like DistributedDataParallel: the model is .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert submodule(Wrapper(model), "backbone.fpn") is model.backbone.fpn
    with pytest.raises(ValueError, match="has no submodule 'neck'"):
        FeatureTap(model, "neck")
    tap = FeatureTap(model)
    with tap, pytest.raises(RuntimeError, match="already active"):
        tap.__enter__()


def test_level_strides_resolve_tiny_levels_in_order():
    # A 64-pixel image: the stride-64 and stride-128 levels are both 1x1.
    sizes = OrderedDict([("a", (8, 8)), ("b", (4, 4)), ("c", (2, 2)), ("d", (1, 1)), ("e", (1, 1))])
    assert list(level_strides((64, 64), sizes).values()) == [8, 16, 32, 64, 128]
    # Not a power of two: the rounded ratio.
    assert level_strides((90, 90), {"x": (30, 30)}) == {"x": 3}
    assert as_levels(torch.zeros(1, 2, 3, 3)).keys() == {"0"}
    assert list(as_levels([torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 2, 2)])) == ["0", "1"]


def test_stride_pairing_faster_rcnn_to_retinanet():
    pairs = pair_levels(RETINA_STRIDES, RCNN_STRIDES, "stride")
    assert [(p.student, p.teacher) for p in pairs] == [("0", "1"), ("1", "2"), ("2", "3"), ("p6", "pool")]
    assert [p.name for p in pairs] == ["s8", "s16", "s32", "s64"]
    # Homogeneous: the first four of five, the coarsest left out as in the reference.
    assert [p.student_stride for p in pair_levels(RETINA_STRIDES, RETINA_STRIDES)] == [8, 16, 32, 64]
    chosen = pair_levels(RETINA_STRIDES, RCNN_STRIDES, levels=[16, 64])
    assert [p.name for p in chosen] == ["s16", "s64"]
    with pytest.raises(ValueError, match=r"levels \[128\] are not strides both models have"):
        pair_levels(RETINA_STRIDES, RCNN_STRIDES, levels=[128])


def test_index_pairing_reproduces_the_reference():
    pairs = pair_levels(RETINA_STRIDES, RCNN_STRIDES, "index")
    # The reference pairs the first four outputs by position: stride 8 with 4, 16 with 8, ...
    assert [(p.student_stride, p.teacher_stride) for p in pairs] == [(8, 4), (16, 8), (32, 16), (64, 32)]
    assert pairs[0] == LevelPair("0", "0", 8, 4) and pairs[0].name == "s8_t4"
    with pytest.raises(ValueError, match="out of range"):
        pair_levels(RETINA_STRIDES, RCNN_STRIDES, "index", levels=[7])


def test_explicit_pairs_and_errors():
    pairs = pair_levels(RETINA_STRIDES, RCNN_STRIDES, [("0", 4), (16, "2")])
    assert [(p.student, p.teacher) for p in pairs] == [("0", "0"), ("1", "2")]
    with pytest.raises(ValueError, match="the teacher has no level 'p9'"):
        pair_levels(RETINA_STRIDES, RCNN_STRIDES, [("0", "p9")])
    with pytest.raises(ValueError, match="share no stride.*pairing='index'"):
        pair_levels({"a": 3}, {"b": 5})
    with pytest.raises(ValueError, match="pairing must be"):
        pair_levels(RETINA_STRIDES, RCNN_STRIDES, "nearest")


def test_connectors_only_where_channels_differ():
    pairs = pair_levels(RETINA_STRIDES, RCNN_STRIDES)
    student_channels = dict.fromkeys(RETINA_STRIDES, 64)
    teacher_channels = dict.fromkeys(RCNN_STRIDES, 256)
    teacher_channels["pool"] = 64
    connectors = build_connectors(pairs, student_channels, teacher_channels)
    assert sorted(connectors) == ["s16", "s32", "s8"]
    assert connectors["s8"](torch.zeros(2, 64, 5, 5)).shape == (2, 256, 5, 5)


def test_probe_levels_restores_training_mode(detectors):
    model = build_detector("fcos_resnet18_fpn", **TINY).train()
    running_mean = model.backbone.body.bn1.running_mean.clone()
    info = probe_levels(model.backbone, 256)
    assert info == {"0": (8, 64), "1": (16, 64), "2": (32, 64), "p6": (64, 64), "p7": (128, 64)}
    assert model.training and model.backbone.training
    assert torch.equal(model.backbone.body.bn1.running_mean, running_mean)  # eval mode during the probe
