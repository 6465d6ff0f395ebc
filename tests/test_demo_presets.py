"""Tests of pkd.demo_presets."""

import pytest

from pkd.demo_presets import PRESETS, get_preset


def test_default_preset_is_pretrained_and_scratch_is_not():
    default, scratch = get_preset("default"), get_preset("scratch")
    assert default.teacher["weights_backbone"] == "efficientnet_lite2.imagenet"
    assert default.student["weights_backbone"] == "efficientnet_lite0.imagenet"
    assert "weights_backbone" not in scratch.teacher and "weights_backbone" not in scratch.student
    assert set(default.distill) == {"pkd", "mse", "cwd"}


def test_every_preset_is_complete_and_unknown_names_are_refused():
    for name, preset in PRESETS.items():
        assert get_preset(name) is preset and preset.name == name
        assert preset.teacher["name"] and preset.student["name"] and preset.student_train["steps"] > 0
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        get_preset("huge")


def test_yolo_preset_distils_yolo11s_into_yolo11n_at_the_budget_where_yolo11n_learns():
    yolo = get_preset("yolo")
    assert (yolo.teacher["name"], yolo.student["name"]) == ("yolo11s", "yolo11n")
    # YOLO11n alone: 0.041 test mAP after 400 steps; after 1250, 0.297 and 0.305 on two machines
    # (3 and 5 seeds; docs/results.md).
    assert yolo.teacher_train["steps"] == 2500 and yolo.student_train["steps"] == 1250
    assert all(section["connectors"] for section in yolo.distill.values())
    assert get_preset("yolo_fcos_400").teacher == get_preset("default").teacher
