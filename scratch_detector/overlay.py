"""The overlay image of one verdict: a banner with the verdict over [original | heat drawn on the original],
optionally with boxes; and its encoding into an overlay file (JPEG or PNG).

drawn_heat is the one definition of "the map as drawn": the overlay colours it, and metrics.localization_scores
scores it, so the pointing game and energy in box describe what a person sees. Its choices (smoothing, floor)
and their measurements: bench/README.md, "Readable overlays".
"""
from __future__ import annotations

import cv2
import numpy as np

BANNER_COLORS = {"defect": (40, 40, 220), "non-defect": (60, 150, 60)}  # BGR
BOX_COLOR = (255, 0, 255)  # BGR magenta: in neither the heat colours nor grey steel

# The map as drawn. SMOOTHING is a Gaussian sigma in the image's own pixels (a NEU image's, a tiled frame's):
# about one scratch width, so the CAM's grid-cell speckles along a scratch merge into one line without
# spreading it over the plate. Heat at or below HEAT_FLOOR is not drawn at all (the steel shows), and above
# it the colour's opacity grows with the heat up to MAX_OPACITY (the original panel beside shows the steel).
SMOOTHING = 4.0
HEAT_FLOOR = 0.2
MAX_OPACITY = 0.85


def drawn_heat(heatmap: np.ndarray, size: tuple[int, int], scale: float = 1.0, smoothing: float = SMOOTHING,
               floor: float = HEAT_FLOOR) -> np.ndarray:
    """A heatmap (any resolution, values in [0, 1]) -> the float32 (height, width) map the overlay draws, in
    [0, 1]: 0 where nothing is drawn, 1 at full heat.

    Resized to `size` (width, height; by area when shrunk); smoothed by a Gaussian of `smoothing` image pixels
    (`scale`: drawn pixels per image pixel, below 1 when the image is shown shrunk); rescaled so its peak
    keeps the raw map's peak (a tiled frame's clean tiles, weighted near 0, stay cold; a detection keeps its
    full heat); then (heat - floor) / (1 - floor), clipped: only the heat above the floor is drawn.
    smoothing=0, floor=0: the raw map, resized."""
    width, height = size
    heat = np.asarray(heatmap, dtype=np.float32)
    peak = float(heat.max()) if heat.size else 0.0
    shrink = width < heat.shape[1] and height < heat.shape[0]
    if heat.shape != (height, width):  # shrinking by area keeps a thin line's mass, sampling would skip it
        heat = cv2.resize(heat, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    else:
        heat = heat.copy()
    sigma = smoothing * scale
    if sigma >= 0.25:  # below a quarter pixel the kernel is a single tap
        heat = cv2.GaussianBlur(heat, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    if (sigma >= 0.25 or shrink) and heat.max() > 0:
        heat *= peak / float(heat.max())
    if floor > 0:
        heat = (heat - floor) / (1.0 - floor)
    return np.clip(heat, 0.0, 1.0, out=heat)


def _heat_lut() -> np.ndarray:
    """(1, 256, 3) uint8 BGR colours for drawn heat 0..1: yellow through orange to red, so the hottest line is
    the most saturated colour on grey steel and no hue looks like the steel or the boxes."""
    stops = np.array([0.0, 0.5, 1.0])
    colours = np.array([(0, 210, 255), (0, 110, 255), (0, 0, 215)], np.float32)  # BGR
    levels = np.linspace(0, 1, 256)
    return np.rint(np.stack([np.interp(levels, stops, colours[:, c]) for c in range(3)], 1))[None].astype(np.uint8)


HEAT_LUT = _heat_lut()


def blend_heat(image_bgr: np.ndarray, heat: np.ndarray, opacity: float = MAX_OPACITY) -> np.ndarray:
    """The image with drawn heat (drawn_heat's output, same height x width) laid over it: each pixel's colour
    at an opacity of `opacity` x its heat, so where the heat is 0 the pixel is the image's, unchanged."""
    heat = np.asarray(heat, dtype=np.float32)
    index = np.rint(heat * 255).astype(np.uint8)
    colour = cv2.LUT(cv2.merge([index, index, index]), HEAT_LUT)
    alpha = heat * np.float32(opacity)
    return cv2.blendLinear(colour, image_bgr, alpha, 1.0 - alpha)


def _draw_legend(panel: np.ndarray, floor: float, opacity: float) -> None:
    """A small colour scale in the panel's bottom-right corner: heat 0 to 1 as drawn over mid-grey (grey up to
    the floor: not drawn), labelled 0 and 1 where the panel is large enough to read them."""
    height, width = panel.shape[:2]
    bar_w = int(np.clip(round(width * 0.3), 12, 200))
    bar_h = max(3, bar_w // 8)
    margin = max(2, min(width, height) // 50)
    levels = np.linspace(0, 1, bar_w, dtype=np.float32)
    drawn = np.clip((levels - floor) / (1.0 - floor), 0, 1) if floor > 0 else levels
    bar = blend_heat(np.full((bar_h, bar_w, 3), 128, np.uint8), np.tile(drawn, (bar_h, 1)), opacity)
    font, text_scale = cv2.FONT_HERSHEY_SIMPLEX, bar_h / 22
    labelled = bar_w >= 48
    (text_w, text_h), _ = cv2.getTextSize("1", font, text_scale, 1)
    pad = max(1, bar_h // 4)
    box_w = bar_w + 2 * pad + (2 * (text_w + pad) if labelled else 0)
    box_h = bar_h + 2 * pad
    x1, y1 = width - margin, height - margin
    x0, y0 = x1 - box_w, y1 - box_h
    if x0 < 0 or y0 < 0:  # a panel too small for any scale
        return
    region = panel[y0:y1, x0:x1]
    region[:] = (region.astype(np.float32) * 0.35).astype(np.uint8)  # a dark backing, the steel still hinted
    bar_x = x0 + pad + (text_w + pad if labelled else 0)
    panel[y0 + pad:y0 + pad + bar_h, bar_x:bar_x + bar_w] = bar
    if labelled:
        baseline = y0 + pad + (bar_h + text_h) // 2
        cv2.putText(panel, "0", (x0 + pad, baseline), font, text_scale, (255, 255, 255), 1, cv2.LINE_AA)
        cv2.putText(panel, "1", (bar_x + bar_w + pad, baseline), font, text_scale, (255, 255, 255), 1, cv2.LINE_AA)


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
                   defect_probability: float, opacity: float = MAX_OPACITY, boxes=(), stacked: bool = False,
                   note: str = "", heat_scale: float = 1.0) -> np.ndarray:
    """-> BGR uint8 image: a banner 'defect  p(defect)=0.9731' over [original | heat on the original, with a
    colour scale]. The heat is drawn_heat(heatmap) (`heat_scale`: image_rgb's pixels per pixel of the image
    it shows), coloured and laid over the image at up to `opacity`; cold pixels show the image unchanged.

    For tiled frames: `boxes` (x, y, w, h in image_rgb's pixels) are drawn on the original, `stacked` puts
    the heatmap below the original instead of beside it (a wide strip stays readable), and `note` is added to
    the banner."""
    image_bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    height, width = image_bgr.shape[:2]
    if heatmap is not None:
        heated = blend_heat(image_bgr, drawn_heat(heatmap, (width, height), heat_scale), opacity)
        _draw_legend(heated, HEAT_FLOOR, opacity)
        shown = [image_bgr, heated]
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
# edges stay crisp) is the default: smaller and faster to write than PNG (bench/profile_parts.py). PNG (zlib
# level 1, 'sub' row filter only: libpng's default of trying all five filters per row is slower for the same
# size on steel texture) keeps every pixel.
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
