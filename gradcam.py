"""Grad-CAM, Grad-CAM++ and LayerCAM, batched, written with hooks; plus the overlay image infer.py writes.

A CAM method is only a weighting of the target layer's activations A and gradients G (both B x K x h x w)
into a B x h x w map; the hooks, the one backward pass per batch, ReLU, resizing to the input and the
per-image [0, 1] scaling are shared by all methods (the design of jacobgil/pytorch-grad-cam).
"""
from __future__ import annotations

import cv2
import numpy as np
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


# ---------------------------------------------------------------------------------------------------------
# Overlay: original | heatmap blended on the original, with the verdict written above.
# ---------------------------------------------------------------------------------------------------------
BANNER_COLORS = {"defect": (40, 40, 220), "non-defect": (60, 150, 60)}  # BGR
BOX_COLOR = (255, 0, 255)  # BGR magenta: in neither the jet colour map nor grey steel


def _draw_boxes(panel: np.ndarray, boxes, thickness: int) -> None:
    """Rectangles (x, y, w, h) in panel pixels, magenta on a black rim so they read on any background; lines
    no thicker than a twentieth of the box, so small boxes stay boxes."""
    for x, y, w, h in boxes:
        corners = (int(x), int(y)), (int(x + max(w, 1)) - 1, int(y + max(h, 1)) - 1)
        line = max(1, min(thickness, int(min(w, h)) // 20))
        if line > 1 or min(w, h) >= 40:  # a rim would fill a small box
            cv2.rectangle(panel, *corners, (0, 0, 0), line + 2)
        cv2.rectangle(panel, *corners, BOX_COLOR, line)


def render_overlay(image_rgb: np.ndarray, heatmap: np.ndarray | None, prediction: str,
                   defect_probability: float, alpha: float = 0.5, boxes=(), stacked: bool = False,
                   note: str = "") -> np.ndarray:
    """-> BGR uint8 image: a banner 'defect  p(defect)=0.9731' over [original | colour heatmap on original].

    For tiled frames (infer.py): `boxes` (x, y, w, h in image_rgb's pixels) are drawn on the original,
    `stacked` puts the heatmap below the original instead of beside it (a wide strip stays readable), and
    `note` is added to the banner. Without them the overlay is what it has always been."""
    image_bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    height, width = image_bgr.shape[:2]
    if heatmap is not None:
        heat = cv2.resize(np.asarray(heatmap, dtype=np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        colored = cv2.applyColorMap(np.clip(heat * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
        shown = [image_bgr, cv2.addWeighted(colored, alpha, image_bgr, 1 - alpha, 0)]
    else:
        shown = [image_bgr]
    if len(boxes):  # on the original, after the blend: the heatmap panel stays unobstructed
        _draw_boxes(image_bgr, boxes, max(1, round(max(height, width) / 600)))
    panels = (cv2.vconcat if stacked else cv2.hconcat)(shown) if len(shown) > 1 else image_bgr
    scale = max(0.4, min(1.2, panels.shape[1] / 500))
    text = f"{prediction}  p(defect)={defect_probability:.4f}" + (f"  {note}" if note else "")
    font = cv2.FONT_HERSHEY_SIMPLEX
    while note and scale > 0.4 and cv2.getTextSize(text, font, scale, 2)[0][0] > panels.shape[1] - 12:
        scale = max(0.4, scale - 0.05)  # a narrow overlay: with a note, the text shrinks rather than being cut
    thickness = 1 if scale < 0.8 else 2
    banner_height = int(28 * scale) + 8
    banner = np.full((banner_height, panels.shape[1], 3), BANNER_COLORS.get(prediction, (80, 80, 80)), np.uint8)
    cv2.putText(banner, text, (6, banner_height - 10), font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return cv2.vconcat([banner, panels])


# Overlay file formats: JPEG quality 95 with full-resolution colour (4:4:4, so the banner text and the heatmap's
# edges stay crisp) is the default: ~0.9 ms and ~65 KiB per NEU overlay against ~6 ms and ~130 KiB for
# the fastest PNG (bench/profile_parts.py). PNG (zlib level 1, 'sub' row filter only: libpng's default of trying
# all five filters per row takes 35-45% longer for the same size on steel texture) keeps every pixel.
OVERLAY_FORMATS = {
    "jpg": [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444],
    "png": [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB],
}


def encode_overlay(image_bgr: np.ndarray, file_format: str = "jpg") -> bytes:
    """The bytes of an overlay file in one of OVERLAY_FORMATS."""
    ok, data = cv2.imencode(f".{file_format}", image_bgr, OVERLAY_FORMATS[file_format])
    if not ok:
        raise OSError(f"{file_format} encoding failed")
    return data.tobytes()
