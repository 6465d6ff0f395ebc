"""Tests of pkd.deploy, ``pkd export --format onnx``: a run's student exported, verified with
ONNX Runtime and evaluated, an early student with the default flags, a graph that disagrees,
and the errors."""

import json

import pytest
import torch
import yaml
from onnx_helpers import confident

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from pkd.build import load_detector  # noqa: E402
from pkd.checkpoint import save_checkpoint  # noqa: E402
from pkd.cli import main  # noqa: E402
from pkd.deploy import load_images  # noqa: E402
from pkd.export import read_metadata  # noqa: E402
from pkd.models import build_detector  # noqa: E402
from pkd.onnx_runner import OnnxDetector  # noqa: E402


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
    metadata = read_metadata(out)
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
    run_onnx = OnnxDetector.run_with_raw

    def shifted(self, images):  # an ONNX graph whose boxes are 3 px off
        (boxes, *rest), raw = run_onnx(self, images)
        return (boxes + 3, *rest), raw

    monkeypatch.setattr(OnnxDetector, "run_with_raw", shifted)
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
    # No detection confident enough to compare: the raw outputs still verify the graph.
    args = ["export", str(run), "--format", "onnx", "--out", str(tmp_path / "s.onnx"), "--verify-threshold", "1.1"]
    assert main(args) == 0 and (tmp_path / "s.onnx").is_file()


def test_demo_report_names_the_onnx_student_and_its_size(tiny_run, tiny_digits, tmp_path):
    from pkd.demo import _deploy_lines, deploy_student

    run, _ = tiny_run
    images = load_images(tiny_digits.images["test"], 3)
    deployed = deploy_student(run, tmp_path / "student_pkd.onnx", images)
    assert deployed["onnx"] == tmp_path / "student_pkd.onnx" and deployed["onnx"].is_file()
    assert deployed["size_mb"] == pytest.approx(deployed["onnx"].stat().st_size / 1e6)
    text = "\n".join(_deploy_lines(deployed))
    assert "student_pkd.onnx" in text and " MB" in text and "bench_onnx.py" in text
    assert "not exported" in _deploy_lines({"skipped": "onnx is not installed"})[0]


def test_an_early_student_exports_verified_with_the_default_flags(tiny_digits, tmp_path, capsys):
    """`pkd train` for 4 steps, then `pkd export --format onnx` with no flag: verified on the raw
    outputs, although the student scores nothing above its own threshold yet; with a lower
    --score-thresh, ONNX Runtime returns its boxes as PyTorch does."""
    from test_cli import write_config

    config = write_config(tmp_path / "student.yaml", tiny_digits, tmp_path / "student")
    assert main(["train", str(config), "--set", "train.steps=4"]) == 0
    out = tmp_path / "student.onnx"
    assert main(["export", str(tmp_path / "student"), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verified with ONNX Runtime" in printed and "raw outputs" in printed and "disagree" not in printed
    assert "--score-thresh" in printed  # the way to a graph that returns this student's boxes
    assert out.is_file() and not (tmp_path / "student.unverified.onnx").exists()

    images = load_images(tiny_digits.images["test"], 4)
    detector, _ = load_detector(out.with_suffix(".pt"))
    with torch.no_grad():
        for image in images:  # FCOS's own threshold, 0.2: the same (here empty) detections in both
            onnx, pytorch = OnnxDetector(out)([image])[0], detector.eval()([image])[0]
            assert onnx["boxes"].shape[1:] == (4,) and len(onnx["boxes"]) == len(pytorch["boxes"])

    low = tmp_path / "low.onnx"
    args = ["export", str(tmp_path / "student"), "--format", "onnx", "--out", str(low), "--score-thresh"]
    assert main([*args, "0.05"]) == 0
    assert read_metadata(low)["score_thresh"] == 0.05
    detector.score_thresh = 0.05
    with torch.no_grad():
        for image in images:
            onnx, pytorch = OnnxDetector(low)([image])[0], detector([image])[0]
            assert len(onnx["boxes"]) > 0 and onnx["boxes"].shape[1:] == (4,)
            assert float(onnx["scores"].max()) == pytest.approx(float(pytorch["scores"].max()), abs=1e-4)
    assert main([*args, "2"]) == 2 and "--score-thresh" in capsys.readouterr().err


def test_a_family_with_one_input_size_is_exported_and_checked_at_it(tiny_run, tmp_path, monkeypatch):
    import dataclasses

    from pkd import deploy
    from pkd.families import describe

    def fixed(model):
        spec = describe(model)
        return dataclasses.replace(spec, export=dataclasses.replace(spec.export, fixed_size=(48, 56)))

    monkeypatch.setattr(deploy, "describe", fixed)
    run, _ = tiny_run
    done = deploy.export_run_onnx(run / "best.pt", tmp_path / "fixed.onnx")  # the 64x80 val images are resized to it
    runtime = OnnxDetector(done.onnx)
    assert runtime.image_size == (48, 56) and read_metadata(done.onnx)["image_size"] == "48x56"
    assert done.comparison.ok and done.comparison.raw_compared > 0
    with pytest.raises(deploy.DeployError, match="48x56"):
        deploy.export_run_onnx(run / "best.pt", tmp_path / "other.onnx", image_size=(64, 64))
