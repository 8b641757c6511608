"""What another camera, lamp or lens does to an image, and the 8 ways to lay a square image down.

Each function takes a uint8 H x W x C image and returns a new uint8 image of the same shape, as a camera
would deliver it (clipped to 0..255 and rounded). train.py draws their parameters at random to augment;
bench/robustness.py applies fixed values to held-out images to measure what the model survives.
"""
from __future__ import annotations

import cv2
import numpy as np


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def dihedral(image: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 symmetries of the square (k in 0..7): k % 4 quarter turns, then a mirror when k >= 4.
    Exact: pixels move, none is interpolated. A scratch at any angle stays a scratch."""
    turned = np.rot90(image, k % 4, axes=(0, 1))
    return np.ascontiguousarray(turned.swapaxes(0, 1) if k >= 4 else turned)


def gain(image: np.ndarray, factor: float, offset: float = 0.0) -> np.ndarray:
    """Exposure or lamp brightness: every pixel times `factor`, plus `offset` grey levels."""
    return _to_uint8(image.astype(np.float32) * factor + offset)


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Spread of grey levels around the image's own mean scaled by `factor` (< 1: flatter, > 1: harder)."""
    values = image.astype(np.float32)
    mean = values.mean()
    return _to_uint8(mean + (values - mean) * factor)


def gamma(image: np.ndarray, exponent: float) -> np.ndarray:
    """A sensor or display response curve: 255 * (x / 255) ** exponent (< 1 lifts dark areas)."""
    return _to_uint8(255.0 * (image.astype(np.float32) / 255.0) ** exponent)


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Defocus, approximated by a Gaussian of `sigma` pixels (border: reflected)."""
    if sigma <= 0:
        return image.copy()
    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise: Gaussian of `sigma` grey levels per pixel, the same on every channel (a grey sensor)."""
    shape = image.shape[:2] + (1,) * (image.ndim - 2)
    return _to_uint8(image.astype(np.float32) + rng.normal(0.0, sigma, shape).astype(np.float32))


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """A JPEG round trip at `quality` (1-100): a camera or archive that compresses."""
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    return decoded.reshape(image.shape)


def magnify(image: np.ndarray, factor: float, center: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
    """A longer lens or a closer camera: the central 1/factor of the field of view, enlarged back to the
    image's size (bilinear). `center` places the window, as fractions of the room left to move it in."""
    if factor <= 1.0:
        return image.copy()
    height, width = image.shape[:2]
    top, left, crop_h, crop_w = magnify_window(height, width, factor, center)
    window = image[top:top + crop_h, left:left + crop_w]
    return cv2.resize(window, (width, height), interpolation=cv2.INTER_LINEAR).reshape(image.shape)


def magnify_window(height: int, width: int, factor: float, center: tuple[float, float] = (0.5, 0.5)):
    """(top, left, height, width) of the part of a height x width image that magnify() keeps in view."""
    if factor <= 1.0:
        return 0, 0, height, width
    crop_h, crop_w = max(1, round(height / factor)), max(1, round(width / factor))
    return round((height - crop_h) * center[1]), round((width - crop_w) * center[0]), crop_h, crop_w


def scratch_marks(image: np.ndarray, boxes, sigma: float = 6.0, margin: int = 4, feather: float = 2.0) -> np.ndarray:
    """A scratch's own marks, to add onto another surface: the grey image minus its Gaussian blur of `sigma`
    px (the local contrast of the line, not the brightness or texture of the plate it was on), inside its
    boxes (x0, y0, x1, y1) grown by `margin` px, with edges feathered over `feather` px. float32, H x W."""
    grey = image.astype(np.float32)
    high_pass = grey - cv2.GaussianBlur(grey, (0, 0), sigma)
    mask = np.zeros_like(grey)
    for x0, y0, x1, y1 in boxes:
        mask[max(0, y0 - margin):y1 + margin, max(0, x0 - margin):x1 + margin] = 1.0
    return high_pass * cv2.GaussianBlur(mask, (0, 0), feather)
