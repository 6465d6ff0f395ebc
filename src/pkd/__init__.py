"""pkd: knowledge distillation of object detectors with the Pearson correlation coefficient.

PKD (Cao et al., NeurIPS 2022, https://arxiv.org/abs/2207.02039) on plain PyTorch and
torchvision: a student detector's FPN features imitate a frozen teacher's after per-channel
standardisation.

The public names below are imported on first use, so ``import pkd`` (and the ``pkd`` command)
start without loading torch until something needs it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The names a user needs; everything else lives in its module (pkd.losses.cwd_loss,
# pkd.features.pair_levels, pkd.analysis.analyze, pkd.config.Config, ...).
_EXPORTS = {
    # the loss
    "pkd_loss": "pkd.losses",
    "PKDLoss": "pkd.losses",
    "LOSSES": "pkd.losses",
    # detectors and the distiller
    "build_detector": "pkd.models",
    "load_detector": "pkd.build",
    "Distiller": "pkd.distiller",
    "FeatureTap": "pkd.features",
    # data
    "CocoDetection": "pkd.data",
    "make_digits_dataset": "pkd.data",
    # runs: train, evaluate, inspect
    "load_config": "pkd.config",
    "fit": "pkd.engine",
    "evaluate": "pkd.evaluation",
    "inspect_pair": "pkd.analysis",
}

__all__ = [
    "CocoDetection",
    "Distiller",
    "FeatureTap",
    "LOSSES",
    "PKDLoss",
    "build_detector",
    "evaluate",
    "fit",
    "inspect_pair",
    "load_config",
    "load_detector",
    "make_digits_dataset",
    "pkd_loss",
]

if TYPE_CHECKING:
    from pkd.analysis import inspect_pair
    from pkd.build import load_detector
    from pkd.config import load_config
    from pkd.data import CocoDetection, make_digits_dataset
    from pkd.distiller import Distiller
    from pkd.engine import fit
    from pkd.evaluation import evaluate
    from pkd.features import FeatureTap
    from pkd.losses import LOSSES, PKDLoss, pkd_loss
    from pkd.models import build_detector


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pkd' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
