"""Which CAM should infer.py draw, and how? Every CAM method x layer scored on a split's boxed scratch images
(pointing game, energy in box) beside what it costs in infer.py's own CAM pass, and the cheapest one that
localizes well; and the choice of how the overlay draws the map (smoothing, floor).

    python bench/cam_choice.py                                # model_binary.pth, its val split (choose here)
    python bench/cam_choice.py --split test                   # check the choice on the held-out test split
    python bench/cam_choice.py --methods layercam --layers features.1 features.2 --json outputs/cam_choice.json
    python bench/cam_choice.py --model /tmp/m.pth --layers features.6 features.8   # quick check
    python bench/cam_choice.py --methods layercam --layers features.2 --no-timing --raw   # the map before drawing
    python bench/cam_choice.py --methods layercam --layers features.2 --drawing-sweep    # choose the drawing (val)
    python bench/cam_choice.py --methods layercam --layers features.2 --no-timing --overlays outputs/overlays_val

Localization: metrics.localization_scores on the split's scratch images that have ANNOTATIONS boxes, on the
map as infer.py's overlay draws it (overlay.drawn_heat at the image's original geometry: smoothed, heat below
the floor not drawn; --raw: the CAM only resized, as scored before the drawing existed); a flat map scores 0,
a tie the share of its maximal pixels inside the boxes. Cost: engines/local.ModelStreams built as infer.py
builds it (BatchNorm folded, --streams 0 = auto, batch size 16), one warm-up batch per stream untimed, then
those images repeated to at least --min-images; ms/img = wall time of ModelStreams.run_batches / images
(normalisation, forward, backward to the layer, CAM; no decoding and no overlay drawing). The forward pass
without CAM (infer.py --no-cam) is the reference row. Timings move with machine load: compare rows of one run,
and see the load average printed.

--drawing-sweep (no timing): per method x layer, how wide a scratch is on this split (the box's short side;
the width at half maximum of the CAM's hot ridge and of the bright line in the image across the box, see
scratch_widths) and a grid of smoothing x floor with pointing game, energy in box and
three readings of what the eye sees: patches (separate regions drawn at >= half opacity, per image), boxes
coloured (annotated boxes holding any drawn colour) and steel coloured (share of the image outside the boxes
holding any drawn colour).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dataset  # noqa: E402
from common import bench_parser, default_data_dir, load_average, machine_lines, markdown_table, median  # noqa: E402
from gradcam import METHODS, GradCAM, resolve_layer  # noqa: E402
from scratch_detector.engines.local import ModelStreams  # noqa: E402
from scratch_detector.evaluation import SWEEP_LAYERS, select_samples  # noqa: E402
from scratch_detector.metrics import (box_mask, cam_maps, energy_in_box, find_annotations, pointing_hit,  # noqa: E402
                                      read_boxes, score_maps)
from scratch_detector.model import fold_batchnorm, load_checkpoint, pick_device  # noqa: E402
from scratch_detector.overlay import HEAT_FLOOR, SMOOTHING, drawn_heat, render_overlay  # noqa: E402
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


def quartiles(values) -> str:
    values = np.asarray(values, dtype=float)
    if not len(values):
        return "none"
    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    return f"median {q2:.1f}, quartiles {q1:.1f}-{q3:.1f} ({len(values)} boxes)"


def scratch_widths(maps: np.ndarray, pixels: np.ndarray, boxes) -> dict[str, list[float]]:
    """Per annotated box, in the original image's pixels: its short side; and the width of the CAM's hot ridge
    and of the bright line in the image (a white top-hat across the box) inside it: on each line across the
    box that reaches half the box's peak, the pixels at >= half that line's own maximum; the median over
    those lines."""
    out = {"box short side": [], "CAM ridge": [], "image line (white top-hat)": []}
    for heatmap, image, (size, image_boxes) in zip(maps, pixels, boxes):
        heat = cv2.resize(np.asarray(heatmap, np.float32), size, interpolation=cv2.INTER_LINEAR)
        grey = cv2.resize(image[..., 0], size, interpolation=cv2.INTER_AREA).astype(np.float32)
        for x0, y0, x1, y1 in image_boxes:
            tall = y1 - y0 >= x1 - x0  # a scratch runs along its box's long side
            out["box short side"].append(min(x1 - x0, y1 - y0))
            kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (15, 1) if tall else (1, 15))
            tophat = cv2.morphologyEx(grey, cv2.MORPH_TOPHAT, kernel)
            regions = {"CAM ridge": heat[y0:y1, x0:x1], "image line (white top-hat)": tophat[y0:y1, x0:x1]}
            for name, region in regions.items():
                lines = region if tall else region.T
                peak = np.percentile(region, 99.5)  # not one stray pixel
                widths = [int((line >= 0.5 * line.max()).sum()) for line in lines if line.max() >= 0.5 * peak > 0]
                if widths:
                    out[name].append(float(np.median(widths)))
    return out


def drawing_readings(maps: np.ndarray, boxes, smoothing: float, floor: float) -> dict:
    """Pointing game, energy in box, and what the eye sees, for the maps drawn with this smoothing and floor."""
    hits, energies, patches, coloured_boxes, steel = [], [], [], [], []
    for heatmap, (size, image_boxes) in zip(maps, boxes):
        drawn = drawn_heat(heatmap, size, smoothing=smoothing, floor=floor)
        mask = box_mask(size, image_boxes)
        hits.append(pointing_hit(drawn, mask))
        energies.append(energy_in_box(drawn, mask))
        patches.append(cv2.connectedComponents((drawn >= 0.5).astype(np.uint8), connectivity=8)[0] - 1)
        coloured_boxes += [bool((drawn[y0:y1, x0:x1] > 0).any()) for x0, y0, x1, y1 in image_boxes]
        steel.append(float((drawn[~mask] > 0).mean()) if (~mask).any() else 0.0)
    return dict(smoothing=smoothing, floor=floor, pointing_game=float(np.mean(hits)),
                energy_in_box=float(np.mean(energies)), patches=float(np.mean(patches)),
                boxes_coloured=int(sum(coloured_boxes)), boxes=len(coloured_boxes),
                steel_coloured=float(np.mean(steel)))


def drawing_sweep(model, meta: dict, pixels: np.ndarray, boxes, args) -> list[dict]:
    """--drawing-sweep: the scratch widths and the smoothing x floor grid, per method x layer; -> the rows."""
    rows = []
    for method, layer in [(m, l) for m in args.methods for l in args.layers]:
        maps = cam_maps(model, torch.from_numpy(pixels), meta["normalization"], method, layer, SCORE_BATCH,
                        pick_device(args.device))
        print(f"\n## Drawing the map: {method} on {layer} ({args.split} split, {len(maps)} images, "
              f"{sum(len(b) for _, b in boxes)} boxes)\n")
        print("Scratch width, original pixels:")
        for name, widths in scratch_widths(maps, pixels, boxes).items():
            print(f"- {name}: {quartiles(widths)}")
        table = []
        for floor in args.sweep_floor:
            for smoothing in args.sweep_smoothing:
                row = drawing_readings(maps, boxes, smoothing, floor)
                rows.append(dict(method=method, layer=layer, **row))
                shipped = " (shipped)" if (smoothing, floor) == (SMOOTHING, HEAT_FLOOR) else ""
                table.append([f"{smoothing:g}", f"{floor:g}{shipped}", f"{row['pointing_game']:.3f}",
                              f"{row['energy_in_box']:.3f}", f"{row['patches']:.1f}",
                              f"{row['boxes_coloured']} of {row['boxes']}", f"{row['steel_coloured']:.3f}"])
        print()
        print(markdown_table(["smoothing (px)", "floor", "pointing game", "energy in box", "patches per image",
                              "boxes coloured", "steel coloured"], table))
    return rows


def previous_drawing(image_rgb: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """The heat panel as overlay.py drew it before the drawing existed: the raw map in OpenCV's jet colours,
    blended at 0.5 over the whole image (RGB)."""
    height, width = image_rgb.shape[:2]
    heat = cv2.resize(np.asarray(heatmap, np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    jet = cv2.applyColorMap(np.clip(heat * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(cv2.cvtColor(jet, cv2.COLOR_BGR2RGB), 0.5, image_rgb, 0.5, 0)


def write_overlays(folder: Path, model, meta: dict, samples, pixels: np.ndarray, boxes, method: str, layer: str,
                   device) -> None:
    """--overlays: for each boxed scratch, <name>_before.jpg (the previous drawing of the raw map) and
    <name>_after.jpg (infer.py's overlay now), at the original size, and thumbnails.jpg: every pair at 160 px
    wide each, as the review page's thumbnails show them. The images are the split's own (not for git)."""
    folder.mkdir(parents=True, exist_ok=True)
    cam = GradCAM(model, resolve_layer(model, layer), method)
    threshold, thumbs = float(meta["threshold"]), []
    for start in range(0, len(samples), SCORE_BATCH):
        batch = torch.from_numpy(pixels[start:start + SCORE_BATCH])
        maps, logits = cam.explain(dataset.normalize(batch, meta["normalization"]).to(device), target_class=1)
        for i, (heatmap, p) in enumerate(zip(maps.cpu().numpy(), logits.softmax(1)[:, 1].cpu().numpy())):
            sample, (size, _) = samples[start + i], boxes[start + i]
            image = cv2.resize(pixels[start + i], size, interpolation=cv2.INTER_AREA)
            verdict = dataset.BINARY_CLASSES[int(p >= threshold)]
            before = render_overlay(cv2.hconcat([image, previous_drawing(image, heatmap)]), None, verdict, float(p))
            after = render_overlay(image, heatmap, verdict, float(p))
            name = Path(sample.relpath).stem
            cv2.imwrite(str(folder / f"{name}_before.jpg"), before)
            cv2.imwrite(str(folder / f"{name}_after.jpg"), after)
            thumbs.append(cv2.hconcat([cv2.resize(o, (160, round(160 * o.shape[0] / o.shape[1])),
                                                  interpolation=cv2.INTER_AREA) for o in (before, after)]))
    print(f"overlays: {folder} (before / after per image, thumbnails.jpg)")
    if thumbs:
        drawing_ms(image, heatmap, verdict, float(p))
        height = max(t.shape[0] for t in thumbs)
        thumbs = [cv2.copyMakeBorder(t, 0, height - t.shape[0], 0, 0, cv2.BORDER_CONSTANT) for t in thumbs]
        columns = [cv2.vconcat(thumbs[i:i + 10]) for i in range(0, len(thumbs), 10)]
        columns = [cv2.copyMakeBorder(c, 0, columns[0].shape[0] - c.shape[0], 0, 8, cv2.BORDER_CONSTANT,
                                      value=(255, 255, 255)) for c in columns]
        cv2.imwrite(str(folder / "thumbnails.jpg"), cv2.hconcat(columns))


def drawing_ms(image: np.ndarray, heatmap: np.ndarray, verdict: str, p: float, repeats: int = 30) -> None:
    """ms to draw one overlay, the previous drawing against today's: at the image's size, and with the image
    and its map repeated to 1000 x 2000, a tiled frame's overlay at the largest (stacked panels, 2048 px)."""
    big_image = np.tile(image, (1000 // image.shape[0] + 1, 2000 // image.shape[1] + 1, 1))[:1000, :2000]
    big_map = cv2.resize(np.asarray(heatmap, np.float32), image.shape[1::-1])
    big_map = np.tile(big_map, (1000 // big_map.shape[0] + 1, 2000 // big_map.shape[1] + 1))[:1000, :2000]
    for name, (img, heat, stacked) in {"one NEU image": (image, heatmap, False),
                                       "a 2000 x 1000 frame": (big_image, big_map, True)}.items():
        layout = cv2.vconcat if stacked else cv2.hconcat
        times = {}
        for label, draw in (("previous", lambda: render_overlay(layout([img, previous_drawing(img, heat)]), None,
                                                                 verdict, p)),
                            ("now", lambda: render_overlay(img, heat, verdict, p, stacked=stacked))):
            draw()
            samples = []
            for _ in range(repeats if img is image else max(3, repeats // 10)):
                start = time.perf_counter()
                draw()
                samples.append(time.perf_counter() - start)
            times[label] = 1000 * median(samples)
        print(f"- draw the overlay of {name}: previous drawing {times['previous']:.2f} ms, now {times['now']:.2f} ms")


def choose(rows: list[dict]) -> dict | None:
    """The cheapest row that meets both thresholds, or None."""
    meeting = [r for r in rows if r["meets"]]
    return min(meeting, key=lambda r: r["ms_per_image"]) if meeting else None


def parse_args(argv=None):
    p = bench_parser(__doc__)
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
    p.add_argument("--smoothing", type=float, default=SMOOTHING,
                   help="score the map drawn with this Gaussian sigma in image pixels (default: the overlay's, "
                        "%(default)s)")
    p.add_argument("--floor", type=float, default=HEAT_FLOOR,
                   help="score the map drawn with this floor (default: the overlay's, %(default)s)")
    p.add_argument("--raw", action="store_true", help="score the raw map: --smoothing 0 --floor 0")
    p.add_argument("--no-timing", action="store_true", help="localization only: no CAM pass timing, no choice")
    p.add_argument("--drawing-sweep", action="store_true",
                   help="per method x layer: scratch widths and a smoothing x floor grid (no timing)")
    p.add_argument("--sweep-smoothing", type=float, nargs="+", default=[0, 1, 2, 3, 4, 6, 8, 12],
                   help="--drawing-sweep's smoothings, image pixels (default: %(default)s)")
    p.add_argument("--sweep-floor", type=float, nargs="+", default=[0, 0.1, 0.2, 0.3, 0.4],
                   help="--drawing-sweep's floors (default: %(default)s)")
    p.add_argument("--overlays", type=Path,
                   help="also write before / after overlays of the boxed scratches of the first method x layer "
                        "into this folder (e.g. outputs/overlays_val; NEU images: keep them out of git)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.streams < 0 or args.min_images < 1 or args.rounds < 1:
        p.error("--batch-size, --min-images and --rounds must be >= 1, --streams >= 0")
    if args.raw:
        args.smoothing, args.floor = 0.0, 0.0
    floors = [args.floor] + (args.sweep_floor if args.drawing_sweep else [])
    if min(floors) < 0 or max(floors) >= 1 or min([args.smoothing] + args.sweep_smoothing) < 0:
        p.error("floors must lie in [0, 1), smoothings >= 0")
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
    if args.overlays:
        write_overlays(args.overlays, model, meta, samples, pixels, boxes, args.methods[0], args.layers[0], device)
    if args.drawing_sweep:
        print(f"\n- model {args.model}; {len(samples)} boxed scratch images of the {args.split} split ({data_dir})")
        rows = drawing_sweep(model, meta, pixels, boxes, args)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(dict(model=str(args.model), split=args.split, data_dir=str(data_dir),
                                                 n_images=len(samples), rows=rows), indent=2))
            print(f"json: {args.json}")
        return 0

    timing = not args.no_timing
    reference_ms = timed = streams = None
    if timing:
        reference_ms, timed, streams = cam_pass_ms(model, meta, pixels, None, args.layers[0], args.batch_size,
                                                   args.streams, args.min_images, args.rounds, device)
    rows = []
    combos = [(m, l) for m in args.methods for l in args.layers]
    for method, layer in tqdm(combos, desc="CAMs", unit="cam", file=sys.stdout, leave=False):
        maps = cam_maps(model, torch.from_numpy(pixels), meta["normalization"], method, layer, SCORE_BATCH, device)
        scores = score_maps(maps, boxes, args.smoothing, args.floor)
        ms = float("nan")
        if timing:
            ms, _, _ = cam_pass_ms(model, meta, pixels, method, layer, args.batch_size, args.streams,
                                   args.min_images, args.rounds, device)
        pointing, energy = scores["pointing_game"], scores["energy_in_box"]
        rows.append(dict(method=method, layer=layer, pointing_game=pointing, energy_in_box=energy, ms_per_image=ms,
                         meets=pointing >= args.min_pointing and energy >= args.min_energy))
    best = choose(rows) if timing else None

    drawn = ("the raw map (no smoothing, no floor)" if args.smoothing == 0 and args.floor == 0 else
             f"the map as drawn: smoothing {args.smoothing:g} px, floor {args.floor:g}")
    print(f"\n## CAM method x layer: localization against cost ({args.split} split)\n")
    print("\n".join(f"- {line}" for line in machine))
    print(f"- load average at the end: {load_average()}")
    print(f"- model {args.model}: image size {meta['image_size']}, {meta['normalization']} normalization, BatchNorm "
          f"folded; infer.py default: {DEFAULT_CAM} on {DEFAULT_CAM_LAYER}")
    print(f"- scored on {drawn}")
    print(f"- {len(samples)} boxed scratch images of the {args.split} split ({data_dir})" +
          (f"; CAM pass timed on {timed} images (those repeated), batches of {args.batch_size}, {streams}, median "
           f"of {args.rounds} round(s)\n" if timing else "; not timed\n"))
    table = [["none (forward only, --no-cam)", "-", "-", "-", f"{reference_ms:.1f}", "-"]] if timing else []
    table += [[r["method"], r["layer"], f"{r['pointing_game']:.3f}", f"{r['energy_in_box']:.3f}",
               f"{r['ms_per_image']:.1f}" if timing else "-", "yes" if r["meets"] else "no"] for r in rows]
    print(markdown_table(["method", "layer", "pointing game", "energy in box", "CAM pass ms/img",
                          f"meets (pointing >= {args.min_pointing}, energy >= {args.min_energy})"], table))
    if timing and best:
        print(f"\ncheapest meeting pointing game >= {args.min_pointing} and energy in box >= {args.min_energy}: "
              f"{best['method']} on {best['layer']} (pointing {best['pointing_game']:.3f}, energy "
              f"{best['energy_in_box']:.3f}, {best['ms_per_image']:.1f} ms/img, forward alone "
              f"{reference_ms:.1f} ms/img)")
    elif timing:
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
            model=str(args.model), split=args.split, data_dir=str(data_dir), n_images=len(samples),
            map=dict(smoothing=args.smoothing, floor=args.floor), timed_images=timed,
            batch_size=args.batch_size, streams=streams, rounds=args.rounds, machine=machine,
            load_average_end=load_average(), min_pointing=args.min_pointing, min_energy=args.min_energy,
            forward_ms_per_image=reference_ms, rows=rows, choice=best), indent=2))
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
