"""The overlay image of one verdict: a banner with the verdict over [original | heatmap blended on the
original], optionally with boxes; and its encoding into an overlay file (JPEG or PNG)."""
from __future__ import annotations

import cv2
import numpy as np

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

    For tiled frames: `boxes` (x, y, w, h in image_rgb's pixels) are drawn on the original, `stacked` puts
    the heatmap below the original instead of beside it (a wide strip stays readable), and `note` is added to
    the banner."""
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
