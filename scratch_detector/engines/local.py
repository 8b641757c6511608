"""The local engine: a reader thread decodes files into units (pipeline.decode_units), the model works on
two batches at once (ModelStreams, each on its own copy of the model), and a writer thread draws and writes
each finished image's overlay and records it in the run's journal. Every queue is bounded (units, and bytes
of pending overlays), so memory does not grow with the number of images or tiles. engines/ray_pool.py is the
other engine: the same pipeline.py work, on a Ray Data actor pool, with the same run(todo, settings, journal,
header) signature.
"""
from __future__ import annotations

import copy
import queue
import sys
import threading
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..memory import default_streams
from ..pipeline import Aggregator, BatchPredictor, Decoded, decode_units, error_item, finish_item
from ..runtime import interrupts_deferred
from ..settings import Plan, RunSettings
from ..storage import Listing, RunJournal

OVERLAY_BYTES_PENDING = 64 * 2**20  # overlays drawn by the writer later: at most this much of images + heatmaps


def read_ahead(todo: Iterable[tuple[str, str]], root: Path, plan: Plan, out: queue.Queue, stop: threading.Event,
               names: dict):
    """Reader thread: each file's units (a whole image, or its tiles) in order into a bounded queue; None
    marks the end. The queue holds units, not frames: a large frame is decoded once and cut as the model
    takes its tiles, so at most one frame's pixels are held here. names[relpath] = its overlay name, for the
    images in flight only (the writer pops them)."""
    for relpath, overlay_name in todo:
        names[relpath] = overlay_name
        for unit in decode_units(root / relpath, relpath, plan):
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


def write_results(jobs: queue.Queue, settings: RunSettings, journal: RunJournal, budget: Budget, done,
                  failed: list):
    """Writer thread: for each finished image, render, encode and write its overlay (temp file + rename) and
    heatmap, then record it in the journal (pipeline.finish_item: the order the journal requires); an
    unreadable file's Item is recorded as it is. None ends it. If the journal cannot be written, the error is
    kept in `failed` for the main thread to raise, and the rest is drained unrecorded."""
    while (job := jobs.get()) is not None:
        item, result, overlay_name = job
        try:
            if failed:
                continue
            if item is None:
                item = finish_item(result, settings.output, overlay_name, settings.threshold,
                                   settings.overlay_format, settings.save_heatmaps)
            journal.record(item.relpath, files=item.files, predictions=item.predictions, detections=item.detections)
            done(item)
        except BaseException as error:  # noqa: BLE001 -- handed to the main thread
            failed.append(error)
        finally:
            if result is not None and result.overlay is not None:
                budget.give(result.overlay.nbytes)


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
    net's layers are too small to keep two threads busy (`python bench/profile_parts.py`, CAM pass by
    streams x threads). Each copy has its own CAM hooks, so no two batches share state. A GPU, or a
    single-thread budget (OMP_NUM_THREADS=1), gets one stream. The torch thread count is restored by close().
    """

    def __init__(self, model, normalization: str, cam_method: str | None, cam_layer: str, requested: int,
                 device: torch.device, familiarity_stats: dict | None = None):
        self.threads_before = torch.get_num_threads()
        self.count = requested or default_streams(device.type, self.threads_before)
        self.threads_each = max(1, self.threads_before // self.count)
        self.idle: queue.SimpleQueue = queue.SimpleQueue()
        for copy_ in [model] + [copy.deepcopy(model) for _ in range(self.count - 1)]:
            self.idle.put(BatchPredictor(copy_, normalization, cam_method, cam_layer, device, familiarity_stats))
        torch.set_num_threads(self.threads_each)
        self.pool = ThreadPoolExecutor(self.count, thread_name_prefix="model")

    def describe(self) -> str:
        return f"{self.count} model stream{'s' if self.count > 1 else ''} x {self.threads_each} thread(s)"

    def predict(self, batch: list) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """-> BatchPredictor's (p(defect), heatmaps or None, unfamiliarity or None), on whichever copy is idle."""
        predictor = self.idle.get()
        try:
            return predictor(batch)
        finally:
            self.idle.put(predictor)

    def run_batches(self, batches: Iterator[list], record) -> None:
        """record(batch, probabilities, heatmaps, scores) for every batch, in input order, in the calling thread.
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
        """Let running batches finish, drop queued ones, restore torch's thread count."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self.threads_before)


def run(todo: Listing, settings: RunSettings, journal: RunJournal, header: str) -> int:
    """The local engine: `todo` through reader thread -> model streams -> writer thread, each image recorded
    in the journal once written. Prints `header` with how it runs. Returns the model inputs (tiles + whole
    images) it ran."""
    device = torch.device(settings.device)
    streams = ModelStreams(settings.network, settings.normalization, settings.cam, settings.cam_layer,
                           settings.streams, device, settings.familiarity_stats)
    print(f"{header}; device {device}, {streams.describe()}, batch {settings.batch_size}", flush=True)
    stop = threading.Event()
    decoded: queue.Queue = queue.Queue(maxsize=2 * settings.batch_size)
    jobs: queue.Queue = queue.Queue(maxsize=2 * settings.batch_size)
    pending = Budget(OVERLAY_BYTES_PENDING)
    names: dict[str, str] = {}  # images in flight only: filled by the reader, emptied as their results come
    failed: list[BaseException] = []
    bar = tqdm(total=len(todo), unit="img", desc="infer", file=sys.stdout)
    reader = threading.Thread(target=read_ahead, daemon=True,
                              args=(todo, settings.input, settings.plan, decoded, stop, names))
    writer = threading.Thread(target=write_results, daemon=True,
                              args=(jobs, settings, journal, pending, lambda item: bar.update(1), failed))
    reader.start()
    writer.start()
    aggregator = Aggregator(settings.threshold, settings.unfamiliar_cutoff)
    units = Counter()  # model inputs: tiles, and whole images

    def check():
        if failed:
            raise failed[0]

    def skip_unreadable(item: Decoded):
        names.pop(item.relpath, None)
        jobs.put((error_item(item), None, ""))

    def record(batch: list, probabilities: np.ndarray, heatmaps: np.ndarray | None, scores: np.ndarray | None):
        check()
        for result in aggregator.add_batch(batch, probabilities, heatmaps, scores):
            if result.overlay is not None:
                pending.take(result.overlay.nbytes)
            jobs.put((None, result, names.pop(result.relpath)))
        units["units"] += len(batch)

    try:
        streams.run_batches(batches_of(decoded, settings.batch_size, skip_unreadable), record)
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
    check()
    return units["units"]
