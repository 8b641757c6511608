"""ImageNet Lite0 weights in EfficientNet-B0 (lite0.py, build_model('lite0')): the right tensor in the right place,
the SE gates open, and features that match the Lite0 network itself on real images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import SqueezeExcitation

import dataset
from scratch_detector import lite0
from scratch_detector.model import B0_STAGES, PretrainedUnavailable, build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lite_state():
    return lite0.load_lite0_state()


@pytest.fixture(scope="module")
def b0_from_lite0():
    model, init = build_model("lite0")
    assert init.startswith("lite0")
    return model.eval()


def test_every_conv_and_batchnorm_is_lite0s(b0_from_lite0, lite_state):
    """Block by block, by Lite0's own names: stem, each block's expand / depthwise / project conv and BatchNorm,
    the 1x1 head. The first B0 block has no expand conv, as Lite0's first block."""
    b0 = b0_from_lite0.state_dict()
    pairs = [("features.0.0.weight", "_conv_stem.weight"), ("features.0.1", "_bn0"),
             ("features.8.0.weight", "_conv_head.weight"), ("features.8.1", "_bn1")]
    index = 0
    for stage, (expand, _, _, _, blocks) in enumerate(B0_STAGES, start=1):
        for block in range(blocks):
            prefix, lite = f"features.{stage}.{block}.block", f"_blocks.{index}"
            layers = ([("_expand_conv", "_bn0")] if expand != 1 else []) + [("_depthwise_conv", "_bn1"), None,
                                                                              ("_project_conv", "_bn2")]
            for position, names in enumerate(layers):
                if names is not None:  # position of SE in B0's block
                    pairs += [(f"{prefix}.{position}.0.weight", f"{lite}.{names[0]}.weight"),
                              (f"{prefix}.{position}.1", f"{lite}.{names[1]}")]
            index += 1
    assert index == 16
    checked = 0
    for b0_key, lite_key in pairs:
        if lite_key.endswith(".weight"):
            assert torch.equal(b0[b0_key], lite_state[lite_key]), b0_key
            checked += 1
        else:
            for name in ("weight", "bias", "running_mean", "running_var"):
                assert torch.equal(b0[f"{b0_key}.{name}"], lite_state[f"{lite_key}.{name}"]), f"{b0_key}.{name}"
                checked += 1
    convs_and_norms = [k for k in lite_state if not k.startswith("_fc") and not k.endswith("num_batches_tracked")]
    assert checked == len(convs_and_norms)  # every Lite0 tensor but its ImageNet classifier went somewhere


def test_se_gates_start_open(b0_from_lite0):
    blocks = [m for m in b0_from_lite0.modules() if isinstance(m, SqueezeExcitation)]
    assert len(blocks) == 16
    x = torch.randn(2, blocks[0].fc1.in_channels, 5, 5)
    for se in blocks:
        assert torch.count_nonzero(se.fc2.weight) == 0
        gate = torch.sigmoid(se.fc2.bias)
        assert gate.min() > 0.997
    assert torch.allclose(blocks[0](x), x, rtol=0.003, atol=1e-6)


def lite0_features(state: dict, images: torch.Tensor, blocks: int = 16) -> torch.Tensor:
    """The Lite0 network written from its own weight names: ReLU6, no SE, BatchNorm eps 1e-3 (its own), the
    strides of B0's stage table, 'same' padding as torchvision pads; -> the pooled 1280 head features, or with
    blocks < 16 the output of the first `blocks` blocks (flattened)."""
    def conv_bn(x, conv, bn, stride=1, groups=1, act=True):
        weight = state[f"{conv}.weight"]
        x = F.conv2d(x, weight, stride=stride, padding=(weight.shape[-1] - 1) // 2, groups=groups)
        x = F.batch_norm(x, state[f"{bn}.running_mean"], state[f"{bn}.running_var"], state[f"{bn}.weight"],
                         state[f"{bn}.bias"], eps=1e-3)
        return F.relu6(x) if act else x

    x = conv_bn(images, "_conv_stem", "_bn0", stride=2)
    strides = [stride if i == 0 else 1 for _, _, stride, _, blocks in B0_STAGES for i in range(blocks)]
    for index, stride in enumerate(strides[:blocks]):
        block, inputs = f"_blocks.{index}", x
        if f"{block}._expand_conv.weight" in state:
            x = conv_bn(x, f"{block}._expand_conv", f"{block}._bn0")
        x = conv_bn(x, f"{block}._depthwise_conv", f"{block}._bn1", stride=stride, groups=x.shape[1])
        x = conv_bn(x, f"{block}._project_conv", f"{block}._bn2", act=False)
        if stride == 1 and x.shape == inputs.shape:
            x = x + inputs
    if blocks < len(strides):
        return x.flatten(1)
    x = conv_bn(x, "_conv_head", "_bn1")
    return x.mean((2, 3))


@pytest.fixture(scope="module")
def real_images() -> torch.Tensor:
    names = ["scratches_10.jpg", "patches_5.jpg", "crazing_1.jpg", "inclusion_17.jpg"]
    pixels = np.stack([dataset.to_model_pixels(dataset.open_image(ROOT / "test_images" / n, 200), 200)
                       for n in names])
    return dataset.normalize(torch.from_numpy(pixels), "imagenet")


def b0_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.avgpool(model.features(images)).flatten(1)


def test_b0_from_lite0_has_lite0s_features(b0_from_lite0, lite_state, real_images):
    """B0 with ReLU6 for SiLU, its SE gates fully open and Lite0's BatchNorm eps is Lite0: on real steel images
    the pooled features are the same. As it starts training (SiLU, gates at 0.9975), its early features (after
    the first three blocks, features.2) still point Lite0's way; a random-init B0's do not."""
    import copy
    reference = lite0_features(lite_state, real_images)
    as_lite = copy.deepcopy(b0_from_lite0)
    for module in list(as_lite.modules()):
        for child_name, child in module.named_children():
            if isinstance(child, nn.SiLU):
                setattr(module, child_name, nn.ReLU6())
            elif isinstance(child, nn.BatchNorm2d):
                child.eps = 1e-3
            elif isinstance(child, SqueezeExcitation):
                nn.init.constant_(child.fc2.bias, 40.0)  # sigmoid(40) == 1 in float32
    with torch.no_grad():
        exact = b0_features(as_lite, real_images)
        early = lite0_features(lite_state, real_images, blocks=3)
        silu = b0_from_lite0.features[:3](real_images).flatten(1)
        random = build_model("none")[0].eval().features[:3](real_images).flatten(1)
    cosine = lambda a, b: F.cosine_similarity(a, b, dim=1)  # noqa: E731
    assert torch.allclose(exact, reference, rtol=1e-3, atol=1e-3 * reference.abs().max().item())
    assert cosine(silu, early).min() > 0.7
    assert cosine(random, early).abs().max() < 0.5


def test_weights_file_is_checked(tmp_path, monkeypatch):
    """A file that is not the pinned one, or no file, is refused; 'auto' then falls back to random init."""
    planted = tmp_path / lite0.WEIGHTS_NAME
    torch.save(lite0.load_lite0_state(), planted)  # same tensors, but not the same bytes
    with pytest.raises(lite0.Lite0Unavailable, match="SHA-256"):
        lite0.load_lite0_state(planted)
    monkeypatch.setattr(lite0, "weights_file", lambda: planted)
    with pytest.raises(PretrainedUnavailable, match="SHA-256"):
        build_model("lite0")
    monkeypatch.setattr(lite0, "weights_file", lambda: tmp_path / "missing.pth")
    with pytest.raises(PretrainedUnavailable, match="not found"):
        build_model("lite0")
