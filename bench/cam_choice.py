"""Which CAM should infer.py draw? Every CAM method x layer scored on a split's boxed scratch images (pointing
game, energy in box) beside what it costs in infer.py's own CAM pass, and the cheapest one that localizes well.

    python bench/cam_choice.py                                # model_binary.pth, its val split (choose here)
    python bench/cam_choice.py --split test                   # check the choice on the held-out test split
    python bench/cam_choice.py --methods layercam --layers features.1 features.2 --json outputs/cam_choice.json
    python bench/cam_choice.py --model /tmp/m.pth --layers features.6 features.8   # quick check

Localization: metrics.localization_scores on the split's scratch images that have ANNOTATIONS boxes (the
heatmap for class defect, resized to the image's original geometry; a flat map scores 0, a tie the share of
its maximal pixels inside the boxes). Cost: engines/local.ModelStreams built as infer.py builds it (BatchNorm folded,
--streams 0 = auto, batch size 16), one warm-up batch per stream untimed, then those images repeated to at
least --min-images; ms/img = wall time of ModelStreams.run_batches / images (normalisation, forward, backward to the
layer, CAM; no decoding and no overlay drawing). The forward pass without CAM (infer.py --no-cam) is the
reference row. Timings move with machine load: compare rows of one run, and see the load average printed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dataset  # noqa: E402
from common import default_data_dir, load_average, machine_lines, markdown_table, median  # noqa: E402
from gradcam import METHODS, resolve_layer  # noqa: E402
from scratch_detector.engines.local import ModelStreams  # noqa: E402
from scratch_detector.evaluation import SWEEP_LAYERS, select_samples  # noqa: E402
from scratch_detector.metrics import find_annotations, localization_scores, read_boxes  # noqa: E402
from scratch_detector.model import fold_batchnorm, load_checkpoint, pick_device  # noqa: E402
from scratch_detector.pipeline import Decoded  # noqa: E402
from scratch_detector.settings import DEFAULT_CAM, DEFAULT_CAM_LAYER  # noqa: E402

SCORE_BATCH = 64  # evaluate.py's default: scores do not depend on it


def boxed_scratches(data_dir: Path, meta: dict, split: str):
    """The split's scratch samples that have a VOC box file, and their ((width, height), boxes)."""
    samples, _ = select_samples(data_dir, meta, split)
    annotations = find_annotations(data_dir)
    boxed = [s for s in samples if s.label == 1 and Path(s.relpath).stem in annotations]
    return boxed, [read_boxes(annotations[Path(s.relpath).stem]) for s in boxed]


def cam_pass_ms(model, meta: dict, pixels: np.ndarray, method: str | None, layer: str, batch_size: int,
                streams: int, min_images: int, rounds: int, device) -> tuple[float, int, str]:
    """ms per image of infer.py's model work (ModelStreams.run_batches) with this CAM, or none; -> (median ms/img over
    the rounds, images per round, the streams' description)."""
    repeat = max(1, math.ceil(min_images / len(pixels)))
    items = [Decoded(f"{i}", pixels[i % len(pixels)]) for i in range(repeat * len(pixels))]
    batches = [items[start:start + batch_size] for start in range(0, len(items), batch_size)]
    runner = ModelStreams(model, meta["normalization"], method, layer, streams, device)
    try:
        warm = [items[:batch_size]] * runner.count  # one batch per model copy, untimed
        runner.run_batches(iter(warm), lambda *_: None)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            runner.run_batches(iter(batches), lambda *_: None)
            times.append(time.perf_counter() - start)
        return 1000 * median(times) / len(items), len(items), runner.describe()
    finally:
        runner.close()


def choose(rows: list[dict]) -> dict | None:
    """The cheapest row that meets both thresholds, or None."""
    meeting = [r for r in rows if r["meets"]]
    return min(meeting, key=lambda r: r["ms_per_image"]) if meeting else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "model_binary.pth"))
    p.add_argument("--data-dir", help="NEU-DET data with ANNOTATIONS (default: $NEU_DATA_DIR, else ../shared/neu-det)")
    p.add_argument("--split", choices=["val", "test"], default="val",
                   help="val (default: where the CAM is chosen) or test (to check the choice)")
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    p.add_argument("--layers", nargs="+", default=SWEEP_LAYERS,
                   help=f"layers to explain (default: {SWEEP_LAYERS[0]} ... {SWEEP_LAYERS[-1]})")
    p.add_argument("--min-pointing", type=float, default=0.95, help="pointing game needed (default: %(default)s)")
    p.add_argument("--min-energy", type=float, default=0.65, help="energy in box needed (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="as infer.py (default: %(default)s)")
    p.add_argument("--streams", type=int, default=0, help="as infer.py: 0 = auto (default: %(default)s)")
    p.add_argument("--min-images", type=int, default=64,
                   help="time at least this many images: the boxed images, repeated (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=1, help="timed rounds per row, median (default: %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--json", type=Path, help="also write the rows and the choice to this file")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.streams < 0 or args.min_images < 1 or args.rounds < 1:
        p.error("--batch-size, --min-images and --rounds must be >= 1, --streams >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    model, meta = load_checkpoint(args.model, device)
    fold_batchnorm(model)  # as infer.py: scores and timings of the model infer.py runs
    for layer in args.layers:
        try:
            resolve_layer(model, layer)
        except ValueError as error:
            sys.exit(f"error: {error}")
    data_dir = default_data_dir(args.data_dir)
    samples, boxes = boxed_scratches(data_dir, meta, args.split)
    if not samples:
        sys.exit(f"error: no scratch image of the {args.split} split has an ANNOTATIONS box file under {data_dir}")
    pixels = dataset.load_pixels(samples, int(meta["image_size"]))
    machine = machine_lines()

    reference_ms, timed, streams = cam_pass_ms(model, meta, pixels, None, args.layers[0], args.batch_size,
                                               args.streams, args.min_images, args.rounds, device)
    rows = []
    combos = [(m, l) for m in args.methods for l in args.layers]
    for method, layer in tqdm(combos, desc="CAMs", unit="cam", file=sys.stdout, leave=False):
        scores = localization_scores(model, torch.from_numpy(pixels), boxes, meta["normalization"], method, layer,
                                     SCORE_BATCH, device)
        ms, _, _ = cam_pass_ms(model, meta, pixels, method, layer, args.batch_size, args.streams, args.min_images,
                               args.rounds, device)
        pointing, energy = scores["pointing_game"], scores["energy_in_box"]
        rows.append(dict(method=method, layer=layer, pointing_game=pointing, energy_in_box=energy, ms_per_image=ms,
                         meets=pointing >= args.min_pointing and energy >= args.min_energy))
    best = choose(rows)

    print(f"\n## CAM method x layer: localization against cost ({args.split} split)\n")
    print("\n".join(f"- {line}" for line in machine))
    print(f"- load average at the end: {load_average()}")
    print(f"- model {args.model}: image size {meta['image_size']}, {meta['normalization']} normalization, BatchNorm "
          f"folded; infer.py default: {DEFAULT_CAM} on {DEFAULT_CAM_LAYER}")
    print(f"- {len(samples)} boxed scratch images of the {args.split} split ({data_dir}); CAM pass timed on {timed} "
          f"images (those repeated), batches of {args.batch_size}, {streams}, median of {args.rounds} round(s)\n")
    table = [["none (forward only, --no-cam)", "-", "-", "-", f"{reference_ms:.1f}", "-"]]
    table += [[r["method"], r["layer"], f"{r['pointing_game']:.3f}", f"{r['energy_in_box']:.3f}",
               f"{r['ms_per_image']:.1f}", "yes" if r["meets"] else "no"] for r in rows]
    print(markdown_table(["method", "layer", "pointing game", "energy in box", "CAM pass ms/img",
                          f"meets (pointing >= {args.min_pointing}, energy >= {args.min_energy})"], table))
    if best:
        print(f"\ncheapest meeting pointing game >= {args.min_pointing} and energy in box >= {args.min_energy}: "
              f"{best['method']} on {best['layer']} (pointing {best['pointing_game']:.3f}, energy "
              f"{best['energy_in_box']:.3f}, {best['ms_per_image']:.1f} ms/img, forward alone "
              f"{reference_ms:.1f} ms/img)")
    else:
        # the one that comes closest to both targets: the larger of its two shortfalls (as a share of the target)
        # is smallest; then the cheaper
        top = min(rows, key=lambda r: (max(1 - r["pointing_game"] / args.min_pointing,
                                           1 - r["energy_in_box"] / args.min_energy), r["ms_per_image"]))
        print(f"\nno method x layer meets pointing game >= {args.min_pointing} and energy in box >= "
              f"{args.min_energy}; closest to both: {top['method']} on {top['layer']} (pointing "
              f"{top['pointing_game']:.3f}, energy {top['energy_in_box']:.3f}, {top['ms_per_image']:.1f} ms/img)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(
            model=str(args.model), split=args.split, data_dir=str(data_dir), n_images=len(samples), timed_images=timed,
            batch_size=args.batch_size, streams=streams, rounds=args.rounds, machine=machine,
            load_average_end=load_average(), min_pointing=args.min_pointing, min_energy=args.min_energy,
            forward_ms_per_image=reference_ms, rows=rows, choice=best), indent=2))
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
