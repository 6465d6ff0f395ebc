"""Tests of pkd.export: every detector family exported whole, its graph matching PyTorch at
other sizes than traced, the metadata, the raw outputs, and torchvision's resize swapped only
while tracing."""

import pytest
import torch
from onnx_helpers import TINY, confident, images_of_sizes
from torchvision.models.detection import transform as detection_transform

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from pkd import export  # noqa: E402
from pkd.export import DeployError, drop_raw_outputs, export_onnx, read_metadata  # noqa: E402
from pkd.models import build_detector  # noqa: E402
from pkd.onnx_runner import OnnxDetector  # noqa: E402
from pkd.verify import verify_onnx  # noqa: E402

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
    path = export_onnx(
        detector,
        tmp_path / "model.onnx",
        image_size=(64, 64),
        metadata=export.detector_metadata(detector),
        raw_outputs=True,
    )
    # Traced at 64x64; run at other sizes and aspect ratios, some resized inside the graph (max_size 96).
    images = images_of_sizes((64, 80), (90, 50), (40, 40), (150, 200))
    comparison = verify_onnx(path, detector, images)
    assert comparison.ok, comparison.summary()
    assert comparison.compared >= 20 and comparison.max_box_difference < 0.1
    assert comparison.raw_compared >= 4 * 2 and comparison.max_raw_difference < 0.01
    metadata = read_metadata(path)
    assert metadata["image_size"] == "dynamic" and metadata["batch_size"] == 1
    assert metadata["image_mean"] == [float(m) for m in detector.transform.image_mean]
    sizes = {**TINY, **options}
    assert metadata["resize"] == {"min_size": [sizes["min_size"]], "max_size": sizes["max_size"], "size_divisible": 32}
    assert "RGB in [0, 1]" in metadata["input"]


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
    path = export_onnx(detector, tmp_path / "yolo.onnx", image_size=(64, 64), raw_outputs=True)
    comparison = verify_onnx(path, detector, images_of_sizes((64, 80), (90, 50), (40, 40)))
    assert comparison.ok and comparison.compared >= 20, comparison.summary()
    # The Detect head's box and class branches of each level, before decoding and top-k.
    assert {"model.model.23.cv2", "model.model.23.cv3"} <= set(comparison.raw_names)


def test_resized_size_is_rounded_as_in_pytorch(tmp_path):
    # float32 and float64 round floor(side * min_size / short_side) apart for these sizes.
    torch.manual_seed(0)
    detector = confident(
        build_detector("fcos_resnet18_fpn", num_classes=3, min_size=112, max_size=256, fpn_channels=64)
    )
    path = export_onnx(detector, tmp_path / "model.onnx", image_size=(112, 112), raw_outputs=True)
    images = images_of_sizes((111, 121), (127, 113), (128, 98), (427, 640))
    comparison = verify_onnx(path, detector, images)
    assert comparison.ok and comparison.max_box_difference < 0.01, comparison.summary()


def test_raw_outputs_are_dropped_for_the_shipped_file(tmp_path):
    torch.manual_seed(0)
    detector = confident(build_detector("retinanet_resnet18_fpn", **TINY, fpn_channels=64))
    checked = export_onnx(detector, tmp_path / "checked.onnx", image_size=(64, 64), raw_outputs=True)
    metadata = read_metadata(checked)
    assert metadata["raw_outputs"]["paths"] == ["backbone", "head"]
    assert len(OnnxDetector(checked).raw_names) == len(metadata["raw_outputs"]["labels"]) > 0
    shipped = drop_raw_outputs(checked, tmp_path / "shipped.onnx")
    runtime = OnnxDetector(shipped)
    assert runtime.raw_names == [] and "raw_outputs" not in read_metadata(shipped)
    assert [o.name for o in runtime.session.get_outputs()] == list(export.OUTPUT_NAMES)
    graph = onnx.load(str(shipped)).graph
    assert not [name for node in graph.node for name in node.output if name.startswith("raw.")]
    raw_count = len(metadata["raw_outputs"]["labels"])
    assert len(graph.node) == len(onnx.load(str(checked)).graph.node) - raw_count  # only their Identity nodes went
    image = images_of_sizes((70, 90))
    for key, value in OnnxDetector(checked)(image)[0].items():
        assert torch.equal(value, runtime(image)[0][key])


def test_torchvision_resize_is_swapped_only_inside_the_block():
    original = detection_transform._resize_image_and_masks
    with export.torchvision_resize_as_eager():
        assert detection_transform._resize_image_and_masks is not original
    assert detection_transform._resize_image_and_masks is original
    with pytest.raises(RuntimeError), export.torchvision_resize_as_eager():
        raise RuntimeError("a failed trace")
    assert detection_transform._resize_image_and_masks is original


def test_bad_sizes_are_refused(tmp_path):
    detector = build_detector("fcos_resnet18_fpn", **TINY, fpn_channels=64)
    with pytest.raises(DeployError, match="batch_size"):
        export_onnx(detector, tmp_path / "m.onnx", batch_size=0)
    assert not (tmp_path / "m.onnx").exists()
