"""From NEU to "your own line": does fine-tuning on a few corrected images recover a camera the shipped model
handles badly, without forgetting NEU?

    python bench/new_line.py                        # 20, 40 and 80 labelled images; scored on the test split
    python bench/new_line.py --counts 80 --split val
    python bench/new_line.py --line blur2.5 --counts       # another camera change; the shipped model only
    python bench/new_line.py --counts 80 --draws 20        # also the new line under 19 more draws of its noise

The new line is NEU under a camera change the training never draws (LINES). The default, flat-noisy (contrast
x0.3 and sensor noise; the training's camera augmentation keeps contrast >= 0.5), was picked on the shipped
model's validation split as the change it handles worst while the scratches stay visible to a person; the others
are the rest of the candidates of that scan (blur and gamma beyond the augmentation's range).

For each count N: N images of the new line, made from the shipped model's NEU *training* split (half scratches,
half spread over the other five classes, as a person who corrects the review page labels both), are written as
PNGs with labels.csv into a temp folder, and `python train.py --init model_binary.pth --labels ... --replay NEU`
fine-tunes on them as a user would (timed, wall clock, as a child process). The shipped and each fine-tuned model
are then scored on the new line's --split images (the same NEU images under the same change, never labelled) and
on the clean NEU --split images (nothing forgotten), each at its own threshold. The temp folder is deleted.

A noisy line's figures are those of one draw of its noise on the held-out images. --draws K scores every model on
K draws (the first the table's), to tell a shortfall that the images carry from one that the draw does.
"""
from __future__ import annotations

import csv
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dataset  # noqa: E402
from common import (bench_parser, check, default_data_dir, load_average, machine_lines, markdown_table,  # noqa: E402
                    run_child)
from robustness import decode_originals, perturbed_pixels  # noqa: E402
from scratch_detector import familiarity, perturb  # noqa: E402
from scratch_detector.calibration import expected_calibration_error  # noqa: E402
from scratch_detector.finetune import spread_pick  # noqa: E402
from scratch_detector.metrics import binary_metrics, clipped_log_odds  # noqa: E402
from scratch_detector.model import load_checkpoint, predict_logits, predict_probabilities  # noqa: E402


# The candidate lines of the scan that picked the first (bench/README.md, "Your own line"): name -> (what the
# camera does, the change). Optics first (blur), then the sensor's response (gamma, contrast), then its noise.
LINES = {
    "flat-noisy": ("contrast x0.3, then Gaussian noise sigma 10",
                   lambda im, rng: perturb.noise(perturb.contrast(im, 0.3), 10.0, rng)),
    "gamma2.2-blur2": ("Gaussian blur sigma 2 px, then gamma 2.2",
                       lambda im, rng: perturb.gamma(perturb.blur(im, 2.0), 2.2)),
    "gamma2.5-blur2.5": ("Gaussian blur sigma 2.5 px, then gamma 2.5",
                         lambda im, rng: perturb.gamma(perturb.blur(im, 2.5), 2.5)),
    "blur2.5": ("Gaussian blur sigma 2.5 px", lambda im, rng: perturb.blur(im, 2.5)),
    "gamma0.4-blur2": ("Gaussian blur sigma 2 px, then gamma 0.4",
                       lambda im, rng: perturb.gamma(perturb.blur(im, 2.0), 0.4)),
}
DEFAULT_LINE = "flat-noisy"


def labelled_pool(train: list, count: int, seed: int) -> list:
    """`count` training images: half scratches, the rest spread over the other classes."""
    rng = np.random.default_rng([seed, count])
    scratches = [s for s in train if s.label == 1]
    others = [s for s in train if s.label == 0]
    return sorted(spread_pick(scratches, count // 2, rng) + spread_pick(others, count - count // 2, rng),
                  key=lambda s: s.relpath)


def line_image(sample, image: np.ndarray, line: str) -> np.ndarray:
    """One NEU image as the line named `line` (a key of LINES) shows it; its noise seeded by its path in the NEU
    data, not by any list, so the same image gets the same noise wherever it is drawn."""
    return LINES[line][1](image, np.random.default_rng(zlib.crc32(sample.relpath.encode())))


def unsure_order(train: list, model_path: Path, line: str, device: str = "cpu") -> list:
    """The new line's training images, those the model is least sure about first: its calibrated p(defect)
    nearest its threshold in log-odds, as a person labels them when the review page lists unsure rows first.
    Ranked once; a count of N labels the first N."""
    model, meta = load_checkpoint(model_path, device)
    size = int(meta["image_size"])
    pixels = torch.from_numpy(np.stack([dataset.to_model_pixels(Image.fromarray(line_image(s, image, line)), size)
                                        for s, image in zip(train, decode_originals(train))]))
    p = predict_probabilities(model, pixels, meta["normalization"], 64, device).numpy()
    distance = np.abs(clipped_log_odds(p) - clipped_log_odds([float(meta["threshold"])])[0])
    return [train[i] for i in np.argsort(distance, kind="stable")]


def write_line_folder(folder: Path, samples: list, line: str) -> Path:
    """The new line's labelled images as PNG (lossless: the change is the camera, not the file) with neutral names,
    and labels.csv as the review page writes it."""
    folder.mkdir(parents=True)
    originals = decode_originals(samples)
    rows = []
    for index, (sample, image) in enumerate(zip(samples, originals)):
        name = f"line_{index:04d}.png"
        Image.fromarray(line_image(sample, image, line)).save(folder / name)
        rows.append((name, dataset.BINARY_CLASSES[sample.label]))
    with open(folder / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("image", "label"), *rows])
    return folder / "labels.csv"


def score(model_path: Path, sets: dict, device: str = "cpu") -> dict:
    """{set name: metrics at the checkpoint's own threshold, calibrated as infer.py runs it, with the calibration
    error of that p(defect) ("ece") and how many images its familiarity check flags ("unfamiliar", None for a
    checkpoint without statistics): whether infer.py would warn about the new line, before and after."""
    model, meta = load_checkpoint(model_path, device)
    stats = meta.get("familiarity")
    scores = {}
    for name, (pixels, labels) in sets.items():
        logits, features = predict_logits(model, pixels, meta["normalization"], 64, device,
                                          None if stats is None else familiarity.layers(stats))
        p = logits.softmax(1)[:, 1].numpy()
        unfamiliar = (None if stats is None else
                      int((familiarity.unfamiliarity(features, pixels, stats) > stats["cutoff"]).sum()))
        scores[name] = {**binary_metrics(p, labels, float(meta["threshold"])),
                        "ece": expected_calibration_error(p, labels), "unfamiliar": unfamiliar}
    return scores


def redrawn(change, draw: int):
    """The camera change with the noise of draw `draw`: draw 0 is `change` itself (the table's); a later one seeds
    its noise by the image's own seed and the draw."""
    if draw == 0:
        return change
    return lambda im, rng: change(im, np.random.default_rng([int(rng.integers(2 ** 62)), draw]))


def draws_found(model_path: Path, draws: list[torch.Tensor], labels: np.ndarray, device: str = "cpu") -> dict:
    """Per draw of the line's noise, the scratches found and the false alarms at the checkpoint's threshold; per
    image, in how many draws it was judged wrong."""
    model, meta = load_checkpoint(model_path, device)
    threshold = float(meta["threshold"])
    wrong = np.zeros(len(labels), dtype=int)
    found, false_alarms = [], []
    for pixels in draws:
        p = predict_probabilities(model, pixels, meta["normalization"], 64, device).numpy()
        matrix = binary_metrics(p, labels, threshold)["confusion_matrix"]
        found.append(matrix["tp"])
        false_alarms.append(matrix["fp"])
        wrong += (p >= threshold) != (labels == 1)
    return {"found": found, "false_alarms": false_alarms, "wrong": wrong}


def draw_cells(d: dict, scratches: int) -> list[str]:
    found, k = np.array(d["found"]), len(d["found"])
    return [f"{found.min()} / {np.median(found):g} / {found.max()}", f"{int((found == scratches).sum())} of {k}",
            f"{found.sum() / (scratches * k):.4f}", f"{sum(d['false_alarms'])}"]


def cells(m: dict) -> list[str]:
    matrix = m["confusion_matrix"]
    return [f"{m['accuracy']:.4f}", f"{m['recall']:.4f} ({matrix['tp']}/{matrix['tp'] + matrix['fn']})",
            str(matrix["fp"]), f"{m['ece']:.4f}",
            "-" if m["unfamiliar"] is None else f"{m['unfamiliar']} / {m['n_images']}"]


def parse_args(argv=None):
    p = bench_parser(__doc__)
    p.add_argument("--counts", type=int, nargs="*", default=[20, 40, 80],
                   help="labelled images per fine-tune (none: score the shipped model only)")
    p.add_argument("--line", choices=sorted(LINES), default=DEFAULT_LINE,
                   help=f"the new line's camera change (default: {DEFAULT_LINE})")
    p.add_argument("--split", choices=["test", "val"], default="test", help="images to score on (default: test)")
    p.add_argument("--seed", type=int, default=0, help="which images are labelled, and train.py's --seed")
    p.add_argument("--keep", type=Path, help="copy each fine-tuned checkpoint here (finetuned_N.pth)")
    p.add_argument("--pick", choices=["spread", "unsure"], default="spread",
                   help="which training images a person labels: spread (default: at random, half scratches, the rest "
                   "spread over the other classes) or unsure (those the model is least sure about)")
    p.add_argument("--draws", type=int, default=1,
                   help="draws of the line's noise to score the new line on (default: 1, the table's)")
    args, extra = p.parse_known_args(argv)
    if args.draws < 1:
        p.error("--draws must be 1 or more")
    args.train_args = extra  # passed to train.py as they are (e.g. --epochs 3)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    data_dir = default_data_dir(args.data_dir)
    _, meta = load_checkpoint(args.model)
    samples, _ = dataset.find_samples(data_dir, verbose=False)
    splits = dataset.recorded_splits(samples, dataset.split_record(meta))
    held_out = splits[args.split]
    labels = dataset.labels_of(held_out)
    originals = decode_originals(held_out)
    size = int(meta["image_size"])
    described, change = LINES[args.line]
    draws = [perturbed_pixels(originals, redrawn(change, d), size) for d in range(args.draws)]
    sets = {"new line": (draws[0], labels),
            "clean NEU": (perturbed_pixels(originals, lambda im, rng: im, size), labels)}
    if args.draws > 1 and torch.equal(draws[0], draws[1]):
        sys.exit(f"error: --draws: the line {args.line} draws no noise, so every draw is the same")
    draw_rows = []
    print("\n".join(machine_lines()))
    print(f"new line: {args.line} ({described}); scored on the {args.split} split of {args.model} "
          f"({len(held_out)} images, {int(labels.sum())} scratches), new line and clean", flush=True)

    shipped = score(Path(args.model), sets)
    if args.draws > 1:
        draw_rows.append(("shipped model", draws_found(Path(args.model), draws, labels)))
    rows = [["shipped model", "0", *cells(shipped["new line"]), *cells(shipped["clean NEU"]), "-"]]
    unsure = unsure_order(splits["train"], Path(args.model), args.line) if args.pick == "unsure" else None
    with tempfile.TemporaryDirectory(prefix="new_line_") as tmp:
        for count in args.counts:
            folder = Path(tmp) / f"labelled_{count}"
            pool = (labelled_pool(splits["train"], count, args.seed) if unsure is None else
                    sorted(unsure[:count], key=lambda s: s.relpath))
            print(f"{count} labelled ({args.pick}): {sum(s.label for s in pool)} scratches", flush=True)
            labels_csv = write_line_folder(folder, pool, args.line)
            checkpoint = Path(tmp) / f"finetuned_{count}.pth"
            command = ["train.py", "--init", str(Path(args.model).resolve()), "--labels", str(labels_csv),
                       "--replay", str(data_dir), "--output", str(checkpoint),
                       "--reports", str(Path(tmp) / f"r{count}"), "--seed", str(args.seed), *args.train_args]
            run = run_child([sys.executable, *command], Path(tmp) / f"train_{count}.log")
            check(run, " ".join(command))
            print(run.log.read_text(errors="replace").split("held-out labelled images")[-1].rstrip(), flush=True)
            tuned = score(checkpoint, sets)
            if args.draws > 1:
                draw_rows.append((f"fine-tuned on {count}", draws_found(checkpoint, draws, labels)))
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                shutil.copy2(checkpoint, args.keep / checkpoint.name)
            rows.append([f"fine-tuned on {count}", str(count), *cells(tuned["new line"]), *cells(tuned["clean NEU"]),
                         f"{run.wall_s:.0f}"])
            print(f"{count} labelled: fine-tune {run.wall_s:.0f} s; new line {cells(tuned['new line'])}, clean "
                  f"{cells(tuned['clean NEU'])}", flush=True)
    print(f"\n## New line {args.line} ({described}), {args.split} split: shipped and fine-tuned\n")
    print(markdown_table(["model", "labelled images", "new line accuracy", "new line recall", "new line false alarms",
                          "new line ECE", "new line unfamiliar", "clean NEU accuracy", "clean NEU recall",
                          "clean NEU false alarms", "clean NEU ECE", "clean NEU unfamiliar",
                          "fine-tune wall s (whole train.py)"], rows))
    if draw_rows:
        scratches = int(labels.sum())
        print(f"\n## The new line under {args.draws} draws of its noise ({args.split} split, {scratches} scratches; "
              "draw 0 is the table's)\n")
        print(markdown_table(["model", "scratches found per draw (min / median / max)", "draws with every scratch",
                              "recall over the draws", "false alarms over the draws"],
                             [[name, *draw_cells(d, scratches)] for name, d in draw_rows]))
        for name, d in draw_rows:
            often = [(int(w), held_out[i].relpath) for i, w in enumerate(d["wrong"]) if w]
            print(f"{name}: judged wrong in k of {args.draws} draws: "
                  + (", ".join(f"{Path(path).stem} {w}" for w, path in sorted(often, reverse=True)) or "none"))
    print(f"\ntrain.py arguments added: {' '.join(args.train_args) or 'none'}; load average at the end "
          f"{load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
