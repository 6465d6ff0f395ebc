"""Tests of pkd.families.yolo: Ultralytics YOLO models as pkd students and teachers (offline, CPU)."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import NO_NETWORK

pytest.importorskip("ultralytics")

from test_cli import coco_config  # noqa: E402
from test_engine import read_metrics, tiny_config  # noqa: E402
from test_weights import Payload  # noqa: E402

from pkd.build import load_detector  # noqa: E402
from pkd.checkpoint import load_checkpoint  # noqa: E402
from pkd.cli import main  # noqa: E402
from pkd.config import save_config  # noqa: E402
from pkd.distiller import Distiller  # noqa: E402
from pkd.engine import fit  # noqa: E402
from pkd.families.yolo import build_yolo, ultralytics_classes  # noqa: E402
from pkd.models import build_detector, detector_names  # noqa: E402
from pkd.weights import UnsafePickleError  # noqa: E402

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
    # An Ultralytics file is a pkd weights source too (read with an allowlist, for YOLO models only).
    first = "model.model.0.conv.weight"
    again = build_yolo("yolo26n", num_classes=11, weights=native, **TINY)
    assert torch.equal(again.state_dict()[first], student.state_dict()[first])
    fewer = build_yolo("yolo26n", num_classes=4, weights=native, **TINY)  # other classes: head's class layers skipped
    assert torch.equal(fewer.state_dict()[first], student.state_dict()[first])


def test_nothing_reaches_the_network(tmp_path):
    """Build, train a step, evaluate and save a YOLO model with every socket refused, settings in a pkd folder."""
    script = NO_NETWORK + textwrap.dedent(
        """
        import json, sys
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


def trainer_files(detector, folder, names):
    """An Ultralytics checkpoint as its trainer writes one mid-training (the layout of
    ``BaseTrainer.save_model``: EMA model in float16, optimizer, argument namespace, NumPy
    metrics), and the final file Ultralytics' own ``strip_optimizer`` makes of it."""
    import ultralytics
    from ultralytics.utils import DEFAULT_CFG_DICT, IterableSimpleNamespace
    from ultralytics.utils.torch_utils import strip_optimizer

    model = copy.deepcopy(detector.model)
    model.names = names
    model.args = IterableSimpleNamespace(**DEFAULT_CFG_DICT)  # the trainer's self.args
    live = copy.deepcopy(model)  # the model being trained; the file's weights are the EMA's
    optimizer = torch.optim.SGD(live.parameters(), lr=0.01, momentum=0.9)
    sum(p.sum() for p in live.parameters()).backward()
    optimizer.step()  # momentum buffers in the optimizer state
    training = folder / "last.pt"
    torch.save(
        {
            "epoch": 0,
            "best_fitness": np.float64(0.25),
            "model": None,
            "ema": copy.deepcopy(model).half(),
            "updates": 2,
            "optimizer": optimizer.state_dict(),
            "scaler": torch.amp.GradScaler("cpu").state_dict(),
            "train_args": vars(model.args),
            "train_metrics": {"metrics/mAP50(B)": np.float64(0.5), "fitness": np.float64(0.25)},
            "date": "2026-01-01T00:00:00",
            "version": ultralytics.__version__,
            "license": "AGPL-3.0",
        },
        training,
    )
    final = folder / "best.pt"
    strip_optimizer(training, str(final))
    return training, final


def test_ultralytics_trainer_files_load_without_pickle_and_evaluate(coco_files, tmp_path, capsys):
    detector = build_yolo("yolo11n", num_classes=4, **TINY)
    expected = {k: v.half().float() if v.is_floating_point() else v for k, v in detector.state_dict().items()}
    names = {0: "dog", 1: "bird", 2: "cat"}
    for path in trainer_files(detector, tmp_path, names):
        loaded = build_yolo("yolo11n", num_classes=4, weights=path, **TINY).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in expected.items())
        assert ultralytics_classes(path) == {1: "dog", 2: "bird", 3: "cat"}
    # pkd eval CONFIG with the .pt as model.weights: classes matched by name to the split's categories.
    model = {"name": "yolo11n", "options": {"width": 0.125}, "weights": str(tmp_path / "best.pt")}
    config = coco_config(tmp_path / "c.yaml", coco_files, model)
    assert main(["eval", str(config), "--json", str(tmp_path / "m.json")]) == 0
    assert "yolo11n" in capsys.readouterr().out and 0 <= json.loads((tmp_path / "m.json").read_text())["mAP"] <= 1


def test_a_payload_given_as_yolo_weights_never_runs(tiny_digits, tmp_path, capsys):
    marker = tmp_path / "marker"
    payload = tmp_path / "yolo11n.pt"
    torch.save({"model": Payload(marker), "train_args": {}}, payload)
    with pytest.raises(UnsafePickleError, match="builtins.exec"):
        build_yolo("yolo11n", num_classes=3, weights=payload, **TINY)
    config = tiny_config(tiny_digits, tmp_path / "run", teacher=payload, steps=1)
    config.teacher.name, config.teacher.options = "yolo11n", {"width": 0.125}
    with pytest.raises(UnsafePickleError, match="builtins.exec"):
        fit(config, progress=False)
    config.model.name, config.model.options, config.model.weights = "yolo11n", {"width": 0.125}, str(payload)
    save_config(config, tmp_path / "c.yaml")
    assert main(["eval", str(tmp_path / "c.yaml")]) == 2
    assert "builtins.exec" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.slow
def test_a_real_ultralytics_training_run_loads(tmp_path):
    """Ultralytics' own trainer, one epoch offline on four images, then its last.pt and best.pt in pkd."""
    from PIL import Image
    from ultralytics import YOLO

    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        for index in range(4):
            pixels = (torch.rand(64, 64, 3) * 255).byte().numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / split / f"{index}.png")
            (tmp_path / "labels" / split / f"{index}.txt").write_text("0 0.5 0.5 0.3 0.3\n1 0.3 0.3 0.2 0.2\n")
    data = tmp_path / "data.yaml"
    data.write_text(f"path: {tmp_path}\ntrain: images/train\nval: images/val\nnames:\n  0: cat\n  1: dog\n")
    YOLO("yolo11n.yaml").train(
        data=str(data), epochs=1, imgsz=64, batch=2, device="cpu", workers=0, plots=False, amp=False,
        project=str(tmp_path / "runs"), name="run", verbose=False,
    )  # fmt: skip
    for name in ("last.pt", "best.pt"):
        path = tmp_path / "runs" / "run" / "weights" / name
        model = build_yolo("yolo11n", num_classes=3, weights=path, min_size=64, max_size=64)
        assert type(model).__name__ == "YoloDetector" and ultralytics_classes(path) == {1: "cat", 2: "dog"}
