"""Backbone registry and the CMIL model.

    backbone = build_backbone('resnet50', dilate_last=True)
    variables = backbone.init(rng, images_nhwc, train=False)
    feature_map = backbone.apply(variables, images_nhwc, train=False)   # (B, h, w, c)

Every builder takes the keywords ``dilate_last``, ``width``, ``layers``, ``dtype`` and
``param_dtype`` (CMIL passes all five) and returns a Linen module called as
``module(images, train=...)`` with float (B, H, W, 3) normalised images, returning the last
feature map (B, h, w, c). ``layers`` is how a ResNet computes its convolutions and BatchNorms
(resnet.Layers); Swin has neither and ignores it. A family that cannot honour a keyword (e.g.
dilation) raises a ValueError for it.

Names: 'resnet18', 'resnet34', 'resnet50' (torchvision layout and weights) and 'resnet10'
(BasicBlock (1, 1, 1, 1): a small demo net of this project, no pretrained weights);
'swin_t', 'swin_s', 'swin_b' (timm layout and weights; no dilation, see models/swin.py for
the window size and the meaning of ``width``).
"""

from typing import Callable

import flax.linen as nn

from cmil_jax.models import resnet, swin

# name -> builder(**kwargs) -> nn.Module
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet10": resnet.resnet10,
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "swin_t": swin.swin_t,
    "swin_s": swin.swin_s,
    "swin_b": swin.swin_b,
}

# name -> output stride of the feature map without dilation
FEATURE_STRIDES: dict[str, int] = {name: 32 for name in BACKBONES}


def _check_name(name: str) -> None:
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; valid names: {', '.join(sorted(BACKBONES))}")


def build_backbone(name: str, /, **kwargs) -> nn.Module:
    """Returns the backbone module ``name`` built with ``kwargs`` (see the module docstring).

    ``kwargs`` may include the Linen submodule ``name=...`` (hence ``name`` is positional-only).
    """
    _check_name(name)
    return BACKBONES[name](**kwargs)


def feature_stride(name: str, dilate_last: bool = False) -> int:
    """Image pixels per feature-map cell: 32 for ResNets, 16 with ``dilate_last``."""
    _check_name(name)
    stride = FEATURE_STRIDES[name]
    return stride // 2 if dilate_last else stride


# Imported last: cmil.py uses build_backbone from this module.
from cmil_jax.models.cmil import CMIL  # noqa: E402

__all__ = ["BACKBONES", "FEATURE_STRIDES", "CMIL", "build_backbone", "feature_stride"]
