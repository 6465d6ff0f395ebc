"""Helpers of the ONNX tests (test_export, test_onnx_runner, test_verify, test_deploy): tiny
detectors made to detect, and random images."""

import torch

TINY = {"num_classes": 3, "min_size": 64, "max_size": 96}


def confident(detector):
    """A random-init detector made to detect: BatchNorm statistics from data, spread class scores.

    From random init MobileNetV3's features all but vanish (std 1e-8 at the FPN), so BatchNorm
    statistics are first measured on random images, as a training step would. Then the class
    logits, near a constant from random init (the focal-loss prior of one-stage heads: scores
    about 0.01), are scaled to a standard deviation of 1 so that many detections pass 0.3 and
    few tie; the background class (0, which torchvision's one-stage detectors score like the
    others and training pushes down) is kept out of the detections. The region proposals of
    two-stage detectors are their anchors (random box deltas leave a handful of proposals).
    """
    calibration = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    norms = [m for m in detector.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.momentum = 1.0
    if norms:
        detector.train()
        with torch.no_grad():
            detector.backbone(calibration)
    detector.eval()
    one_stage = hasattr(detector, "head")
    layer = detector.head.classification_head.cls_logits if one_stage else detector.roi_heads.box_predictor.cls_score
    logits = []
    handle = layer.register_forward_hook(lambda module, inputs, output: logits.append(output))
    with torch.no_grad():
        layer.bias.zero_()
        detector(list(calibration))
        handle.remove()
        layer.weight.mul_(1 / torch.cat([x.flatten() for x in logits]).std())
        if one_stage:
            layer.bias[0 :: detector.head.classification_head.num_classes] = -30.0
        else:  # proposals are the anchors (random deltas leave a handful), no background wins
            detector.rpn.head.bbox_pred.weight.zero_()
            detector.rpn.head.bbox_pred.bias.zero_()
            # MobileNetV3's FPN features reach 1e3 here: damp the random box deltas they feed.
            detector.roi_heads.box_predictor.bbox_pred.weight.mul_(0.01)
            layer.bias[0] = -30.0
    return detector


def images_of_sizes(*sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, *size, generator=generator) for size in sizes]
