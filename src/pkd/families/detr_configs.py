"""The DETR family's named sizes: Hugging Face ``transformers`` configs, built offline with random init.

Every name maps to a model class of ``transformers`` and the changes its default config needs
to reach that size; :func:`detr_config` builds it. The sizes are the published ones where
``transformers`` documents them (its conversion scripts of the original checkpoints):

============== ============================ ========================================================
name           model                        size
============== ============================ ========================================================
rtdetr_r18     RT-DETR (RTDetrFor...)       ResNet-18-vd, encoder 256 (expansion 0.5), 3 decoder layers
rtdetr_r34     RT-DETR                      ResNet-34-vd, encoder 256 (expansion 0.5), 4 decoder layers
rtdetr_r50     RT-DETR                      ResNet-50-vd, encoder 256, 6 decoder layers (the default)
rtdetr_v2_r18  RT-DETRv2 (RTDetrV2For...)   as rtdetr_r18
rtdetr_v2_r34  RT-DETRv2                    as rtdetr_r34
rtdetr_v2_r50  RT-DETRv2                    as rtdetr_r50
dfine_s        D-FINE (DFineFor...)         HGNetV2-B0, encoder 256 (expansion 0.5, depth 0.34), 3 decoder layers
dfine_m        D-FINE                       HGNetV2-B2, encoder 256 (depth 0.67), 4 decoder layers
dfine_l        D-FINE                       HGNetV2-B4, encoder 256, 6 decoder layers
deimv2_s       DEIMv2 (Deimv2For...)        dfine_s's backbone and sizes (pkd's choice, see below)
deimv2_m       DEIMv2                       dfine_m's backbone and sizes (pkd's choice)
============== ============================ ========================================================

DEIMv2's own small sizes (N, Pico, Femto, Atto) read two levels (strides 16, 32) or one, and
its S-X sizes a DINOv3 ViT; ``deimv2_s`` / ``deimv2_m`` are DEIMv2's decoder and hybrid encoder
at D-FINE-S / M sizes on HGNetV2, three levels at strides 8, 16, 32 like every other name here.
Any field of the config can be changed with the ``hf_config`` option (``backbone_config`` as a
nested dict), e.g. ``{"d_model": 128, "decoder_layers": 2}``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DETR_MODELS", "detr_config"]

#: ``transformers`` class names of each kind: (config, detection model).
KINDS = {
    "rtdetr": ("RTDetrConfig", "RTDetrForObjectDetection"),
    "rtdetr_v2": ("RTDetrV2Config", "RTDetrV2ForObjectDetection"),
    "dfine": ("DFineConfig", "DFineForObjectDetection"),
    "deimv2": ("Deimv2Config", "Deimv2ForObjectDetection"),
}

_RESNET18 = {"depths": [2, 2, 2, 2], "hidden_sizes": [64, 128, 256, 512], "layer_type": "basic"}
_RESNET34 = {"depths": [3, 4, 6, 3], "hidden_sizes": [64, 128, 256, 512], "layer_type": "basic"}
_SMALL_RESNET = {"encoder_in_channels": [128, 256, 512], "hidden_expansion": 0.5}

_HGNETV2_B0 = {
    "hidden_sizes": [128, 256, 512, 1024],
    "stem_channels": [3, 16, 16],
    "stage_in_channels": [16, 64, 256, 512],
    "stage_mid_channels": [16, 32, 64, 128],
    "stage_out_channels": [64, 256, 512, 1024],
    "stage_num_blocks": [1, 1, 2, 1],
    "stage_numb_of_layers": [3, 3, 3, 3],
    "use_learnable_affine_block": True,
}
_HGNETV2_B2 = {
    "hidden_sizes": [192, 384, 768, 1536],
    "stem_channels": [3, 24, 32],
    "stage_in_channels": [32, 96, 384, 768],
    "stage_mid_channels": [32, 64, 128, 256],
    "stage_out_channels": [96, 384, 768, 1536],
    "stage_num_blocks": [1, 1, 3, 1],
    "stage_numb_of_layers": [4, 4, 4, 4],
    "use_learnable_affine_block": True,
}
_HGNETV2_B4 = {"stage_numb_of_layers": [6, 6, 6, 6]}  # the default HGNetV2 config is B4's
_DFINE_S = {
    "decoder_layers": 3,
    "hidden_expansion": 0.5,
    "depth_mult": 0.34,
    "decoder_n_points": [3, 6, 3],
    "encoder_in_channels": [256, 512, 1024],
}
_DFINE_M = {
    "decoder_layers": 4,
    "depth_mult": 0.67,
    "decoder_n_points": [3, 6, 3],
    "encoder_in_channels": [384, 768, 1536],
}
_DFINE_L = {"decoder_layers": 6, "encoder_ffn_dim": 1024, "decoder_n_points": [3, 6, 3]}

#: name -> (kind, config changes, backbone config changes).
DETR_MODELS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "rtdetr_r18": ("rtdetr", {**_SMALL_RESNET, "decoder_layers": 3}, _RESNET18),
    "rtdetr_r34": ("rtdetr", {**_SMALL_RESNET, "decoder_layers": 4}, _RESNET34),
    "rtdetr_r50": ("rtdetr", {}, {}),
    "rtdetr_v2_r18": ("rtdetr_v2", {**_SMALL_RESNET, "decoder_layers": 3}, _RESNET18),
    "rtdetr_v2_r34": ("rtdetr_v2", {**_SMALL_RESNET, "decoder_layers": 4}, _RESNET34),
    "rtdetr_v2_r50": ("rtdetr_v2", {}, {}),
    "dfine_s": ("dfine", _DFINE_S, _HGNETV2_B0),
    "dfine_m": ("dfine", _DFINE_M, _HGNETV2_B2),
    "dfine_l": ("dfine", _DFINE_L, _HGNETV2_B4),
    "deimv2_s": ("deimv2", _DFINE_S, _HGNETV2_B0),
    "deimv2_m": ("deimv2", _DFINE_M, _HGNETV2_B2),
}


def detr_config(transformers: Any, name: str, num_labels: int, changes: dict[str, Any], timm_backbone: Any = None):
    """The ``transformers`` config of a named DETR with ``num_labels`` classes (no background).

    Args:
        transformers: the imported ``transformers`` module.
        name: a key of :data:`DETR_MODELS`.
        num_labels: object classes (pkd's ``num_classes - 1``).
        changes: more config fields to set (``backbone_config``: a dict of backbone fields).
        timm_backbone: a ``TimmBackboneConfig`` replacing the model's own backbone.

    Raises:
        ValueError: a field the config does not have.
    """
    kind, preset, backbone_preset = DETR_MODELS[name]
    config = getattr(transformers, KINDS[kind][0])()
    changes = dict(changes)
    backbone_changes = {**backbone_preset, **changes.pop("backbone_config", {})}
    # Random init trains the backbone's BatchNorm; frozen statistics suit pretrained weights only.
    fields = {**preset, "num_labels": num_labels, "freeze_backbone_batch_norms": False, **changes}
    if timm_backbone is not None:
        config.backbone_config = timm_backbone
    else:
        _set(config.backbone_config, backbone_changes, f"{name}'s backbone_config")
        if "depths" not in backbone_changes and "stage_numb_of_layers" in backbone_changes:
            config.backbone_config.depths = list(backbone_changes["stage_numb_of_layers"])
    if "encoder_hidden_dim" in fields and "decoder_in_channels" not in fields:
        # The decoder reads the encoder's levels: its input widths follow the encoder's.
        fields["decoder_in_channels"] = [fields["encoder_hidden_dim"]] * len(config.decoder_in_channels)
    if "d_model" in fields and "head_dim" not in fields and getattr(config, "head_dim", None) is not None:
        fields["head_dim"] = fields["d_model"] // fields.get("decoder_attention_heads", config.decoder_attention_heads)
    _set(config, fields, f"{name}'s config")
    return config


def _set(config: Any, fields: dict[str, Any], what: str) -> None:
    for key, value in fields.items():
        if not hasattr(config, key):
            raise ValueError(f"{key}: not a field of {what} ({type(config).__name__}); see its transformers docs")
        setattr(config, key, value)
