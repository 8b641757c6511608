"""Tiled inference on large frames built from a checkpoint's held-out NEU test images: are clean frames clean,
are planted scratches found, and do the heatmap and the top detection point at them?

    python bench/frames.py                          # model_binary.pth: the table, the six-frame case, the mosaic
    python bench/frames.py --clean 40 --scratch 40  # more frames
    python bench/frames.py --speed                  # tiles/s against images/s on 200 x 200 images, peak RSS
    python bench/frames.py --speed --many 1000      # ... with a folder of 1000 large frames (long: ~5x the default)

The frames are built from one split of the checkpoint's, the test split unless --split val (to choose a setting
without looking at the test split), and only from it (evaluation.select_samples), in a temp folder deleted
after; infer.py runs on them as a child process with its defaults, plus --save-heatmaps for the pointing
score. --keep DIR copies the overlays and CSVs out (outside the repo, or under its git-ignored outputs/: they
are made from NEU images).

A frame:
  background  one non-scratch test image with its illumination flattened (minus its Gaussian blur of sigma
              25 px, --flatten-sigma, plus its mean), grown to the frame size by image quilting (Efros &
              Freeman 2001: blocks of it joined along minimal-error cuts). The texture runs on without a seam,
              so the benchmark neither rewards nor punishes tile seams. --background mirror mirror-tiles the
              image instead (numpy 'symmetric'): continuous too, but the mirror axes repeat every 200 px as
              symmetric shapes (a dark blob doubled into an elongated one) that no steel surface has.
  scratch     a test scratch image's annotated boxes (+4 px) at a random place, by --plant:
              clone (default) OpenCV's seamlessClone (Poisson blending): the region's own gradients, its levels
                    fitted to the frame around it. Independent of training.
              marks the scratch's high-pass (itself minus its Gaussian blur of sigma 6 px) inside its boxes,
                    feathered, added: perturb.scratch_marks, the very operation train.py's transplant trains
                    on, so this measures memory of the operation rather than generalisation.
              Its boxes, moved there, are the ground truth.
  mosaic      (the sanity check) 5 x 5 different test images side by side, seams on a 200 px grid, one of them
              a scratch image in a scratch frame: the issue's original measurement, seams and all.
  control     every non-scratch image of the split, whole (200 x 200), as it is and flattened as the
              backgrounds are: how many false alarms the flattening makes by itself.
Scores, per set of frames:
  frame accuracy         flagged (a tile at or over the threshold) == has a planted scratch
  false alarms / clean   detection rows per clean frame (and clean frames flagged)
  stray / scratch frame  detections touching no planted scratch, per scratch frame
  scratch recall         planted scratches (one scratch image's boxes) touched by at least one detection
  heat max on scratch    the stitched heatmap's maximum lies in a planted box (scratch frames)
  top det. on scratch    the highest tile (max_tile) touches a planted box (scratch frames)
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from common import ROOT, bench_parser, check, default_data_dir, load_average, machine_lines, markdown_table, run_child

sys.path.insert(0, str(ROOT))
from scratch_detector import perturb  # noqa: E402  (numpy and OpenCV only: this process stays light)

# This process stays light (no torch): a child's peak RSS (ru_maxrss) starts from its parent's at the fork.
# The frames are built by a child of their own (--build-worker), which reads the checkpoint and the split.
NATIVE = 200                                         # dataset.NATIVE_SIZE: infer.py's default tile
SIZES = [(1000, 1000), (1024, 4096), (1500, 2000)]   # (height, width) of the continuous frames, in turn
HIGH_PASS_SIGMA, BOX_MARGIN = 6.0, 4
# The scale at which a background's illumination is flattened before quilting. Coarser scales leave brightness
# differences that the quilt shows as a patchwork of blocks; this one is also a high-pass that changes the
# model's verdicts on some whole NEU images, which the control images measure (bench/README.md, large frames).
FLATTEN_SIGMA = 25.0


# ---------------------------------------------------------------------------------------------------------
# Building frames
# ---------------------------------------------------------------------------------------------------------
def gray(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float32)


def _seam(errors: np.ndarray) -> np.ndarray:
    """The minimal-error path down a (rows, cols) strip of squared differences (Efros & Freeman 2001): per
    row, the first column that takes the new block."""
    cost = errors.copy()
    rows, cols = cost.shape
    for i in range(1, rows):
        prev = cost[i - 1]
        cost[i] += np.minimum(prev, np.minimum(np.r_[np.inf, prev[:-1]], np.r_[prev[1:], np.inf]))
    path = np.empty(rows, int)
    path[-1] = int(np.argmin(cost[-1]))
    for i in range(rows - 2, -1, -1):
        lo = max(0, path[i + 1] - 1)
        path[i] = lo + int(np.argmin(cost[i, lo:min(cols, path[i + 1] + 2)]))
    return path


def quilt(source: np.ndarray, height: int, width: int, rng, block: int = 100, overlap: int = 25,
          tolerance: float = 0.3) -> np.ndarray:
    """Image quilting (Efros & Freeman 2001): blocks of the source laid with overlaps, each chosen at random
    among those matching what is already there within `tolerance` of the best (cv2.matchTemplate on the
    overlap), and joined along the minimal-error cut: a texture of any size without seams or symmetry."""
    step = block - overlap
    rows, cols = max(1, -(-(height - overlap) // step)), max(1, -(-(width - overlap) // step))
    out = np.zeros((rows * step + overlap, cols * step + overlap), np.float32)
    source = np.ascontiguousarray(source, np.float32)
    for r in range(rows):
        for c in range(cols):
            y, x = r * step, c * step
            old = out[y:y + block, x:x + block]
            if r == 0 and c == 0:
                sy, sx = (int(rng.integers(n - block + 1)) for n in source.shape)
            else:
                mask = np.zeros((block, block), np.float32)
                mask[:, :overlap if c else 0] = 1
                mask[:overlap if r else 0, :] = 1
                error = cv2.matchTemplate(source, np.ascontiguousarray(old), cv2.TM_SQDIFF, mask=mask)
                # a sum of squares, but OpenCV's masked sums can round to just below 0; a negative best match
                # would leave no candidate within `tolerance` of it
                error = np.maximum(error, 0)
                good = np.argwhere(error <= error.min() * (1 + tolerance) + 1e-3)
                sy, sx = good[int(rng.integers(len(good)))]
            patch = source[sy:sy + block, sx:sx + block]
            take = np.ones((block, block), bool)
            columns = np.arange(overlap)
            if c:  # left overlap: old pixels left of the cut, new ones right of it
                take[:, :overlap] &= columns[None, :] >= _seam((patch[:, :overlap] - old[:, :overlap]) ** 2)[:, None]
            if r:  # top overlap: the same, transposed
                take[:overlap, :] &= columns[:, None] >= _seam(((patch[:overlap] - old[:overlap]) ** 2).T)[None, :]
            out[y:y + block, x:x + block] = np.where(take, patch, old)
    return out[:height, :width]


def flatten(source: np.ndarray, sigma: float = FLATTEN_SIGMA) -> np.ndarray:
    """The image minus its Gaussian blur of `sigma` px, plus its mean: its shading coarser than about `sigma`
    removed."""
    return source - cv2.GaussianBlur(source, (0, 0), sigma) + source.mean()


def continuous_background(source: np.ndarray, height: int, width: int, method: str, rng,
                          sigma: float = FLATTEN_SIGMA) -> np.ndarray:
    """One image's texture over height x width, illumination flattened first (so blocks or mirrored copies
    meet at the same brightness)."""
    flat = flatten(source, sigma)
    if method == "quilt":
        return quilt(flat, height, width, rng)
    return np.pad(flat, ((0, height - flat.shape[0]), (0, width - flat.shape[1])), mode="symmetric")


def plant_marks(frame: np.ndarray, scratch: np.ndarray, boxes, x: int, y: int) -> list[tuple[int, int, int, int]]:
    """Add the scratch's high-pass inside its boxes at (x, y) (perturb.scratch_marks: the operation train.py's
    transplant augmentation trains on); -> its boxes in frame coordinates."""
    frame[y:y + scratch.shape[0], x:x + scratch.shape[1]] += perturb.scratch_marks(scratch, boxes, HIGH_PASS_SIGMA,
                                                                                 BOX_MARGIN)
    return [(x + x0, y + y0, x + x1, y + y1) for x0, y0, x1, y1 in boxes]


CLONE_PAD = 16  # grey levels of frame around the clone, so that its mask never touches an edge


def plant_clone(frame: np.ndarray, scratch: np.ndarray, boxes, x: int, y: int) -> list[tuple[int, int, int, int]]:
    """Poisson-blend the scratch image's annotated boxes (+BOX_MARGIN) into the frame at (x, y) with OpenCV's
    seamlessClone (Perez et al. 2003: the region's gradients, its levels fitted to the frame around it). An
    operation independent of train.py's transplant; -> the boxes in frame coordinates."""
    height, width = scratch.shape
    mask = np.zeros((height, width), np.uint8)
    for x0, y0, x1, y1 in boxes:
        mask[max(1, y0 - BOX_MARGIN):min(height - 1, y1 + BOX_MARGIN),
             max(1, x0 - BOX_MARGIN):min(width - 1, x1 + BOX_MARGIN)] = 255
    pad = CLONE_PAD
    top, left = max(0, y - pad), max(0, x - pad)
    window = frame[top:y + height + pad, left:x + width + pad]
    destination = np.clip(np.rint(window), 0, 255).astype(np.uint8)
    canvas = np.zeros_like(destination)
    canvas[y - top:y - top + height, x - left:x - left + width] = np.clip(np.rint(scratch), 0, 255)
    full_mask = np.zeros_like(destination)
    full_mask[y - top:y - top + height, x - left:x - left + width] = mask
    # seamlessClone centres the source's masked bounding box at `center` in the destination: give both one frame
    bx, by, bw, bh = cv2.boundingRect(full_mask)
    center = (bx + bw // 2, by + bh // 2)
    # a copy: OpenCV 5.0's seamlessClone overwrites its mask argument, leaving only a thin ring of it; the
    # np.where below then kept the frame's own pixels and the scratch was never planted
    blended = cv2.seamlessClone(cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR), cv2.cvtColor(destination, cv2.COLOR_GRAY2BGR),
                                full_mask.copy(), center, cv2.NORMAL_CLONE)
    window[:] = np.where(full_mask > 0, cv2.cvtColor(blended, cv2.COLOR_BGR2GRAY).astype(np.float32), window)
    return [(x + x0, y + y0, x + x1, y + y1) for x0, y0, x1, y1 in boxes]


PLANTERS = {"clone": plant_clone, "marks": plant_marks}


def places(rng, height: int, width: int, count: int, size: int = NATIVE) -> list[tuple[int, int]]:
    """Random top-left corners of `count` size x size squares, not overlapping, anywhere (not tile-aligned)."""
    chosen: list[tuple[int, int]] = []
    for _ in range(1000):
        if len(chosen) == count:
            break
        x, y = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
        if all(abs(x - a) >= size + 20 or abs(y - b) >= size + 20 for a, b in chosen):
            chosen.append((x, y))
    return chosen


@dataclass
class Truth:
    name: str                  # relpath under the frames folder
    kind: str                  # set: continuous, six, mosaic, strip
    height: int
    width: int
    background: str            # NEU class of the background
    scratches: list[list[tuple[int, int, int, int]]] = field(default_factory=list)  # per planted scratch, its boxes
    source: str = ""           # a continuous frame's background image (its file's stem)


class Sources:
    """The split's images (test unless --split val), drawn in a seeded shuffled order (cycling when a set needs
    more)."""

    def __init__(self, samples, annotations, seed: int, background: str = "quilt", planting: str = "clone",
                 flatten_sigma: float = FLATTEN_SIGMA):
        import dataset
        rng = np.random.default_rng(seed)
        self.rng, self.method, self.plant, self.flatten_sigma = rng, background, PLANTERS[planting], flatten_sigma
        self.clean = {c: [s for s in samples if s.neu_class == c]
                      for c in dataset.NEU_CLASSES if c != dataset.DEFECT_CLASS}
        for items in self.clean.values():
            rng.shuffle(items)
        self.scratches = [s for s in samples if s.label == 1 and Path(s.relpath).stem in annotations]
        rng.shuffle(self.scratches)
        self.annotations = annotations
        self.counts: dict[str, int] = defaultdict(int)

    def background(self, index: int):
        neu_class = list(self.clean)[index % len(self.clean)]
        items = self.clean[neu_class]
        sample = items[self.counts[neu_class] % len(items)]
        self.counts[neu_class] += 1
        return sample

    def scratch(self):
        from scratch_detector.metrics import read_boxes
        sample = self.scratches[self.counts["scratch"] % len(self.scratches)]
        self.counts["scratch"] += 1
        return sample, read_boxes(self.annotations[Path(sample.relpath).stem])[1]


def save(frame: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(frame, 0, 255).round().astype(np.uint8), mode="L").save(path)


def continuous_frame(sources: Sources, folder: Path, truth: Truth, index: int, n_scratches: int) -> Truth:
    sample = sources.background(index)
    truth.background, truth.source = sample.neu_class, Path(sample.relpath).stem
    frame = continuous_background(gray(sample.path), truth.height, truth.width, sources.method, sources.rng,
                                  sources.flatten_sigma)
    for x, y in places(sources.rng, truth.height, truth.width, n_scratches):
        scratch, boxes = sources.scratch()
        truth.scratches.append(sources.plant(frame, gray(scratch.path), boxes, x, y))
    save(frame, folder / truth.name)
    return truth


def mosaic_frame(sources: Sources, folder: Path, truth: Truth, index: int, with_scratch: bool) -> Truth:
    """5 x 5 test images on a 200 px grid (the seams a real frame never has); one scratch image if asked."""
    cells = [gray(sources.background(index + i).path) for i in range(25)]
    truth.background = "mixed"
    if with_scratch:
        cell = int(sources.rng.integers(25))
        scratch, boxes = sources.scratch()
        cells[cell] = gray(scratch.path)
        cx, cy = NATIVE * (cell % 5), NATIVE * (cell // 5)
        truth.scratches.append([(cx + x0, cy + y0, cx + x1, cy + y1) for x0, y0, x1, y1 in boxes])
    frame = np.vstack([np.hstack(cells[row * 5:row * 5 + 5]) for row in range(5)])
    save(frame, folder / truth.name)
    return truth


def build_accuracy_frames(sources: Sources, folder: Path, n_clean: int, n_scratch: int) -> list[Truth]:
    truths = []
    for i in range(n_clean):
        height, width = SIZES[i % len(SIZES)]
        truths.append(continuous_frame(sources, folder, Truth(f"continuous/clean_{i:03d}.png", "continuous", height,
                                                              width, ""), i, 0))
    for i in range(n_scratch):
        height, width = SIZES[i % len(SIZES)]
        truths.append(continuous_frame(sources, folder, Truth(f"continuous/scratch_{i:03d}.png", "continuous",
                                                              height, width, ""), i, 1 + i % 3))
    for i in range(6):  # the case: four 1000 x 1000 frames with one scratch, two without
        kind = "scratch" if i < 4 else "clean"
        truths.append(continuous_frame(sources, folder, Truth(f"six/{kind}_{i}.png", "six", 1000, 1000, ""), 7 * i,
                                       int(i < 4)))
    for i in range(6):
        kind = "scratch" if i < 4 else "clean"
        truths.append(mosaic_frame(sources, folder, Truth(f"mosaic/{kind}_{i}.png", "mosaic", 1000, 1000, ""), 25 * i,
                                   i < 4))
    return truths + control_images(sources, folder)


def control_images(sources: Sources, folder: Path) -> list[Truth]:
    """The control for the backgrounds: every non-scratch image of the split, whole, as it is and flattened as
    the backgrounds are (continuous_background's first step). A false alarm among the flattened ones that the
    image as it is does not make is the filter's doing, not the frame's."""
    truths = []
    for neu_class, items in sources.clean.items():
        for sample in sorted(items, key=lambda item: item.relpath):
            source = gray(sample.path)
            for kind, image in (("as_is", source), ("flattened", flatten(source, sources.flatten_sigma))):
                truth = Truth(f"control/{kind}/{Path(sample.relpath).stem}.png", f"control_{kind}", *source.shape,
                              neu_class)
                save(image, folder / truth.name)
                truths.append(truth)
    return truths


def build_speed_inputs(sources: Sources, samples, work: Path, n_small: int, n_distinct: int,
                       many: list[int]) -> list[Truth]:
    """small/: n_small symlinks to the test images (200 x 200); distinct/: 1000 x 1000 frames (every other one
    with a scratch); frames_<n>/: n symlinks to those; strip/: one 20000 x 2000 strip with one scratch."""
    small = work / "small"
    small.mkdir()
    for i in range(n_small):
        sample = samples[i % len(samples)]
        (small / f"{i:05d}_{sample.path.name}").symlink_to(sample.path)
    distinct = [continuous_frame(sources, work / "distinct", Truth(f"frame_{i:03d}.png", "speed", 1000, 1000, ""), i,
                                 i % 2) for i in range(n_distinct)]
    for n in many:
        folder = work / f"frames_{n}"
        folder.mkdir()
        for i in range(n):
            (folder / f"{i:05d}.png").symlink_to(work / "distinct" / distinct[i % n_distinct].name)
    return [continuous_frame(sources, work / "strip", Truth("strip.png", "strip", 2000, 20000, ""), 0, 1)]


def build_worker(args) -> int:
    """The child that reads the checkpoint and the --split images and writes the frames and build.json."""
    from scratch_detector.evaluation import select_samples
    from scratch_detector.metrics import find_annotations
    from scratch_detector.model import load_checkpoint

    work = args.work
    data_dir = default_data_dir(args.data_dir)
    _, meta = load_checkpoint(args.model)
    samples, _ = select_samples(data_dir, meta, args.split)
    sources = Sources(samples, find_annotations(data_dir), args.seed, args.background, args.plant,
                      args.flatten_sigma)
    if args.speed:
        truths = build_speed_inputs(sources, samples, work, args.small, args.distinct, [args.distinct, args.many])
    else:
        truths = build_accuracy_frames(sources, work / "frames", args.clean, args.scratch)
    info = {"data_dir": str(data_dir), "n_images": len(samples), "n_scratch_sources": len(sources.scratches),
            "n_clean_sources": sum(map(len, sources.clean.values())),
            "model": {k: meta.get(k) for k in ("image_size", "normalization", "threshold")},
            "truths": [asdict(t) for t in truths]}
    (work / "build.json").write_text(json.dumps(info))
    return 0


def build(args, work: Path) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--build-worker", "--work", str(work),
               "--model", str(args.model), "--split", args.split, "--seed", str(args.seed),
               "--background", args.background, "--plant", args.plant, "--flatten-sigma", str(args.flatten_sigma),
               "--clean", str(args.clean), "--scratch", str(args.scratch), "--small", str(args.small),
               "--distinct", str(args.distinct), "--many", str(args.many)]
    command += (["--data-dir", str(args.data_dir)] if args.data_dir else []) + (["--speed"] if args.speed else [])
    subprocess.run(command, check=True, cwd=ROOT)
    info = json.loads((work / "build.json").read_text())
    info["truths"] = [Truth(**t) for t in info["truths"]]
    return info


# ---------------------------------------------------------------------------------------------------------
# Running infer.py and scoring
# ---------------------------------------------------------------------------------------------------------
def run_infer(model: Path, inputs: Path, output: Path, log: Path, *extra: str, sample_every: float = 0.0):
    run = run_child([sys.executable, "infer.py", "--input", str(inputs), "--output", str(output),
                     "--model", str(model), *extra], log, sample_every=sample_every)
    check(run, "infer.py")
    return run


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def touches(a, b) -> bool:
    """(x, y, w, h) box a and (x0, y0, x1, y1) box b overlap."""
    x, y, w, h = a
    return x < b[2] and x + w > b[0] and y < b[3] and y + h > b[1]


def heat_peak_hits(heat: np.ndarray, truth: Truth) -> bool:
    """The heatmap's maximum (at display scale) lies on a planted box: the frame pixels its display pixel covers
    overlap one. A flat map points nowhere."""
    if not heat.size or heat.max() <= heat.min():
        return False
    i, j = np.unravel_index(int(np.argmax(heat)), heat.shape)
    sy, sx = heat.shape[0] / truth.height, heat.shape[1] / truth.width
    cover = (j / sx, i / sy, 1 / sx, 1 / sy)
    return any(touches(cover, b) for boxes in truth.scratches for b in boxes)


@dataclass
class Scored:
    truth: Truth
    flagged: bool
    probability: float
    tiles: int
    detections: list
    found: list[bool]          # per planted scratch
    stray: int                 # detections touching no planted scratch
    top_hit: bool | None
    heat_hit: bool | None
    heat_max: float


def score(truths: list[Truth], output: Path) -> list[Scored]:
    rows = {r["image"]: r for r in read_rows(output / "predictions.csv")}
    found = defaultdict(list)
    for d in read_rows(output / "detections.csv"):
        found[d["image"]].append(((int(d["x"]), int(d["y"]), int(d["width"]), int(d["height"])),
                                  float(d["defect_probability"])))
    scored = []
    for truth in truths:
        row = rows[truth.name]
        if row["status"] != "ok":
            sys.exit(f"infer.py could not read {truth.name}: {row['status']}")
        boxes = [b for b, _ in found[truth.name]]
        planted = [b for scratch in truth.scratches for b in scratch]
        heat_path = output / "heatmaps" / (truth.name.rsplit(".", 1)[0] + "_heatmap.npy")
        heat = np.load(heat_path).astype(np.float32)
        top = tuple(map(int, row["max_tile"].split(","))) if row["max_tile"] else (0, 0, truth.width, truth.height)
        scored.append(Scored(
            truth, row["label"] == "1", float(row["defect_probability"]), int(row["tiles"]), found[truth.name],
            [any(touches(d, b) for d in boxes for b in scratch) for scratch in truth.scratches],
            sum(not any(touches(d, b) for b in planted) for d in boxes),
            any(touches(top, b) for b in planted) if planted else None,
            heat_peak_hits(heat, truth) if planted else None, float(heat.max())))
    return scored


def fraction(values) -> str:
    values = list(values)
    return f"{sum(values)}/{len(values)} = {sum(values) / len(values):.2f}" if values else "-"


def table_row(name: str, scored: list[Scored]) -> list:
    clean = [s for s in scored if not s.truth.scratches]
    dirty = [s for s in scored if s.truth.scratches]
    correct = [s.flagged == bool(s.truth.scratches) for s in scored]
    return [name, len(clean), len(dirty), sum(s.tiles for s in scored), fraction(correct),
            f"{sum(len(s.detections) for s in clean) / len(clean):.2f} ({sum(s.flagged for s in clean)} flagged)"
            if clean else "-",
            f"{sum(s.stray for s in dirty) / len(dirty):.2f}" if dirty else "-",
            fraction(f for s in dirty for f in s.found), fraction(s.heat_hit for s in dirty),
            fraction(s.top_hit for s in dirty),
            f"{max(s.heat_max for s in clean):.3f}" if clean else "-"]


def control_rows(scored: list[Scored]) -> list[list]:
    """Per background class (and all): the control images' false alarms and mean p, as they are and flattened."""
    by = {kind: [s for s in scored if s.truth.kind == f"control_{kind}"] for kind in ("as_is", "flattened")}
    rows = []
    for neu_class in sorted({s.truth.background for s in by["as_is"]}) + ["all"]:
        picked = {kind: [s for s in items if neu_class in ("all", s.truth.background)] for kind, items in by.items()}
        rows.append([neu_class, len(picked["as_is"]),
                     *[sum(s.flagged for s in picked[kind]) for kind in by],
                     *[f"{np.mean([s.probability for s in picked[kind]]):.3f}" for kind in by]])
    return rows


def expected_flagged(frames: list[Scored], control: list[Scored]) -> tuple[float, float, float]:
    """What the model's own per-image false-alarm rate predicts for clean frames: a frame is flagged when any of
    its n tiles is, so if each tile were an independent image like the split's non-scratch images of the frame's
    background class, taken as they are (the control), a frame is flagged with probability 1 - (1 - p)^n.
    -> (expected clean frames flagged with each class's own rate, with the rate pooled over the classes, the
    pooled rate). Why: it tells how many flagged clean frames a large frame's many tiles make from a rate that
    single images show, before any effect of the bench's construction (tiles overlap and repeat one source, so
    they are not independent: an order of magnitude, not a prediction)."""
    as_is = [s for s in control if s.truth.kind == "control_as_is"]
    pooled = sum(s.flagged for s in as_is) / max(len(as_is), 1)
    by_class = defaultdict(list)
    for s in as_is:
        by_class[s.truth.background].append(s.flagged)
    clean = [s for s in frames if not s.truth.scratches]
    per_class = sum(1 - (1 - float(np.mean(by_class[s.truth.background]) if by_class[s.truth.background] else pooled))
                    ** s.tiles for s in clean)
    return per_class, sum(1 - (1 - pooled) ** s.tiles for s in clean), pooled


def failures(scored: list[Scored], flattened: dict[str, float] | None = None) -> list[str]:
    """One line per frame that misses a target; flattened: the control's p(defect) of each background image
    flattened (by stem), quoted beside a clean frame's false alarm."""
    flattened = flattened or {}
    lines = []
    for s in scored:
        what = []
        if not s.truth.scratches and s.flagged:
            what.append(f"false alarm: {len(s.detections)} tiles, p={s.probability:.4f} "
                        f"at {[b for b, _ in s.detections][:4]}"
                        + (f"; its background image flattened, whole: p={flattened[s.truth.source]:.4f}"
                           if s.truth.source in flattened else ""))
        if s.truth.scratches:
            if not all(s.found):
                what.append(f"missed {s.found.count(False)} of {len(s.found)} scratches, p={s.probability:.4f}, "
                            f"planted {s.truth.scratches}")
            if s.stray:
                what.append(f"{s.stray} stray detections")
            if not s.heat_hit:
                what.append("heat max off the scratch")
            if not s.top_hit:
                what.append(f"top tile off the scratch (p={s.probability:.4f})")
        if what:
            lines.append(f"- {s.truth.name} ({s.truth.height}x{s.truth.width}, background {s.truth.background}"
                         + (f" from {s.truth.source}" if s.truth.source else "") + "): "
                         + "; ".join(what))
    return lines


HEADER = ["frames", "clean", "scratch", "tiles", "frame accuracy", "false alarms / clean frame",
          "stray / scratch frame", "scratch recall", "heat max on scratch", "top det. on scratch", "max heat, clean"]


def accuracy_bench(args, model: Path, info: dict, work: Path) -> None:
    frames, output, truths, meta = work / "frames", work / "out", info["truths"], info["model"]
    print(f"built {len(truths)} frames; running infer.py", flush=True)
    run = run_infer(model, frames, output, work / "infer.log", "--save-heatmaps", *args.infer_args)
    log = run.log.read_text(errors="replace")
    scored = score(truths, output)
    sets = {"continuous (mixed sizes)": [s for s in scored if s.truth.kind == "continuous"],
            "six-frame case, 1000x1000 continuous": [s for s in scored if s.truth.kind == "six"],
            "mosaic 5x5, seams on a 200 px grid (sanity check)": [s for s in scored if s.truth.kind == "mosaic"]}
    print(f"\n## Tiled inference on frames from the {args.split} split ({model.name})\n")
    print(f"- model: image size {meta['image_size']}, normalization {meta.get('normalization')}, threshold "
          f"{meta['threshold']:.4f}; infer.py defaults + --save-heatmaps {' '.join(args.infer_args)}; "
          f"{run.wall_s:.0f} s, peak RSS {run.peak_rss_mib:.0f} MiB")
    print(f"- data: {info['data_dir']}, {args.split} split: {info['n_images']} images "
          f"({info['n_scratch_sources']} annotated scratches, {info['n_clean_sources']} others)")
    print(f"- continuous frames ({args.background} backgrounds flattened at sigma {args.flatten_sigma:g} px, "
          f"scratches planted by {args.plant}, seed "
          f"{args.seed}): sizes "
          f"{', '.join(f'{w}x{h}' for h, w in SIZES)} (W x H) in turn; scratch frames hold 1, 2, 3 scratches in "
          f"turn; backgrounds cycle through the 5 non-scratch classes")
    print(f"- load average at the end: {load_average()}")
    for line in log.splitlines():
        if "large images tiled" in line or " images: " in line or "model " in line:
            print(f"- infer.py: {line.strip()}")
    print()
    print(markdown_table(HEADER, [table_row(name, items) for name, items in sets.items()]))
    by_class = defaultdict(list)
    for s in sets["continuous (mixed sizes)"]:
        by_class[s.truth.background].append(s)
    print("\nContinuous frames by background class:\n")
    print(markdown_table(HEADER, [table_row(c, by_class[c]) for c in sorted(by_class)]))
    print(f"\nControl: the split's non-scratch images, whole, as they are and flattened (sigma "
          f"{args.flatten_sigma:g} px) as the backgrounds are; false alarms of each:\n")
    print(markdown_table(["background class", "images", "false alarms, as they are", "false alarms, flattened",
                          "mean p(defect), as they are", "mean p(defect), flattened"], control_rows(scored)))
    continuous = sets["continuous (mixed sizes)"]
    by_rate, by_pooled, pooled = expected_flagged(continuous, scored)
    clean_tiles = [s.tiles for s in continuous if not s.truth.scratches]
    print(f"\nExpected clean continuous frames flagged if each tile were an independent non-scratch image of the "
          f"split, as it is (1 - (1 - p)^tiles per frame; {len(clean_tiles)} frames of {min(clean_tiles, default=0)} "
          f"to {max(clean_tiles, default=0)} tiles): {by_rate:.1f} with each class's own false-alarm rate, "
          f"{by_pooled:.1f} with the pooled rate p = {pooled:.4f}; flagged: "
          f"{sum(s.flagged for s in continuous if not s.truth.scratches)}")
    flattened = {Path(s.truth.name).stem: s.probability for s in scored if s.truth.kind == "control_flattened"}
    for name, items in sets.items():
        lines = failures(items, flattened)
        print(f"\nFrames that miss a target, {name}: " + ("none" if not lines else ""))
        print("\n".join(lines))
    if args.keep:
        keep(args.keep, output, frames if args.keep_frames else None)


def keep(folder: Path, output: Path, frames: Path | None) -> None:
    target = folder.resolve()
    if target.is_relative_to(ROOT) and not target.is_relative_to(ROOT / "outputs"):
        sys.exit(f"error: --keep {target} is inside the repo: NEU-derived files go outside it or under outputs/")
    shutil.copytree(output, target / "infer_out", dirs_exist_ok=True)
    if frames is not None:
        shutil.copytree(frames, target / "frames", dirs_exist_ok=True)
    print(f"\nkept: {target}")


# ---------------------------------------------------------------------------------------------------------
# Throughput and memory
# ---------------------------------------------------------------------------------------------------------
def own_rate(log: Path, unit: str) -> float:
    found = re.findall(rf"([\d.]+) {unit}/s", log.read_text(errors="replace"))
    return float(found[-1]) if found else float("nan")


def early_late_rss(timeline: list[tuple[float, int]]) -> str:
    """Peak RSS (MiB) in the second and in the last quarter of a run (the first holds the start-up), from a
    TreeSampler's (s, KiB) timeline: memory that grows with the frames done shows as a later peak well above
    the earlier one."""
    if len(timeline) < 8:
        return "(run too short)"
    end = timeline[-1][0]
    second = max(kib for s, kib in timeline if end / 4 <= s < end / 2) / 1024
    last = max(kib for s, kib in timeline if s >= 3 * end / 4) / 1024
    return f"{second:.0f} / {last:.0f}"


def speed_bench(args, model: Path, info: dict, work: Path) -> None:
    """images/s on the split's 200 x 200 images vs tiles/s on 1000 x 1000 frames; peak RSS of one
    20000 x 2000 strip and of folders of few and many large frames (symlinks to --distinct frames)."""
    [strip_truth] = info["truths"]
    runs = []
    for name, folder, n, tiles in (
            (f"{args.small} NEU test images, 200x200", work / "small", args.small, args.small),
            (f"{args.distinct} frames 1000x1000", work / f"frames_{args.distinct}", args.distinct, args.distinct * 49),
            (f"{args.many} frames 1000x1000", work / f"frames_{args.many}", args.many, args.many * 49),
            ("one strip 20000x2000", work / "strip", 1, 1729)):
        output = work / "out"
        print(f"infer.py on {name} ...", flush=True)
        run = run_infer(model, folder, output, work / f"speed_{len(runs)}.log", *args.infer_args, sample_every=1.0)
        rows = read_rows(output / "predictions.csv")
        if len(rows) != n or sum(int(r["tiles"] or 0) for r in rows) != tiles or any(r["status"] != "ok" for r in rows):
            sys.exit(f"infer.py did not do the full job on {name}: {len(rows)} rows")
        unit = "images" if folder.name == "small" else "inputs"
        note = ""
        if folder.name == "strip":
            found = [(int(d["x"]), int(d["y"]), int(d["width"]), int(d["height"]))
                     for d in read_rows(output / "detections.csv")]
            hit = any(touches(d, b) for d in found for s in strip_truth.scratches for b in s)
            note = f"{len(found)} detections, the planted scratch {'found' if hit else 'MISSED'}"
        runs.append([name, tiles, f"{run.wall_s:.0f}", f"{tiles / run.wall_s:.1f}", f"{own_rate(run.log, unit):.1f}",
                     f"{run.peak_rss_mib:.0f}", early_late_rss(run.sampled.timeline), note])
        shutil.rmtree(output)
    meta = info["model"]
    print(f"\n## Tiled inference: throughput and memory ({model.name}, image size {meta['image_size']})\n")
    print("\n".join(f"- {line}" for line in machine_lines()))
    print(f"- load average at the end: {load_average()}")
    print(f"- infer.py defaults (CAM overlay per image) {' '.join(args.infer_args)}; model inputs = tiles, or whole "
          f"small images; 'own' = the rate infer.py prints, timed after its imports (model load included); frames "
          f"folders are symlinks to {args.distinct} distinct frames\n")
    print(markdown_table(["input", "model inputs", "wall s", "inputs/s (wall)", "inputs/s (own)", "peak RSS MiB",
                          "peak RSS MiB, 2nd / last quarter of the run", "note"], runs))


# ---------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = bench_parser(__doc__)
    p.add_argument("--clean", type=int, default=12, help="clean continuous frames (default: %(default)s)")
    p.add_argument("--scratch", type=int, default=12, help="continuous frames with scratches (default: %(default)s)")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="the split the frames are built from: val to choose a setting, test to report it once "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="which images go where (default: %(default)s)")
    p.add_argument("--background", choices=["quilt", "mirror"], default="quilt",
                   help="continuous backgrounds by image quilting, or by mirror tiling (default: %(default)s)")
    p.add_argument("--flatten-sigma", type=float, default=FLATTEN_SIGMA,
                   help="px: the backgrounds' illumination is flattened by subtracting their Gaussian blur of this "
                   "sigma (default: %(default)s)")
    p.add_argument("--plant", choices=sorted(PLANTERS), default="clone",
                   help="how scratches are planted: clone (OpenCV seamlessClone of the annotated boxes, independent "
                   "of training) or marks (perturb.scratch_marks, the operation train.py's transplant trains on; "
                   "default: %(default)s)")
    p.add_argument("--speed", action="store_true", help="throughput and peak RSS instead of the accuracy table")
    p.add_argument("--small", type=int, default=300, help="--speed: 200x200 images (default: %(default)s)")
    p.add_argument("--distinct", type=int, default=10,
                   help="--speed: different 1000x1000 frames (default: %(default)s)")
    p.add_argument("--many", type=int, default=200,
                   help="--speed: frames in the large folder, symlinks to the distinct ones (default: %(default)s)")
    p.add_argument("--keep", type=Path, help="copy infer.py's outputs here (outside the repo or under outputs/)")
    p.add_argument("--keep-frames", action="store_true", help="with --keep: the frames too")
    p.add_argument("--infer-args", nargs=argparse.REMAINDER, default=[],
                   help="the rest is passed to infer.py (e.g. --infer-args --tile-stride 100)")
    p.add_argument("--build-worker", action="store_true", help=argparse.SUPPRESS)  # internal: build the frames
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.clean, args.scratch, args.small, args.distinct, args.many) < 1:
        p.error("counts must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.model = Path(args.model).resolve()
    if args.build_worker:
        return build_worker(args)
    if not args.model.is_file():
        sys.exit(f"error: checkpoint not found: {args.model} (train one, or pass --model)")
    print("\n".join(machine_lines()), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_frames_") as tmp:
        work = Path(tmp)
        info = build(args, work)
        if args.speed:
            speed_bench(args, args.model, info, work)
        else:
            accuracy_bench(args, args.model, info, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
