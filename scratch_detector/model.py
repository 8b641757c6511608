"""The model (EfficientNet-B0 with a 2-way head) and the one reader and one writer of its checkpoint.

Training builds torchvision's efficientnet_b0. Reading a checkpoint builds the same network from torch.nn
alone (EfficientNetB0 below: same layers, same state_dict keys, same outputs, tested against torchvision):
`import torchvision` is a large part of a short run's start, most of it torchvision.ops importing
torch._dynamo (`python bench/profile_parts.py` measures it), for nothing inference needs. So torchvision is
imported only where training or the ImageNet weights need it.
"""
from __future__ import annotations

import datetime
import pickle
import re
import socket
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from dataset import BINARY_CLASSES, IMAGENET_MEAN, IMAGENET_STD, NORMALIZATIONS, file_digest, normalize
from . import familiarity
from .calibration import apply_temperature
from .runtime import UserError, atomic_write

ARCH = "efficientnet_b0"


def imagenet_weights():
    """torchvision's EfficientNet_B0_Weights.IMAGENET1K_V1 (imports torchvision)."""
    from torchvision.models import EfficientNet_B0_Weights
    return EfficientNet_B0_Weights.IMAGENET1K_V1


class CheckpointError(UserError):
    """The checkpoint cannot be used; the message is one line for the user."""


class PretrainedUnavailable(UserError):
    """ImageNet weights could be neither found in the torch hub cache nor downloaded."""


def _two_way_head(model: nn.Module) -> nn.Module:
    """Give the model a fresh 2-way classifier with small weights.

    torchvision initialises the head uniformly in +-1/sqrt(num_classes): fine for 1000 classes, but
    +-0.71 for two, which starts training at a loss near 5 instead of ln 2 and wastes the first epoch."""
    linear = nn.Linear(model.classifier[1].in_features, len(BINARY_CLASSES))
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    model.classifier[1] = linear
    return model


def imagenet_cache_file(weights) -> Path:
    """Where torch hub keeps (or would keep) the downloaded weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def imagenet_state_dict(download_timeout_s: float = 30.0) -> dict:
    """ImageNet-1k weights from the torch hub cache ($TORCH_HOME/hub/checkpoints), downloading if needed."""
    weights = imagenet_weights()
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(download_timeout_s)  # a blocked network should fail, not hang
    try:
        # weights_only: a file planted in the hub cache is a pickle too, and must not run code
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as error:  # URLError, timeouts, hash mismatch, a corrupt cached file ...
        raise PretrainedUnavailable(f"{_first_line(error)} (looked for {imagenet_cache_file(weights)}, "
                                    f"then tried {weights.url})") from None
    finally:
        socket.setdefaulttimeout(previous)


def _efficientnet_b0() -> nn.Module:
    """torchvision's EfficientNet-B0 without stochastic depth: dropping residual blocks at random regularises
    long ImageNet runs, while 5 epochs here still underfit. It changes no weights: the state_dict is the same."""
    from torchvision.models import efficientnet_b0
    return efficientnet_b0(stochastic_depth_prob=0.0)


def _random_init() -> nn.Module:
    """Random init with every residual block's last BatchNorm scale at zero (Goyal et al. 2017): each block
    starts as the identity, so the untrained network is effectively shallow and learns fast from scratch.
    Only for random init: pretrained weights overwrite it."""
    from torchvision.models.efficientnet import MBConv
    model = _two_way_head(_efficientnet_b0())
    for block in model.modules():
        if isinstance(block, MBConv) and block.use_res_connect:
            nn.init.zeros_(block.block[-1][1].weight)  # block[-1] = projection conv + BatchNorm, no activation
    return model


PRETRAINED_CHOICES = ("auto", "imagenet", "lite0", "none")


def _lite0_model() -> tuple[nn.Module, str]:
    """B0 with the ImageNet-trained Lite0 convolutions (lite0.py), or PretrainedUnavailable."""
    from . import lite0
    try:
        model = lite0.transplant_lite0(_efficientnet_b0(), lite0.load_lite0_state())
    except (lite0.Lite0Unavailable, ValueError) as error:
        raise PretrainedUnavailable(str(error)) from None
    return _two_way_head(model), f"lite0 (ImageNet EfficientNet-Lite0 convolutions in {ARCH}, {lite0.WEIGHTS_NAME})"


def _torchvision_imagenet_model() -> tuple[nn.Module, str]:
    """torchvision's ImageNet B0 weights (hub cache or download), or PretrainedUnavailable."""
    state = imagenet_state_dict()
    model = _efficientnet_b0()
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:  # a cached file of the wrong model
        raise PretrainedUnavailable(f"{imagenet_cache_file(imagenet_weights())} does not fit {ARCH}: "
                                    f"{_first_line(error)}") from None
    return _two_way_head(model), f"imagenet ({ARCH} {imagenet_weights()})"


def build_model(pretrained: str = "auto") -> tuple[nn.Module, str]:
    """EfficientNet-B0 with a 2-way head. Returns (model, initialisation actually used).

    pretrained: 'imagenet' (torchvision's ImageNet weights), 'lite0' (ImageNet Lite0's convolutions from the
    pinned package), each PretrainedUnavailable when it cannot be had; 'auto' tries imagenet, then lite0,
    then falls back to random init with a loud warning; 'none' is random init and never tries the network.
    """
    if pretrained not in PRETRAINED_CHOICES:
        raise ValueError(f"pretrained must be one of {', '.join(PRETRAINED_CHOICES)}, not {pretrained!r}")
    if pretrained == "none":
        return _random_init(), "none (random init, --pretrained none)"
    if pretrained == "imagenet":
        return _torchvision_imagenet_model()
    if pretrained == "lite0":
        return _lite0_model()
    reasons = []
    for attempt in (_torchvision_imagenet_model, _lite0_model):
        try:
            return attempt()
        except PretrainedUnavailable as error:
            reasons.append(str(error))
    print("WARNING: no ImageNet weights could be had, training from RANDOM INIT instead. "
          + " | ".join(reasons), file=sys.stderr)
    return _random_init(), "none (random init: ImageNet weights unavailable)"


def freeze_first_blocks(model: nn.Module, count: int) -> int:
    """Keep the first `count` blocks of `model.features` at their starting weights (no gradient, no update).
    Started from ImageNet or a trained checkpoint, their low-level filters already fit, and the backward pass
    then stops above them, where the largest feature maps make it costliest. Their BatchNorm statistics still
    follow the data (they stay in training mode). Returns the number of parameters frozen."""
    frozen = 0
    for block in list(model.features)[:count]:
        for parameter in block.parameters():
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    return frozen


def model_from_checkpoint(path: str | Path) -> tuple[nn.Module, str, dict]:
    """A trainable B0 holding a trained checkpoint's weights (train.py --init) -> (model, initialisation
    text, the checkpoint's metadata). The text names the file, its SHA-256 and what that model started from,
    so a fine-tuned checkpoint says where it came from."""
    trained, meta = load_checkpoint(path, calibrated=False)  # every check of a checkpoint, once
    model = _two_way_head(_efficientnet_b0())
    model.load_state_dict(trained.state_dict())
    digest = file_digest(Path(path))
    meta["sha256"] = digest
    return model, f"fine-tuned from {Path(path).name} (sha256 {digest[:12]}), which started from " \
                  f"{meta.get('pretrained') or 'unknown'}", meta


# ---------------------------------------------------------------------------------------------------------
# EfficientNet-B0 from torch.nn alone, for inference: the layers, names and order of torchvision's
# efficientnet_b0 (torchvision/models/efficientnet.py), so its state_dict loads strictly. Eval only: no
# stochastic depth (an identity at eval anyway), no weight initialisation (weights always come from a checkpoint).
# ---------------------------------------------------------------------------------------------------------
# Stages 1-7: (expand ratio, kernel, stride of the first block, output channels, blocks) (Tan & Le 2019, table 1)
B0_STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
             (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
             activation: bool = True) -> nn.Sequential:
    """Conv (no bias, 'same' padding) + BatchNorm (+ SiLU): torchvision's Conv2dNormActivation, as a Sequential.

    SiLU not in place (torchvision's is): under autograd, for a CAM, an in-place SiLU makes torch copy its
    input for the backward pass, a cost bench/profile_parts.py measures. Same outputs."""
    layers = [nn.Conv2d(in_channels, out_channels, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(out_channels)]
    return nn.Sequential(*layers, nn.SiLU()) if activation else nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.SiLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) * x


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand (unless ratio 1), depthwise conv, squeeze-excitation, 1x1 project."""

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int, kernel: int, stride: int):
        super().__init__()
        wide = in_channels * expand_ratio
        layers = [_conv_bn(in_channels, wide, 1)] if expand_ratio != 1 else []
        layers += [_conv_bn(wide, wide, kernel, stride, groups=wide),
                   SqueezeExcitation(wide, max(1, in_channels // 4)),
                   _conv_bn(wide, out_channels, 1, activation=False)]
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


class EfficientNetB0(nn.Module):
    """features.0 (stem) ... features.8 (1x1 conv to 1280), average pool, dropout + linear: torchvision's layout."""

    def __init__(self, num_classes: int = len(BINARY_CLASSES)):
        super().__init__()
        features, channels = [_conv_bn(3, 32, 3, stride=2)], 32
        for expand_ratio, kernel, stride, out_channels, blocks in B0_STAGES:
            features.append(nn.Sequential(*[
                MBConvBlock(channels if i == 0 else out_channels, out_channels, expand_ratio, kernel,
                            stride if i == 0 else 1) for i in range(blocks)]))
            channels = out_channels
        features.append(_conv_bn(channels, 1280, 1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def save_checkpoint(path: str | Path, model: nn.Module, metadata: dict) -> None:
    """Write {state_dict, arch, classes, versions, date, **metadata} atomically: temp file, fsync, rename.
    An interrupted save leaves the previous checkpoint untouched."""
    import torchvision
    path = Path(path)
    checkpoint = {
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "arch": ARCH,
        "classes": list(BINARY_CLASSES),
        "torch_version": str(torch.__version__),  # TorchVersion is not a plain str: weights_only refuses it
        "torchvision_version": str(torchvision.__version__),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **metadata,
    }
    with atomic_write(path, "wb") as handle:
        torch.save(checkpoint, handle)


REQUIRED_KEYS = ("state_dict", "arch", "classes", "image_size", "threshold")


def _first_line(error: BaseException, limit: int = 200) -> str:
    """The informative first sentence of an exception, on one line: torch's messages run to paragraphs."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    # load_state_dict: "Error(s) in loading state_dict for X:" then the details; take the first detail
    text = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else (lines[0] if lines else "")
    text = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_metadata(path: Path, checkpoint: dict) -> None:
    """Reject metadata infer/evaluate would choke on or silently misuse; an ImageNet-normalised model must
    record the mean/std this program applies."""
    size, threshold = checkpoint["image_size"], checkpoint["threshold"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise CheckpointError(f"{path}: image_size must be a positive integer, not {size!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise CheckpointError(f"{path}: threshold must be a number in [0, 1], not {threshold!r}")
    temperature = checkpoint.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise CheckpointError(f"{path}: temperature must be a positive number, not {temperature!r}")
    if checkpoint.get("familiarity") is not None and not familiarity.valid(checkpoint["familiarity"]):
        raise CheckpointError(f"{path}: its familiarity statistics are damaged (retrain, or remove the key)")
    normalization = checkpoint["normalization"]
    if normalization not in NORMALIZATIONS:
        raise CheckpointError(f"{path}: normalization {normalization!r} is none of {', '.join(NORMALIZATIONS)}")
    if normalization != "imagenet":
        return
    for key, expected in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        try:
            ok = len(checkpoint[key]) == 3 and all(abs(float(a) - b) < 1e-6 for a, b in zip(checkpoint[key], expected))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: trained with {key} {checkpoint.get(key)!r}, but this program "
                                  f"normalises with {list(expected)}")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", calibrated: bool = True
                    ) -> tuple[nn.Module, dict]:
    """Read a checkpoint written by save_checkpoint -> (model in eval mode, metadata without state_dict).

    calibrated: the model's logits come divided by the checkpoint's temperature (calibration.py), so every
    reader gets the calibrated p(defect) its threshold was chosen on; False only to measure the raw model.

    weights_only=True: a .pth is a pickle, and a malicious one runs code on load; this refuses anything
    but tensors and plain containers. Every failure is a CheckpointError with a one-line message.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path} (train one with: python train.py)")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles on stderr; the error below says it all
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        blocked = re.search(r"^.*(unsupported|GLOBAL).*$", re.sub(r"\x1b\[[0-9;]*m", "", str(error)), re.I | re.M)
        if not blocked:
            raise CheckpointError(f"cannot read {path}: not a valid checkpoint ({_first_line(error)})") from None
        detail = blocked.group(0).strip().split(". Please")[0][:200]
        raise CheckpointError(f"refused to load {path}: it holds more than weights and may carry code, "
                              f"which is never run (weights_only=True): {detail}") from None
    except Exception as error:  # weights_only runs no code, so any failure here is a damaged or foreign file
        raise CheckpointError(f"cannot read {path}: not a valid checkpoint or truncated "
                              f"({_first_line(error)})") from None
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a model_binary checkpoint (needs keys {', '.join(REQUIRED_KEYS)})")
    if checkpoint["arch"] != ARCH:
        raise CheckpointError(f"{path} is for architecture {checkpoint['arch']!r}, this program runs {ARCH}")
    if not isinstance(checkpoint["classes"], (list, tuple)) or list(checkpoint["classes"]) != BINARY_CLASSES:
        raise CheckpointError(f"{path} has classes {checkpoint['classes']!r}, expected {BINARY_CLASSES}")
    checkpoint.setdefault("normalization", "imagenet")  # a checkpoint without the key was ImageNet-normalised
    _check_metadata(path, checkpoint)
    model = EfficientNetB0(num_classes=len(BINARY_CLASSES))
    state = checkpoint["state_dict"]
    try:
        model.load_state_dict(state)
    except Exception as error:  # wrong architecture or head size, or not a state_dict at all
        raise CheckpointError(f"{path}: weights do not fit {ARCH} with {len(BINARY_CLASSES)} classes "
                              f"({_first_line(error)})") from None
    if not all(v.isfinite().all() for v in state.values() if v.is_floating_point()):
        raise CheckpointError(f"{path}: weights contain NaN or infinity (a diverged training run?)")
    metadata = {k: v for k, v in checkpoint.items() if k != "state_dict"}
    metadata["temperature"] = float(checkpoint.get("temperature", 1.0))
    if calibrated:
        apply_temperature(model, metadata["temperature"])
    model.to(device=device, memory_format=torch.channels_last).eval()
    return model, metadata


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """For inference: fold every eval-mode BatchNorm into the convolution before it (same outputs up to float
    rounding; a faster forward pass, bench/profile_parts.py). The model can no longer train.
    Works on torchvision's model and on EfficientNetB0: both keep each conv + BatchNorm (+ SiLU) in a Sequential."""
    for block in model.modules():
        if (isinstance(block, nn.Sequential) and len(block) >= 2 and isinstance(block[0], nn.Conv2d)
                and isinstance(block[1], nn.BatchNorm2d)):
            block[0] = fuse_conv_bn_eval(block[0].eval(), block[1].eval())
            block[1] = nn.Identity()
    return model.to(memory_format=torch.channels_last)


@torch.no_grad()
def predict_logits(model: nn.Module, pixels: torch.Tensor, normalization: str, batch_size: int, device,
                   features_at: str | tuple[str, ...] | None = None,
                   stop_at_features: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (logits (N, 2), the mean-pooled output of layer `features_at` in the same pass (N, C), or None) for
    each uint8 (N, S, S, 3) image, in order, in batches; several layers: their outputs side by side
    (familiarity.FeatureTap). stop_at_features ends each pass at that layer: the features only, and no logits
    (N = 0); predict_features."""
    model.eval()
    tap = familiarity.FeatureTap(model, features_at, stop=stop_at_features) if features_at else None
    logits, features = [torch.empty(0, len(BINARY_CLASSES))], []
    try:
        for start in range(0, len(pixels), batch_size):
            try:
                batch = normalize(pixels[start:start + batch_size], normalization).to(device)
                logits.append(model(batch).float().cpu())
            except familiarity.StopForward:
                pass
            if tap is not None:
                features.append(tap.take().cpu())
    finally:
        if tap is not None:
            tap.remove()
    return torch.cat(logits), (torch.cat(features) if features else None)


@torch.no_grad()
def refresh_batchnorm(model: nn.Module, pixels: torch.Tensor, normalization: str, batch_size: int, device) -> int:
    """Recompute every BatchNorm's running statistics as the plain average over uint8 (N, S, S, 3) `pixels`, as
    inference sees them (no augmentation), the rest of the network in eval mode (no stochastic depth). Why:
    after two networks' weights are averaged (finetune.blend_with_start), the average of their statistics is not
    the statistics of the averaged network (SWA's update_bn, Izmailov et al. 2018; REPAIR, Jordan et al. 2022).
    Returns how many BatchNorm layers were refreshed."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    model.eval()
    try:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average over the batches, not an exponential one
            norm.train()
        for start in range(0, len(pixels), batch_size):
            model(normalize(pixels[start:start + batch_size], normalization).to(device))
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.eval()
    return len(norms)


def predict_features(model: nn.Module, pixels: torch.Tensor, normalization: str, batch_size: int, device,
                     layer: str) -> torch.Tensor:
    """The mean-pooled output of `layer` (N, C) for each uint8 (N, S, S, 3) image, each pass stopped at that
    layer: the same values predict_logits(..., features_at=layer) gives, for the work up to the layer."""
    features = predict_logits(model, pixels, normalization, batch_size, device, layer, stop_at_features=True)[1]
    return features if features is not None else torch.empty(0, 0)


def predict_probabilities(model: nn.Module, pixels: torch.Tensor, normalization: str, batch_size: int,
                          device) -> torch.Tensor:
    """Defect probability for each uint8 (N, S, S, 3) image, in order, in batches."""
    return predict_logits(model, pixels, normalization, batch_size, device)[0].softmax(1)[:, 1]


def pick_device(choice: str) -> torch.device:
    """'auto' -> cuda when present, else cpu; 'cuda' without a GPU is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA GPU is available")
    return torch.device(choice)
