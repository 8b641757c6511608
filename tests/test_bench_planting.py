"""bench/frames.py's planting: a planted scratch must be in the frame. Under OpenCV 5.0 seamlessClone overwrote
its mask, the frame kept its own pixels, and the "independent planting" benchmark measured empty frames."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import frames  # noqa: E402  (bench/frames.py: numpy and OpenCV only at import)


def line_image() -> np.ndarray:
    image = np.full((200, 200), 80.0, np.float32)
    image[:, 45:55] = 200.0  # a bright vertical line inside the box below
    return image


@pytest.mark.parametrize("planting", sorted(frames.PLANTERS))
def test_a_planted_line_keeps_its_contrast_on_a_flat_frame(planting):
    frame = np.full((300, 300), 100.0, np.float32)
    boxes = frames.PLANTERS[planting](frame, line_image(), [(15, 0, 61, 198)], 40, 50)
    assert boxes == [(55, 50, 101, 248)]
    row = frame[150]
    line, beside = row[40 + 46:40 + 54].mean(), row[40 + 25:40 + 35].mean()
    assert line - beside > 50, (planting, row[60:110].round())  # the line stands out as in its own image
    assert np.abs(frame[:, :40] - 100).max() < 1 and np.abs(frame[:, 120:] - 100).max() < 2  # nothing else moves


def test_clone_fits_the_levels_to_the_frame_around_it():
    """Poisson blending keeps the region's gradients and takes its levels from the frame: the source's own
    background (80) becomes the frame's (100), the line stays 120 above it."""
    frame = np.full((300, 300), 100.0, np.float32)
    frames.plant_clone(frame, line_image(), [(15, 0, 61, 198)], 40, 50)
    row = frame[150]
    assert abs(row[40 + 25:40 + 35].mean() - 100) < 5
    assert abs(row[40 + 47:40 + 53].mean() - 220) < 10


def test_quilting_survives_a_best_match_rounded_below_zero(monkeypatch):
    """OpenCV's masked squared-difference sums can round to just below 0 for a near-perfect match (seen on a
    validation background): quilt() must still find candidate blocks, not crash on an empty choice."""
    real = frames.cv2.matchTemplate

    def rounded_below_zero(*args, **kwargs):
        error = real(*args, **kwargs)
        return error - error.min() - 4.0  # the best match now reads -4, as float rounding can leave it
    monkeypatch.setattr(frames.cv2, "matchTemplate", rounded_below_zero)
    rng = np.random.default_rng(0)
    source = rng.normal(120, 20, (200, 200)).astype(np.float32)
    out = frames.quilt(source, 260, 330, np.random.default_rng(1))
    assert out.shape == (260, 330)
    assert source.min() <= out.min() and out.max() <= source.max()  # every pixel comes from the source
