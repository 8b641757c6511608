"""Tiled inference at native scale for frames larger than the model input (line-camera strips).

Shrinking a 4096 x 1024 frame to the model's 200 x 200 input erases a 1-pixel scratch. Instead the frame is
cut into overlapping tiles at native scale (the scale of NEU's 200 x 200 training images), each tile is
classified and explained on its own, and the tile heatmaps are blended back into one map for the frame.
One small set of objects for every caller, after anomalib's Tiler:

    tiler = Tiler(200)
    positions, probabilities = tiler.positions(height, width), []
    stitcher = HeatmapStitcher(height, width, tiler.tile, scale=min(1.0, 2048 / max(height, width)))
    for x, y, tile in tiler.tiles(frame):       # lazily, one tile at a time (batch them for the model)
        p_defect, tile_heatmap = ...            # the model on the tile
        probabilities.append(p_defect)
        stitcher.add(x, y, tile_heatmap)
    frame_heatmap = stitcher.result()
    score, box = hottest_tile(tiler, height, width, positions, probabilities)
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import cv2
import numpy as np


def _starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis: the fewest tiles with steps of at most `stride` whose last one is flush
    with the end (no padding, no pixel left out), spread evenly. A fixed step with a flush last tile would
    use as many tiles but could put the last two 1 px apart, piling all the spare overlap at the end;
    evenly spread, every overlap is at least tile - stride and the steps differ by at most 1 px.
    One tile at 0 when the axis is no longer than a tile."""
    if length <= tile:
        return [0]
    steps = -(-(length - tile) // stride)  # ceil
    return [k * (length - tile) // steps for k in range(steps + 1)]


@dataclass(frozen=True)
class Tiler:
    """Where the tiles of an H x W frame lie, and the tiles themselves.

    tile: the tile side in frame pixels, the scale the model was trained at (NEU: 200); a model trained at
    another input size resizes each tile, not the frame.

    stride: the largest step between neighbouring tiles (default tile - tile // 4: a quarter overlap).
    Neighbours share a strip at least tile - stride wide; a point in it lies at least half that width inside
    one of the two, and a point outside it at least the full width inside its only tile. With a quarter
    overlap every point of the frame, except those near the frame's own border, therefore lies at least
    tile/8 (25 px of a 200 px tile) inside some tile on all four sides at once: a scratch cut by one tile's
    edge is whole and clear of the edge in a neighbour, and the stitcher's window gives that neighbour the
    say there. A half overlap would double that margin for 4x the tiles of no overlap instead of
    (4/3)^2 = 1.8x. tile/8 is several times a scratch's width, and scratches at an image edge are not new to
    the model (NEU's training scratches run to the image border), so the cheaper overlap is enough.

    Frames smaller than the tile along an axis (a 150 x 4000 strip) are filled up to the tile by mirror
    reflection at the bottom/right (numpy 'reflect': the edge row is not doubled; a frame one row high has
    that row repeated), not resized: resizing that axis alone stretches the texture and the scratch width,
    which is exactly the scale change tiling avoids, and reflected pixels come from the frame itself, so
    per-image standardisation sees the same statistics (zero padding would shift them). On that axis the
    one tile starts at 0; box() and HeatmapStitcher clip the tile to the frame, so the reflected part never
    reaches the map or a reported box.
    """

    tile: int
    stride: int | None = None

    def __post_init__(self):
        if self.stride is None:
            object.__setattr__(self, "stride", self.tile - self.tile // 4)
        if self.tile < 1 or not 1 <= self.stride <= self.tile:
            raise ValueError(f"need tile >= 1 and 1 <= stride <= tile (else pixels fall between tiles), "
                             f"got tile {self.tile}, stride {self.stride}")

    def positions(self, height: int, width: int) -> list[tuple[int, int]]:
        """Top-left corners (x, y) of the tiles covering every pixel, row by row (the frame's memory order)."""
        if height < 1 or width < 1:
            raise ValueError(f"empty frame {height} x {width}")
        xs = _starts(width, self.tile, self.stride)
        return [(x, y) for y in _starts(height, self.tile, self.stride) for x in xs]

    def box(self, x: int, y: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The part of the tile at (x, y) inside an H x W frame, as (x, y, w, h)."""
        return x, y, min(self.tile, width - x), min(self.tile, height - y)

    def tiles(self, frame: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield (x, y, tile) for an (H, W) or (H, W, C) frame, one at a time, so a 20000 x 2000 strip never has
        all its tiles in memory. A tile is a view of the frame (no copy) where the frame is at least a tile in
        both axes, else a new reflected array (see the class docstring); treat both as read-only."""
        if frame.ndim not in (2, 3):
            raise ValueError(f"a frame is (H, W) or (H, W, C), got shape {frame.shape}")
        height, width = frame.shape[:2]
        for x, y in self.positions(height, width):
            tile = frame[y:y + self.tile, x:x + self.tile]
            short = (self.tile - tile.shape[0], self.tile - tile.shape[1])
            if any(short):
                tile = np.pad(tile, [(0, short[0]), (0, short[1])] + [(0, 0)] * (frame.ndim - 2), mode="reflect")
            yield x, y, tile


class HottestTile(NamedTuple):
    probability: float                  # max over the frame's tiles of p(defect): the frame-level score
    box: tuple[int, int, int, int]      # that tile's (x, y, w, h) in the frame, clipped to it


def hottest_tile(tiler: Tiler, height: int, width: int, positions: Sequence[tuple[int, int]],
                 probabilities: Sequence[float]) -> HottestTile:
    """The frame-level decision inputs: a frame is as defective as its worst tile (a scratch in one tile of a
    strip is a defective strip). Ties go to the first tile in raster order."""
    p = np.asarray(probabilities, dtype=np.float64)
    if len(p) == 0 or len(p) != len(positions):
        raise ValueError(f"need one probability per tile, got {len(p)} for {len(positions)} tiles")
    if not np.isfinite(p).all():
        raise ValueError("tile probabilities contain NaN or infinity")
    best = int(np.argmax(p))
    return HottestTile(float(p[best]), tiler.box(*positions[best], height, width))


@lru_cache(maxsize=64)
def _window(n: int) -> np.ndarray:
    """Raised cosine (Hann) over n pixels, sampled at pixel centres: largest in the middle, where the tile's
    CNN sees all the context, falling towards the edges, where it sees padding. Its floor, at the edge
    pixels, is sin^2(pi / 2n) > 0: a pixel that only a tile's edge covers (the frame border) still has weight,
    yet the weight is close enough to 0 there that a tile ending inside the frame leaves no step."""
    w = (np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2).astype(np.float32)
    w.flags.writeable = False  # shared by every caller through the cache
    return w


def _round(value: float) -> int:
    """Round half up, the same way for every tile: adjacent scaled footprints then meet without gaps."""
    return int(np.floor(value + 0.5))


class HeatmapStitcher:
    """Blends tile heatmaps into one frame heatmap: each pixel is the average of the tiles covering it,
    weighted by a separable raised-cosine window over each tile (the tile in which the pixel lies deeper
    has the larger say).

    The normalisation (sum of weighted maps / sum of weights) makes constant tile maps of value c give c
    everywhere, whatever the overlaps; where tiles disagree the result passes from one to the other
    smoothly across their overlap instead of stepping at a tile edge: no grid on a uniform surface. There
    is no added floor: a weight of f at a tile's edge would make a step of about f / (the neighbour's
    weight) of the two tiles' difference wherever a tile ends inside the frame.

    Memory: two float32 arrays of the accumulator's size (sum of weighted maps, sum of weights) while
    adding, plus the one result() returns; nothing per tile is kept. This is the bound. scale < 1
    accumulates at that fraction of the frame's size (e.g. the overlay's display size): each tile map is
    resized to its scaled footprint before it is added, so a 20000 x 2000 strip's heatmap never exists at
    full size.
    """

    def __init__(self, height: int, width: int, tile: int, scale: float = 1.0):
        if height < 1 or width < 1 or tile < 1:
            raise ValueError(f"need a non-empty frame and tile, got {height} x {width}, tile {tile}")
        if not scale > 0 or tile * scale < 1:
            raise ValueError(f"scale must be > 0 and leave a tile at least 1 pixel, got {scale}")
        self.tile, self.scale = tile, float(scale)
        self.shape = (max(1, _round(height * scale)), max(1, _round(width * scale)))
        self._sum = np.zeros(self.shape, np.float32)
        self._weight = np.zeros(self.shape, np.float32)

    def _span(self, start: int, limit: int) -> tuple[int, int, int, int]:
        """Scaled footprint [lo, hi) of a tile starting at `start`, and its part [a, b) inside the accumulator."""
        lo, hi = _round(start * self.scale), _round((start + self.tile) * self.scale)
        return lo, hi, max(lo, 0), min(hi, limit)

    def add(self, x: int, y: int, tile_map: np.ndarray) -> None:
        """Add the heatmap of the tile whose top-left corner is (x, y) in the frame. The map may have any
        resolution (a CAM at the model's input size, or coarser): it is resized to the tile's footprint.
        All tiles' maps must share one scale: per-tile [0, 1] scaling (gradcam.scale_per_image) gives every
        tile of a clean surface a hot spot of 1, so scale once per frame, or weight each map by its p(defect)."""
        tile_map = np.asarray(tile_map, dtype=np.float32)
        if tile_map.ndim != 2 or tile_map.size == 0:
            raise ValueError(f"a tile heatmap is a non-empty 2-D array, got shape {tile_map.shape}")
        top, bottom, y0, y1 = self._span(y, self.shape[0])
        left, right, x0, x1 = self._span(x, self.shape[1])
        if y0 >= y1 or x0 >= x1:
            raise ValueError(f"tile at ({x}, {y}) lies outside the frame")
        h, w = bottom - top, right - left
        if tile_map.shape != (h, w):
            shrink = tile_map.shape[0] > h or tile_map.shape[1] > w  # area averaging keeps thin hot lines' mass
            tile_map = cv2.resize(tile_map, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        weight = np.outer(_window(h)[y0 - top:y1 - top], _window(w)[x0 - left:x1 - left])
        self._weight[y0:y1, x0:x1] += weight
        weight *= tile_map[y0 - top:y1 - top, x0 - left:x1 - left]
        self._sum[y0:y1, x0:x1] += weight

    def result(self) -> np.ndarray:
        """The blended float32 heatmap, of shape `self.shape`; 0 where no tile was added. Adding may go on."""
        out = np.maximum(self._weight, np.finfo(np.float32).tiny)
        np.divide(self._sum, out, out=out)
        return out
