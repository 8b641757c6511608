"""Would another threshold rule keep more scratches under a changed camera? Scored on the models that
`python bench/crossval.py --camera --keep DIR` kept, without training again.

    python bench/crossval.py --camera --keep folds/     # once: five trainings, about an hour
    python bench/threshold_rules.py --folds folds/      # then each rule, in minutes

For each fold's model, every held-out image's p(defect) is read clean, under bench/robustness.py's camera changes,
and under COPIES copies changed by the training's own camera augmentation (augment.CAMERA). A rule chooses a
threshold from images with known labels; to score it honestly, each fold's held-out images are split in two
stratified halves: the threshold chosen on one half decides the other half's camera rows, and the halves swap.
Misses and false alarms are summed over the folds and both halves (every held-out image scored once per split
in halves) and averaged over --repeats random halvings. Each half holds about 126 images, fewer than train.py's
228 validation images, so every rule's threshold is noisier here than in training; the rules are compared on
the same halves.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from common import ROOT, default_data_dir, kept_folds, kept_folds_parser, machine_lines, markdown_table
from robustness import (MAGNIFICATIONS, PERTURBATIONS, changed_probabilities, decode_originals, perturbed_pixels,
                        scratches_in_view)

sys.path.insert(0, str(ROOT))
import dataset  # noqa: E402
from scratch_detector.augment import augment  # noqa: E402
from scratch_detector.evaluation import select_samples  # noqa: E402
from scratch_detector.metrics import choose_threshold, clipped_log_odds, find_annotations  # noqa: E402
from scratch_detector.model import load_checkpoint, predict_probabilities  # noqa: E402

COPIES = 4


def with_copies(probabilities, copies, labels, count):
    """The clean scores and the first `count` copies' scores, with their labels repeated."""
    return np.concatenate([probabilities, *copies[:count]]), np.tile(labels, count + 1)


def clean_first_then_copies(probabilities, copies, labels):
    """Among the cuts with the best Youden J on the clean images, the one with the best J on the copies; then
    the widest gap (in log-odds), as metrics.choose_threshold breaks its ties."""
    clean, changed = clipped_log_odds(probabilities), clipped_log_odds(np.concatenate(copies))
    changed_labels = np.tile(labels, len(copies))
    scores = np.unique(np.concatenate([clipped_log_odds([0.0, 1.0]), clean, changed]))
    best, cut = None, 0.0
    for low, high in zip(scores[:-1], scores[1:]):
        middle = (low + high) / 2
        j_clean = (clean[labels == 1] >= middle).mean() + (clean[labels == 0] < middle).mean()
        j_changed = (changed[changed_labels == 1] >= middle).mean() + (changed[changed_labels == 0] < middle).mean()
        key = (round(j_clean, 12), round(j_changed, 12), high - low)
        if best is None or key > best:
            best, cut = key, middle
    return float(1 / (1 + np.exp(-cut)))


RULES = {
    "validation images (train.py's rule)": lambda p, copies, y: choose_threshold(p, y),
    "validation images + 2 camera copies": lambda p, copies, y: choose_threshold(*with_copies(p, copies, y, 2)),
    f"validation images + {COPIES} camera copies": lambda p, copies, y: choose_threshold(*with_copies(p, copies, y, COPIES)),
    "validation images first, then the copies": clean_first_then_copies,
    "0.5": lambda p, copies, y: 0.5,
}


def fold_scores(checkpoint: Path, data_dir: Path, annotations: dict, seed: int) -> dict:
    """One fold's held-out images: labels, p(defect) per camera change, the in-view masks, and the copies' p."""
    model, meta = load_checkpoint(checkpoint)
    samples, _ = select_samples(data_dir, meta, "val")
    originals = decode_originals(samples)
    rows = changed_probabilities(model, meta, samples, "cpu", progress=False, originals=originals)
    clean = perturbed_pixels(originals, PERTURBATIONS["none"], int(meta["image_size"]))
    generator = torch.Generator().manual_seed(seed)
    copies = [predict_probabilities(model, augment(clean, generator, ("camera",)), meta["normalization"], 64,
                                    "cpu").numpy() for _ in range(COPIES)]
    in_view = {name: scratches_in_view(samples, originals, annotations, factor)
               for name, factor in MAGNIFICATIONS.items()}
    return {"labels": dataset.labels_of(samples), "rows": rows, "copies": copies, "in_view": in_view}


def stratified_half(labels, rng: np.random.Generator) -> np.ndarray:
    half = np.zeros(len(labels), bool)
    for value in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == value))
        half[members[:len(members) // 2]] = True
    return half


def count_errors(probabilities, labels, threshold, scored) -> tuple[int, int]:
    """(misses among the scratches in `scored`, false alarms among the non-scratches)."""
    called = probabilities >= threshold
    return int((~called & (labels == 1) & scored).sum()), int((called & (labels == 0)).sum())


def cross_fitted(folds: list[dict], rules: dict, repeats: int, seed: int = 0) -> dict:
    """rule -> change -> [mean misses, mean false alarms] over `repeats` halvings; rule -> thresholds chosen."""
    rng = np.random.default_rng(seed)
    totals = {rule: {name: np.zeros(2) for name in folds[0]["rows"]} for rule in rules}
    thresholds = {rule: [] for rule in rules}
    for _ in range(repeats):
        for fold in folds:
            labels = fold["labels"]
            half = stratified_half(labels, rng)
            for chooser, scored in ((half, ~half), (~half, half)):
                for rule, choose in rules.items():
                    threshold = choose(fold["rows"]["none"][chooser], [c[chooser] for c in fold["copies"]],
                                       labels[chooser])
                    thresholds[rule].append(threshold)
                    for name, probabilities in fold["rows"].items():
                        counted = fold["in_view"].get(name, labels == 1)[scored]
                        totals[rule][name] += count_errors(probabilities[scored], labels[scored], threshold, counted)
    return {rule: {name: t / repeats for name, t in by_change.items()} for rule, by_change in totals.items()}, thresholds


def parse_args(argv=None):
    return kept_folds_parser(__doc__).parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    checkpoints = kept_folds(args.folds)
    data_dir = default_data_dir(args.data_dir)
    annotations = find_annotations(data_dir)
    folds = [fold_scores(c, data_dir, annotations, seed=index) for index, c in enumerate(checkpoints)]
    errors, thresholds = cross_fitted(folds, RULES, args.repeats)
    scratches = sum(int(f["labels"].sum()) for f in folds)
    print("\n".join(f"- {line}" for line in machine_lines()))
    print(f"- {len(folds)} folds from {args.folds}: {sum(len(f['labels']) for f in folds)} held-out images, "
          f"{scratches} scratches; mean of {args.repeats} halvings; magnification rows count the scratches at "
          f"least half in view\n")
    names = list(folds[0]["rows"])
    rows = [[name + ("" if name in PERTURBATIONS else " (other value)"),
             *(f"{errors[rule][name][0]:.1f} / {errors[rule][name][1]:.1f}" for rule in RULES)] for name in names]
    asked = [name for name in names if name in PERTURBATIONS]
    rows.append(["**asked rows, all errors**", *(f"{sum(errors[rule][n].sum() for n in asked):.1f}" for rule in RULES)])
    rows.append(["threshold: median (10th-90th percentile)",
                 *("{:.2f} ({:.2f}-{:.2f})".format(np.median(t), *np.percentile(t, [10, 90]))
                   for t in thresholds.values())])
    print(markdown_table(["misses / false alarms", *RULES], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
