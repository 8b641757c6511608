"""The heat as the overlay draws it (overlay.drawn_heat, render_overlay) and the localization scored on that
same map (metrics.score_maps): smoothing keeps a scratch and drops speckles, cold steel shows unchanged, the
colour scale is there, and the figures describe what is drawn."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scratch_detector import metrics, overlay, pipeline
from scratch_detector.metrics import box_mask, energy_in_box, pointing_hit, score_maps
from scratch_detector.overlay import HEAT_FLOOR, drawn_heat, render_overlay

LINE = (98, 102)  # columns of a 4 px scratch on a 200 px image, NEU's scale
LINE_BOX = (90, 0, 110, 200)  # (x0, y0, x1, y1)


def speckled_line(seed: int = 0) -> np.ndarray:
    """A CAM like LayerCAM's on a scratch: a 4 px line at 0.8 along its length, and single-pixel speckles at
    1.0 scattered over the plate (the raw maximum is a speckle, off the line)."""
    rng = np.random.default_rng(seed)
    heat = np.zeros((200, 200), np.float32)
    heat[:, LINE[0]:LINE[1]] = 0.8
    for _ in range(12):
        y, x = rng.integers(0, 200), rng.choice(np.r_[0:80, 120:200])
        heat[y, x] = 1.0
    return heat


def test_smoothing_keeps_the_maximum_on_the_line_not_on_a_speckle():
    heat = speckled_line()
    mask = box_mask((200, 200), [LINE_BOX])
    assert pointing_hit(heat, mask) == 0.0  # raw: the hottest pixel is a speckle
    drawn = drawn_heat(heat, (200, 200))
    y, x = np.unravel_index(np.argmax(drawn), drawn.shape)
    assert LINE[0] <= x < LINE[1], x
    assert drawn.max() == pytest.approx(1.0, abs=1e-6)  # the peak keeps the raw map's full heat
    assert drawn[:, LINE[0]:LINE[1]].min() > 0.5  # the whole line is drawn hot, not only its peak
    assert pointing_hit(drawn, mask) == 1.0
    assert energy_in_box(drawn, mask) > 0.99  # the speckles fall under the floor: nothing drawn on the plate
    # no smoothing, no floor: the raw map, resized
    assert np.array_equal(drawn_heat(heat, (200, 200), smoothing=0, floor=0), heat)


def test_floor_and_peak():
    weak = np.full((50, 50), 0.1, np.float32)
    weak[20:30, 20:30] = HEAT_FLOOR * 0.9  # a clean tiled frame: weighted near 0, below the floor everywhere
    assert not drawn_heat(weak, (200, 200)).any()
    half = np.zeros((50, 50), np.float32)
    half[10:40, 20:30] = 0.6  # a broad patch at 0.6: after smoothing still 0.6, drawn as (0.6 - floor) / (1 - floor)
    assert drawn_heat(half, (50, 50)).max() == pytest.approx((0.6 - HEAT_FLOOR) / (1 - HEAT_FLOOR), abs=1e-5)


def test_smoothing_is_in_image_pixels():
    heat = np.zeros((200, 200), np.float32)
    heat[:, 100] = 1.0
    full = drawn_heat(heat, (200, 200), floor=0)
    shrunk = drawn_heat(heat, (50, 50), scale=0.25, floor=0)  # the image shown at a quarter: sigma 1 px
    wrong = drawn_heat(heat, (50, 50), scale=1.0, floor=0)  # sigma 4 display px = 16 image px
    profile = full[100, ::4]

    def width(row):
        return int((row >= 0.5 * row.max()).sum())
    assert abs(width(shrunk[25]) - width(profile)) <= 1
    assert width(wrong[25]) >= 3 * width(shrunk[25])


def test_cold_steel_is_unchanged_and_hot_is_red():
    rng = np.random.default_rng(1)
    image = rng.integers(60, 200, (120, 160, 3), dtype=np.uint8)
    heat = np.zeros((120, 160), np.float32)
    heat[:, 40:44] = 1.0
    heat[10, 120] = 0.15  # below the floor even before smoothing
    out = render_overlay(image, heat, "defect", 0.97)
    banner = out.shape[0] - 120
    left, right = out[banner:, :160], out[banner:, 160:]
    bgr = image[..., ::-1]
    assert np.array_equal(left, bgr)  # the original panel untouched
    drawn = drawn_heat(heat, (160, 120))
    legend = np.zeros((120, 160), bool)
    legend[-20:, -70:] = True  # the corner the colour scale may take
    cold = (drawn == 0) & ~legend
    assert cold.mean() > 0.7
    assert np.array_equal(right[cold], bgr[cold])  # not a single cold pixel tinted
    assert (right[~cold & ~legend] != bgr[~cold & ~legend]).any(-1).all()  # and every drawn one is
    hot = right[:100, 41].astype(int)
    assert (hot[:, 2] - hot[:, 0]).mean() > 80  # red over grey steel (BGR)


def test_colour_scale_is_drawn_in_the_heat_panel():
    image = np.full((200, 200, 3), 128, np.uint8)
    for stacked in (False, True):
        out = render_overlay(image, np.zeros((200, 200), np.float32), "non-defect", 0.01, stacked=stacked)
        panels = out[out.shape[0] - (400 if stacked else 200):]
        original, heat_panel = (panels[:200], panels[200:]) if stacked else (panels[:, :200], panels[:, 200:])
        assert (original == 128).all()  # nothing on the original
        changed = np.argwhere((heat_panel != 128).any(-1))
        assert len(changed), "no colour scale"
        assert changed[:, 0].min() > 150 and changed[:, 1].min() > 100  # a small thing in the bottom-right corner
        assert len(changed) < 0.06 * 200 * 200
        (y0, x0), (y1, x1) = changed.min(0), changed.max(0) + 1
        scale = heat_panel[y0:y1, x0:x1].astype(int)
        assert ((scale[..., 2] > 150) & (scale[..., 0] < 80)).any()  # its hot end is red
        assert (scale == 128).all(-1).any()  # its cold end is the steel's own grey: below the floor, not drawn
    tiny = render_overlay(np.full((20, 20, 3), 128, np.uint8), np.zeros((20, 20), np.float32), "defect", 0.9)
    assert tiny.shape[1] == 40  # a panel too small for a scale still draws


def test_localization_scores_the_map_as_drawn():
    maps = np.stack([speckled_line(seed) for seed in range(3)])
    boxes = [((200, 200), [LINE_BOX])] * 3
    drawn = score_maps(maps, boxes)
    raw = score_maps(maps, boxes, smoothing=0, floor=0)
    assert drawn["pointing_game"] == 1.0 and raw["pointing_game"] == 0.0
    assert drawn["map"] == {"smoothing": overlay.SMOOTHING, "floor": HEAT_FLOOR}
    mask = box_mask((200, 200), [LINE_BOX])
    by_hand = np.mean([energy_in_box(drawn_heat(m, (200, 200)), mask) for m in maps])
    assert drawn["energy_in_box"] == pytest.approx(by_hand)
    assert metrics.drawn_heat is overlay.drawn_heat  # one definition for the overlay and the figures


def test_raw_map_scores_as_before():
    """smoothing=0, floor=0 resize as localization did before the drawing (torch bilinear), so the raw
    figures stay comparable with earlier ones."""
    rng = np.random.default_rng(2)
    maps = rng.random((2, 50, 50)).astype(np.float32)
    for heatmap in maps:
        torch_resized = F.interpolate(torch.from_numpy(heatmap)[None, None], size=(80, 120), mode="bilinear",
                                      align_corners=False)[0, 0].numpy()
        assert np.abs(drawn_heat(heatmap, (120, 80), smoothing=0, floor=0) - torch_resized).max() < 1e-5


def test_overlays_smooth_in_image_pixels():
    """A whole image shown shrunk, and a tiled frame's display, tell render_overlay how many display pixels an
    image pixel is, so a scratch is smoothed by its own width whatever the overlay's size."""
    shown = np.zeros((256, 512, 3), np.uint8)
    unit = pipeline.Decoded("a.png", np.zeros((8, 8, 3), np.uint8), shown, size=(1024, 512))
    result = pipeline.Aggregator(0.5)._whole(unit, 0.9, np.zeros((8, 8), np.float32))
    assert result.overlay.heat_scale == pytest.approx(0.5)
    small = pipeline.Decoded("b.png", np.zeros((8, 8, 3), np.uint8), np.zeros((150, 150, 3), np.uint8),
                             size=(150, 150))
    assert pipeline.Aggregator(0.5)._whole(small, 0.9, np.zeros((8, 8), np.float32)).overlay.heat_scale == 1.0
