"""tiler.py: tile positions, lazy tiles, the heatmap stitcher and the frame-level score. Synthetic frames only."""
from __future__ import annotations

import inspect
import math
import tracemalloc

import cv2
import numpy as np
import pytest

from scratch_detector.tiler import HeatmapStitcher, Tiler, hottest_tile

TILE = 200
SHAPES = [(200, 200), (201, 351), (1000, 1000), (1024, 4096), (2000, 20000), (150, 4000), (150, 120), (1, 500)]


def starts(positions, axis):
    return sorted({p[axis] for p in positions})


def coverage(tiler, height, width):
    """How many tiles cover each pixel (tiles clipped to the frame)."""
    count = np.zeros((height, width), np.uint16)
    for x, y in tiler.positions(height, width):
        count[y:y + tiler.tile, x:x + tiler.tile] += 1
    return count


def smooth_field(height, width):
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    return (0.5 + 0.25 * np.sin(2 * np.pi * x / 900) * np.cos(2 * np.pi * y / 700)).astype(np.float32)


def stitch(height, width, maps, tiler=Tiler(TILE), scale=1.0):
    """Stitch maps(x, y) -> tile heatmap for every tile of an H x W frame."""
    stitcher = HeatmapStitcher(height, width, tiler.tile, scale=scale)
    for x, y in tiler.positions(height, width):
        stitcher.add(x, y, maps(x, y))
    return stitcher.result()


def crop(field, x, y, tile=TILE):
    """The tile's region of a frame-sized field, filled up to tile x tile (the part outside is never used)."""
    part = field[y:y + tile, x:x + tile]
    return np.pad(part, [(0, tile - part.shape[0]), (0, tile - part.shape[1])], mode="edge")


# ---------------------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("height, width", [s for s in SHAPES if s[0] * s[1] <= 4096 * 1024])
def test_positions_cover_every_pixel(height, width):
    assert coverage(Tiler(TILE), height, width).min() >= 1


@pytest.mark.parametrize("height, width", SHAPES)
@pytest.mark.parametrize("stride", [None, 100, 200])
def test_positions_grid_flush_and_stride(height, width, stride):
    tiler = Tiler(TILE, stride)
    positions = tiler.positions(height, width)
    for axis, length in ((0, width), (1, height)):
        s = starts(positions, axis)
        assert s[0] == 0
        assert s[-1] == max(0, length - TILE)  # flush with the right/bottom edge, never past it
        steps = np.diff(s)
        assert ((steps >= 1) & (steps <= tiler.stride)).all()
        assert len(s) == (1 if length <= TILE else math.ceil((length - TILE) / tiler.stride) + 1)  # fewest tiles
        if len(steps):
            assert steps.max() - steps.min() <= 1  # spread evenly: no near-duplicate last tile
    assert len(positions) == len(starts(positions, 0)) * len(starts(positions, 1))  # a full grid, row by row
    assert positions == sorted(positions, key=lambda p: (p[1], p[0]))


def test_steps_equal_the_stride_when_they_fit_exactly():
    assert starts(Tiler(TILE).positions(200, 200 + 150 * 12), 0) == list(range(0, 1801, 150))


def test_default_stride_leaves_every_point_an_eighth_of_a_tile_inside_some_tile():
    """The stride's justification: a scratch cut by one tile's edge lies >= tile/8 inside a neighbour."""
    tiler = Tiler(TILE)
    assert tiler.stride == 150
    margin = TILE // 8
    for length in (201, 351, 1000, 1024, 4096, 20000):
        inside = np.zeros(length, bool)
        for start in starts(tiler.positions(TILE, length), 0):
            inside[start + margin:start + TILE - margin] = True
        assert inside[margin:length - margin].all(), length


def test_frame_exactly_tile_sized_is_one_tile_the_frame_itself():
    frame = np.arange(TILE * TILE, dtype=np.uint16).reshape(TILE, TILE)
    assert Tiler(TILE).positions(TILE, TILE) == [(0, 0)]
    [(x, y, tile)] = list(Tiler(TILE).tiles(frame))
    assert (x, y) == (0, 0) and np.shares_memory(tile, frame) and np.array_equal(tile, frame)


@pytest.mark.parametrize("bad", [dict(tile=0), dict(tile=200, stride=0), dict(tile=200, stride=201)])
def test_invalid_tiler_rejected(bad):
    with pytest.raises(ValueError):
        Tiler(**bad)


def test_empty_frame_rejected():
    with pytest.raises(ValueError):
        Tiler(TILE).positions(0, 500)
    with pytest.raises(ValueError):
        HeatmapStitcher(0, 500, TILE)
    with pytest.raises(ValueError):
        HeatmapStitcher(500, 500, TILE, scale=0.001)  # a tile would shrink below one pixel


# ---------------------------------------------------------------------------------------------------------
# Tiles
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [None, 3])
def test_tiles_are_views_equal_to_the_frames_region(channels):
    rng = np.random.default_rng(0)
    shape = (1000, 1300) if channels is None else (1000, 1300, channels)
    frame = rng.integers(0, 256, shape, dtype=np.uint8)
    tiler = Tiler(TILE)
    seen = []
    for x, y, tile in tiler.tiles(frame):
        assert tile.shape == (TILE, TILE) + shape[2:]
        assert np.array_equal(tile, frame[y:y + TILE, x:x + TILE])
        assert np.shares_memory(tile, frame)  # no copy
        seen.append((x, y))
    assert seen == tiler.positions(*shape[:2])


@pytest.mark.parametrize("height, width", [(150, 4000), (150, 120), (1000, 90), (1, 500)])
def test_frame_smaller_than_the_tile_is_filled_by_reflection(height, width):
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    tiler = Tiler(TILE)
    for x, y, tile in tiler.tiles(frame):
        assert tile.shape == (TILE, TILE, 3)  # native scale kept: nothing resized
        h, w = min(TILE, height), min(TILE, width)
        assert np.array_equal(tile[:h, :w], frame[y:y + h, x:x + w])
        if height >= 2 and height < TILE:  # mirrored about the last row, which is not repeated
            assert np.array_equal(tile[h:h + min(TILE - h, h - 1), :w], frame[y:y + h][-2::-1][:TILE - h, x:x + w])
        if height == 1:
            assert (tile == tile[:1]).all()  # one row: reflection can only repeat it
        if width < TILE:
            assert np.array_equal(tile[:h, w:w + min(TILE - w, w - 1)], frame[y:y + h, ::-1][:, 1:TILE - w + 1])
        assert tiler.box(x, y, height, width) == (x, y, w, h)  # boxes never reach into the reflection


def test_tiles_are_generated_lazily_with_bounded_memory():
    """A 20000 x 2000 strip has 1729 tiles: 69 MB if built at once; iterating must hold about one."""
    tiler = Tiler(TILE)
    frame = np.random.default_rng(2).integers(0, 256, (20000, 2000), dtype=np.uint8)
    strip = np.random.default_rng(3).integers(0, 256, (150, 20000, 3), dtype=np.uint8)  # padded tiles: copies
    assert inspect.isgenerator(tiler.tiles(frame))
    for big, tile_bytes in ((frame, TILE * TILE), (strip, TILE * TILE * 3)):
        tracemalloc.start()
        try:
            count, total = 0, 0
            for _, _, tile in tiler.tiles(big):
                count += 1
                total += int(tile[0, 0].sum())
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert count == len(tiler.positions(*big.shape[:2])) > 100
        assert peak < 1_000_000 < count * tile_bytes / 10, peak


# ---------------------------------------------------------------------------------------------------------
# Stitching
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("height, width", [(200, 200), (201, 351), (1000, 1000), (1024, 4096), (150, 4000)])
@pytest.mark.parametrize("value", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("scale, map_size", [(1.0, TILE), (1.0, 7), (0.1, TILE)])
def test_constant_maps_stitch_to_exactly_that_constant(height, width, value, scale, map_size):
    result = stitch(height, width, lambda x, y: np.full((map_size, map_size), value, np.float32), scale=scale)
    assert result.dtype == np.float32
    assert result.shape == (max(1, math.floor(height * scale + 0.5)), max(1, math.floor(width * scale + 0.5)))
    assert np.abs(result - value).max() <= 1e-6  # no seams, no darker border


@pytest.mark.parametrize("height, width", [(1000, 1000), (1024, 4096), (150, 4000)])
def test_smooth_field_sampled_per_tile_is_reconstructed(height, width):
    field = smooth_field(height, width)
    full = stitch(height, width, lambda x, y: crop(field, x, y))
    assert np.abs(full - field).max() < 1e-5  # the maps agree where tiles overlap, so the blend must be exact
    # a coarse map per tile (a CAM at its layer's resolution), resized by the stitcher to the footprint
    coarse = stitch(height, width, lambda x, y: cv2.resize(crop(field, x, y), (25, 25), interpolation=cv2.INTER_AREA))
    assert np.abs(coarse - field).max() < 0.01


@pytest.mark.parametrize("height, width", [(1000, 1000), (1024, 4096)])
def test_tiles_that_disagree_blend_without_seams(height, width):
    """Each tile a different constant: pasting them would step by up to 1 at tile edges; blended, neighbouring
    pixels never differ by more than a few hundredths."""
    tiler = Tiler(TILE)
    positions = tiler.positions(height, width)
    values = dict(zip(positions, np.random.default_rng(4).random(len(positions))))
    result = stitch(height, width, lambda x, y: np.full((TILE, TILE), values[x, y], np.float32))
    assert np.abs(np.diff(result, axis=0)).max() < 0.05
    assert np.abs(np.diff(result, axis=1)).max() < 0.05
    assert result.min() >= min(values.values()) - 1e-6 and result.max() <= max(values.values()) + 1e-6


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_single_hot_tile_stays_inside_its_footprint(scale):
    height, width = 1000, 1300
    tiler = Tiler(TILE)
    hot = tiler.positions(height, width)[7]  # an interior tile
    result = stitch(height, width, lambda x, y: np.full((TILE, TILE), float((x, y) == hot), np.float32),
                    scale=scale)
    x, y = hot
    x0, x1, y0, y1 = (math.floor(v * scale + 0.5) for v in (x, x + TILE, y, y + TILE))
    inside = np.zeros(result.shape, bool)
    inside[y0:y1, x0:x1] = True
    assert (result[~inside] == 0).all()
    assert result[inside].min() > 0  # its own weight never vanishes, even at its edge
    assert abs(result[(y0 + y1) // 2, (x0 + x1) // 2] - 1) < 1e-6  # its centre is covered by no other tile


@pytest.mark.parametrize("scale", [0.25, 0.1])
def test_downscaled_accumulator_matches_the_downscaled_full_result(scale):
    """Tile maps as a CAM might give them: a smooth field plus a per-tile offset (tiles disagree by up to 0.2),
    and then a thin hot line in one tile. Each tile's scaled footprint starts on a whole display pixel, so
    the line may move by up to half a display pixel; it keeps its heat and its place."""
    height, width = 1024, 4096
    tiler = Tiler(TILE)
    field = smooth_field(height, width)
    positions = tiler.positions(height, width)
    offsets = dict(zip(positions, 0.2 * np.random.default_rng(5).random(len(positions))))
    hot = positions[30]

    def maps(x, y, line=False):
        tile_map = crop(field, x, y) + offsets[x, y]
        if line and (x, y) == hot:
            tile_map[:, 98:102] = 1.0
        return tile_map

    def full_and_small(line):
        full = stitch(height, width, lambda x, y: maps(x, y, line))
        small = stitch(height, width, lambda x, y: maps(x, y, line), scale=scale)
        return cv2.resize(full, (small.shape[1], small.shape[0]), interpolation=cv2.INTER_AREA), small

    expected, small = full_and_small(line=False)
    assert small.shape == (round(height * scale), round(width * scale))
    error = np.abs(small - expected)
    assert error.mean() < 0.005 and error.max() < 0.05, (error.mean(), error.max())

    expected_line, small_line = full_and_small(line=True)
    heat_expected = (expected_line - expected).sum(0)  # the line's heat per display column
    heat_small = (small_line - small).sum(0)
    assert heat_small.sum() == pytest.approx(heat_expected.sum(), rel=0.02)
    columns = np.arange(len(heat_small))
    centre = (heat_small * columns).sum() / heat_small.sum()
    assert abs(centre - (heat_expected * columns).sum() / heat_expected.sum()) <= 0.5
    assert abs(centre - ((hot[0] + 100) * scale - 0.5)) <= 0.5  # the line's centre in the frame, in display pixels


# ---------------------------------------------------------------------------------------------------------
# Frame-level decision inputs
# ---------------------------------------------------------------------------------------------------------
def test_hottest_tile_gives_the_max_probability_and_its_box():
    tiler = Tiler(TILE)
    positions = tiler.positions(1000, 1300)
    probabilities = np.full(len(positions), 0.1)
    probabilities[[5, 9]] = 0.9  # a tie goes to the first in raster order
    score, box = hottest_tile(tiler, 1000, 1300, positions, probabilities)
    assert score == pytest.approx(0.9) and box == (*positions[5], TILE, TILE)


def test_hottest_tile_box_is_clipped_to_a_small_frame():
    tiler = Tiler(TILE)
    positions = tiler.positions(150, 4000)
    probabilities = [0.0] * len(positions)
    probabilities[-1] = 0.8
    assert hottest_tile(tiler, 150, 4000, positions, probabilities) == (0.8, (3800, 0, TILE, 150))


@pytest.mark.parametrize("probabilities", [[], [0.1], [0.1, float("nan"), 0.2]])
def test_hottest_tile_rejects_bad_input(probabilities):
    tiler = Tiler(TILE)
    positions = tiler.positions(200, 351)
    assert len(positions) == 3
    with pytest.raises(ValueError):
        hottest_tile(tiler, 200, 351, positions, probabilities)
