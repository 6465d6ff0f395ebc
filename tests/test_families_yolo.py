"""Tests of pkd.families.yolo: Ultralytics YOLO models as pkd students and teachers (offline, CPU)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("ultralytics")

from test_engine import read_metrics, tiny_config  # noqa: E402

from pkd.build import load_detector  # noqa: E402
from pkd.checkpoint import load_checkpoint  # noqa: E402
from pkd.cli import main  # noqa: E402
from pkd.distiller import Distiller  # noqa: E402
from pkd.engine import fit  # noqa: E402
from pkd.families.yolo import build_yolo  # noqa: E402
from pkd.models import build_detector, detector_names  # noqa: E402

TINY = {"min_size": 64, "max_size": 64, "width": 0.125}


def images_and_targets():
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 80)]
    targets = [
        {"boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[10.0, 10.0, 40.0, 50.0], [0.0, 0.0, 20.0, 20.0]]), "labels": torch.tensor([2, 1])},
    ]
    return images, targets


@pytest.mark.parametrize("name", ["yolov8n", "yolo11n", "yolo26n"])
def test_yolo_trains_and_predicts_in_image_coordinates(name):
    torch.manual_seed(0)
    model = build_detector(name, num_classes=3, skip_resize=True, score_thresh=0.0, **TINY)
    levels = model.backbone(torch.zeros(1, 3, 64, 96))
    assert {k: tuple(v.shape[-2:]) for k, v in levels.items()} == {"p3": (8, 12), "p4": (4, 6), "p5": (2, 3)}
    images, targets = images_and_targets()
    losses = model.train()(images, targets)
    assert set(losses) == {"loss_box", "loss_cls", "loss_dfl"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.backbone.layers[0].parameters())
    with torch.no_grad():
        detections = model.eval()([images[1] * 0.5, images[0]])
    assert len(detections) == 2 and detections[0]["boxes"].shape[0] > 0
    for detection, (height, width) in zip(detections, [(64, 80), (64, 64)], strict=True):
        boxes = detection["boxes"]
        assert set(detection) == {"boxes", "scores", "labels"}
        assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all() and (boxes >= 0).all()
        assert set(detection["labels"].tolist()) <= {1, 2}
    assert model.end2end == (name == "yolo26n")


def test_yolo_names_options_and_errors():
    assert {"yolov8n", "yolo11s", "yolo26x"} <= set(detector_names())
    with pytest.raises(ValueError, match="fpn_channels: torchvision options"):
        build_detector("yolo11n", num_classes=3, fpn_channels=64)
    with pytest.raises(ValueError, match="anchor_sizes: not options of YOLO"):
        build_yolo("yolo11n", num_classes=3, anchor_sizes=(8,))
    with pytest.raises(ValueError, match="not weights_backbone"):
        build_yolo("yolo11n", num_classes=3, weights_backbone="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="use BatchNorm"):
        build_yolo("yolo11n", num_classes=3, norm="group")
    with pytest.raises(ValueError, match="one-to-one head"):
        build_yolo("yolo11n", num_classes=3, end2end=True, **TINY)
    assert type(build_detector("yolo11n.yaml", num_classes=3, **TINY)).__name__ == "YoloDetector"  # packaged yaml
    with pytest.raises(FileNotFoundError, match="my-yolo.yaml does not exist"):
        build_detector("cfg/my-yolo.yaml", num_classes=3)
    wide = build_yolo("yolo11n", num_classes=3, min_size=64, max_size=64, width=0.25)
    narrow = build_yolo("yolo11n", num_classes=3, **TINY)
    assert sum(p.numel() for p in wide.parameters()) > 2 * sum(p.numel() for p in narrow.parameters())


def test_yolo_state_dict_has_one_key_per_weight_and_reloads(tmp_path):
    model = build_yolo("yolo11n", num_classes=3, **TINY)
    keys = list(model.state_dict())
    assert all(k.startswith("model.model.") for k in keys) and len(keys) == len(set(keys))
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    again = build_yolo("yolo11n", num_classes=3, weights=tmp_path / "plain.pt", **TINY)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="do not fit this YOLO model"):
        build_yolo("yolo11n", num_classes=3, min_size=64, max_size=64, width=0.25, weights=tmp_path / "plain.pt")


@pytest.fixture(scope="module")
def yolo_teacher(tiny_digits, tmp_path_factory):
    """A YOLO11 run of a few steps (a pkd checkpoint), trained once for the module."""
    output = tmp_path_factory.mktemp("yolo") / "yolo11"
    config = tiny_config(tiny_digits, output, steps=4, eval_every=2)
    config.model.name, config.model.fpn_channels, config.model.options = "yolo11n", 256, {"width": 0.125}
    results = fit(config, progress=False)
    return output, results


def test_fit_trains_and_evaluates_a_yolo_model(yolo_teacher):
    run, results = yolo_teacher
    records = read_metrics(run)
    train = [r for r in records if r["type"] == "train"]
    assert {"loss_box", "loss_cls", "loss_dfl"} <= set(train[0]) and all(r["loss"] > 0 for r in train)
    assert [r["step"] for r in records if r["type"] == "val"] == [2, 4]
    assert 0 <= results["test"]["mAP"] <= 1
    meta = load_checkpoint(run / "best.pt")["meta"]
    assert meta["detector"] == "yolo11n" and meta["build"]["width"] == 0.125 and meta["num_classes"] == 11
    model, _ = load_detector(run / "best.pt")
    assert type(model).__name__ == "YoloDetector"


def _teacher_unchanged(distiller, before):
    return all(torch.equal(before[k], v) for k, v in distiller.teacher.state_dict().items())


@pytest.mark.parametrize(
    ("student", "teacher", "loss"),
    [
        ("yolo26n", "yolo11n", "pkd"),
        ("yolo26n", "fcos_resnet18_fpn", "mse"),
        ("fasterrcnn_resnet18_fpn", "yolo11n", "cwd"),
        ("yolo11n", "fasterrcnn_resnet18_fpn", "pkd"),
    ],
)
def test_cross_framework_pairs_distil_with_connectors(student, teacher, loss):
    torch.manual_seed(0)

    def build(name):
        options = TINY if name.startswith("yolo") else {"min_size": 64, "max_size": 64, "fpn_channels": 32}
        return build_detector(name, num_classes=3, skip_resize=True, **options)

    distiller = Distiller(build(student), build(teacher), loss=loss, weight=1.0, connectors=True)
    assert [p.student_stride for p in distiller.pairs] == [p.teacher_stride for p in distiller.pairs]
    before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.01)
    images, targets = images_and_targets()
    for _ in range(2):
        losses = distiller.train()(images, targets)
        distill = [v for k, v in losses.items() if k.startswith("loss_distill/")]
        assert distill and all(torch.isfinite(v) and v > 0 for v in distill)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert _teacher_unchanged(distiller, before)
    assert all(p.grad is None for p in distiller.teacher.parameters())
    # What pkd inspect reads: both sides of every pair, the student's through its connector.
    students, teachers = distiller.paired_features(images)
    assert list(students) == [p.name for p in distiller.pairs]
    assert all(students[k].shape[:2] == teachers[k].shape[:2] for k in students)


def test_pkd_distill_config_yolo11_to_yolo26_then_export(yolo_teacher, tiny_digits, tmp_path):
    teacher_run, _ = yolo_teacher
    config = tiny_config(tiny_digits, tmp_path / "yolo26", teacher=teacher_run / "best.pt", steps=2, eval_every=2)
    config.model.name, config.model.fpn_channels, config.model.options = "yolo26n", 256, {"width": 0.125}
    config.distill.connectors = True
    fit(config, progress=False)
    train = [r for r in read_metrics(tmp_path / "yolo26") if r["type"] == "train"]
    assert all(r["loss_distill"] > 0 and all(r[f"loss_distill/s{s}"] > 0 for s in (8, 16, 32)) for r in train)

    # pkd's own export, then Ultralytics' format, loaded back by Ultralytics itself.
    native = tmp_path / "student_ultralytics.pt"
    args = ["export", str(tmp_path / "yolo26"), "--out", str(tmp_path / "student.pt"), "--ultralytics", str(native)]
    assert main(args) == 0
    student, meta = load_detector(tmp_path / "student.pt")
    from ultralytics import YOLO

    loaded = YOLO(str(native)).model.eval()
    batch = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ours = student.model.eval()(batch)[0]
        theirs = loaded(batch)[0]
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert loaded.names[0] == meta["class_names"][1]
    # An Ultralytics file is a pkd weights source too (read with pickle, for YOLO models only).
    first = "model.model.0.conv.weight"
    again = build_yolo("yolo26n", num_classes=11, weights=native, **TINY)
    assert torch.equal(again.state_dict()[first], student.state_dict()[first])
    fewer = build_yolo("yolo26n", num_classes=4, weights=native, **TINY)  # other classes: head's class layers skipped
    assert torch.equal(fewer.state_dict()[first], student.state_dict()[first])


def test_nothing_reaches_the_network(tmp_path):
    """Build, train a step, evaluate and save a YOLO model with every socket refused, settings in a pkd folder."""
    script = textwrap.dedent(
        """
        import json, socket, sys
        def refuse(*args, **kwargs):
            raise OSError("network disabled in this test")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        import torch
        from pkd.models import build_detector
        from pkd.families.yolo import save_ultralytics
        model = build_detector("yolo26n", num_classes=3, min_size=64, max_size=64, width=0.125, skip_resize=True)
        images = [torch.rand(3, 64, 64)]
        targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])}]
        sum(model.train()(images, targets).values()).backward()
        model.eval()(images)
        save_ultralytics(model, sys.argv[1])
        from ultralytics import YOLO
        YOLO(sys.argv[1])
        import os
        print(json.dumps({"config": os.environ["YOLO_CONFIG_DIR"]}))
        """
    )
    env = {**os.environ, "HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    env.pop("YOLO_CONFIG_DIR", None)
    env.pop("XDG_CACHE_HOME", None)
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "out.pt")], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads(result.stdout.strip().splitlines()[-1])["config"]
    assert config == str(tmp_path / "home" / ".cache" / "pkd" / "ultralytics")
    assert (tmp_path / "home" / ".cache" / "pkd" / "ultralytics").is_dir()
    assert not (tmp_path / "home" / ".config").exists()
