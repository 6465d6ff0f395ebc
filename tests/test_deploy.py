"""Tests of the ONNX deployment: every detector family exported whole, run in ONNX Runtime and
matched with PyTorch, the comparison's rules, the command line, and the speed measurement."""

import json
import sys

import pytest
import torch
import yaml

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from pkd import deploy  # noqa: E402
from pkd.checkpoint import save_checkpoint  # noqa: E402
from pkd.cli import main  # noqa: E402
from pkd.deploy import Comparison, DeployError, OnnxDetector, compare_detections  # noqa: E402
from pkd.models import build_detector  # noqa: E402

TINY = {"num_classes": 3, "min_size": 64, "max_size": 96}


def confident(detector):
    """A random-init detector made to detect: BatchNorm statistics from data, spread class scores.

    From random init MobileNetV3's features all but vanish (std 1e-8 at the FPN), so BatchNorm
    statistics are first measured on random images, as a training step would. Then the class
    logits, near a constant from random init (the focal-loss prior of one-stage heads: scores
    about 0.01), are scaled to a standard deviation of 1 so that many detections pass 0.3 and
    few tie; the background class (0, which torchvision's one-stage detectors score like the
    others and training pushes down) is kept out of the detections. The region proposals of
    two-stage detectors are their anchors (random box deltas leave a handful of proposals).
    """
    calibration = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    norms = [m for m in detector.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.momentum = 1.0
    if norms:
        detector.train()
        with torch.no_grad():
            detector.backbone(calibration)
    detector.eval()
    one_stage = hasattr(detector, "head")
    layer = detector.head.classification_head.cls_logits if one_stage else detector.roi_heads.box_predictor.cls_score
    logits = []
    handle = layer.register_forward_hook(lambda module, inputs, output: logits.append(output))
    with torch.no_grad():
        layer.bias.zero_()
        detector(list(calibration))
        handle.remove()
        layer.weight.mul_(1 / torch.cat([x.flatten() for x in logits]).std())
        if one_stage:
            layer.bias[0 :: detector.head.classification_head.num_classes] = -30.0
        else:  # proposals are the anchors (random deltas leave a handful), no background wins
            detector.rpn.head.bbox_pred.weight.zero_()
            detector.rpn.head.bbox_pred.bias.zero_()
            # MobileNetV3's FPN features reach 1e3 here: damp the random box deltas they feed.
            detector.roi_heads.box_predictor.bbox_pred.weight.mul_(0.01)
            layer.bias[0] = -30.0
    return detector


def images_of_sizes(*sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, *size, generator=generator) for size in sizes]


# Every family pkd trains, on each kind of backbone (ResNet, MobileNetV3, timm).
DETECTORS = [
    pytest.param("fcos_resnet18_fpn", {"fpn_channels": 64}, id="fcos_resnet18_fpn"),
    pytest.param("retinanet_resnet18_fpn", {"fpn_channels": 64}, id="retinanet_resnet18_fpn"),
    pytest.param("retinanet_resnet18_fpn_v2", {"fpn_channels": 64}, id="retinanet_resnet18_fpn_v2"),
    pytest.param("fasterrcnn_resnet18_fpn", {"fpn_channels": 64}, id="fasterrcnn_resnet18_fpn"),
    # Boxes only (no masks output), but tracing still pastes the masks: 16 s on 2 cores.
    pytest.param("maskrcnn_resnet18_fpn", {"fpn_channels": 64}, id="maskrcnn_resnet18_fpn", marks=pytest.mark.slow),
    pytest.param("fasterrcnn_mobilenet_v3_large_320_fpn", {}, id="fasterrcnn_mobilenet_v3_large_320_fpn"),
    pytest.param("fcos_timm_tf_efficientnet_lite0_fpn", {"fpn_channels": 64}, id="fcos_timm_tf_efficientnet_lite0_fpn"),
]


@pytest.mark.parametrize(("name", "options"), DETECTORS)
def test_every_family_exports_whole_and_matches_pytorch_at_other_sizes(name, options, tmp_path):
    torch.manual_seed(0)
    detector = confident(build_detector(name, **{**TINY, **options}))
    path = deploy.export_onnx(
        detector, tmp_path / "model.onnx", image_size=(64, 64), metadata=deploy.detector_metadata(detector)
    )
    # Traced at 64x64; run at other sizes and aspect ratios, some resized inside the graph (max_size 96).
    images = images_of_sizes((64, 80), (90, 50), (40, 40), (150, 200))
    comparison = deploy.verify_onnx(path, detector, images)
    assert comparison.ok, comparison.summary()
    assert comparison.compared >= 20 and comparison.max_box_difference < 0.1
    metadata = deploy.read_metadata(path)
    assert metadata["image_size"] == "dynamic" and metadata["batch_size"] == 1
    assert metadata["image_mean"] == [float(m) for m in detector.transform.image_mean]
    sizes = {**TINY, **options}
    assert metadata["resize"] == {"min_size": [sizes["min_size"]], "max_size": sizes["max_size"], "size_divisible": 32}
    assert "RGB in [0, 1]" in metadata["input"]


def test_resized_size_is_rounded_as_in_pytorch(tmp_path):
    # float32 and float64 round floor(side * min_size / short_side) apart for these sizes.
    torch.manual_seed(0)
    detector = confident(
        build_detector("fcos_resnet18_fpn", num_classes=3, min_size=112, max_size=256, fpn_channels=64)
    )
    path = deploy.export_onnx(detector, tmp_path / "model.onnx", image_size=(112, 112))
    images = images_of_sizes((111, 121), (127, 113), (128, 98), (427, 640))
    comparison = deploy.verify_onnx(path, detector, images)
    assert comparison.ok and comparison.max_box_difference < 0.01, comparison.summary()


def test_fixed_batch_and_size(tmp_path):
    torch.manual_seed(0)
    detector = confident(build_detector("fcos_resnet18_fpn", **TINY, fpn_channels=64))
    path = deploy.export_onnx(detector, tmp_path / "b2.onnx", image_size=(64, 72), batch_size=2, dynamic_size=False)
    runtime = OnnxDetector(path)
    assert runtime.batch_size == 2 and runtime.session.get_inputs()[0].shape == [2, 3, 64, 72]
    assert deploy.read_metadata(path)["image_size"] == "64x72"
    images = images_of_sizes((64, 72), (64, 72), (64, 72))  # the last batch is padded with a copy
    outputs = runtime(images)
    assert len(outputs) == 3
    for image, output in zip(images, outputs, strict=True):
        comparison = compare_detections(detector([image])[0], output, Comparison())
        assert comparison.ok, comparison.summary()
    with pytest.raises(DeployError, match="batches of 2 images of one size"):
        runtime(images_of_sizes((64, 72), (64, 64)))


def detections(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def test_comparison_rules():
    reference = detections([[0, 0, 10, 10], [20, 20, 40, 40], [5, 5, 8, 8]], [0.9, 0.6, 0.1], [1, 2, 1])
    # Same detections in another order, slightly moved; the one under the threshold is ignored.
    close = detections([[20.5, 20, 40, 40], [0, 0, 10.2, 10]], [0.605, 0.9], [2, 1])
    comparison = compare_detections(reference, close, Comparison())
    assert comparison.ok and comparison.compared == comparison.matched == 2
    assert comparison.max_box_difference == pytest.approx(0.5) and comparison.max_score_difference < 0.006

    moved = detections([[0, 0, 10, 12], [20, 20, 40, 40]], [0.9, 0.6], [1, 2])
    comparison = compare_detections(reference, moved, Comparison())
    assert not comparison.ok and comparison.matched == 1
    assert "missing in ONNX, e.g. image 0: label 1 score 0.900" in comparison.summary()
    assert "1 only in ONNX" in comparison.summary()

    relabelled = detections([[0, 0, 10, 10], [20, 20, 40, 40]], [0.9, 0.6], [2, 2])
    assert not compare_detections(reference, relabelled, Comparison()).ok

    # Right at the threshold a detection may fall on either side; clearly above it may not.
    near = detections([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]], [0.9, 0.6, 0.305], [1, 2, 1])
    assert compare_detections(reference, near, Comparison()).ok
    above = detections([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]], [0.9, 0.6, 0.5], [1, 2, 1])
    assert not compare_detections(reference, above, Comparison()).ok

    empty = compare_detections(detections([], [], []), detections([], [], []), Comparison())
    assert not empty.ok and "nothing to compare" in empty.summary()


@pytest.fixture
def tiny_run(tiny_digits, tmp_path):
    """A run folder as `pkd train` leaves it (best.pt, config in the checkpoint) for a random
    FCOS whose scores are spread out, and a config for `pkd eval`."""
    torch.manual_seed(0)
    build = {"fpn_channels": 64, "norm": "batch", "min_size": 64, "max_size": 96}
    detector = confident(build_detector("fcos_resnet18_fpn", num_classes=11, **build))
    split = lambda name: {"annotations": str(tiny_digits.annotations[name]), "images": str(tiny_digits.images[name])}  # noqa: E731
    config = {
        "model": {"name": "fcos_resnet18_fpn", "fpn_channels": 64},
        "data": {"train": split("train"), "val": split("val"), "test": split("test"), "eval_size": 64},
        "train": {"batch_size": 4},
        "output": str(tmp_path / "run"),
    }
    meta = {
        "detector": "fcos_resnet18_fpn",
        "num_classes": 11,
        "build": build,
        "label_map": {k: k for k in range(1, 11)},
        "class_names": {k: str(k - 1) for k in range(1, 11)},
    }
    save_checkpoint(tmp_path / "run" / "best.pt", {"model": detector.state_dict(), "meta": meta, "config": config})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "run", tmp_path / "config.yaml"


def test_cli_exports_verifies_and_evaluates_onnx(tiny_run, tmp_path, capsys):
    run, config = tiny_run
    out = tmp_path / "deploy" / "student.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "student.pt (PyTorch)" in printed and "ONNX Runtime on" in printed and "/val" in printed
    assert out.is_file() and out.with_suffix(".pt").is_file() and not (out.parent / "student.unverified.onnx").exists()
    metadata = deploy.read_metadata(out)
    assert metadata["detector"] == "fcos_resnet18_fpn" and metadata["class_names"][1] == "0"
    assert metadata["label_map"] == {k: k for k in range(1, 11)}

    for flag, model in (("--checkpoint", out.with_suffix(".pt")), ("--onnx", out)):
        # One image per batch, as ONNX Runtime runs them: a padded batch changes what the convolutions see.
        args = ["eval", str(config), flag, str(model), "--split", "test", "--set", "train.batch_size=1"]
        args += ["--json", str(tmp_path / f"{flag}.json")]
        assert main(args) == 0
    pytorch, onnx = (json.loads((tmp_path / f"{flag}.json").read_text()) for flag in ("--checkpoint", "--onnx"))
    assert set(onnx) == set(pytorch)
    assert all(abs(onnx[k] - pytorch[k]) <= 1e-3 for k in pytorch), (pytorch, onnx)
    assert "(ONNX Runtime, " in capsys.readouterr().out


def test_export_that_disagrees_fails_and_keeps_the_pytorch_export(tiny_run, tiny_digits, tmp_path, monkeypatch, capsys):
    run, _ = tiny_run
    run_onnx = OnnxDetector.run

    def shifted(self, images):  # an ONNX graph whose boxes are 3 px off
        boxes, *rest = run_onnx(self, images)
        return (boxes + 3, *rest)

    monkeypatch.setattr(OnnxDetector, "run", shifted)
    out = tmp_path / "student.onnx"
    assert (
        main(["export", str(run), "--format", "onnx", "--out", str(out), "--images", str(tiny_digits.images["test"])])
        == 2
    )
    error = capsys.readouterr().err
    assert "the ONNX export disagrees with PyTorch" in error and "missing in ONNX" in error
    assert "Kept the PyTorch export" in error and "student.unverified.onnx" in error
    assert not out.exists() and out.with_suffix(".pt").is_file() and (tmp_path / "student.unverified.onnx").is_file()


def test_cli_export_errors(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "s.onnx"), "--half"]) == 2
    assert "--half is for --format pt" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "s.pt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "s.onnx"), "--images", "/nope"]) == 2
    assert "image folder /nope does not exist" in capsys.readouterr().err
    # Nothing confident enough to compare is a failure, not a silent pass.
    args = ["export", str(run), "--format", "onnx", "--out", str(tmp_path / "s.onnx"), "--verify-threshold", "1.1"]
    assert main(args) == 2
    assert "nothing to compare" in capsys.readouterr().err


def test_missing_onnxruntime_says_which_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(DeployError, match=r"pkd\[onnx\]"):
        OnnxDetector(tmp_path / "x.onnx")


def test_compare_speed_reports_both_and_their_ratio(tmp_path):
    detector = build_detector("fcos_resnet18_fpn", **TINY, fpn_channels=64).eval()
    path = deploy.export_onnx(detector, tmp_path / "m.onnx", image_size=(64, 64))
    speed = deploy.compare_speed(detector, path, images_of_sizes((64, 64), (64, 64)), threads=1, warmup=1, rounds=1)
    assert speed["threads"] == 1 and speed["pytorch_images_per_s"] > 0 and speed["onnx_images_per_s"] > 0
    assert speed["onnx_speedup"] == pytest.approx(speed["onnx_images_per_s"] / speed["pytorch_images_per_s"])


def test_demo_report_names_the_onnx_student_its_size_and_speed(tiny_run, tiny_digits, tmp_path):
    from pkd.demo import _deploy_lines, deploy_student

    run, _ = tiny_run
    images = deploy.load_images(tiny_digits.images["test"], 3)
    deployed = deploy_student(run, tmp_path / "student_pkd.onnx", images, verify=3)
    assert deployed["onnx"] == tmp_path / "student_pkd.onnx" and deployed["onnx"].is_file()
    assert deployed["size_mb"] == pytest.approx(deployed["onnx"].stat().st_size / 1e6)
    assert deployed["onnx_images_per_s"] > 0 and deployed["pytorch_images_per_s"] > 0
    text = "\n".join(_deploy_lines(deployed))
    assert "student_pkd.onnx" in text and " MB" in text and "images/s" in text and "ONNX Runtime" in text
    assert "not exported" in _deploy_lines({"skipped": "onnx is not installed"})[0]


@pytest.mark.parametrize("name", ["yolo11n", "yolo26n"])
def test_yolo_students_export_and_match_pytorch(name, tmp_path):
    pytest.importorskip("ultralytics")
    torch.manual_seed(0)
    detector = build_detector(name, num_classes=3, min_size=64, max_size=96, width=0.125)
    # As confident(): BatchNorm statistics from data, then class logits spread around 0 instead
    # of YOLO's prior (scores about 0.01), so that many detections pass 0.3 and few tie.
    for norm in (m for m in detector.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.momentum = 1.0
    with torch.no_grad():
        detector.train()
        detector.head(list(detector.backbone(torch.rand(2, 3, 96, 96)).values()))
        for branch in ("cv3", "one2one_cv3"):
            for level in getattr(detector.head, branch, None) or []:
                level[-1].bias.zero_()
                level[-1].weight.mul_(10)
    detector.eval()
    path = deploy.export_onnx(detector, tmp_path / "yolo.onnx", image_size=(64, 64))
    comparison = deploy.verify_onnx(path, detector, images_of_sizes((64, 80), (90, 50), (40, 40)))
    assert comparison.ok and comparison.compared >= 20, comparison.summary()
