"""Tiled inference (infer.py --tile auto, pipeline.py): large frames are judged tile by tile at native scale.

Synthetic frames only. The model is trained here for a few seconds (the idea of test_gradcam.py's fixture) to
tell a 64 px noise texture from one crossed by a bright vertical line anywhere; its native scale is 64 px, so
infer.py runs with --tile-size 64 (NEU models keep the default, 200). Scripts run as separate processes on one
torch thread, as in test_infer_robustness.py.
"""
from __future__ import annotations

import csv
import io
import os
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_script, save_image
from PIL import Image

import dataset
from scratch_detector import pipeline
from scratch_detector.model import build_model, load_checkpoint, save_checkpoint
from scratch_detector.overlay import render_overlay
from scratch_detector.settings import DEFAULT_CAM_LAYER
from scratch_detector.tiler import Tiler

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SIZE = 64                          # the fixture model's input, and its native scale: the tile side
FRAME = (480, 640)                 # height, width: 10 x 13 tiles of 64 px at stride 48
LINE_X, LINE_Y = (560, 562), (40, 440)   # the planted scratch, far from the centre
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def texture(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(128, 12, (height, width)).clip(0, 255).astype(np.uint8)


def training_batch(rng: np.random.Generator, n: int = 16) -> tuple[np.ndarray, torch.Tensor]:
    """Half plain texture, half with a vertical bright line (1-3 px) at a random column."""
    images, labels = [], []
    for i in range(n):
        image = texture(SIZE, SIZE, int(rng.integers(1 << 30)))
        if i % 2:
            x, width = int(rng.integers(0, SIZE - 3)), int(rng.integers(1, 4))
            image[:, x:x + width] = int(rng.integers(215, 245))
        images.append(np.repeat(image[..., None], 3, -1))
        labels.append(i % 2)
    return np.stack(images), torch.tensor(labels)


@pytest.fixture(scope="module")
def line_model(tmp_path_factory, one_torch_thread) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        net, init = build_model("none")
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        net.train()
        for _ in range(30):
            pixels, labels = training_batch(rng)
            loss = torch.nn.functional.cross_entropy(net(dataset.normalize(pixels, "per-image")), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        for module in net.modules():  # BatchNorm statistics of the final weights
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None
                module.reset_running_stats()
        with torch.no_grad():
            for _ in range(4):
                net(dataset.normalize(training_batch(rng)[0], "per-image"))
    path = tmp_path_factory.mktemp("tiling") / "line.pth"
    save_checkpoint(path, net.eval(), {"image_size": SIZE, "normalization": "per-image", "threshold": 0.5,
                                       "pretrained": init})
    pixels, labels = training_batch(np.random.default_rng(99))
    with torch.no_grad():
        probabilities = load_checkpoint(path)[0](dataset.normalize(pixels, "per-image")).softmax(1)[:, 1]
    assert ((probabilities >= 0.5).long() == labels).all(), f"the fixture model did not learn: {probabilities}"
    return path


def scratch_frame(seed: int = 1) -> np.ndarray:
    frame = texture(*FRAME, seed)
    frame[LINE_Y[0]:LINE_Y[1], LINE_X[0]:LINE_X[1]] = 235
    return frame


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def infer(model: Path, images: Path, out: Path, *args) -> dict[str, dict]:
    result = run_script("infer.py", "--model", model, "--input", images, "--output", out, "--tile-size", SIZE,
                        *args, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    columns, rows = read_csv(out / "predictions.csv")
    assert columns == ["image", "prediction", "label", "defect_probability", "gradcam", "status", "tiles",
                       "max_tile", "familiar", "unfamiliarity"]
    return {row["image"]: row for row in rows}


def detections(out: Path) -> list[dict]:
    columns, rows = read_csv(out / "detections.csv")
    assert columns == ["image", "x", "y", "width", "height", "defect_probability"]
    return rows


def box(row: dict, key: str = "max_tile") -> tuple[int, int, int, int]:
    if key == "max_tile":
        return tuple(map(int, row[key].split(",")))
    return tuple(int(row[k]) for k in ("x", "y", "width", "height"))


def touches_line(x, y, w, h) -> bool:
    return x < LINE_X[1] and x + w > LINE_X[0] and y < LINE_Y[1] and y + h > LINE_Y[0]


@pytest.fixture(scope="module")
def runs(line_model, tmp_path_factory):
    """One folder (a scratch frame, a clean frame, two small images) through infer.py four ways: tiled with a
    batch size that mixes the tiles of both frames in one batch (130 tiles each, batches of 7), tiled with
    small overlays, tiled without CAM, and --tile off."""
    work = tmp_path_factory.mktemp("frames")
    images = work / "images"
    images.mkdir()
    Image.fromarray(scratch_frame()).save(images / "scratch_frame.png")
    Image.fromarray(texture(*FRAME, seed=2)).save(images / "clean_frame.png")
    save_image(images / "small_scratch.png", "scratch", size=SIZE, seed=3)
    save_image(images / "small_plain.png", size=SIZE, seed=4)
    tiled = infer(line_model, images, work / "tiled", "--batch-size", 7, "--save-heatmaps")
    infer(line_model, images, work / "small", "--overlay-max-side", 512)
    no_cam = infer(line_model, images, work / "no_cam", "--no-cam")
    off = infer(line_model, images, work / "off", "--tile", "off")
    return work, images, tiled, no_cam, off


def test_scratch_frame_is_flagged_with_a_box_on_the_line(runs):
    work, _, rows, _, _ = runs
    row = rows["scratch_frame.png"]
    assert row["status"] == "ok" and row["prediction"] == "defect" and row["label"] == "1"
    assert int(row["tiles"]) == len(Tiler(SIZE).positions(*FRAME)) == 130
    x, y, w, h = box(row)
    assert (w, h) == (SIZE, SIZE) and touches_line(x, y, w, h)
    assert x <= LINE_X[0] and x + w >= LINE_X[1]  # the hottest tile holds the line's whole width
    found = [d for d in detections(work / "tiled") if d["image"] == "scratch_frame.png"]
    assert found, "no detection rows for the scratch frame"
    assert all(touches_line(*box(d, "detection")) for d in found), found  # no box away from the line
    assert any(box(d, "detection") == (x, y, w, h) for d in found)
    assert max(float(d["defect_probability"]) for d in found) == pytest.approx(float(row["defect_probability"]),
                                                                              abs=1e-4)
    # the line runs through 8 tile rows: most of the tiles holding it are found
    assert len({box(d, "detection")[1] for d in found}) >= 6


def test_clean_frame_is_clean_and_cold(runs):
    work, _, rows, _, _ = runs
    row = rows["clean_frame.png"]
    assert row["status"] == "ok" and row["prediction"] == "non-defect" and row["tiles"] == "130"
    assert not [d for d in detections(work / "tiled") if d["image"] == "clean_frame.png"]
    heat = np.load(work / "tiled" / "heatmaps" / "clean_frame_heatmap.npy").astype(np.float32)
    assert heat.shape == FRAME  # 1280 x 480 px of panels fit 2048: drawn at full size
    # weighted by its tile's p(defect), a clean tile adds almost nothing: no hot spot, no tile grid
    assert heat.max() < 0.25, heat.max()


def test_heatmap_peaks_on_the_line(runs):
    work, _, rows, _, _ = runs
    heat = np.load(work / "tiled" / "heatmaps" / "scratch_frame_heatmap.npy").astype(np.float32)
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    # within one cell of the default CAM layer's grid, plus a pixel: 3 px at features.1 (stride 2), 5 at
    # features.2 (stride 4)
    tolerance = {"features.0": 2, "features.1": 2, "features.2": 4, "features.3": 8}[DEFAULT_CAM_LAYER] + 1
    assert LINE_X[0] - tolerance <= x < LINE_X[1] + tolerance and LINE_Y[0] - tolerance <= y < LINE_Y[1] + tolerance, \
        (x, y)
    assert heat.max() > 0.5
    away = heat[:, :LINE_X[0] - 2 * SIZE]  # two tiles left of the line and beyond: cold
    assert away.max() < 0.25, away.max()


def test_overlays_are_readable_sizes(runs):
    work, _, rows, _, _ = runs
    with Image.open(work / "tiled" / rows["scratch_frame.png"]["gradcam"]) as overlay:
        assert max(overlay.size) <= 2048 and overlay.size[0] == 2 * FRAME[1]  # side by side, full size
    small = {row["image"]: row for row in read_csv(work / "small" / "predictions.csv")[1]}
    with Image.open(work / "small" / small["scratch_frame.png"]["gradcam"]) as overlay:
        assert 512 - 60 <= max(overlay.size) <= 512  # shrunk to fit, not beyond (panels one above the other)


def test_small_images_are_judged_as_before(runs, line_model):
    work, images, tiled, _, off = runs
    net, meta = load_checkpoint(line_model)
    for name in ("small_scratch.png", "small_plain.png"):
        assert tiled[name]["tiles"] == off[name]["tiles"] == "1"
        assert tiled[name]["max_tile"] == off[name]["max_tile"] == f"0,0,{SIZE},{SIZE}"
        old_columns = ("prediction", "label", "defect_probability", "gradcam", "status")
        assert [tiled[name][k] for k in old_columns] == [off[name][k] for k in old_columns]
        assert ((work / "tiled" / tiled[name]["gradcam"]).read_bytes()
                == (work / "off" / off[name]["gradcam"]).read_bytes())
        with torch.no_grad():
            logits = net(dataset.preprocess(images / name, SIZE, meta["normalization"])[None])
        assert float(tiled[name]["defect_probability"]) == pytest.approx(float(logits.softmax(1)[0, 1]), abs=2e-4)
    assert tiled["small_scratch.png"]["prediction"] == "defect"
    assert tiled["small_plain.png"]["prediction"] == "non-defect"
    # a small image judged defect is one detection, the whole image
    whole = [d for d in detections(work / "tiled") if d["image"] == "small_scratch.png"]
    assert [box(d, "detection") for d in whole] == [(0, 0, SIZE, SIZE)]


def test_tile_off_shrinks_the_whole_frame_as_before(runs, line_model):
    work, images, _, _, off = runs
    net, meta = load_checkpoint(line_model)
    for name in ("scratch_frame.png", "clean_frame.png"):
        row = off[name]
        assert row["tiles"] == "1" and row["max_tile"] == f"0,0,{FRAME[1]},{FRAME[0]}"
        with torch.no_grad():
            logits = net(dataset.preprocess(images / name, SIZE, meta["normalization"])[None])
        assert float(row["defect_probability"]) == pytest.approx(float(logits.softmax(1)[0, 1]), abs=2e-4)
        with Image.open(work / "off" / row["gradcam"]) as overlay:
            assert max(overlay.size) <= 2 * pipeline.DISPLAY_MAX_SIDE  # the old small overlay


def test_no_cam_still_reports_where(runs):
    work, _, _, rows, _ = runs
    assert rows["scratch_frame.png"]["prediction"] == "defect" and rows["scratch_frame.png"]["gradcam"] == ""
    assert any(d["image"] == "scratch_frame.png" for d in detections(work / "no_cam"))
    assert not (work / "no_cam" / "gradcam").exists()


# ---------------------------------------------------------------------------------------------------------
# pipeline.py in-process: batching, memory, layout
# ---------------------------------------------------------------------------------------------------------
def fake_predictions(units) -> tuple[np.ndarray, np.ndarray]:
    """A stand-in model: p from each unit's pixels, a heatmap hot where the unit is bright."""
    p = np.array([float(u.pixels.max() > 200) * 0.9 + u.pixels.mean() / 2550 for u in units])
    heat = np.stack([(u.pixels[..., 0] > 200).astype(np.float32) for u in units])
    return p, heat


def aggregate(units: list, batch_size: int) -> dict[str, pipeline.Result]:
    aggregator, done = pipeline.Aggregator(threshold=0.5), {}
    for start in range(0, len(units), batch_size):
        batch = units[start:start + batch_size]
        for unit, p, heat in zip(batch, *fake_predictions(batch)):
            result = aggregator.add(unit, float(p), heat)
            if result is not None:
                done[result.relpath] = result
    assert not aggregator.open
    return done


def test_batches_mixing_tiles_of_several_frames_change_nothing(tmp_path):
    Image.fromarray(scratch_frame()).save(tmp_path / "a.png")
    Image.fromarray(texture(300, 200, seed=5)).save(tmp_path / "b.png")
    save_image(tmp_path / "c.png", "scratch", size=SIZE, seed=6)
    plan = pipeline.Plan(SIZE, tile=SIZE)
    units = [u for name in ("a.png", "b.png", "c.png") for u in pipeline.decode_units(tmp_path / name, name, plan)]
    assert [type(u).__name__ for u in units].count("Tile") == 130 + len(Tiler(SIZE).positions(300, 200)) == 154
    alone = {name: aggregate([u for u in units if u.relpath == name], batch_size=1)[name]
             for name in ("a.png", "b.png", "c.png")}
    for batch_size in (7, 16, 1000):  # batches holding the end of one frame and the start of the next
        mixed = aggregate(units, batch_size)
        for name, expected in alone.items():
            got = mixed[name]
            assert (got.probability, got.tiles, got.max_tile, got.detections) == (
                expected.probability, expected.tiles, expected.max_tile, expected.detections)
            assert np.array_equal(got.overlay.heatmap, expected.overlay.heatmap)
    a = alone["a.png"]
    assert a.tiles == 130 and a.detections and all(touches_line(*d[:4]) for d in a.detections)
    assert alone["c.png"].max_tile == (0, 0, SIZE, SIZE) and alone["c.png"].tiles == 1


def test_tiles_are_the_frame_at_native_scale(tmp_path):
    """Each tile is the frame's own pixels (resized only to the model input), grey tiles as 3 equal channels,
    and a frame thinner than a tile is filled by reflection, as tiler.Tiler does."""
    frame = texture(150, 700, seed=7)
    Image.fromarray(frame).save(tmp_path / "strip.png")
    tiler = Tiler(200)
    units = list(pipeline.decode_units(tmp_path / "strip.png", "strip.png", pipeline.Plan(200)))
    assert [u.index for u in units] == list(range(len(tiler.positions(150, 700))))
    for unit, (_, _, expected) in zip(units, tiler.tiles(frame)):
        assert unit.pixels.shape == (200, 200, 3) and unit.pixels.flags.writeable
        assert all(np.array_equal(unit.pixels[..., c], expected) for c in range(3))
    shrunk = list(pipeline.decode_units(tmp_path / "strip.png", "strip.png", pipeline.Plan(112)))
    _, _, first = next(tiler.tiles(frame))
    assert np.array_equal(shrunk[0].pixels, dataset.tile_model_pixels(first, 112))
    assert np.array_equal(shrunk[0].pixels, dataset.to_model_pixels(Image.fromarray(first).convert("RGB"), 112))


@pytest.mark.parametrize("mode", ["L", "RGB", "I;16", "P", "LA", "1", "F", "rotated"])
def test_frames_decode_as_whole_images_do(tmp_path, mode):
    """open_frame (native scale, grey kept at 1 byte a pixel) gives the pixels open_image gives when it is not
    asked to shrink: same mode conversions, same EXIF orientation; grey comes back as 'L'."""
    base = np.random.default_rng(10).integers(0, 256, (230, 310), dtype=np.uint8)
    path = tmp_path / ("frame.tif" if mode in ("I;16", "F") else "frame.png")
    if mode == "I;16":
        Image.fromarray(base.astype(np.uint16) * 257 + 100).save(path)
    elif mode == "F":
        Image.fromarray(base.astype(np.float32) / 255).save(path)
    elif mode == "rotated":
        path = tmp_path / "frame.jpg"
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 270: the frame comes out 230 wide, 310 high
        Image.fromarray(base).save(path, exif=exif, quality=95)
    else:
        Image.fromarray(base).convert(mode).save(path)
    frame = dataset.open_frame(path)
    whole = dataset.open_image(path, 1000)  # no draft reduction at this size
    assert frame.size == whole.size == ((230, 310) if mode == "rotated" else (310, 230))
    assert frame.mode == ("RGB" if mode in ("RGB", "P") else "L")
    assert np.array_equal(np.asarray(frame.convert("RGB")), np.asarray(whole))
    assert dataset.oriented_size(path) == frame.size


def test_a_long_strip_is_tiled_in_bounded_memory(tmp_path):
    """A 20000 x 2000 strip: 1729 tiles of 200 px, 207 MB of model input if they were all kept. Traced Python
    and numpy memory (the frame itself is Pillow's, 40 MB grey, held while its tiles are cut) stays at a few
    MB: the units are produced lazily, the aggregator keeps one number per tile and a display-sized map."""
    strip = np.random.default_rng(8).integers(90, 170, (2000, 20000), dtype=np.uint8)
    strip[1200:1203, 15000:19000] = 250
    Image.fromarray(strip).save(tmp_path / "strip.bmp")
    del strip
    plan = pipeline.Plan(200)
    heat = np.zeros((200, 200), np.float32)
    aggregator, results, count = pipeline.Aggregator(threshold=0.5), [], 0
    tracemalloc.start()
    try:
        for unit in pipeline.decode_units(tmp_path / "strip.bmp", "strip.bmp", plan):
            count += 1
            p = 0.9 if unit.pixels[..., 0].max() > 240 else 0.1
            if (result := aggregator.add(unit, p, heat)) is not None:
                results.append(result)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 1729 and len(results) == 1
    result = results[0]
    assert result.tiles == 1729 and result.probability == 0.9 and result.detections
    assert all(14800 < x < 19000 and 1000 < y < 1203 for x, y, *_ in result.detections)
    assert result.overlay.display.shape == (200, 2000, 3) and result.overlay.stacked  # 1/10 scale, one above the other
    assert result.overlay.heat_scale == pytest.approx(0.1)  # the heat is smoothed in the strip's own pixels
    assert peak < 20e6 < count * 200 * 200 * 3 / 10, peak


@pytest.mark.parametrize("height, width", [(1000, 1000), (1024, 4096), (2000, 20000), (20000, 2000), (201, 201),
                                           (150, 4000), (3000, 2048)])
def test_overlay_of_any_frame_fits_the_side(height, width):
    for side in (2048, 512):
        scale, stacked = pipeline.display_layout(width, height, 200, side)
        shown = (pipeline.scaled(height, scale), pipeline.scaled(width, scale))
        overlay = render_overlay(np.zeros((*shown, 3), np.uint8), np.zeros(shown, np.float32), "defect", 0.97,
                                 boxes=[(0, 0, 10, 10)], stacked=stacked, note="3 of 45 tiles flagged")
        assert max(overlay.shape[:2]) <= side, (height, width, side, overlay.shape)
        assert scale == 1.0 or max(overlay.shape[:2]) >= side - 60  # no smaller than needed


def test_boxes_are_drawn_on_the_original_only():
    image = np.full((100, 120, 3), 128, np.uint8)
    heat = np.zeros((100, 120), np.float32)
    plain = render_overlay(image, heat, "defect", 0.9)
    boxed = render_overlay(image, heat, "defect", 0.9, boxes=[(20, 30, 40, 50)])
    changed = np.argwhere((plain != boxed).any(-1))
    assert len(changed) and changed[:, 1].max() < 120  # left panel only
    assert (boxed[changed[:, 0], changed[:, 1]] == (255, 0, 255)).all(-1).any()  # magenta


def test_pending_overlay_bytes_are_bounded():
    import threading
    import time

    from scratch_detector.engines.local import Budget

    budget, taken = Budget(100), []
    budget.take(60)
    worker = threading.Thread(target=lambda: (budget.take(60), taken.append(True)))
    worker.start()
    time.sleep(0.2)
    assert not taken  # 120 would be over the limit: waits for the writer
    budget.give(60)
    worker.join(5)
    assert taken and budget.out == 60
    budget.give(60)
    budget.take(500)  # larger than the limit: passes when nothing else is out
    assert budget.out == 500


def test_a_thin_hot_line_keeps_its_heat_on_a_shrunk_overlay():
    tile_map = np.zeros((200, 200), np.float32)
    tile_map[:, 101:103] = 1.0  # a 2 px line
    shrunk = pipeline.footprint_map(tile_map, 1500, 300, 200, 0.1)
    assert shrunk.shape == (20, 20)
    assert shrunk.max() == 1.0 and shrunk.max(0).nonzero()[0].tolist() == [10]  # averaged it would be 0.2
    assert pipeline.footprint_map(tile_map, 0, 0, 200, 0.6) is tile_map  # under 2x: left to the stitcher


def test_heat_weight_is_p_recentred_on_the_threshold():
    assert pipeline.heat_weight(0.3, 0.3) == pytest.approx(0.5)
    assert pipeline.heat_weight(0.8, 0.5) == pytest.approx(0.8)
    assert pipeline.heat_weight(0.001, 0.03) < 0.05 and pipeline.heat_weight(0.5, 0.03) > 0.95
    assert pipeline.heat_weight(0.0, 0.0) == 1.0 and pipeline.heat_weight(1.0, 1.0) == 1.0


# ---------------------------------------------------------------------------------------------------------
# Bad input stays bad input
# ---------------------------------------------------------------------------------------------------------
def png_claiming(path: Path, width: int, height: int) -> None:
    """A valid little PNG whose header claims width x height pixels."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def test_bad_large_files_get_their_rows(line_model, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    png_claiming(images / "over_limit_100mp.png", 10000, 10000)  # over Pillow's 89.5 MP: refused, not tiled
    png_claiming(images / "bomb.png", 30000, 30000)
    frame = scratch_frame(seed=9)
    Image.fromarray(frame).save(images / "good.jpg", quality=90)
    jpeg = (images / "good.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    middle = bytearray(jpeg)
    middle[len(jpeg) // 2:len(jpeg) // 2 + 400] = os.urandom(400)  # garbage in the middle of the scan
    (images / "corrupt_middle.jpg").write_bytes(bytes(middle))
    rows = infer(line_model, images, tmp_path / "out")
    assert sorted(rows) == ["bomb.png", "corrupt_middle.jpg", "good.jpg", "over_limit_100mp.png", "truncated.jpg"]
    limit = rows["over_limit_100mp.png"]["status"]
    assert limit.startswith("error: DecompressionBombError") and "10000x10000" in limit and "89478485" in limit
    assert "ecompression" in rows["bomb.png"]["status"]
    assert rows["truncated.jpg"]["status"].startswith("error:") and "truncated" in rows["truncated.jpg"]["status"]
    for name in ("over_limit_100mp.png", "bomb.png", "truncated.jpg"):
        assert rows[name]["tiles"] == rows[name]["max_tile"] == rows[name]["prediction"] == ""
    corrupt = rows["corrupt_middle.jpg"]
    assert corrupt["status"] == "ok" or corrupt["status"].startswith("error:")
    good = rows["good.jpg"]
    assert good["status"] == "ok" and good["prediction"] == "defect" and touches_line(*box(good))
