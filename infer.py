"""Classify every image in a folder as defect (scratch) / non-defect and draw a Grad-CAM overlay for each.

    python infer.py                                  # test_images/ -> outputs/predictions.csv + outputs/gradcam/
    python infer.py --input /line3/today --output /line3/report --no-cam

An image larger than a tile (200 px, the scale the model was trained at) on either side is cut into
overlapping tiles at that scale instead of being shrunk whole (--tile off shrinks it, as before): its
p(defect) is its hottest tile's, every tile at or over the threshold is a row of detections.csv and a box on
its overlay, and the tiles' heatmaps are blended into one. pipeline.py holds that per-image work.

Decoding runs in a reader thread and overlay drawing and writing in a writer thread, while the model works on
two batches at once (ModelStreams); every queue is bounded (units, and bytes of pending overlays), so memory
does not grow with the number of images or tiles.
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import queue
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import dataset
from gradcam import METHODS, OVERLAY_FORMATS, encode_overlay, resolve_layer
from model import fold_batchnorm, load_checkpoint, pick_device
# Decoded, decode and DISPLAY_MAX_SIDE are also infer.py's: bench/ and evaluate.py import them from here
from pipeline import (DISPLAY_MAX_SIDE, FRAME_OVERLAY_SIDE, Aggregator, BatchPredictor, Decoded, Plan,  # noqa: F401
                      Result, decode, decode_units)
from review import model_summary, write_review_page
from runtime import UserError, atomic_write, ensure_writable_dir, interrupts_deferred, run_main, write_csv

# The default explanation, chosen on the validation split by evaluate.py's localization table (README).
DEFAULT_CAM = "layercam"
DEFAULT_CAM_LAYER = "features.1"
CSV_COLUMNS = ["image", "prediction", "label", "defect_probability", "gradcam", "status", "tiles", "max_tile"]
DETECTION_COLUMNS = ["image", "x", "y", "width", "height", "defect_probability"]
OVERLAY_BYTES_PENDING = 64 * 2**20  # overlays drawn by the writer later: at most this much of images + heatmaps
OVERLAY_DIR = "gradcam"
HEATMAP_DIR = "heatmaps"
OVERLAY_SUFFIXES = tuple(f"_gradcam.{file_format}" for file_format in OVERLAY_FORMATS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default="test_images", help="folder of images, searched recursively (default: %(default)s)")
    p.add_argument("--output", default="outputs", help="folder for predictions.csv and gradcam/ (default: %(default)s)")
    p.add_argument("--model", default="model_binary.pth", help="checkpoint (default: %(default)s)")
    p.add_argument("--threshold", type=float, help="defect if p(defect) >= this (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch and model stream (default: %(default)s)")
    p.add_argument("--cam", choices=sorted(METHODS), default=DEFAULT_CAM, help="CAM method (default: %(default)s)")
    p.add_argument("--cam-layer", default=DEFAULT_CAM_LAYER, help="layer to explain (default: %(default)s)")
    p.add_argument("--no-cam", action="store_true", help="predictions only, no overlays (faster)")
    p.add_argument("--overlay-format", choices=sorted(OVERLAY_FORMATS), default="jpg",
                   help="overlay files: jpg (quality 95, small and fast) or png (lossless) (default: %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--streams", type=int, default=0,
                   help="batches worked on side by side, each on its own model copy (default: 2 on a CPU with "
                        "2+ threads, else 1)")
    p.add_argument("--tile", choices=["auto", "off"], default="auto",
                   help="auto: an image larger than --tile-size on either side is cut into overlapping tiles at "
                        "native scale, each classified and explained; off: every image is shrunk whole to the "
                        "model input (default: %(default)s)")
    p.add_argument("--tile-size", type=int, default=dataset.NATIVE_SIZE,
                   help="tile side in image pixels: the scale the model was trained at, NEU's 200 x 200 images "
                        "(each tile is resized to the checkpoint's image size) (default: %(default)s)")
    p.add_argument("--tile-stride", type=int,
                   help="largest step between tiles in image pixels (default: 3/4 of --tile-size, a quarter "
                        "overlap: every point lies 1/8 of a tile inside some tile)")
    p.add_argument("--overlay-max-side", type=int, default=FRAME_OVERLAY_SIDE,
                   help="a tiled image's overlay fits in this many pixels each way (default: %(default)s)")
    p.add_argument("--save-heatmaps", action="store_true",
                   help=f"also write each image's heatmap as float16 .npy ({HEATMAP_DIR}/, at the overlay's scale)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.streams < 0:
        p.error("--batch-size must be >= 1 and --streams >= 0")
    if args.tile_size < 1 or not 1 <= (args.tile_stride or 1) <= args.tile_size:
        p.error("need --tile-size >= 1 and 1 <= --tile-stride <= --tile-size (else pixels fall between tiles)")
    if args.overlay_max_side < 256:
        p.error("--overlay-max-side must be >= 256")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        p.error("--threshold must be between 0 and 1")
    return args


def find_images(folder: Path, skip: Path | None = None) -> list[Path]:
    """Image files under `folder` (any depth, extension in any case), sorted by relative path. `skip` (our
    own overlay folder, when --output lies inside --input) is left out, or each run would explain the last's."""
    skip = skip.resolve() if skip is not None else None
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and (Path(root) / d).resolve() != skip]
        found.extend(Path(root) / name for name in files
                     if dataset.is_image_file(name) and not name.startswith(".")  # macOS ._name.jpg forks
                     and os.path.isfile(os.path.join(root, name)))  # a FIFO named x.jpg would block the reader
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def printable(text: str) -> str:
    """A file name that is not valid UTF-8 (surrogate-escaped by Python) as text: \\udce4 instead of a crash."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def overlay_names(relpaths: list[str], file_format: str = "jpg") -> dict[str, str]:
    """<relpath without extension>_gradcam.jpg; where two inputs share that (a.jpg, a.png), both keep their
    extension in the name (a_jpg_gradcam.jpg, a_png_gradcam.jpg). Any name still taken (a_jpg.png exists
    too, or it differs only in case, which macOS/Windows disks do not tell apart) gets _2, _3 ..., so no
    overlay ever overwrites another."""
    stems = Counter(r.rsplit(".", 1)[0] for r in relpaths)
    names, taken = {}, set()
    for r in sorted(relpaths):
        stem, ext = r.rsplit(".", 1)
        base = printable(stem if stems[stem] == 1 else f"{stem}_{ext}")
        name, n = f"{OVERLAY_DIR}/{base}_gradcam.{file_format}", 1
        while name.lower() in taken:
            n += 1
            name = f"{OVERLAY_DIR}/{base}_{n}_gradcam.{file_format}"
        taken.add(name.lower())
        names[r] = name
    return names


def read_ahead(paths, root: Path, plan: Plan, out: queue.Queue, stop: threading.Event):
    """Reader thread: each file's units (a whole image, or its tiles) in order into a bounded queue; None
    marks the end. The queue holds units, not frames: a large frame is decoded once and cut as the model
    takes its tiles, so at most one frame's pixels are held here."""
    for path in paths:
        for unit in decode_units(path, path.relative_to(root).as_posix(), plan):
            if stop.is_set():
                break
            out.put(unit)
        if stop.is_set():
            break
    out.put(None)


class Budget:
    """Bytes handed to another thread: take() waits while more than `limit` are out, except that one item
    always passes when none is out (an item over the limit waits for an empty queue, not forever)."""

    def __init__(self, limit: int):
        self.limit, self.out = limit, 0
        self.changed = threading.Condition()

    def take(self, amount: int) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.out == 0 or self.out + amount <= self.limit)
            self.out += amount

    def give(self, amount: int) -> None:
        with self.changed:
            self.out -= amount
            self.changed.notify_all()


def write_overlays(jobs: queue.Queue, output: Path, file_format: str, failures: dict, budget: Budget):
    """Writer thread: render, encode and write each overlay (temp file + rename), and its heatmap when asked
    (a name); None ends it."""
    while (job := jobs.get()) is not None:
        relpath, overlay_name, heatmap_name, overlay, prediction, probability = job
        try:
            data = encode_overlay(overlay.render(prediction, probability), file_format)
            with atomic_write(output / overlay_name, "wb", fsync=False) as handle:
                handle.write(data)
            if heatmap_name:
                with atomic_write(output / heatmap_name, "wb", fsync=False) as handle:
                    np.save(handle, overlay.heatmap.astype(np.float16))
        except Exception as error:  # a full disk or odd path fails this overlay, not the run
            failures[relpath] = f"overlay not written: {type(error).__name__}: {error}"
        finally:
            budget.give(overlay.nbytes)


def batches_of(decoded: queue.Queue, size: int, on_error) -> Iterator[list]:
    """The reader's units grouped into batches of `size` (tiles of several images and whole images may share
    one); unreadable images go to on_error."""
    batch = []
    while (item := decoded.get()) is not None:
        if item.error:
            on_error(item)
            continue
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class ModelStreams:
    """Runs batches on `count` copies of the model side by side, each copy in its own thread.

    On a small CPU two batches at once, one torch thread each, beat one batch at a time on both cores: this
    net's layers at 112 px are too small to keep two threads busy (`python bench/profile_parts.py`, CAM pass
    by streams x threads). Each copy has its own CAM hooks, so no two batches share state. A GPU, or a
    single-thread budget (OMP_NUM_THREADS=1), gets one stream. The torch thread count is restored by close().
    """

    def __init__(self, model, normalization: str, cam_method: str | None, cam_layer: str, requested: int,
                 device: torch.device):
        self.threads_before = torch.get_num_threads()
        self.count = requested or (2 if device.type == "cpu" and self.threads_before >= 2 else 1)
        self.threads_each = max(1, self.threads_before // self.count)
        self.idle: queue.SimpleQueue = queue.SimpleQueue()
        for copy_ in [model] + [copy.deepcopy(model) for _ in range(self.count - 1)]:
            self.idle.put(BatchPredictor(copy_, normalization, cam_method, cam_layer, device))
        torch.set_num_threads(self.threads_each)
        self.pool = ThreadPoolExecutor(self.count, thread_name_prefix="model")

    def describe(self) -> str:
        return f"{self.count} model stream{'s' if self.count > 1 else ''} x {self.threads_each} thread(s)"

    def predict(self, batch: list) -> tuple[np.ndarray, np.ndarray | None]:
        """-> (p(defect) per unit, heatmaps for class defect or None), on whichever model copy is idle."""
        predictor = self.idle.get()
        try:
            return predictor(batch)
        finally:
            self.idle.put(predictor)

    def run(self, batches: Iterator[list], record) -> None:
        """record(batch, probabilities, heatmaps) for every batch, in input order, in the calling thread.
        Every copy busy plus one batch waiting, no more: memory stays flat however many images come."""
        pending: deque = deque()

        def record_oldest():
            done, future = pending.popleft()
            record(done, *future.result())
        for batch in batches:
            pending.append((batch, self.pool.submit(self.predict, batch)))
            while len(pending) > self.count:
                record_oldest()
        while pending:
            record_oldest()

    def close(self) -> None:
        """Let running batches finish (seconds at most), drop queued ones, restore torch's thread count."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self.threads_before)


def previous_overlays(csv_path: Path) -> set[str]:
    """Overlay paths listed by an earlier run's predictions.csv (the only files we may clean up)."""
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            return {row["gradcam"] for row in csv.DictReader(handle) if row.get("gradcam")}
    except (OSError, KeyError, csv.Error, UnicodeDecodeError):
        return set()


def remove_stale_overlays(output: Path, old: set[str], new: set[str]) -> int:
    """Delete overlays the previous CSV lists and this run did not rewrite. Only names we could have made
    (gradcam/..._gradcam.jpg or .png, no '..', not a link): a hand-edited CSV must not delete the user's files."""
    removed = 0
    for name in old - new:
        parts = Path(name).parts
        target = output / name
        if (len(parts) > 1 and parts[0] == OVERLAY_DIR and ".." not in parts and name.endswith(OVERLAY_SUFFIXES)
                and not target.is_symlink() and target.is_file()):
            target.unlink()
            removed += 1
    return removed


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    # the quick checks first: a wrong folder should not cost a model load
    root = Path(args.input)
    fill = "`python train.py` fills test_images/ with its held-out NEU test images; or pass --input FOLDER"
    if not root.is_dir():
        raise UserError(f"input folder not found: {root}. {fill}")
    paths = find_images(root, skip=Path(args.output) / OVERLAY_DIR)
    if not paths:
        raise UserError(f"no images (.jpg .jpeg .png .bmp .tif .tiff) in {root}. {fill}")
    output = ensure_writable_dir(args.output, "the output folder")
    device = pick_device(args.device)
    model, meta = load_checkpoint(args.model, device)
    fold_batchnorm(model)
    threshold = meta["threshold"] if args.threshold is None else args.threshold
    image_size = int(meta["image_size"])
    cam_method = None if args.no_cam else args.cam
    if cam_method is not None:
        try:
            resolve_layer(model, args.cam_layer)
        except ValueError as error:
            raise UserError(str(error)) from None

    relpaths = [p.relative_to(root).as_posix() for p in paths]
    names = overlay_names(relpaths, args.overlay_format)
    csv_path = output / "predictions.csv"
    old_overlays = previous_overlays(csv_path)
    plan = Plan(image_size, None if args.tile == "off" else args.tile_size, args.tile_stride,
                with_display=cam_method is not None, overlay_side=args.overlay_max_side)
    streams = ModelStreams(model, meta["normalization"], cam_method, args.cam_layer, args.streams, device)
    stride = args.tile_stride or plan.tile - plan.tile // 4 if plan.tile else 0
    tiling = "tiling off" if plan.tile is None else f"images over {plan.tile} px tiled, stride {stride}"
    print(f"{len(paths)} images in {root}; model {args.model} (image size {image_size}, threshold {threshold:.4f}); "
          f"{'no CAM' if cam_method is None else f'{args.cam} on {args.cam_layer}'}; {tiling}; device {device}, "
          f"{streams.describe()}")

    stop = threading.Event()
    decoded: queue.Queue = queue.Queue(maxsize=2 * args.batch_size)
    jobs: queue.Queue = queue.Queue(maxsize=2 * args.batch_size)
    pending = Budget(OVERLAY_BYTES_PENDING)
    overlay_failures: dict[str, str] = {}
    reader = threading.Thread(target=read_ahead, daemon=True, args=(paths, root, plan, decoded, stop))
    writer = threading.Thread(target=write_overlays, daemon=True,
                              args=(jobs, output, args.overlay_format, overlay_failures, pending))
    reader.start()
    writer.start()
    results: dict[str, tuple] = {}
    detections: dict[str, list] = {}
    aggregator = Aggregator(threshold)
    units = Counter()  # model inputs: tiles, and whole images
    bar = tqdm(total=len(paths), unit="img", desc="infer", file=sys.stdout)

    def skip_unreadable(item: Decoded):
        results[item.relpath] = ("", "", "", "", f"error: {item.error}", "", "")
        bar.update(1)

    def finish(result: Result):
        label = int(result.probability >= threshold)
        prediction = dataset.BINARY_CLASSES[label]
        overlay = ""
        if result.overlay is not None:
            overlay = names[result.relpath]
            heatmap = HEATMAP_DIR + overlay[len(OVERLAY_DIR):].rsplit("_gradcam.", 1)[0] + "_heatmap.npy"
            pending.take(result.overlay.nbytes)
            jobs.put((result.relpath, overlay, heatmap if args.save_heatmaps else "", result.overlay, prediction,
                      result.probability))
        box = "" if result.max_tile is None else ",".join(map(str, result.max_tile))
        results[result.relpath] = (prediction, label, f"{result.probability:.4f}", overlay, "ok", result.tiles, box)
        detections[result.relpath] = result.detections
        bar.update(1)

    def record(batch: list, probabilities: np.ndarray, heatmaps: np.ndarray | None):
        for i, unit in enumerate(batch):
            result = aggregator.add(unit, float(probabilities[i]), None if heatmaps is None else heatmaps[i])
            if result is not None:
                finish(result)
        units["units"] += len(batch)

    try:
        streams.run(batches_of(decoded, args.batch_size, skip_unreadable), record)
    finally:
        with interrupts_deferred():  # a second Ctrl-C must not cut this short
            streams.close()
            stop.set()
            while reader.is_alive():  # unblock a reader waiting on a full queue
                try:
                    decoded.get_nowait()
                except queue.Empty:
                    reader.join(0.05)
            jobs.put(None)
            writer.join()  # the writer finishes its current file, so no temp file is left behind
            bar.close()

    rows, detection_rows = [], []
    for relpath in relpaths:
        prediction, label, probability, overlay, status, tiles, box = results.get(
            relpath, ("", "", "", "", "error: not processed", "", ""))
        if relpath in overlay_failures:
            overlay, status = "", f"error: {overlay_failures[relpath]}"
        rows.append([relpath, prediction, label, probability, overlay, status, tiles, box])
        detection_rows.extend([relpath, x, y, w, h, f"{p:.4f}"] for x, y, w, h, p in detections.get(relpath, ()))
    write_csv(csv_path, CSV_COLUMNS, rows)
    write_csv(output / "detections.csv", DETECTION_COLUMNS, detection_rows)
    page = write_review_page(output / "index.html", [dict(zip(CSV_COLUMNS, r)) for r in rows],
                             model_summary(args.model, meta, threshold, input=root,
                                           explanation=f"{args.cam} on {args.cam_layer}" if cam_method else "none"))
    removed = remove_stale_overlays(output, old_overlays, {r[4] for r in rows if r[4]})

    seconds = time.time() - started
    defects = sum(r[2] == 1 for r in rows)
    errors = sum(r[5] != "ok" for r in rows)
    tiled = sum(isinstance(r[6], int) and r[6] > 1 for r in rows)
    print(f"{len(rows)} images: {defects} defect, {len(rows) - defects - errors} non-defect, {errors} errors; "
          f"{seconds:.1f}s, {len(rows) / seconds:.1f} images/s -> {csv_path}"
          + (f", overlays in {output / OVERLAY_DIR}/" if cam_method is not None else "")
          + (f" ({removed} stale overlays of the previous run removed)" if removed else ""))
    if tiled:
        print(f"{tiled} large images tiled: {units['units']} model inputs (tiles + whole images), "
              f"{units['units'] / seconds:.1f} inputs/s; {len(detection_rows)} detections -> "
              f"{output / 'detections.csv'}")
    print(f"review page: {page} (open it in a browser)")
    return 0


if __name__ == "__main__":
    run_main(main, skip_teardown=True)
