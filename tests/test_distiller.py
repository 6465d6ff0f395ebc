"""Tests of pkd.distiller: homogeneous and heterogeneous pairs, a frozen teacher, a clean student."""

import pytest
import torch
import torchvision
from torch import nn

from pkd.distiller import Distiller, default_weight
from pkd.models import build_detector

TINY = dict(num_classes=3, min_size=64, max_size=64, fpn_channels=64)
PAIRS = [
    ("retinanet_resnet18_fpn", "retinanet_resnet18_fpn"),
    ("fasterrcnn_resnet18_fpn", "retinanet_resnet18_fpn"),
    ("fasterrcnn_resnet18_fpn", "fcos_resnet18_fpn"),
    ("maskrcnn_resnet18_fpn", "fcos_resnet18_fpn"),
    ("fcos_resnet18_fpn", "retinanet_resnet18_fpn"),
]


def batch(seed=0, count=2, size=64):
    generator = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=generator) for _ in range(count)]
    targets = []
    for _ in range(count):
        boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]])
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks})
    return images, targets


def head_modules(detector):
    names = ("rpn", "roi_heads") if hasattr(detector, "roi_heads") else ("head",)
    return [getattr(detector, name) for name in names] + [detector.transform]


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("teacher_name, student_name", PAIRS)
def test_distillation_trains_the_student_and_leaves_the_teacher_alone(teacher_name, student_name):
    torch.manual_seed(0)
    teacher = build_detector(teacher_name, **TINY)
    student = build_detector(student_name, **TINY)
    distiller = Distiller(student, teacher).train()
    assert distiller.weight == (6.0 if teacher_name.startswith(("faster", "mask")) else 10.0)
    before = snapshot(teacher)
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in head_modules(teacher)]
    optimizer = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.002, momentum=0.9)
    images, targets = batch()
    history = []
    for step in range(6):
        losses = distiller(images, targets)
        distill = sum(v for k, v in losses.items() if k.startswith("loss_distill/"))
        assert torch.isfinite(distill)
        history.append(distill.item())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        if step == 0:
            fpn_grad = student.backbone.fpn.layer_blocks[0][0].weight.grad
            body_grad = student.backbone.body.layer1[0].conv1.weight.grad
            assert fpn_grad is not None and fpn_grad.abs().sum() > 0
            assert body_grad is not None and body_grad.abs().sum() > 0
        optimizer.step()
    for hook in hooks:
        hook.remove()
    assert history[-1] < history[0]
    assert not calls, "the teacher's heads or transform ran"
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "teacher parameters or buffers changed"
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert len([k for k in losses if k.startswith("loss_distill/")]) == 4


def test_teacher_sees_exactly_the_students_batch_renormalised():
    torch.manual_seed(1)
    student = build_detector("retinanet_resnet18_fpn", **TINY)
    teacher = build_detector("fcos_resnet18_fpn", image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.5, 1.0], **TINY)
    distiller = Distiller(student, teacher).train()
    seen = {}
    student.backbone.register_forward_pre_hook(lambda m, args: seen.setdefault("student", args[0].detach().clone()))
    teacher.backbone.register_forward_pre_hook(lambda m, args: seen.setdefault("teacher", args[0].detach().clone()))
    images, targets = batch(count=2)
    images[1] = torch.rand(3, 48, 64)  # another size: padded in the batch
    distiller(images, targets)
    raw = seen["student"] * torch.tensor(student.transform.image_std).view(1, 3, 1, 1) + torch.tensor(
        student.transform.image_mean
    ).view(1, 3, 1, 1)
    expected = (raw - 0.5) / torch.tensor([0.25, 0.5, 1.0]).view(1, 3, 1, 1)
    assert seen["teacher"].shape == seen["student"].shape
    assert torch.allclose(seen["teacher"], expected, atol=1e-5)


def test_eval_mode_is_the_student():
    torch.manual_seed(2)
    student = build_detector("fcos_resnet18_fpn", **TINY)
    distiller = Distiller(student, build_detector("fcos_resnet18_fpn", **TINY)).eval()
    images, _ = batch()
    with torch.no_grad():
        ours = distiller(images)
        plain = student(images)
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(ours, plain, strict=True))


def test_state_dict_is_the_plain_student():
    torch.manual_seed(3)
    student = build_detector("retinanet_resnet50_fpn", num_classes=3, min_size=64, max_size=64)
    teacher = build_detector("fasterrcnn_resnet18_fpn", num_classes=3, min_size=64, max_size=64, fpn_channels=128)
    distiller = Distiller(student, teacher, connectors=True)
    state = distiller.state_dict()
    assert not any(k.startswith(("teacher", "connectors", "student.")) for k in state)
    plain = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    plain.load_state_dict(state, strict=True)
    assert len(distiller.connector_state_dict()) == 8  # 4 pairs x (weight, bias), 256 -> 128 channels
    assert not any(p is q for p in distiller.parameters() for q in teacher.parameters())


def test_channel_mismatch_needs_a_connector_and_then_trains():
    torch.manual_seed(4)
    teacher = build_detector("fasterrcnn_resnet18_fpn", num_classes=3, min_size=64, max_size=64, fpn_channels=128)
    student = build_detector("fcos_resnet18_fpn", **TINY)
    with pytest.raises(ValueError, match=r"s8: student 64 vs teacher 128 channels.*connectors=True"):
        Distiller(student, teacher)
    distiller = Distiller(student, teacher, connectors=True).train()
    connector_params = list(distiller.connectors.parameters())
    assert connector_params and all(any(p is q for q in distiller.parameters()) for p in connector_params)
    optimizer = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.002, momentum=0.9)
    images, targets = batch()
    first = None
    for _ in range(5):
        losses = distiller(images, targets)
        distill = sum(v for k, v in losses.items() if k.startswith("loss_distill/"))
        first = distill.item() if first is None else first
        optimizer.zero_grad()
        sum(losses.values()).backward()
        assert connector_params[0].grad is not None
        optimizer.step()
    assert distill.item() < first


@pytest.mark.parametrize("loss", ["mse", "cwd", "callable"])
def test_other_losses(loss):
    torch.manual_seed(5)
    criterion = (lambda s, t: (s - t).abs().mean()) if loss == "callable" else loss
    distiller = Distiller(
        build_detector("fcos_resnet18_fpn", **TINY),
        build_detector("retinanet_resnet18_fpn", **TINY),
        loss=criterion,
        weight=1.0,
        pairing="index",
    ).train()
    losses = distiller(*batch())
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="unknown loss"):
        Distiller(build_detector("fcos_resnet18_fpn", **TINY), build_detector("fcos_resnet18_fpn", **TINY), loss="l1")


def test_index_pairing_resizes_student_levels():
    torch.manual_seed(6)
    teacher = build_detector("fasterrcnn_resnet18_fpn", **TINY)
    distiller = Distiller(build_detector("retinanet_resnet18_fpn", **TINY), teacher, pairing="index").train()
    assert [p.name for p in distiller.pairs] == ["s8_t4", "s16_t8", "s32_t16", "s64_t32"]
    losses = distiller(*batch())
    assert {"loss_distill/s8_t4", "loss_distill/s64_t32"} <= set(losses)


def test_warmup_and_distill_until():
    torch.manual_seed(7)
    teacher = build_detector("fcos_resnet18_fpn", **TINY)
    distiller = Distiller(
        build_detector("fcos_resnet18_fpn", **TINY), teacher, weight=4.0, warmup_steps=4, distill_until=6
    ).train()
    assert [distiller.current_weight(step) for step in range(8)] == [1.0, 2.0, 3.0, 4.0, 4.0, 4.0, 0.0, 0.0]
    calls = []
    teacher.backbone.register_forward_pre_hook(lambda *_: calls.append(1))
    distiller.step = 6
    losses = distiller(*batch())
    assert not any(k.startswith("loss_distill/") for k in losses) and not calls
    assert distiller.step == 7
    assert default_weight(teacher) == 10.0


def test_paired_features_and_device_moves():
    torch.manual_seed(8)
    distiller = Distiller(
        build_detector("retinanet_resnet18_fpn", **TINY), build_detector("fasterrcnn_resnet18_fpn", **TINY)
    )
    students, teachers = distiller.paired_features(batch()[0])
    assert list(students) == ["s8", "s16", "s32", "s64"]
    assert students["s8"].shape == teachers["s8"].shape == (2, 64, 8, 8)
    distiller.to(torch.float64)
    assert next(distiller.teacher.parameters()).dtype == torch.float64
    assert distiller.student.training  # paired_features restored the mode
    assert isinstance(distiller.teacher, nn.Module) and "teacher" not in dict(distiller.named_children())
