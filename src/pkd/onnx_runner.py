"""An exported detector run by ONNX Runtime behind the PyTorch detectors' list-of-images interface.

``OnnxDetector("student.onnx")([image])`` returns what the PyTorch detector returns, so
:func:`pkd.engine.evaluate` measures an ONNX file's mAP as it does a detector's (``pkd eval
--onnx``), and :func:`pkd.verify.verify_onnx` compares the two.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pkd.export import INPUT_NAME, OUTPUT_NAMES, RAW_PREFIX, DeployError, read_metadata, require

__all__ = ["OnnxDetector", "session_options"]


def session_options(threads: int | None = None):
    """ONNX Runtime options with ``threads`` intra-op threads (default: torch's thread count)."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class OnnxDetector(nn.Module):
    """An exported file run by ONNX Runtime (CPU) behind the detectors' list-of-images interface.

    It has no parameters; ``eval()`` / ``to()`` are accepted and change nothing.

    Args:
        path: An ONNX file written by :func:`pkd.export.export_onnx`.
        threads: Intra-op threads of ONNX Runtime (default: ``torch.get_num_threads()``).

    Attributes:
        batch_size: Images per call of the graph (fixed at export).
        image_size: ``(H, W)`` the graph takes, or None when any size goes.
        raw_names: Names of the graph's raw outputs (``export_onnx(..., raw_outputs=True)``), if any.
        metadata: The file's ``pkd.*`` metadata (:func:`pkd.export.read_metadata`).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        super().__init__()
        ort = require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file {self.path} does not exist")
        self.metadata = read_metadata(self.path)
        self.session = ort.InferenceSession(
            str(self.path), sess_options=session_options(threads), providers=["CPUExecutionProvider"]
        )
        shape = self.session.get_inputs()[0].shape
        self.batch_size = shape[0] if isinstance(shape[0], int) else 1
        fixed = all(isinstance(side, int) for side in shape[2:])
        self.image_size = (shape[2], shape[3]) if fixed else None
        self.raw_names = [o.name for o in self.session.get_outputs() if o.name.startswith(RAW_PREFIX)]

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The graph's detections for one batch.

        Args:
            images: float32 ``(batch_size, 3, H, W)``.

        Returns:
            ``boxes`` ``(K, 4)``, ``scores`` ``(K,)``, ``labels`` ``(K,)``, ``image_index`` ``(K,)``.
        """
        return tuple(self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images}))

    def run_with_raw(self, images: np.ndarray) -> tuple[tuple[np.ndarray, ...], list[np.ndarray]]:
        """The graph's detections and its raw outputs (``export_onnx(..., raw_outputs=True)``) for one batch.

        Args:
            images: float32 ``(batch_size, 3, H, W)``.

        Returns:
            What :meth:`run` returns, and the raw outputs in the order of :attr:`raw_names`
            (empty for a file exported without them).
        """
        outputs = self.session.run([*OUTPUT_NAMES, *self.raw_names], {INPUT_NAME: images})
        return tuple(outputs[: len(OUTPUT_NAMES)]), outputs[len(OUTPUT_NAMES) :]

    def forward(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Detections of each image, as torchvision's detectors return them.

        Args:
            images: ``(3, H, W)`` float tensors in [0, 1]. A file exported for a batch of
                ``batch_size > 1`` takes them in groups of that many of the same size (the
                last group padded with copies).

        Returns:
            One dict per image: ``boxes`` ``(K, 4)`` float32, ``scores`` ``(K,)`` float32,
            ``labels`` ``(K,)`` int64.
        """
        results = []
        for start in range(0, len(images), self.batch_size):
            group = [image.detach().cpu().float() for image in images[start : start + self.batch_size]]
            count = len(group)
            boxes, scores, labels, image_index = self.run(self.batch(group).numpy())
            for index in range(count):
                keep = image_index == index
                results.append(
                    {
                        "boxes": torch.from_numpy(boxes[keep]),
                        "scores": torch.from_numpy(scores[keep]),
                        "labels": torch.from_numpy(labels[keep]),
                    }
                )
        return results

    def batch(self, group: Sequence[Tensor]) -> Tensor:
        """Up to ``batch_size`` images of one size as the graph's ``(batch_size, 3, H, W)`` input.

        A short group is padded with copies of its last image.

        Raises:
            DeployError: the images differ in size, or are not the size a fixed-size graph takes.
        """
        sizes = sorted({tuple(image.shape[-2:]) for image in group})
        if len(sizes) > 1:
            raise DeployError(
                f"{self.path} takes batches of {self.batch_size} images of one size; got sizes {sizes} "
                "(export with batch_size=1)"
            )
        if self.image_size is not None and sizes[0] != self.image_size:
            raise DeployError(
                f"{self.path} takes images of {self.image_size[0]}x{self.image_size[1]} only, got "
                f"{sizes[0][0]}x{sizes[0][1]} (resize them, or export with a dynamic size)"
            )
        group = list(group) + [group[-1]] * (self.batch_size - len(group))
        return torch.stack([image.detach().cpu().float() for image in group])
