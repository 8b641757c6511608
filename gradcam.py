"""Grad-CAM, Grad-CAM++ and LayerCAM, batched, written with hooks (the overlay drawn from a heatmap is
scratch_detector/overlay.py).

A CAM method is only a weighting of the target layer's activations A and gradients G (both B x K x h x w)
into a B x h x w map; the hooks, the one backward pass per batch, ReLU, resizing to the input and the
per-image [0, 1] scaling are shared by all methods (the design of jacobgil/pytorch-grad-cam).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _gradcam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Selvaraju et al. 2017: channel weight = spatial mean of the gradient."""
    return (gradients.mean(dim=(2, 3), keepdim=True) * activations).sum(1)


def _gradcam_plus_plus(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Chattopadhay et al. 2018: positive gradients weighted by alpha, with the exp(score) closed form."""
    g2 = gradients.pow(2)
    g3 = g2 * gradients
    sum_a = activations.sum(dim=(2, 3), keepdim=True)
    alpha = g2 / (2 * g2 + sum_a * g3 + 1e-6)
    alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
    weights = (gradients.clamp(min=0) * alpha).sum(dim=(2, 3), keepdim=True)
    return (weights * activations).sum(1)


def _layercam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Jiang et al. 2021: element-wise positive gradient times activation, so earlier layers stay sharp."""
    return (gradients.clamp(min=0) * activations).sum(1)


METHODS = {"gradcam": _gradcam, "gradcam++": _gradcam_plus_plus, "layercam": _layercam}


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """'features.5' or 'features[5]' -> that submodule, with a clear error listing the choices."""
    dotted = name.replace("[", ".").replace("]", "").strip(".")
    try:
        return model.get_submodule(dotted)
    except AttributeError:
        choices = ", ".join(f"features.{i}" for i in range(len(model.features)))
        raise ValueError(f"no layer {name!r} in the model; try one of: {choices}") from None


def scale_per_image(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each (H, W) map of a (B, H, W) batch to [0, 1]; a flat map becomes all zeros."""
    flat = maps.flatten(1)
    low = flat.min(1).values.view(-1, 1, 1)
    high = flat.max(1).values.view(-1, 1, 1)
    return (maps - low) / (high - low).clamp(min=1e-7)


class GradCAM:
    """GradCAM(model, target_layer, method)(images, target_class) -> (B, H, W) heatmaps in [0, 1].

    One forward and one backward pass per batch; the backward pass stops at the target layer and computes
    no weight gradients, so a late layer costs little more than the forward pass. Hooks are removed and
    the parameters' requires_grad restored after every call, whatever happens.
    """

    def __init__(self, model: nn.Module, target_layer: nn.Module | str, method: str = "gradcam"):
        if method not in METHODS:
            raise ValueError(f"unknown CAM method {method!r}; choose from {', '.join(METHODS)}")
        self.model = model
        self.layer = resolve_layer(model, target_layer) if isinstance(target_layer, str) else target_layer
        self.method = method

    def __call__(self, images: torch.Tensor, target_class) -> torch.Tensor:
        return self.explain(images, target_class)[0]

    def explain(self, images: torch.Tensor, target_class=None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (heatmaps (B, H, W) in [0, 1], logits (B, C)). target_class: an int for every image, one int
        per image, or None for each image's predicted class."""
        captured = {}

        def keep_activation(module, inputs, output):
            if not output.requires_grad:  # parameters frozen: start the graph here, nothing earlier is needed
                output = output.detach().requires_grad_(True)
            captured["activations"] = output
            return output

        handle = self.layer.register_forward_hook(keep_activation)
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        try:
            for p in frozen:
                p.requires_grad_(False)
            with torch.enable_grad():
                logits = self.model(images)
                if "activations" not in captured:
                    raise RuntimeError("the target layer did not run in the forward pass")
                if target_class is None:
                    targets = logits.argmax(1)
                else:
                    targets = torch.as_tensor(target_class, device=logits.device).long().expand(len(logits))
                score = logits.gather(1, targets[:, None]).sum()  # samples are independent in eval mode
                gradients, = torch.autograd.grad(score, captured["activations"])
        finally:
            handle.remove()
            for p in frozen:
                p.requires_grad_(True)
        activations = captured["activations"].detach().float()
        cam = METHODS[self.method](activations, gradients.float()).clamp(min=0)
        cam = F.interpolate(cam[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return scale_per_image(cam), logits.detach()
