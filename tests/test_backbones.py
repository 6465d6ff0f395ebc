"""Tests of pkd.backbones: timm backbones in every detector family, their weights and freezing."""

import pytest
import torch
import torch.nn.functional as F
from skimage import data as photos
from torch import nn

from pkd.backbones import OFFLINE_WEIGHTS, TimmBackboneWithFPN, map_by_order, offline_state_dict
from pkd.distiller import Distiller
from pkd.families.torchvision import detector_names, parse_detector_name
from pkd.models import build_detector

# A CNN (NCHW features) and a Swin transformer (NHWC features), both shrunk to test size.
CNN = ("timm_tf_efficientnet_lite0", {})
SWIN = ("timm_swin_tiny_patch4_window7_224", {"embed_dim": 24, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]})
FAMILIES = ("fasterrcnn", "maskrcnn", "retinanet", "fcos")


def batch(sizes=((64, 80), (72, 64))):
    images = [torch.rand(3, h, w) for h, w in sizes]
    targets = [
        {
            "boxes": torch.tensor([[5.0, 6.0, 30.0, 40.0]]),
            "labels": torch.tensor([1 + i % 2]),
            "masks": torch.zeros(1, h, w, dtype=torch.uint8),
        }
        for i, (h, w) in enumerate(sizes)
    ]
    for target in targets:
        target["masks"][:, 6:40, 5:30] = 1
    return images, targets


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backbone", [CNN, SWIN], ids=["cnn", "swin"])
def test_every_family_trains_and_predicts_on_timm_backbones(family, backbone):
    name, options = backbone
    model = build_detector(
        f"{family}_{name}_fpn", num_classes=3, min_size=64, max_size=96, fpn_channels=32, backbone_options=options
    )
    assert isinstance(model.backbone, TimmBackboneWithFPN)
    assert model.backbone.channels_last == (name == SWIN[0])
    images, targets = batch()
    model.train()
    losses = model(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.body.parameters().__next__().grad is not None  # random init: the stem trains
    model.eval()
    with torch.no_grad():
        levels = model.backbone(torch.rand(1, 3, 64, 96))
        outputs = model(images)
    expected = [4, 8, 16, 32, 64] if family in ("fasterrcnn", "maskrcnn") else [8, 16, 32, 64, 128]
    assert [64 // level.shape[-2] for level in levels.values()][:3] == expected[:3]
    assert all(level.shape[1] == 32 for level in levels.values())
    assert len(levels) == 5
    assert set(outputs[0]) >= {"boxes", "scores", "labels"}


def test_levels_and_strides_come_from_timm_feature_info():
    model = build_detector("retinanet_timm_tf_efficientnet_lite0_fpn", num_classes=3, min_size=64, max_size=64)
    info = model.backbone.body.feature_info
    assert info.reduction() == [2, 4, 8, 16, 32]
    assert model.backbone.levels == [2, 3, 4]  # strides 8, 16, 32 for a one-stage detector
    assert [m[0].in_channels for m in model.backbone.fpn.inner_blocks] == [info.channels()[i] for i in (2, 3, 4)]


def test_v2_variants_and_names():
    model = build_detector("retinanet_timm_tf_efficientnet_lite0_fpn_v2", num_classes=3, min_size=64, max_size=64)
    assert model.head.regression_head._loss_type == "giou"
    assert parse_detector_name("fcos_timm_tf_efficientnet_lite0_fpn") == ("fcos", "timm_tf_efficientnet_lite0", False)
    names = detector_names()
    assert "maskrcnn_timm_swin_tiny_patch4_window7_224_fpn" in names and "fcos_resnet18_fpn" in names
    assert "fcos_timm_tf_efficientnet_lite0_fpn" not in detector_names(timm_backbones=False)


def test_bad_timm_names_and_backbones_are_clear_errors():
    with pytest.raises(ValueError, match="timm_<model>"):
        build_detector("fcos_timm_no_such_net_fpn", num_classes=3)
    with pytest.raises(ValueError, match=r"strides \[8, 16, 32\].*\[16, 16, 16\]"):
        build_detector("fcos_timm_vit_tiny_patch16_224_fpn", num_classes=3, min_size=64, max_size=64)
    with pytest.raises(ValueError, match="backbone_options are for timm"):
        build_detector("fcos_resnet18_fpn", num_classes=3, backbone_options={"depths": [1]})
    with pytest.raises(ValueError, match="norm must be auto, batch or frozen"):
        build_detector("fcos_timm_tf_efficientnet_lite0_fpn", num_classes=3, norm="group")
    with pytest.raises(ValueError, match="not a .pt/.pth file, 'timm'"):
        build_detector("fcos_timm_tf_efficientnet_lite0_fpn", num_classes=3, weights_backbone="imagenet")
    with pytest.raises(ValueError, match="are for timm's 'tf_efficientnet_lite2'"):
        build_detector(
            "fcos_timm_tf_efficientnet_lite0_fpn", num_classes=3, weights_backbone="efficientnet_lite2.imagenet"
        )
    with pytest.raises(ValueError, match="trainable_backbone_layers must be in 0..5"):
        build_detector("fcos_timm_tf_efficientnet_lite0_fpn", num_classes=3, trainable_backbone_layers=6)


def _classify(model: nn.Module, image) -> tuple[int, float]:
    pixels = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    pixels = F.interpolate(pixels, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        probabilities = model((pixels - 0.5) / 0.5).softmax(-1)[0]
    return int(probabilities.argmax()), float(probabilities.max())


def test_offline_lite0_weights_are_genuine_imagenet_weights():
    import timm

    architecture, state_dict = offline_state_dict("efficientnet_lite0.imagenet")
    assert architecture == "tf_efficientnet_lite0"
    classifier = timm.create_model(architecture, pretrained=False)
    missing, unexpected = classifier.load_state_dict(state_dict, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    classifier.eval()
    cat, p_cat = _classify(classifier, photos.chelsea())
    espresso, p_espresso = _classify(classifier, photos.coffee())
    assert 281 <= cat <= 285 and p_cat > 0.5  # tabby .. Egyptian cat
    assert espresso == 967 and p_espresso > 0.5


def test_offline_weights_reach_the_detector_with_frozen_norm_and_early_stages():
    model = build_detector(
        "fcos_timm_tf_efficientnet_lite0_fpn",
        num_classes=3,
        min_size=64,
        max_size=64,
        weights_backbone="efficientnet_lite0.imagenet",
    )
    _, state_dict = offline_state_dict("efficientnet_lite0.imagenet")
    body = model.backbone.body
    assert torch.equal(body.conv_stem.weight, state_dict["conv_stem.weight"])
    assert torch.equal(body.blocks[6][0].conv_pwl.weight, state_dict["blocks.6.0.conv_pwl.weight"])
    assert model.transform.image_mean == [0.5, 0.5, 0.5] and model.transform.image_std == [0.5, 0.5, 0.5]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())  # all frozen
    # Pretrained: the stem and the stages of strides 2 and 4 are frozen, those of 8-32 train (3 of 5).
    assert not body.conv_stem.weight.requires_grad and not body.blocks[1][0].conv_pw.weight.requires_grad
    assert body.blocks[2][0].conv_pw.weight.requires_grad and body.blocks[6][0].conv_pwl.weight.requires_grad
    every = build_detector(
        "fcos_timm_tf_efficientnet_lite0_fpn",
        num_classes=3,
        weights_backbone="efficientnet_lite0.imagenet",
        trainable_backbone_layers=5,
        norm="batch",
    )
    assert all(p.requires_grad for p in every.backbone.body.parameters())
    assert any(isinstance(m, nn.BatchNorm2d) for m in every.backbone.body.modules())


def test_map_by_order_names_the_first_tensor_that_does_not_fit():
    target = {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4), "b.num_batches_tracked": torch.tensor(0)}
    source = {"x": torch.ones(2, 3), "y": torch.ones(4)}
    mapped = map_by_order(source, target, "test weights")
    assert list(mapped) == ["a.weight", "b.weight"] and torch.equal(mapped["b.weight"], torch.ones(4))
    with pytest.raises(ValueError, match=r"tensor #1 'y' \(5,\) does not fit 'b.weight' \(4,\)"):
        map_by_order({"x": torch.ones(2, 3), "y": torch.ones(5)}, target, "test weights")
    with pytest.raises(ValueError, match="3 tensors, but the architecture has 2"):
        map_by_order({**source, "z": torch.ones(1)}, target, "test weights")


def test_offline_weights_errors():
    assert set(OFFLINE_WEIGHTS) == {f"efficientnet_lite{k}.imagenet" for k in (0, 1, 2)}
    with pytest.raises(ValueError, match="unknown offline weights 'efficientnet_lite9.imagenet'"):
        offline_state_dict("efficientnet_lite9.imagenet")


def test_local_state_dict_of_the_classification_model(tmp_path):
    import timm

    classifier = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **dict(SWIN[1]))
    path = tmp_path / "swin.pth"
    torch.save(classifier.state_dict(), path)
    model = build_detector(
        "fcos_timm_swin_tiny_patch4_window7_224_fpn",
        num_classes=3,
        min_size=64,
        max_size=64,
        fpn_channels=32,
        weights_backbone=str(path),
        backbone_options=SWIN[1],
    )
    # timm's feature wrapper renames layers.0 to layers_0; the weights still land.
    loaded = model.backbone.body.layers_0.blocks[0].attn.qkv.weight
    assert torch.equal(loaded, classifier.layers[0].blocks[0].attn.qkv.weight)
    assert model.transform.image_mean == [0.485, 0.456, 0.406]
    # A pretrained file counts as pretrained: early stages frozen (3 of 4 stages train).
    assert not model.backbone.body.patch_embed.proj.weight.requires_grad
    other = timm.create_model("resnet18", pretrained=False)
    torch.save(other.state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(ValueError, match="do not fit the backbone: .* missing"):
        build_detector(
            "fcos_timm_swin_tiny_patch4_window7_224_fpn",
            num_classes=3,
            weights_backbone=str(tmp_path / "resnet18.pth"),
            backbone_options=SWIN[1],
        )


def test_distil_from_an_imagenet_normalised_timm_teacher_into_a_resnet_student_with_its_own_normalisation():
    teacher = build_detector(
        "fasterrcnn_timm_tf_efficientnet_lite0_fpn",
        num_classes=3,
        min_size=64,
        max_size=96,
        fpn_channels=32,
        weights_backbone="efficientnet_lite0.imagenet",
    )
    student = build_detector("retinanet_resnet18_fpn", num_classes=3, min_size=64, max_size=96, fpn_channels=32)
    assert teacher.transform.image_mean == [0.5] * 3 and student.transform.image_mean != [0.5] * 3
    distiller = Distiller(student, teacher)
    assert distiller.renormalise
    assert [pair.name for pair in distiller.pairs] == ["s8", "s16", "s32", "s64"]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.01)
    images, targets = batch()
    distiller.train()
    for _ in range(2):
        losses = distiller(images, targets)
        assert all(torch.isfinite(v) for v in losses.values())
        assert losses["loss_distill/s8"] > 0
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # The teacher sees the student's batch in its own normalisation: (x * std_s + mean_s - 0.5) / 0.5.
    pixels = torch.rand(1, 3, 8, 8)
    student_batch = (pixels - torch.tensor(student.transform.image_mean).view(1, 3, 1, 1)) / torch.tensor(
        student.transform.image_std
    ).view(1, 3, 1, 1)
    renormalised = student_batch * distiller._teacher_scale + distiller._teacher_shift
    torch.testing.assert_close(renormalised, (pixels - 0.5) / 0.5)
