"""Tests of pkd.onnx_runner: an exported file behind the detectors' list-of-images interface,
with a fixed batch or size, and the error without onnxruntime."""

import sys

import pytest
import torch
from onnx_helpers import TINY, confident, images_of_sizes

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from pkd.export import DeployError, export_onnx, read_metadata  # noqa: E402
from pkd.models import build_detector  # noqa: E402
from pkd.onnx_runner import OnnxDetector  # noqa: E402
from pkd.verify import Comparison, compare_detections  # noqa: E402


def test_fixed_batch_and_size(tmp_path):
    torch.manual_seed(0)
    detector = confident(build_detector("fcos_resnet18_fpn", **TINY, fpn_channels=64))
    path = export_onnx(detector, tmp_path / "b2.onnx", image_size=(64, 72), batch_size=2, dynamic_size=False)
    runtime = OnnxDetector(path)
    assert runtime.batch_size == 2 and runtime.session.get_inputs()[0].shape == [2, 3, 64, 72]
    assert runtime.image_size == (64, 72) and read_metadata(path)["image_size"] == "64x72"
    images = images_of_sizes((64, 72), (64, 72), (64, 72))  # the last batch is padded with a copy
    outputs = runtime(images)
    assert len(outputs) == 3
    for image, output in zip(images, outputs, strict=True):
        comparison = compare_detections(detector([image])[0], output, Comparison())
        assert comparison.ok, comparison.summary()
    with pytest.raises(DeployError, match="batches of 2 images of one size"):
        runtime(images_of_sizes((64, 72), (64, 64)))
    with pytest.raises(DeployError, match="64x72 only"):
        runtime(images_of_sizes((64, 64), (64, 64)))


def test_missing_onnxruntime_says_which_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(DeployError, match=r"pkd\[onnx\]"):
        OnnxDetector(tmp_path / "x.onnx")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="x.onnx"):
        OnnxDetector(tmp_path / "x.onnx")
