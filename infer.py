"""Classify every image in a folder as defect (scratch) / non-defect and draw a Grad-CAM overlay for each.

    python infer.py                                  # test_images/ -> outputs/predictions.csv + outputs/gradcam/
    python infer.py --input /line3/today --output /line3/report --no-cam

An image larger than a tile (200 px, the scale the model was trained at) on either side is cut into
overlapping tiles at that scale instead of being shrunk whole (--tile off shrinks it, as before): its
p(defect) is its hottest tile's, every tile at or over the threshold is a row of detections.csv and a box on
its overlay, and the tiles' heatmaps are blended into one. pipeline.py holds that per-image work.

The local engine (local_engine.py) decodes in a reader thread and draws and writes overlays in a writer
thread, while the model works on two batches at once; every queue is bounded, so memory does not grow with
the number of images or tiles.

Resumable: each finished image is recorded in OUT/.journal/ (journal.py) once its overlay is in place, fsync'd
in batches. Rerunning the same command after a crash, Ctrl-C, kill -9 or a power cut does only the images
without a valid record; predictions.csv, detections.csv and index.html are assembled from the journal at the
end, atomically, as one uninterrupted run writes them. A different model (its SHA-256), threshold, CAM,
overlay or tiling setting, or input folder starts over, with a message; --restart always does. Nothing held
in memory grows with the number of images: the sorted input listing is on disk (listing.py), results go to
the journal, and the CSVs and the review page are streamed from it.

    python infer.py --engine ray [--ray-address auto|ray://HEAD:10001]

runs the same per-image code (pipeline.py) on a Ray Data actor pool (ray_engine.py; pip install -r
requirements-ray.txt), on this machine or a cluster, with the same journal and the same outputs.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import dataset
import local_engine
from gradcam import METHODS, OVERLAY_FORMATS, resolve_layer
from journal import JOURNAL_DIR, SEGMENT_GLOB, RunJournal, file_sha256
from listing import Listing, SortedRecords, list_inputs, walk_images
from model import fold_batchnorm, load_checkpoint, pick_device
from pipeline import CSV_COLUMNS, DETECTION_COLUMNS, FRAME_OVERLAY_SIDE, HEATMAP_DIR, OVERLAY_DIR, Plan, heatmap_name
from review import PageWriter, model_summary
from runtime import UserError, ensure_writable_dir, run_main

# The default explanation: on the validation split, the cheapest CAM with pointing game >= 0.95 and energy in
# box >= 0.65 (`python bench/cam_choice.py`; bench/README.md).
DEFAULT_CAM = "layercam"
DEFAULT_CAM_LAYER = "features.1"
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
    p.add_argument("--restart", action="store_true",
                   help="discard the unfinished run recorded in --output and start over (default: a rerun of the "
                        "same command finishes it, doing only the images not yet done)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: threads in this process; ray: a Ray Data actor pool, on this machine or a cluster "
                        "(pip install -r requirements-ray.txt) (default: %(default)s)")
    p.add_argument("--ray-address",
                   help="--engine ray: the cluster to join, auto (the one this node belongs to) or ray://HEAD:10001 "
                        "(default: start Ray on this machine for this run)")
    p.add_argument("--ray-actors", type=int, default=0,
                   help="--engine ray: model actors (default: one per CPU of the cluster; see ray_engine.py)")
    p.add_argument("--ray-cpus", type=int, default=0,
                   help="--engine ray without --ray-address: CPUs of the Ray instance started here (default: all)")
    args = p.parse_args(argv)
    if args.engine != "ray" and (args.ray_address or args.ray_actors or args.ray_cpus):
        p.error("--ray-address, --ray-actors and --ray-cpus need --engine ray")
    if args.ray_actors < 0 or args.ray_cpus < 0 or (args.ray_address and args.ray_cpus):
        p.error("--ray-actors and --ray-cpus must be >= 0; --ray-cpus is for a Ray started here, not --ray-address")
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
    return [folder / relpath for relpath in sorted(walk_images(folder, dataset.is_image_file, skip))]


def list_images(folder: Path, output: Path, file_format: str = "jpg") -> Listing:
    """find_images' files with their overlay_names, sorted the same way, on disk (listing.py; temp files
    in `output`, which must have room for the overlays anyway): what main() runs on, in memory that does not
    grow with the number of images."""
    return list_inputs(folder, output / OVERLAY_DIR, output, dataset.is_image_file,
                       lambda relpaths: overlay_names(relpaths, file_format), printable)


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


def previous_overlays(csv_path: Path) -> Iterator[str]:
    """Overlay paths listed by an earlier run's predictions.csv (the only files we may clean up), streamed."""
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if row.get("gradcam"):
                    yield row["gradcam"]
    except (OSError, KeyError, csv.Error, UnicodeDecodeError):
        return


TEMP_NAME = re.compile(r"^\..+\.\d+\.tmp$")  # runtime.atomic_write's: .<name>.<pid>.tmp


def remove_orphan_temp_files(output: Path) -> int:
    """The temp files of overlays and heatmaps that a killed run (kill -9, power cut) was writing: never
    trusted (the journal records only renamed files), removed when the run is resumed. The journal's lock
    means no other run writes here now. os.scandir, not os.walk: no list of a huge folder's names."""
    def walk(folder: Path) -> Iterator[Path]:
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        yield from walk(Path(entry.path))
                    elif TEMP_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
                        yield Path(entry.path)
        except OSError:
            return
    removed = 0
    for folder in (OVERLAY_DIR, HEATMAP_DIR):
        for path in walk(output / folder):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def sorted_difference(old: Iterable[str], new: Iterable[str]) -> Iterator[str]:
    """The names in `old` and not in `new`, both sorted (duplicates allowed), without holding either."""
    new = iter(new)
    current = next(new, None)
    for name in old:
        while current is not None and current < name:
            current = next(new, None)
        if current != name:
            yield name


def remove_stale_overlays(output: Path, old: Iterable[str], new: Iterable[str]) -> int:
    """Delete overlays the previous CSV lists and this run did not rewrite. Only names we could have made
    (gradcam/..._gradcam.jpg or .png, no '..', not a link): a hand-edited CSV must not delete the user's files.
    old, new: sets, or sorted iterables (main() streams them from disk)."""
    removed = 0
    old = sorted(old) if isinstance(old, (set, frozenset)) else old
    new = sorted(new) if isinstance(new, (set, frozenset)) else new
    for name in sorted_difference(old, new):
        parts = Path(name).parts
        target = output / name
        if (len(parts) > 1 and parts[0] == OVERLAY_DIR and ".." not in parts and name.endswith(OVERLAY_SUFFIXES)
                and not target.is_symlink() and target.is_file()):
            target.unlink()
            removed += 1
    return removed


def run_key(args, root: Path, model_digest: str, meta: dict, threshold: float, cam_method: str | None,
            plan: Plan) -> dict:
    """What makes a recorded result valid (journal.py): a change to any of these starts the run over."""
    return {"model": model_digest, "threshold": float(threshold), "image_size": int(meta["image_size"]),
            "normalization": meta["normalization"], "cam": cam_method,
            "cam_layer": args.cam_layer if cam_method else None, "overlay_format": args.overlay_format,
            "overlay_max_side": args.overlay_max_side, "save_heatmaps": bool(args.save_heatmaps and cam_method),
            "tiling": None if plan.tile is None else {"tile": plan.tile, "stride": plan.stride},
            "input": str(root.resolve()), "columns": [CSV_COLUMNS, DETECTION_COLUMNS]}


def pending_work(listing: Listing, journal: RunJournal, with_files: bool, save_heatmaps: bool) -> Listing:
    """The (relpath, overlay name) records without a valid result in the journal, on disk."""
    if not with_files:
        return listing.subset(journal.pending(listing.keys()))
    name_of = listing.cursor()

    def expected(relpath: str) -> list[str]:
        name = name_of(relpath)
        return [name, heatmap_name(name)] if save_heatmaps else [name]
    return listing.subset(journal.pending(listing.keys(), expected))


def assemble(args, listing: Listing, journal: RunJournal, output: Path, summary: dict) -> tuple[Counter, Path, int]:
    """predictions.csv, detections.csv (journal.assemble: atomic, streamed), the review page (streamed), then
    the overlays of the previous run that this one did not write are removed. -> (counts, page, removed)."""
    csv_path = output / "predictions.csv"
    old = SortedRecords(output).extend([name] for name in previous_overlays(csv_path)).sort()
    new = SortedRecords(output)
    page = PageWriter(output / "index.html", summary, scratch=output)
    counts = Counter()

    def on_item(relpath: str, tables: dict):
        for row in tables.get("predictions", ()):
            if row[4]:
                new.add([row[4]])
            page.add(dict(zip(CSV_COLUMNS, row)))
            counts["images"] += 1
            counts["defect"] += row[2] == 1
            counts["non-defect"] += row[2] == 0
            counts["error"] += row[5] != "ok"
            counts["tiled"] += isinstance(row[6], int) and row[6] > 1
            counts["units"] += row[6] if isinstance(row[6], int) else 0
        counts["detections"] += len(tables.get("detections", ()))

    try:
        journal.assemble(listing.keys(), on_item, predictions=(csv_path, CSV_COLUMNS),
                         detections=(output / "detections.csv", DETECTION_COLUMNS))
    except RuntimeError as error:  # an image without a result: the engine stopped short
        raise UserError(f"{error}; run the same command again to finish") from None
    page_path = page.write()
    removed = remove_stale_overlays(output, (name for [name] in old), (name for [name] in new.sort()))
    return counts, page_path, removed


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    if args.engine == "ray" and importlib.util.find_spec("ray") is None:
        raise UserError("--engine ray needs Ray: pip install -r requirements-ray.txt")
    # the quick checks first: a wrong folder should not cost a model load
    root = Path(args.input)
    fill = "`python train.py` fills test_images/ with its held-out NEU test images; or pass --input FOLDER"
    if not root.is_dir():
        raise UserError(f"input folder not found: {root}. {fill}")
    output = ensure_writable_dir(args.output, "the output folder")
    listing = list_images(root, output, args.overlay_format)
    if not len(listing):
        raise UserError(f"no images (.jpg .jpeg .png .bmp .tif .tiff) in {root}. {fill}")
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
    plan = Plan(image_size, None if args.tile == "off" else args.tile_size, args.tile_stride,
                with_display=cam_method is not None, overlay_side=args.overlay_max_side)
    model_bytes = Path(args.model).read_bytes() if args.engine == "ray" else None  # shipped to the actors
    digest = hashlib.sha256(model_bytes).hexdigest() if model_bytes is not None else file_sha256(args.model)
    key = run_key(args, root, digest, meta, threshold, cam_method, plan)

    stride = args.tile_stride or plan.tile - plan.tile // 4 if plan.tile else 0
    tiling = "tiling off" if plan.tile is None else f"images over {plan.tile} px tiled, stride {stride}"
    unfinished = any((output / JOURNAL_DIR).glob(SEGMENT_GLOB))
    with RunJournal.open(output, key, restart=args.restart) as journal:
        if unfinished:
            remove_orphan_temp_files(output)
        todo = pending_work(listing, journal, cam_method is not None, key["save_heatmaps"])
        skipped = len(listing) - len(todo)
        header = (f"{len(listing)} images in {root}"
                  + (f" ({skipped} done by an earlier run, {len(todo)} to do)" if skipped else "")
                  + f"; model {args.model} (image size {image_size}, threshold {threshold:.4f}); "
                  f"{'no CAM' if cam_method is None else f'{args.cam} on {args.cam_layer}'}; {tiling}")
        if args.engine == "ray":
            import ray_engine  # only here: the local engine never imports Ray
            units_now = ray_engine.run(args, todo, root, output, model_bytes, plan, threshold, cam_method,
                                       journal, header)
        else:
            units_now = local_engine.run(args, todo, root, output, model, meta, plan, threshold, cam_method, journal,
                                  device, header)
        del model
        summary = model_summary(args.model, meta, threshold, input=root,
                                explanation=f"{args.cam} on {args.cam_layer}" if cam_method else "none")
        counts, page, removed = assemble(args, listing, journal, output, summary)
        journal.finish()  # complete: the next run starts fresh

    seconds = time.time() - started
    done_now = len(todo)
    csv_path = output / "predictions.csv"
    print(f"{counts['images']} images: {counts['defect']} defect, {counts['non-defect']} non-defect, "
          f"{counts['error']} errors; {seconds:.1f}s, {done_now / seconds:.1f} images/s -> {csv_path}"
          + (f" ({skipped} done by an earlier run)" if skipped else "")
          + (f", overlays in {output / OVERLAY_DIR}/" if cam_method is not None else "")
          + (f" ({removed} stale overlays of the previous run removed)" if removed else ""))
    if counts["tiled"]:
        print(f"{counts['tiled']} large images tiled: {counts['units']} model inputs (tiles + whole images), "
              f"{units_now / seconds:.1f} inputs/s; {counts['detections']} detections -> "
              f"{output / 'detections.csv'}")
    print(f"review page: {page} (open it in a browser)")
    return 0


if __name__ == "__main__":
    run_main(main, skip_teardown=True)
