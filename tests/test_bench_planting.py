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


def test_the_control_images_are_the_backgrounds_filter_applied_to_whole_images(tmp_path):
    """The control beside the frames: each non-scratch image of the split as it is, and flattened exactly as a
    background is before quilting, so that false alarms the filter makes by itself can be told apart."""
    from types import SimpleNamespace
    from PIL import Image
    rng = np.random.default_rng(0)
    samples = []
    for name, neu_class, label in (("inclusion_1", "inclusion", 0), ("patches_7", "patches", 0),
                                   ("scratches_3", "scratches", 1)):
        # a texture on a strong left-to-right illumination gradient
        image = np.clip(rng.normal(0, 12, (200, 200)) + np.linspace(60, 190, 200)[None, :], 0, 255).astype(np.uint8)
        path = tmp_path / f"{name}.jpg"
        Image.fromarray(image).save(path, quality=100)
        samples.append(SimpleNamespace(path=path, relpath=f"{neu_class}/{name}.jpg", neu_class=neu_class, label=label))
    sources = frames.Sources(samples, {}, seed=0)
    truths = frames.control_images(sources, tmp_path / "frames")
    assert sorted(t.name for t in truths) == sorted(f"control/{kind}/{stem}.png" for kind in ("as_is", "flattened")
                                                    for stem in ("inclusion_1", "patches_7"))
    for stem in ("inclusion_1", "patches_7"):
        source = frames.gray(tmp_path / f"{stem}.jpg")
        as_is = frames.gray(tmp_path / "frames" / "control" / "as_is" / f"{stem}.png")
        flat = frames.gray(tmp_path / "frames" / "control" / "flattened" / f"{stem}.png")
        assert np.array_equal(as_is, source)
        background = frames.continuous_background(source, 200, 200, "mirror", np.random.default_rng(0))
        assert np.abs(flat - np.clip(np.rint(background), 0, 255)).max() == 0  # the backgrounds' own first step
        gradient, left = np.ptp(source.mean(0)), np.ptp(flat.mean(0))  # brightness across the columns
        assert gradient > 100 and left < 0.5 * gradient
        assert abs(flat.mean() - source.mean()) < 2


def scored(name: str, kind: str, background: str, flagged: bool, tiles: int = 1, scratch: bool = False):
    truth = frames.Truth(name, kind, 200, 200, background, [[(0, 0, 10, 10)]] if scratch else [])
    return frames.Scored(truth, flagged, 0.0, tiles, [], [], 0, None, None, 0.0)


def test_expected_flagged_frames_follow_the_per_image_false_alarm_rate():
    # control: inclusion 1 false alarm of 4 images, crazing 0 of 4 -> pooled 1/8
    control = ([scored(f"i{k}", "control_as_is", "inclusion", k == 0) for k in range(4)]
               + [scored(f"c{k}", "control_as_is", "crazing", False) for k in range(4)]
               + [scored("f", "control_flattened", "crazing", True)])          # the flattened ones do not count
    clean = [scored("a", "continuous", "inclusion", True, tiles=3), scored("b", "continuous", "crazing", False, 10),
             scored("s", "continuous", "crazing", True, 50, scratch=True)]    # a scratch frame does not count
    by_class, by_pooled, pooled = frames.expected_flagged(clean, control)
    assert pooled == 1 / 8
    assert abs(by_class - (1 - 0.75 ** 3)) < 1e-12                            # crazing's rate 0 adds nothing
    assert abs(by_pooled - ((1 - (7 / 8) ** 3) + (1 - (7 / 8) ** 10))) < 1e-12
