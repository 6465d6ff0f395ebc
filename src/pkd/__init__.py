"""pkd: knowledge distillation of object detectors with the Pearson correlation coefficient.

PKD (Cao et al., NeurIPS 2022, https://arxiv.org/abs/2207.02039) on plain PyTorch and
torchvision: a student detector's FPN features imitate a frozen teacher's after per-channel
standardisation.
"""

from pkd.losses import LOSSES, PKDLoss, cwd_loss, mse_feature_loss, pkd_loss

__version__ = "0.1.0"

__all__ = ["LOSSES", "PKDLoss", "cwd_loss", "mse_feature_loss", "pkd_loss"]
