"""Tests of the pkd command line: every command end to end on tiny data, and its errors."""

import json
import subprocess
import sys

import pytest
import torch
import torchvision
import yaml

from pkd.cli import build_parser, main
from pkd.models import build_detector


def write_config(path, digits, output, **sections):
    values = {
        "model": {"name": "fcos_resnet18_fpn", "fpn_channels": 64},
        "data": {
            "train": {"annotations": str(digits.annotations["train"]), "images": str(digits.images["train"])},
            "val": {"annotations": str(digits.annotations["val"]), "images": str(digits.images["val"])},
            "test": {"annotations": str(digits.annotations["test"]), "images": str(digits.images["test"])},
            "train_sizes": [64],
            "max_size": 96,
            "eval_size": 64,
            "workers": 0,
        },
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "log_every": 1},
        "output": str(output),
    }
    values.update(sections)
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize(
    "command",
    [[], ["train"], ["distill"], ["eval"], ["export"], ["check-data"], ["data", "digits"], ["inspect"], ["plot"]],
)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: pkd" in capsys.readouterr().out


def test_console_script_entry_point():
    done = subprocess.run([sys.executable, "-m", "pkd", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "distill" in done.stdout


def test_train_distill_eval_export(tiny_digits, tmp_path, capsys):
    teacher_config = write_config(tmp_path / "teacher.yaml", tiny_digits, tmp_path / "teacher")
    assert main(["train", str(teacher_config), "--set", "model.name=fasterrcnn_resnet18_fpn"]) == 0
    assert "best validation" in capsys.readouterr().out

    student_config = write_config(
        tmp_path / "student.yaml",
        tiny_digits,
        tmp_path / "student",
        model={"name": "fcos_resnet50_fpn"},
        teacher={"weights": str(tmp_path / "teacher" / "best.pt"), "fpn_channels": 64},
        distill={"loss": "pkd", "weight": 1.0, "connectors": True},
    )
    assert main(["distill", str(student_config)]) == 0
    out = capsys.readouterr().out
    assert "test (best checkpoint)" in out and "mAP" in out

    assert main(["export", str(tmp_path / "student"), "--out", str(tmp_path / "student.pt")]) == 0
    # Loadable without pkd, into torchvision's own builder.
    exported = torch.load(tmp_path / "student.pt", weights_only=True)
    plain = torchvision.models.detection.fcos_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=exported["meta"]["num_classes"]
    )
    plain.load_state_dict(exported["state_dict"], strict=True)
    assert exported["meta"]["label_map"] == {k: k for k in range(1, 11)}

    assert main(["eval", str(student_config), "--checkpoint", str(tmp_path / "student.pt"), "--split", "test",
                 "--json", str(tmp_path / "m.json")]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) >= {"mAP", "AP50", "AR100"}
    assert "on test (6 images)" in capsys.readouterr().out
    # The same file as the config's model.weights: its label map and build come from its meta.
    assert main(["eval", str(student_config), "--set", f"model.weights={tmp_path / 'student.pt'}", "--split", "test",
                 "--json", str(tmp_path / "w.json")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "w.json").read_text()) == metrics


def test_errors_are_one_line_with_exit_code_2(tiny_digits, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_digits, tmp_path / "run")
    assert main(["train", str(config), "--set", "train.optimiser=adam"]) == 2
    assert "unknown key train.optimiser" in capsys.readouterr().err
    assert main(["distill", str(config)]) == 2
    assert "needs a teacher section" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["export", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_check_data(coco_files, capsys):
    assert main(["check-data", str(coco_files.annotations), "--images", str(coco_files.images)]) == 0
    capsys.readouterr()
    coco_files.data["annotations"][0]["bbox"] = [5, 5, 0, 10]
    coco_files.write()
    assert main(["check-data", str(coco_files.annotations), "--images", str(coco_files.images)]) == 1
    report = capsys.readouterr().out
    assert str(coco_files.data["annotations"][0]["id"]) in report


def test_data_digits_with_preview(tmp_path, capsys):
    out = tmp_path / "digits"
    args = ["data", "digits", "--out", str(out), "--train-images", "4", "--val-images", "2", "--test-images", "2",
            "--image-size", "64", "72", "--digit-size", "12", "20", "--preview"]  # fmt: skip
    assert main(args) == 0
    assert (out / "preview.png").stat().st_size > 1000
    assert json.loads((out / "annotations" / "train.json").read_text())["images"]
    assert "preview:" in capsys.readouterr().out


def test_parser_lists_every_command():
    text = build_parser().format_help()
    for command in ("train", "distill", "eval", "export", "check-data", "data"):
        assert command in text


def test_demo_presets_on_the_command_line(capsys):
    parser = build_parser()
    assert parser.parse_args(["demo", "--scratch"]).scratch
    assert parser.parse_args(["demo", "--preset", "retinanet"]).preset == "retinanet"
    assert main(["demo", "--preset", "huge"]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err


def test_inspect_writes_every_figure_and_the_numbers(tiny_digits, tmp_path, capsys):
    from PIL import Image

    config = write_config(
        tmp_path / "pair.yaml",
        tiny_digits,
        tmp_path / "run",
        teacher={"name": "fasterrcnn_resnet18_fpn", "fpn_channels": 64},
        distill={"loss": "pkd"},
    )
    out = tmp_path / "inspect"
    assert main(["inspect", str(config), "--batches", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for stage in ("s8", "s16", "s32", "s64"):
        assert stage in printed
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["stages"] == ["s8", "s16", "s32", "s64"] and analysis["num_batches"] == 2
    for name in ("histograms", "channel_dominance", "stage_maps", "gradient_shares", "correlation"):
        with Image.open(out / f"{name}.png") as image:
            assert image.size[0] > 400 and image.size[1] > 200
    # A pair whose channels differ needs trained connectors.
    mismatched = write_config(
        tmp_path / "mismatch.yaml",
        tiny_digits,
        tmp_path / "run2",
        teacher={"name": "fasterrcnn_resnet18_fpn", "fpn_channels": 128},
        distill={"connectors": True},
    )
    assert main(["inspect", str(mismatched), "--out", str(out)]) == 2
    assert "needs connectors" in capsys.readouterr().err


def test_plot_one_run_and_several(tiny_digits, tmp_path, capsys):
    for name in ("a", "b"):
        config = write_config(tmp_path / f"{name}.yaml", tiny_digits, tmp_path / name)
        assert main(["train", str(config)]) == 0
        assert (tmp_path / name / "curves.png").stat().st_size > 10_000  # written at the end of the run
    (tmp_path / "a" / "curves.png").unlink()
    assert main(["plot", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "curves.png").is_file()
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab.png")]) == 0
    assert (tmp_path / "ab.png").stat().st_size > 10_000
    assert "mAP of 2 runs" in capsys.readouterr().out


def test_timm_backbone_student_distils_exports_loads_plainly_and_inspects(tiny_digits, tmp_path, capsys):
    from pkd.models import build_detector

    student = {
        "name": "retinanet_timm_tf_efficientnet_lite0_fpn",
        "weights_backbone": "efficientnet_lite0.imagenet",
        "fpn_channels": 64,
    }
    config = write_config(
        tmp_path / "student.yaml",
        tiny_digits,
        tmp_path / "student",
        model=student,
        teacher={"name": "fasterrcnn_resnet18_fpn", "fpn_channels": 64},  # ImageNet-normalised
        distill={"loss": "pkd", "weight": 2.0},
    )
    assert main(["distill", str(config)]) == 0
    assert main(["export", str(tmp_path / "student"), "--out", str(tmp_path / "student.pt")]) == 0
    exported = torch.load(tmp_path / "student.pt", weights_only=True)
    meta = exported["meta"]
    assert meta["detector"] == student["name"] and meta["build"]["norm"] == "frozen"
    # Rebuilt for inference without the weights file: the state_dict carries every weight.
    plain = build_detector(meta["detector"], num_classes=meta["num_classes"], **meta["build"])
    plain.load_state_dict(exported["state_dict"], strict=True)
    assert plain.transform.image_mean == [0.5, 0.5, 0.5]
    plain.eval()
    with torch.no_grad():
        assert set(plain([torch.rand(3, 64, 64)])[0]) == {"boxes", "scores", "labels"}
    capsys.readouterr()

    out = tmp_path / "inspect"
    assert main(["inspect", str(config), "--batches", "1", "--out", str(out)]) == 0
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["stages"] == ["s8", "s16", "s32", "s64"]


def coco_config(path, coco_files, model):
    """A config whose splits are the hand-made COCO dataset (categories bird, cat, dog, as COCO names them)."""
    split = {"annotations": str(coco_files.annotations), "images": str(coco_files.images)}
    values = {"model": model, "data": {"train": split, "val": split, "eval_size": 64, "max_size": 64, "workers": 0}}
    path.write_text(yaml.safe_dump(values))
    return path


def test_eval_a_torchvision_weights_enum(coco_files, tmp_path, monkeypatch, capsys):
    """COCO weights by enum name, matched to the split's categories by name. No detector weights exist
    offline, so torchvision's download returns a random state_dict of the same network: the code path
    (enum -> torchvision's builder -> label map by name -> COCO mAP) is what is tested, not the numbers."""
    torch.manual_seed(0)
    random_weights = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda *args, **kwargs: random_weights)
    model = {"name": "fcos_resnet50_fpn", "weights": "FCOS_ResNet50_FPN_Weights.COCO_V1"}
    config = coco_config(tmp_path / "c.yaml", coco_files, model)
    assert main(["eval", str(config), "--json", str(tmp_path / "m.json")]) == 0
    assert "mAP" in capsys.readouterr().out
    assert 0 <= json.loads((tmp_path / "m.json").read_text())["mAP"] <= 1

    from pkd.build import load_weights_model
    from pkd.config import ModelConfig

    _, meta = load_weights_model(ModelConfig(**model), {11: "bird", 3: "cat", 7: "dog"}, eval_size=64, max_size=64)
    assert meta["label_map"] == {11: 16, 3: 17, 7: 18} and meta["num_classes"] == 91  # COCO's own labels
    with pytest.raises(ValueError, match="does not predict"):
        load_weights_model(ModelConfig(**model), {1: "digit 7"}, eval_size=64, max_size=64)


def test_eval_a_timm_backbone_state_dict(tiny_digits, tmp_path, capsys):
    model = {"name": "fcos_timm_tf_efficientnet_lite0_fpn", "fpn_channels": 32}
    detector = build_detector(model["name"], num_classes=11, fpn_channels=32, min_size=64, max_size=96)
    torch.save(detector.state_dict(), tmp_path / "detector.pth")
    config = write_config(tmp_path / "c.yaml", tiny_digits, tmp_path / "run", model={**model, "weights": "x"})
    override = f"model.weights={tmp_path / 'detector.pth'}"
    assert main(["eval", str(config), "--set", override, "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "detector.pth" in out and "mAP" in out
    assert main(["eval", str(config), "--set", "model.weights=null"]) == 2
    assert "model.weights" in capsys.readouterr().err
