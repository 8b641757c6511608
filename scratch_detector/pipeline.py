"""The per-image work of inference, one stage per object, free of threads and queues (so that more than one
driver can run it):

    decode_units(path, relpath, plan)      a file -> work units: an image no larger than a tile -> one Decoded
                                           (shrunk whole to the model input); a larger one -> its Tiles at
                                           native scale, cut lazily from pixels decoded once
    BatchPredictor(model, ...)(units)      a batch of units (tiles of several images may share one) ->
                                           p(defect), a CAM heatmap and an unfamiliarity score per unit
    Aggregator(threshold, cutoff).add_batch(units, p, heatmaps, scores)
                                           -> a Result for each image whose last unit is in: p(defect) (the
                                           maximum over its tiles), its unfamiliarity (the median over its
                                           tiles), its detections, its overlay

and, per finished image, its outputs:

    finish_item(result, output, name, threshold, file_format)
                                           -> an Item: the overlay (and heatmap) written into place, the CSV
                                           rows, the files the run journal is to check
    error_item(decoded)                    -> an Item for a file that could not be read

Two engines run them: engines/local.py (reader thread, model streams, writer thread) and engines/ray_pool.py's
actors (run_files: the same stages one after the other, in each of several processes). evaluate.py's review
page draws its overlays through decode, Aggregator and finish_item too.

What is what: a unit (Decoded: a whole image; Tile: one tile of a Frame, a large image) is what the model
takes; a Result is one image's verdict and overlay, aggregated from its units; an Item is that image's rows
and files as the journal records them. settings.Plan says how files become units.

Tiles are cut at the scale the model was trained at: `Plan.tile` frame pixels a side (NEU's 200 x 200
images), each resized to the checkpoint's image size as a whole NEU image is; see tiler.Tiler for the
stride (a quarter overlap) and the frame-border rule. An image that fits in one tile is not tiled.

The frame heatmap: each tile's CAM (min-max scaled per tile by gradcam) is weighted by heat_weight(p,
threshold) before tiler.HeatmapStitcher blends it in, at the overlay's scale, and the blend is shown as it
is (no rescaling per frame). Per-tile scaling alone gives every tile of a clean surface a hot spot of 1 (a
clean frame becomes a grid of hot spots); stitching raw maps and scaling once per frame makes the frame's
hottest spot 1 whatever it is, so a clean frame still gets a red spot. Weighted by its tile's verdict, a
clean tile adds ~0 and a detected one its full map: no heat on a clean frame, and the maximum on a detection.
The overlay draws that blend through overlay.drawn_heat, smoothed at the tiles' native scale (frame.scale);
--save-heatmaps saves the blend itself, before drawing.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import dataset
from gradcam import GradCAM

from . import familiarity
from .overlay import encode_overlay, render_overlay
from .runtime import atomic_write
from .settings import Plan, RunSettings, heatmap_name
from .tiler import HeatmapStitcher, Tiler, hottest_tile

DISPLAY_MAX_SIDE = 512       # overlays of images that are not tiled are drawn at most this wide/high
BANNER_ROOM = 48             # render_overlay's banner is at most 41 px high


def error_text(error: BaseException) -> str:
    reason = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {reason}"[:300]


# ---------------------------------------------------------------------------------------------------------
# Units of work
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Decoded:
    """A whole image, shrunk to the model input: every image with --tile off, else one that fits in a tile."""
    relpath: str
    pixels: np.ndarray | None = None     # model input, uint8 S x S x 3
    display: np.ndarray | None = None    # RGB for the overlay, at most DISPLAY_MAX_SIDE
    error: str | None = None
    size: tuple[int, int] | None = None  # (width, height) of the image, when known


@dataclass(eq=False)
class Frame:
    """A tiled image: what its tiles share. Holds no frame pixels, only the small display image."""
    relpath: str
    width: int
    height: int
    tiler: Tiler
    positions: list[tuple[int, int]]
    scale: float                         # display pixels per image pixel
    stacked: bool                        # overlay panels one above the other (a wide image)
    display: np.ndarray | None           # RGB at `scale`, None without overlays


@dataclass(eq=False)
class Tile:
    frame: Frame
    index: int                           # into frame.positions
    pixels: np.ndarray                   # model input, uint8 S x S x 3
    error = None                         # never unreadable: a frame that cannot be decoded yields no tiles

    @property
    def relpath(self) -> str:
        return self.frame.relpath


def decode(path, relpath: str, image_size: int, with_display: bool) -> Decoded:
    """One file, shrunk whole -> model pixels (+ display image); any failure becomes an error reason, never
    an exception."""
    try:
        image = dataset.open_image(path, image_size)
        display = None
        if with_display:
            shown = image.copy()
            shown.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE), Image.BILINEAR)
            display = np.asarray(shown)
        return Decoded(relpath, dataset.to_model_pixels(image, image_size), display)
    except Exception as error:  # one bad file must never stop the batch: PIL raises many types
        return Decoded(relpath, error=error_text(error))


def display_layout(width: int, height: int, tile: int, side: int) -> tuple[float, bool]:
    """(scale, stacked) of a tiled image's overlay: everything, banner included, fits in side x side; the
    two panels go side by side as for small images unless one above the other shows them larger (a wide
    strip). Never enlarged; never below one display pixel per tile (HeatmapStitcher's minimum: only a strip
    over 2048 tiles long gets a larger overlay)."""
    room = side - BANNER_ROOM
    beside, stacked = min(1.0, room / max(2 * width, height)), min(1.0, room / max(width, 2 * height))
    return max(max(beside, stacked), 1.0 / tile), stacked > beside


def scaled(value: float, scale: float) -> int:
    """Frame pixels -> display pixels, rounded as HeatmapStitcher rounds (half up)."""
    return int(np.floor(value * scale + 0.5))


def _frame(relpath: str, image: Image.Image, plan: Plan) -> Frame:
    width, height = image.size
    tiler = Tiler(plan.tile, plan.stride)
    scale, stacked = display_layout(width, height, tiler.tile, plan.overlay_side)
    display = None
    if plan.with_display:
        size = (max(1, scaled(width, scale)), max(1, scaled(height, scale)))  # HeatmapStitcher's shape
        factor = int(1 / scale)  # a box filter by the whole factor first: no intermediate near the frame's size
        shown = image.reduce(factor) if factor > 1 else image
        shown = shown if shown.size == size else shown.resize(size, Image.BILINEAR)
        display = np.asarray(shown if shown.mode == "RGB" else shown.convert("RGB"))
    return Frame(relpath, width, height, tiler, tiler.positions(height, width), scale, stacked, display)


def decode_units(path, relpath: str, plan: Plan) -> Iterator[Decoded | Tile]:
    """A file -> its units, lazily. Every failure is one Decoded with an error, before any tile.

    Memory: the frame's pixels (1 byte a pixel grey, 4 colour; dataset.open_frame's limit) live while its
    tiles are being cut, and each tile is a copy of its region, so the units a caller queues hold no frame."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception:  # the whole-image decoder reports it, as for any image it cannot read
        yield decode(path, relpath, plan.image_size, plan.with_display)
        return
    if not plan.is_large(width, height):
        item = decode(path, relpath, plan.image_size, plan.with_display)
        if item.error is None:
            try:
                item.size = dataset.oriented_size(path)
            except Exception:  # the image was read: its size is only for the CSV
                pass
        yield item
        return
    try:
        image = dataset.open_frame(path)
        frame = _frame(relpath, image, plan)
    except Exception as error:  # unreadable, truncated, over the pixel limit, out of memory ...
        yield Decoded(relpath, error=error_text(error))
        return
    for index, (x, y) in enumerate(frame.positions):
        x, y, w, h = frame.tiler.box(x, y, frame.height, frame.width)
        region = np.asarray(image.crop((x, y, x + w, y + h)))
        _, _, tile = next(frame.tiler.tiles(region))  # a region short of a tile is filled by reflection
        yield Tile(frame, index, dataset.tile_model_pixels(tile, plan.image_size))


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------
class BatchPredictor:
    """A model copy and its CAM hooks, set up once, then called on batches of units (Ray Data's callable-class
    style). Units are independent: a batch may hold tiles of several images and whole small images."""

    def __init__(self, model, normalization: str, cam_method: str | None, cam_layer: str, device: torch.device,
                 familiarity_stats: dict | None = None):
        self.model, self.normalization, self.device = model, normalization, device
        self.cam = None if cam_method is None else GradCAM(model, cam_layer, cam_method)
        self.familiarity = familiarity_stats
        self.tap = (None if familiarity_stats is None else
                    familiarity.FeatureTap(model, familiarity.layers(familiarity_stats)))

    def __call__(self, batch: list) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """-> (p(defect) per unit, heatmaps for class defect (each min-max scaled to [0, 1]) or None,
        unfamiliarity per unit (familiarity.unfamiliarity, read from the same forward pass) or None)."""
        pixels = np.stack([unit.pixels for unit in batch])
        images = dataset.normalize(pixels, self.normalization).to(self.device)
        if self.cam is None:
            with torch.no_grad():
                logits = self.model(images)
            heatmaps = None
        else:
            heatmaps, logits = self.cam.explain(images, target_class=1)  # where the model sees the defect
            heatmaps = heatmaps.cpu().numpy()
        scores = (None if self.tap is None else
                  familiarity.unfamiliarity(self.tap.take(), pixels, self.familiarity).cpu().numpy())
        return logits.float().softmax(1)[:, 1].cpu().numpy(), heatmaps, scores


# ---------------------------------------------------------------------------------------------------------
# Per image: the verdict, the detections, the overlay
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Overlay:
    """What the overlay writer draws: overlay.render_overlay's inputs. `heatmap` is the raw map (a CAM at the
    model's input size, or a frame's stitched map at display size): render_overlay draws it through
    overlay.drawn_heat, and --save-heatmaps saves it as it is."""
    display: np.ndarray
    heatmap: np.ndarray
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # in display pixels
    stacked: bool = False
    note: str = ""
    heat_scale: float = 1.0              # display pixels per image pixel (the heat is smoothed in image pixels)

    @property
    def nbytes(self) -> int:
        return self.display.nbytes + self.heatmap.nbytes

    def render(self, prediction: str, probability: float) -> np.ndarray:
        return render_overlay(self.display, self.heatmap, prediction, probability, boxes=self.boxes,
                              stacked=self.stacked, note=self.note, heat_scale=self.heat_scale)


@dataclass
class Result:
    relpath: str
    probability: float                            # p(defect): the image's, or the maximum over its tiles
    tiles: int                                    # units the model saw: 1 for an image that is not tiled
    max_tile: tuple[int, int, int, int] | None    # (x, y, w, h) of the unit with that p; None: size unknown
    detections: list[tuple[int, int, int, int, float]]  # (x, y, w, h, p) of each unit at or over the threshold
    overlay: Overlay | None
    unfamiliarity: float | None = None            # familiarity.score (median over tiles); None: no statistics
    familiar: bool | None = None                  # unfamiliarity within the checkpoint's cut-off


def heat_weight(probability: float, threshold: float) -> float:
    """The weight of a tile's CAM in its frame's heatmap: p(defect) with its odds re-centred on the decision
    threshold, so a tile at the threshold weighs 0.5, clean tiles (p well below) ~0 and detections (p well
    above) ~1. With a threshold of 0.5 it is p itself; a model calibrated to a low threshold still shows its
    detections in full."""
    over, under = probability * (1.0 - threshold), (1.0 - probability) * threshold
    return over / (over + under) if over + under > 0 else float(probability >= threshold)


def footprint_map(tile_map: np.ndarray, x: int, y: int, tile: int, scale: float) -> np.ndarray:
    """A tile's CAM at the size of its footprint on the overlay (HeatmapStitcher's rounding). Shrunk by 2x or
    more, each display pixel takes the hottest CAM pixel it covers: averaged instead, a scratch a few pixels
    wide fades to nothing on a 20000 px strip drawn 2000 px wide. Less shrinking is left to the stitcher."""
    height = max(1, scaled(y + tile, scale) - scaled(y, scale))
    width = max(1, scaled(x + tile, scale) - scaled(x, scale))
    if tile_map.shape[0] < 2 * height or tile_map.shape[1] < 2 * width:
        return tile_map
    rows = np.arange(height) * tile_map.shape[0] // height  # first CAM row of each display row
    columns = np.arange(width) * tile_map.shape[1] // width
    return np.maximum.reduceat(np.maximum.reduceat(tile_map, rows, axis=0), columns, axis=1)


@dataclass(eq=False)
class _Open:
    """A frame whose tiles are coming in."""
    frame: Frame
    probabilities: np.ndarray
    scores: np.ndarray
    stitcher: HeatmapStitcher | None
    count: int = 0


class Aggregator:
    """Collects the units' results in any order and batching; add() returns an image's Result when its last
    unit is in. Holds one probability per tile and one display-sized stitcher per image still open: with
    units arriving in input order, one or two images at a time."""

    def __init__(self, threshold: float, unfamiliar_cutoff: float | None = None):
        self.threshold, self.cutoff = threshold, unfamiliar_cutoff
        self.open: dict[int, _Open] = {}

    def add_batch(self, batch: list, probabilities: np.ndarray, heatmaps: np.ndarray | None,
                  scores: np.ndarray | None = None) -> list[Result]:
        """The Results of the images that a batch of units (BatchPredictor's outputs for it) completes."""
        results = []
        for i, unit in enumerate(batch):
            result = self.add(unit, float(probabilities[i]), None if heatmaps is None else heatmaps[i],
                              None if scores is None else float(scores[i]))
            if result is not None:
                results.append(result)
        return results

    def _judged(self, result: Result, score: float | None) -> Result:
        result.unfamiliarity = score
        result.familiar = familiarity.is_familiar(score, self.cutoff)
        return result

    def add(self, unit: Decoded | Tile, probability: float, heatmap: np.ndarray | None,
            score: float | None = None) -> Result | None:
        if isinstance(unit, Decoded):
            return self._judged(self._whole(unit, probability, heatmap), score)
        frame = unit.frame
        state = self.open.get(id(frame))  # the state holds the frame, so its id is not reused meanwhile
        if state is None:
            stitcher = None
            if frame.display is not None:
                stitcher = HeatmapStitcher(frame.height, frame.width, frame.tiler.tile, scale=frame.scale)
            state = self.open[id(frame)] = _Open(frame, np.full(len(frame.positions), np.nan),
                                                 np.full(len(frame.positions), np.nan), stitcher)
        state.probabilities[unit.index] = probability
        state.scores[unit.index] = np.nan if score is None else score
        if state.stitcher is not None and heatmap is not None:
            x, y = frame.positions[unit.index]
            tile_map = footprint_map(np.asarray(heatmap, np.float32), x, y, frame.tiler.tile, frame.scale)
            state.stitcher.add(x, y, tile_map * heat_weight(probability, self.threshold))
        state.count += 1
        if state.count < len(frame.positions):
            return None
        del self.open[id(frame)]
        scores = state.scores
        return self._judged(self._finish(state), None if np.isnan(scores).any() else familiarity.frame_score(scores))

    def _whole(self, unit: Decoded, probability: float, heatmap: np.ndarray | None) -> Result:
        box = None if unit.size is None else (0, 0, *unit.size)
        detections = [(*box, probability)] if box is not None and probability >= self.threshold else []
        overlay = None
        if heatmap is not None and unit.display is not None:  # the display is the image, shrunk past 512 px
            scale = 1.0 if unit.size is None else unit.display.shape[1] / unit.size[0]
            overlay = Overlay(unit.display, heatmap, heat_scale=scale)
        return Result(unit.relpath, probability, 1, box, detections, overlay)

    def _finish(self, state: _Open) -> Result:
        frame, probabilities = state.frame, state.probabilities
        tiler, height, width = frame.tiler, frame.height, frame.width
        best = hottest_tile(tiler, height, width, frame.positions, probabilities)
        detections = [(*tiler.box(x, y, height, width), float(p))
                      for (x, y), p in zip(frame.positions, probabilities) if p >= self.threshold]
        overlay = None
        if state.stitcher is not None:
            boxes = [(scaled(x, frame.scale), scaled(y, frame.scale), max(1, scaled(w, frame.scale)),
                      max(1, scaled(h, frame.scale))) for x, y, w, h, _ in detections]
            note = f"{len(detections)} of {len(probabilities)} tiles flagged"
            # the stitched map is at display size already; an image pixel is frame.scale display pixels
            overlay = Overlay(frame.display, state.stitcher.result(), boxes, frame.stacked, note, frame.scale)
        return Result(frame.relpath, best.probability, len(probabilities), best.box, detections, overlay)


# ---------------------------------------------------------------------------------------------------------
# Per image: its files and rows, as the run journal records them
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Item:
    """A finished input: its predictions.csv row, its detections.csv rows, and the files it wrote (relative
    to the output folder), which RunJournal.pending checks before it trusts the record."""
    relpath: str
    files: list[str]
    predictions: list[list]
    detections: list[list]
    units: int = 0                       # model inputs it took (tiles, or 1)


def error_item(unit: Decoded) -> Item:
    return Item(unit.relpath, [], [[unit.relpath, "", "", "", "", f"error: {unit.error}", "", "", "", ""]], [])


def finish_item(result: Result, output: Path, overlay_name: str, threshold: float, file_format: str,
                save_heatmap: bool = False) -> Item:
    """Write the overlay (and heatmap) of `result`, each to a temp file renamed into place, and return its
    Item. A file that cannot be written (disk full, odd path) makes the row an error and leaves the verdict;
    the Item still lists the files, so that a later run finds them missing and redoes the image."""
    label = int(result.probability >= threshold)
    prediction = dataset.BINARY_CLASSES[label]
    box = "" if result.max_tile is None else ",".join(map(str, result.max_tile))
    row = [result.relpath, prediction, label, f"{result.probability:.4f}", "", "ok", result.tiles, box,
           {True: "yes", False: "no", None: ""}[result.familiar],
           "" if result.unfamiliarity is None else f"{result.unfamiliarity:.2f}"]
    files = []
    if result.overlay is not None:
        row[4] = overlay_name
        files = [overlay_name] + ([heatmap_name(overlay_name)] if save_heatmap else [])
        try:
            data = encode_overlay(result.overlay.render(prediction, result.probability), file_format)
            with atomic_write(output / overlay_name, "wb", fsync=False) as handle:
                handle.write(data)
            if save_heatmap:
                with atomic_write(output / files[1], "wb", fsync=False) as handle:
                    np.save(handle, result.overlay.heatmap.astype(np.float16))
        except Exception as error:  # a full disk or odd path fails this overlay, not the run
            row[4], row[5] = "", f"error: overlay not written: {type(error).__name__}: {error}"
            for name in files:  # no older file of that name may pass for this run's
                try:
                    (output / name).unlink(missing_ok=True)
                except OSError:
                    pass
    detections = [[result.relpath, x, y, w, h, f"{p:.4f}"] for x, y, w, h, p in result.detections]
    return Item(result.relpath, files, [row], detections, result.tiles)


def run_files(files: Iterable[tuple[Path, str, str]], predictor: BatchPredictor, settings: RunSettings
              ) -> Iterator[Item]:
    """(path, relpath, overlay name) -> an Item each, in order: decode, predict in batches of
    settings.batch_size units, aggregate, write. One thread, the stages one after the other (the Ray engine's
    actors: parallel across processes); the local engine runs the same stages in overlapping threads instead."""
    aggregator, names, batch, done = Aggregator(settings.threshold, settings.unfamiliar_cutoff), {}, [], []

    def predict():
        for result in aggregator.add_batch(batch, *predictor(batch)):
            done.append(finish_item(result, settings.output, names.pop(result.relpath), settings.threshold,
                                    settings.overlay_format, settings.save_heatmaps))
        batch.clear()

    for path, relpath, overlay_name in files:
        names[relpath] = overlay_name
        for unit in decode_units(path, relpath, settings.plan):
            if unit.error:
                names.pop(relpath)
                done.append(error_item(unit))
                continue
            batch.append(unit)
            if len(batch) == settings.batch_size:
                predict()
        yield from done
        done.clear()
    if batch:
        predict()
    yield from done
