"""Tests of pkd.verify: the rules that match detections and raw outputs, and that an untrained
detector, which detects nothing, verifies on its raw outputs and fails only when they differ."""

import numpy as np
import pytest
import torch
from onnx_helpers import TINY, images_of_sizes

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from pkd.export import export_onnx  # noqa: E402
from pkd.models import build_detector  # noqa: E402
from pkd.onnx_runner import OnnxDetector  # noqa: E402
from pkd.verify import Comparison, compare_detections, compare_raw, verify_onnx  # noqa: E402


def detections(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def test_detection_rules():
    reference = detections([[0, 0, 10, 10], [20, 20, 40, 40], [5, 5, 8, 8]], [0.9, 0.6, 0.1], [1, 2, 1])
    # Same detections in another order, slightly moved; the one under the threshold is ignored.
    close = detections([[20.5, 20, 40, 40], [0, 0, 10.2, 10]], [0.605, 0.9], [2, 1])
    comparison = compare_detections(reference, close, Comparison())
    assert comparison.ok and comparison.compared == comparison.matched == 2
    assert comparison.max_box_difference == pytest.approx(0.5) and comparison.max_score_difference < 0.006

    moved = detections([[0, 0, 10, 12], [20, 20, 40, 40]], [0.9, 0.6], [1, 2])
    comparison = compare_detections(reference, moved, Comparison())
    assert comparison.disagrees and comparison.matched == 1 and len(comparison.missing) == len(comparison.extra) == 1

    relabelled = detections([[0, 0, 10, 10], [20, 20, 40, 40]], [0.9, 0.6], [2, 2])
    assert compare_detections(reference, relabelled, Comparison()).disagrees

    # Right at the threshold a detection may fall on either side; clearly above it may not.
    near = detections([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]], [0.9, 0.6, 0.305], [1, 2, 1])
    assert compare_detections(reference, near, Comparison()).ok
    above = detections([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]], [0.9, 0.6, 0.5], [1, 2, 1])
    assert compare_detections(reference, above, Comparison()).disagrees


def test_no_detections_on_either_side_is_no_disagreement():
    empty = compare_detections(detections([], [], []), detections([], [], []), Comparison())
    assert not empty.disagrees and empty.compared == 0
    # Nothing at all was compared: not a disagreement, and not a verification either.
    assert not empty.ok
    only_onnx = compare_detections(detections([], [], []), detections([[0, 0, 5, 5]], [0.8], [1]), Comparison())
    assert only_onnx.disagrees and len(only_onnx.extra) == 1


def test_raw_rules():
    reference = [("backbone[0]", torch.ones(1, 2, 4, 4) * 100), ("head[cls_logits]", torch.linspace(-5, 5, 10))]
    close = [np.ones((1, 2, 4, 4)) * 100.5, np.linspace(-5, 5, 10) + 0.01]
    comparison = compare_raw(reference, close, Comparison())
    assert comparison.ok and comparison.raw_compared == 2 and comparison.raw_names == ["backbone", "head"]
    assert comparison.max_raw_difference == pytest.approx(0.005)

    off = [np.ones((1, 2, 4, 4)) * 100, np.linspace(-5, 5, 10) + 0.5]
    assert len(compare_raw(reference, off, Comparison()).raw_differences) == 1
    reshaped = [np.ones((1, 2, 4, 5)) * 100, np.linspace(-5, 5, 10)]
    assert compare_raw(reference, reshaped, Comparison()).disagrees
    assert compare_raw(reference, close[:1], Comparison()).disagrees
    nan = [np.full((1, 2, 4, 4), np.nan), np.linspace(-5, 5, 10)]
    assert compare_raw(reference, nan, Comparison()).disagrees


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A random-init FCOS, which detects nothing above 0.3, exported with its raw outputs."""
    torch.manual_seed(0)
    detector = build_detector("fcos_resnet18_fpn", **TINY, fpn_channels=64).eval()
    path = export_onnx(detector, tmp_path_factory.mktemp("untrained") / "m.onnx", image_size=(64, 64), raw_outputs=True)
    return detector, path


def test_untrained_detector_verifies_on_raw_outputs(untrained):
    detector, path = untrained
    images = images_of_sizes((64, 80), (90, 50))
    comparison = verify_onnx(path, detector, images)
    assert comparison.compared == 0 and comparison.raw_compared > 0
    assert comparison.ok and not comparison.disagrees, comparison.summary()
    assert "disagree" not in comparison.summary() and "--verify-threshold" not in comparison.summary()


def test_a_graph_that_computes_otherwise_disagrees(untrained, monkeypatch):
    detector, path = untrained
    run = OnnxDetector.run_with_raw

    def perturbed(self, images):  # one head output 10% off
        detected, raw = run(self, images)
        raw[-1] = raw[-1] * 1.1
        return detected, raw

    monkeypatch.setattr(OnnxDetector, "run_with_raw", perturbed)
    comparison = verify_onnx(path, detector, images_of_sizes((64, 80)))
    assert comparison.disagrees and not comparison.ok and len(comparison.raw_differences) == 1
    assert "head" in comparison.raw_differences[0]
