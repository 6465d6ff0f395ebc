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

_EXPORTS = {
    # losses
    "pkd_loss": "pkd.losses",
    "PKDLoss": "pkd.losses",
    "mse_feature_loss": "pkd.losses",
    "cwd_loss": "pkd.losses",
    "LOSSES": "pkd.losses",
    # detectors, features, the distiller
    "build_detector": "pkd.models",
    "FeatureTap": "pkd.features",
    "pair_levels": "pkd.features",
    "Distiller": "pkd.distiller",
    # data
    "CocoDetection": "pkd.data",
    "check_dataset": "pkd.data",
    "make_digits_dataset": "pkd.data",
    # configs, training, evaluation
    "Config": "pkd.config",
    "load_config": "pkd.config",
    "fit": "pkd.engine",
    "train_one_epoch": "pkd.engine",
    "evaluate": "pkd.engine",
    "load_detector": "pkd.engine",
    # analysis
    "analyze": "pkd.analysis",
    "inspect_pair": "pkd.analysis",
}

__all__ = [
    "CocoDetection",
    "Config",
    "Distiller",
    "FeatureTap",
    "LOSSES",
    "PKDLoss",
    "analyze",
    "build_detector",
    "check_dataset",
    "cwd_loss",
    "evaluate",
    "fit",
    "inspect_pair",
    "load_config",
    "load_detector",
    "make_digits_dataset",
    "mse_feature_loss",
    "pair_levels",
    "pkd_loss",
    "train_one_epoch",
]

if TYPE_CHECKING:
    from pkd.analysis import analyze, inspect_pair
    from pkd.config import Config, load_config
    from pkd.data import CocoDetection, check_dataset, make_digits_dataset
    from pkd.distiller import Distiller
    from pkd.engine import evaluate, fit, load_detector, train_one_epoch
    from pkd.features import FeatureTap, pair_levels
    from pkd.losses import LOSSES, PKDLoss, cwd_loss, mse_feature_loss, pkd_loss
    from pkd.models import build_detector


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pkd' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
