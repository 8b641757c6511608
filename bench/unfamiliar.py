"""Does the unfamiliarity score tell NEU steel from everything else, and is p(defect) calibrated?

    python bench/unfamiliar.py                      # model_binary.pth: its splits, and the non-steel set
    python bench/unfamiliar.py --model other.pth --json figures.json

Reports, for the checkpoint's own score (familiarity.py: Mahalanobis distance of an early block's pooled
features, fitted on training images and camera-changed copies) and, to show why it was chosen, three candidates
read from the same pass: the same distance on the pooled 1280-d features the head reads, fitted on the clean
training images; the energy of the logits (-logsumexp); and one minus the largest softmax probability. Each
candidate's cut-off is at the same validation quantile (the shipped score's: validation and its copies):
  1. the share of NEU test images flagged unfamiliar (target <= 1 %);
  2. the share of non-steel images flagged (target >= 95 %) and the AUROC of the score, NEU test against
     non-steel. The non-steel set (NON_STEEL below) is the pictures that ship inside scikit-image and
     matplotlib (each named with its source) and synthetic images made here (noise, flat grey, gradients,
     text, checkerboards ...). Each goes through infer.py's own decoding: an image larger than a NEU tile is
     tiled, and is unfamiliar when most of its tiles are (the median tile score);
  3. the share of NEU test images flagged under each camera change of bench/robustness.py, beside that row's
     accuracy and recall;
  4. calibration: the expected calibration error of p(defect) on the validation and test splits, without and
     with the checkpoint's temperature.
A checkpoint trained before familiarity statistics existed gets them, its temperature and its threshold on
the calibrated p fitted here from its own training and validation splits by the function train.py uses
(posthoc.fit_after_training); the output says so.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dataset  # noqa: E402
from common import default_data_dir, machine_lines, markdown_table  # noqa: E402
from robustness import OTHER_VALUES, PERTURBATIONS, decode_originals, perturbed_pixels  # noqa: E402
from scratch_detector import familiarity  # noqa: E402
from scratch_detector.calibration import apply_temperature, calibration_summary  # noqa: E402
from scratch_detector.evaluation import select_samples  # noqa: E402
from scratch_detector.metrics import binary_metrics, roc_auc  # noqa: E402
from scratch_detector.model import load_checkpoint, pick_device, predict_logits  # noqa: E402
from scratch_detector.pipeline import decode_units  # noqa: E402
from scratch_detector.posthoc import fit_after_training  # noqa: E402
from scratch_detector.settings import Plan  # noqa: E402


# ---------------------------------------------------------------------------------------------------------
# The non-steel set: name -> (where it comes from, a function making the image as a uint8 array)
# ---------------------------------------------------------------------------------------------------------
def _skimage(name: str):
    def load():
        import skimage.data
        return getattr(skimage.data, name)()
    return f"scikit-image {name}() (skimage.data, shipped in the wheel)", load


def _matplotlib(file: str):
    def load():
        import matplotlib
        return np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / file))
    return f"matplotlib mpl-data/sample_data/{file}", load


def _synthetic(description: str, make):
    return f"synthetic: {description}", lambda: make(np.random.default_rng(0))


def _text_image(rng) -> np.ndarray:
    image = Image.new("L", (400, 200), 255)
    draw = ImageDraw.Draw(image)
    for line in range(9):
        draw.text((8, 6 + 21 * line), "Inspection report: line 4, coil 1187, no findings. " * 2, fill=0)
    return np.asarray(image)


def _checkerboard(cell: int) -> np.ndarray:
    y, x = np.mgrid[:200, :200]
    return (((x // cell + y // cell) % 2) * 255).astype(np.uint8)


def _gradient(kind: str) -> np.ndarray:
    y, x = np.mgrid[:200, :200] / 199.0
    values = {"horizontal": x, "vertical": y, "diagonal": (x + y) / 2,
              "radial": np.clip(np.hypot(x - 0.5, y - 0.5) / 0.71, 0, 1)}[kind]
    return (values * 255).astype(np.uint8)


SKIMAGE_NAMES = ["astronaut", "brick", "camera", "cat", "cell", "checkerboard", "clock", "coffee", "coins",
                 "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
                 "microaneurysms", "moon", "page", "retina", "rocket", "shepp_logan_phantom", "text"]
NON_STEEL = {
    **{f"skimage_{name}": _skimage(name) for name in SKIMAGE_NAMES},
    "grace_hopper": _matplotlib("grace_hopper.jpg"),
    "present_blue_pack": _matplotlib("Minduka_Present_Blue_Pack.png"),
    "matplotlib_logo": _matplotlib("logo2.png"),
    "uniform_noise": _synthetic("uniform noise 0-255, 200 x 200",
                                lambda rng: rng.integers(0, 256, (200, 200), dtype=np.uint8)),
    "gaussian_noise": _synthetic("Gaussian noise, mean 128, sigma 40, 200 x 200",
                                 lambda rng: np.clip(rng.normal(128, 40, (200, 200)), 0, 255).astype(np.uint8)),
    "colour_noise": _synthetic("uniform RGB noise, 200 x 200",
                               lambda rng: rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)),
    **{f"flat_{level}": _synthetic(f"flat grey {level}, 200 x 200",
                                   lambda rng, level=level: np.full((200, 200), level, np.uint8))
       for level in (0, 64, 128, 192, 255)},
    "lens_cap": _synthetic("black with sensor noise sigma 2 (a lens cap left on)",
                           lambda rng: np.clip(rng.normal(6, 2, (200, 200)), 0, 255).astype(np.uint8)),
    "overexposed": _synthetic("white with sensor noise sigma 2 (overexposed)",
                              lambda rng: np.clip(rng.normal(250, 2, (200, 200)), 0, 255).astype(np.uint8)),
    **{f"gradient_{kind}": _synthetic(f"{kind} grey gradient, 200 x 200", lambda rng, kind=kind: _gradient(kind))
       for kind in ("horizontal", "vertical", "diagonal", "radial")},
    "text_page": _synthetic("black text on white (PIL's default font), 400 x 200", _text_image),
    **{f"checkerboard_{cell}": _synthetic(f"checkerboard of {cell} px cells, 200 x 200",
                                          lambda rng, cell=cell: _checkerboard(cell)) for cell in (5, 25, 50)},
    "colour_bars": _synthetic("eight vertical colour bars, 200 x 200", lambda rng: np.repeat(np.array(
        [[[255, 255, 255], [255, 255, 0], [0, 255, 255], [0, 255, 0], [255, 0, 255], [255, 0, 0], [0, 0, 255],
          [0, 0, 0]]], np.uint8).repeat(25, axis=1), 200, axis=0)),
}


def write_non_steel(folder: Path) -> list[tuple[str, str, Path]]:
    """Each NON_STEEL image as a PNG in `folder` -> (name, source, path)."""
    made = []
    for name, (source, load) in NON_STEEL.items():
        array = np.asarray(load())
        if array.dtype != np.uint8:  # e.g. the float phantom
            array = (np.clip(array, 0, 1) * 255).astype(np.uint8) if array.max() <= 1 else array.astype(np.uint8)
        path = folder / f"{name}.png"
        Image.fromarray(array).save(path)
        made.append((name, source, path))
    return made


# ---------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------
POOLED = "avgpool"  # the 1280-d vector the head reads: the candidate the issue proposed
CANDIDATES = ("shipped", "pooled_1280", "energy", "max_softmax")


def pooled_features(model, meta: dict, pixels: torch.Tensor, device) -> torch.Tensor:
    return predict_logits(model, pixels, meta["normalization"], 64, device, POOLED)[1]


def unit_scores(model, meta: dict, stats: dict, pooled: dict, pixels: torch.Tensor, device) -> dict:
    """Per image: each candidate score (larger = less familiar) and the calibrated p(defect)."""
    logits, early = predict_logits(model, pixels, meta["normalization"], 64, device, stats["layer"])
    raw = logits * meta["temperature"]
    return {"shipped": familiarity.score(early, stats).numpy(),
            "pooled_1280": familiarity.score(pooled_features(model, meta, pixels, device), pooled).numpy(),
            "energy": (-torch.logsumexp(raw, 1)).numpy(),
            "max_softmax": (1 - logits.softmax(1).max(1).values).numpy(),
            "p": logits.softmax(1)[:, 1].numpy(), "logits": logits}


def file_scores(model, meta: dict, stats: dict, pooled: dict, path: Path, device) -> dict:
    """A file as infer.py sees it (decode_units: tiled when larger than a NEU image) -> median score per candidate."""
    units = list(decode_units(path, path.name, Plan(int(meta["image_size"]), with_display=False)))
    if units[0].error:
        raise RuntimeError(f"{path}: {units[0].error}")
    scores = unit_scores(model, meta, stats, pooled, torch.from_numpy(np.stack([u.pixels for u in units])), device)
    return {name: familiarity.frame_score(scores[name]) for name in CANDIDATES} | {"tiles": len(units),
                                                                                  "p": float(scores["p"].max())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "model_binary.pth"))
    p.add_argument("--data-dir", help="NEU data (default: $NEU_DATA_DIR, else ../shared/neu-det beside the repo)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--json", help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    model, meta = load_checkpoint(args.model, device)
    data_dir = default_data_dir(args.data_dir)
    split = {name: select_samples(data_dir, meta, name)[0] for name in ("train", "val", "test")}
    pixels = {name: torch.from_numpy(dataset.load_pixels(items, int(meta["image_size"]), progress=False))
              for name, items in split.items()}
    labels = {name: dataset.labels_of(items) for name, items in split.items()}

    stats, notes = meta.get("familiarity"), []
    if stats is None:  # an older checkpoint: fit what train.py now fits, from its own splits, as train.py does
        fitted = fit_after_training(model, pixels["train"], [s.neu_class for s in split["train"]], pixels["val"],
                                    labels["val"], meta["normalization"], 64, device, int(meta.get("seed") or 0))
        apply_temperature(model, fitted["temperature"])
        meta.update(temperature=fitted["temperature"], threshold=fitted["threshold"])
        stats = fitted["familiarity"]
        notes.append("this checkpoint has no familiarity statistics or temperature: they and the threshold on the "
                     "calibrated p are fitted here from its own training and validation splits, as train.py fits "
                     "them")
    pooled = familiarity.fit(pooled_features(model, meta, pixels["train"], device),
                             [s.neu_class for s in split["train"]], pooled_features(model, meta, pixels["val"], device),
                             layer=POOLED)
    scores = {name: unit_scores(model, meta, stats, pooled, pixels[name], device) for name in ("val", "test")}
    cutoffs = {c: float(np.quantile(scores["val"][c], stats["quantile"])) for c in CANDIDATES}
    cutoffs.update(shipped=float(stats["cutoff"]), pooled_1280=float(pooled["cutoff"]))

    with tempfile.TemporaryDirectory() as tmp:
        non_steel = [(name, source, file_scores(model, meta, stats, pooled, path, device))
                     for name, source, path in write_non_steel(Path(tmp))]

    figures = {"model": args.model, "notes": notes, "cutoffs": cutoffs, "candidates": {}}
    for c in CANDIDATES:
        test = scores["test"][c]
        other = np.array([s[c] for _, _, s in non_steel])
        auroc = roc_auc(np.concatenate([test, other]), np.r_[np.zeros(len(test)), np.ones(len(other))])
        figures["candidates"][c] = {"test_flagged": int((test > cutoffs[c]).sum()), "n_test": len(test),
                                    "non_steel_flagged": int((other > cutoffs[c]).sum()), "n_non_steel": len(other),
                                    "auroc": auroc}
    figures["non_steel"] = [{"name": name, "source": source, **{k: (float(v) if k != "tiles" else v)
                                                                 for k, v in s.items()},
                             "flagged": bool(s["shipped"] > cutoffs["shipped"])}
                            for name, source, s in non_steel]

    originals = decode_originals(split["test"])
    rows = []
    for name, change in {**PERTURBATIONS, **OTHER_VALUES}.items():
        changed = unit_scores(model, meta, stats, pooled, perturbed_pixels(originals, change, int(meta["image_size"])), device)
        m = binary_metrics(changed["p"], labels["test"], float(meta["threshold"]))
        flagged = changed["shipped"] > cutoffs["shipped"]
        rows.append({"perturbation": name, "asked": name in PERTURBATIONS, "flagged": int(flagged.sum()),
                     "n": len(flagged), "accuracy": m["accuracy"], "recall": m["recall"],
                     "wrong_among_flagged": int(((changed["p"] >= meta["threshold"]) != labels["test"])[flagged].sum())})
    figures["camera_changes"] = rows

    T = float(meta["temperature"])
    figures["calibration"] = {name: calibration_summary(scores[name]["logits"], labels[name], T)
                              for name in ("val", "test")}

    print("\n".join(f"- {line}" for line in machine_lines()))
    print(f"- model {args.model}: threshold {float(meta['threshold']):.4f}, temperature {T:.3f}, seed {meta.get('seed')}")
    for note in notes:
        print(f"- NOTE: {note}")
    print(f"- familiarity cut-off: validation quantile {stats['quantile']}; non-steel set: {len(non_steel)} images\n")
    print(markdown_table(["score", "cut-off", "NEU test flagged", "non-steel flagged", "AUROC test vs non-steel"],
                         [[{"shipped": f"shipped: Mahalanobis {stats['layer']}, camera-changed copies",
                            "pooled_1280": "Mahalanobis, pooled 1280-d, clean images"}.get(c, c), f"{cutoffs[c]:.3f}",
                           f"{f['test_flagged']} / {f['n_test']} ({f['test_flagged'] / f['n_test']:.1%})",
                           f"{f['non_steel_flagged']} / {f['n_non_steel']} "
                           f"({f['non_steel_flagged'] / f['n_non_steel']:.1%})", f"{f['auroc']:.4f}"]
                          for c, f in figures["candidates"].items()]))
    print()
    print(markdown_table(["non-steel image", "source", "tiles", "score", "flagged", "p(defect)"],
                         [[r["name"], r["source"], r["tiles"], f"{r['shipped']:.1f}", "yes" if r["flagged"] else
                           "**no**", f"{r['p']:.3f}"] for r in figures["non_steel"]]))
    print()
    print(markdown_table(["camera change (NEU test)", "flagged unfamiliar", "accuracy", "scratch recall",
                          "wrong verdicts among the flagged"],
                         [[r["perturbation"] + ("" if r["asked"] else " (other value)"),
                           f"{r['flagged']} / {r['n']} ({r['flagged'] / r['n']:.1%})", f"{r['accuracy']:.4f}",
                           f"{r['recall']:.4f}", r["wrong_among_flagged"]] for r in rows]))
    c = figures["calibration"]
    print(f"\ncalibration (ECE of p(defect), 10 bins): validation {c['val']['ece_without_temperature']:.4f} -> "
          f"{c['val']['ece']:.4f}, test {c['test']['ece_without_temperature']:.4f} -> {c['test']['ece']:.4f} "
          f"(without -> with temperature {T:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
