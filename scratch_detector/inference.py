"""One inference run over a folder: list the images, find those still to do in the journal, hand them to an
engine, assemble predictions.csv, detections.csv and the review page from the journal, clean up.

    listing = list_images(root, output, file_format)    # every image and its overlay name, sorted, on disk
    with RunJournal.open(output, settings.run_key()) as journal:
        todo = pending_work(listing, journal, settings)  # what an earlier run left undone
        engine.run(todo, settings, journal, header)      # engines/local.py or engines/ray_pool.py
        assemble(listing, journal, settings, summary)    # the CSVs and the page, streamed from the journal
        journal.finish()

infer.py parses the command line and calls run_inference.
"""
from __future__ import annotations

import csv
import importlib.util
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import torch

import dataset
from gradcam import resolve_layer

from .engines import local
from .model import fold_batchnorm, load_checkpoint, pick_device
from .review import PageWriter, model_summary
from .runtime import UserError, ensure_writable_dir
from .memory import GPU_BATCH_SIZE, MemoryFit, fit_memory
from .settings import (CSV_COLUMNS, DETECTION_COLUMNS, HEATMAP_DIR, OVERLAY_DIR, OVERLAY_SUFFIXES,
                       UNFAMILIAR_RUN_SHARE, RunSettings, heatmap_name, overlay_names)
from .storage import JOURNAL_DIR, SEGMENT_GLOB, Listing, RunJournal, SortedRecords, file_sha256, sorted_listing


def list_images(folder: Path, output: Path, file_format: str = "jpg") -> Listing:
    """The images under `folder` (dataset.walk_images; our own overlay folder left out, when --output lies
    inside --input) with their overlay names, sorted by relative path, on disk (temp files in `output`, which
    must have room for the overlays anyway): memory does not grow with the number of images."""
    return sorted_listing(dataset.walk_images(folder, skip=output / OVERLAY_DIR), output,
                          lambda relpaths: overlay_names(relpaths, file_format))


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
    old, new: sets, or sorted iterables (assemble() streams them from disk)."""
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


def pending_work(listing: Listing, journal: RunJournal, settings: RunSettings) -> Listing:
    """The (relpath, overlay name) records without a valid result in the journal, on disk."""
    if settings.cam is None:
        return listing.subset(journal.pending(listing.keys()))
    name_of = listing.cursor()

    def expected(relpath: str) -> list[str]:
        name = name_of(relpath)
        return [name, heatmap_name(name)] if settings.save_heatmaps else [name]
    return listing.subset(journal.pending(listing.keys(), expected))


def assemble(listing: Listing, journal: RunJournal, settings: RunSettings, summary: dict
             ) -> tuple[Counter, Path, int]:
    """predictions.csv, detections.csv (journal.assemble: atomic, streamed), the review page (streamed), then
    the overlays of the previous run that this one did not write are removed. -> (counts, page, removed)."""
    output = settings.output
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
            counts["unfamiliar"] += row[8] == "no"
            counts["judged"] += row[8] in ("yes", "no")
        counts["detections"] += len(tables.get("detections", ()))

    try:
        journal.assemble(listing.keys(), on_item, predictions=(csv_path, CSV_COLUMNS),
                         detections=(output / "detections.csv", DETECTION_COLUMNS))
    except RuntimeError as error:  # an image without a result: the engine stopped short
        raise UserError(f"{error}; run the same command again to finish") from None
    page_path = page.write()
    removed = remove_stale_overlays(output, (name for [name] in old), (name for [name] in new.sort()))
    return counts, page_path, removed


def familiarity_summary(counts: Counter, meta: dict) -> str:
    """The run summary's line on unfamiliar images, with one plain warning when they are a large share."""
    if meta.get("familiarity") is None:
        return ("familiarity: not checked (this model was trained without familiarity statistics; retrain with "
                "python train.py to get them)")
    judged, unfamiliar = counts["judged"], counts["unfamiliar"]
    line = f"{unfamiliar} of {judged} images unfamiliar (unlike the training images; their rows say familiar=no)"
    if judged and unfamiliar > UNFAMILIAR_RUN_SHARE * judged:
        line += (f"\nWARNING: {unfamiliar / judged:.0%} of these images do not look like the training data, so check "
                 "the camera and the steel grade, and consider training on your own images.")
    return line


def memory_fit(args, meta: dict, device) -> MemoryFit:
    """Batch size and stream count for the local engine, fitted to --max-memory (memory.fit_memory); the
    Ray engine's actors are sized by Ray, so only its batch size is filled in."""
    if args.engine == "ray":
        return MemoryFit(args.streams, args.batch_size or GPU_BATCH_SIZE, 0, None, "not fitted for --engine ray")
    return fit_memory(args.max_memory, args.batch_size, args.streams, int(meta["image_size"]),
                      None if args.no_cam else args.cam_layer, device.type, torch.get_num_threads())


def run_inference(args) -> int:
    """The run infer.py's command line asks for (args: its parsed arguments)."""
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
    if not args.no_cam:
        try:
            resolve_layer(model, args.cam_layer)
        except ValueError as error:
            raise UserError(str(error)) from None
    # the Ray engine ships the file's bytes (its digest is the one in the run key); the local engine runs `model`
    network = model if args.engine == "local" else None
    settings = RunSettings.from_args(args, meta, file_sha256(args.model), str(device), network)
    del model, network
    fit = memory_fit(args, meta, device)
    settings = replace(settings, batch_size=fit.batch_size, streams=fit.streams)
    plan = settings.plan

    stride = plan.stride or plan.tile - plan.tile // 4 if plan.tile else 0
    tiling = "tiling off" if plan.tile is None else f"images over {plan.tile} px tiled, stride {stride}"
    unfinished = any((output / JOURNAL_DIR).glob(SEGMENT_GLOB))
    with RunJournal.open(output, settings.run_key(), restart=settings.restart) as journal:
        if unfinished:
            remove_orphan_temp_files(output)
        todo = pending_work(listing, journal, settings)
        skipped = len(listing) - len(todo)
        header = (f"{len(listing)} images in {root}"
                  + (f" ({skipped} done by an earlier run, {len(todo)} to do)" if skipped else "")
                  + f"; model {settings.model} (image size {plan.image_size}, threshold {settings.threshold:.4f}); "
                  f"{settings.describe()}; {tiling}; {fit.describe()}")
        if settings.engine == "ray":
            from .engines import ray_pool  # only here: the local engine never imports Ray
            engine = ray_pool
        else:
            engine = local
        units_now = engine.run(todo, settings, journal, header)
        settings = replace(settings, network=None)  # the model is no longer needed
        summary = model_summary(settings.model, meta, settings.threshold, input=root,
                                explanation="none" if settings.cam is None else settings.describe())
        counts, page, removed = assemble(listing, journal, settings, summary)
        journal.finish()  # complete: the next run starts fresh

    seconds = time.time() - started
    done_now = len(todo)
    csv_path = output / "predictions.csv"
    print(f"{counts['images']} images: {counts['defect']} defect, {counts['non-defect']} non-defect, "
          f"{counts['error']} errors; {seconds:.1f}s, {done_now / seconds:.1f} images/s -> {csv_path}"
          + (f" ({skipped} done by an earlier run)" if skipped else "")
          + (f", overlays in {output / OVERLAY_DIR}/" if settings.cam is not None else "")
          + (f" ({removed} stale overlays of the previous run removed)" if removed else ""))
    print(familiarity_summary(counts, meta))
    if counts["tiled"]:
        print(f"{counts['tiled']} large images tiled: {counts['units']} model inputs (tiles + whole images), "
              f"{units_now / seconds:.1f} inputs/s; {counts['detections']} detections -> "
              f"{output / 'detections.csv'}")
    print(f"review page: {page} (open it in a browser)")
    return 0
