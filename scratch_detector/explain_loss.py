"""Teach the model where to look: a training loss on the share of its LayerCAM map that falls outside the boxes.

An ImageNet start classifies scratches well but spreads its heatmap over the plate's texture. NEU-DET boxes every
training scratch, and the transplant knows where it pasted its marks, so during training the defect-class
LayerCAM map at one layer is computed differentiably (the gradient of the defect logit with create_graph, a
double backward), and the share of its mass outside the boxes is added to the loss ("right for the right
reasons": Ross et al. 2017; guided attention: Li et al. 2018). Only images with a box count; the rest of the
batch trains on cross-entropy alone.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def boxes_mask(size: tuple[int, int], boxes, shape: tuple[int, int]) -> np.ndarray:
    """float32 (H, W) mask of `shape`: 1 inside the VOC boxes (x0, y0, x1, y1 in an image of `size` = (width,
    height)), scaled to `shape`, 0 elsewhere."""
    height, width = shape
    sx, sy = width / size[0], height / size[1]
    mask = np.zeros(shape, np.float32)
    for x0, y0, x1, y1 in boxes:
        mask[max(0, int(y0 * sy)):max(1, round(y1 * sy)), max(0, int(x0 * sx)):max(1, round(x1 * sx))] = 1.0
    return mask


class LayerCamCapture:
    """Keeps the output of one layer from the last forward pass, for the loss below (a forward hook)."""

    def __init__(self, layer: nn.Module):
        self.activations = None
        self._handle = layer.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.activations = output

    def remove(self) -> None:
        self._handle.remove()


def outside_share(logits: torch.Tensor, activations: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per image, the share of its defect-class LayerCAM map (relu(dS/dA) * A summed over channels, at the layer
    whose output is `activations`) that lies outside its mask (B, H, W in [0, 1], area-pooled to the layer's
    grid). Differentiable: the gradient dS/dA is taken with create_graph. A map with no positive mass says
    nothing about where the model looks, and counts as all outside."""
    gradients, = torch.autograd.grad(logits[:, 1].sum(), activations, create_graph=True)
    cam = (gradients.clamp(min=0) * activations).sum(1).clamp(min=0)
    inside = F.adaptive_avg_pool2d(masks[:, None].to(cam.dtype), cam.shape[-2:])[:, 0]
    total = cam.flatten(1).sum(1)
    outside = (cam * (1 - inside)).flatten(1).sum(1) / (total + 1e-8)
    return torch.where(total > 0, outside, torch.ones_like(outside))


def heatmap_loss(model: nn.Module, capture: LayerCamCapture, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean outside_share of `images` (only those with a mask) in a forward pass of their own, in eval mode: the
    double backward then costs the boxed images only, not the whole batch, and the map is the one inference
    draws (BatchNorm on its running statistics). The model is back in train mode on return."""
    model.eval()
    try:
        logits = model(images)
    finally:
        model.train()
    return outside_share(logits, capture.activations, masks).mean()
