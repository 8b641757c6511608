"""Is p(defect) calibrated beyond one split? The expected calibration error of the recipe's five cross-validation
models, from the checkpoints that `python bench/crossval.py --keep DIR` kept, without training again.

    python bench/crossval.py --keep folds/           # once: five trainings
    python bench/calibration_cv.py --folds folds/    # then this, in a minute or two

Each fold's model trained on four fifths of train + validation and fitted its temperature on the fifth it held
out, as train.py fits the shipped model's on the validation split; here it is fitted again there by the current
rule (calibration.fit_temperature), so a change of the rule needs no retraining. Per fold:
  held out, in-sample   the ECE on that fifth with that temperature (fitted there: optimistic)
  test split            the ECE on the seed's test split, which no fold trains on or fits anything on: one more
                        retraining of the recipe scored as the shipped model is (a report; nothing is chosen here);
                        also with the temperature stored in the checkpoint (the rule it was trained with), and none
  halves                each held-out fifth split into two stratified halves, the temperature fitted on one half
                        (train.py's rule) calibrating the other, and swapped; the median over --repeats halvings.
                        The rule's smoothed targets (calibration.smoothed_targets) depend on how many images it
                        fits on, so this column shows the rule on about half a validation split's images.
Then the halves again for each --pseudo-counts value (the smoothed targets' pseudo-count, calibration.PSEUDO_COUNT
the rule's): which rule calibrates images it was not fitted on, without the test split. Also the log loss there,
which an overconfident rule cannot win.
ECE: 10 bins, as evaluate.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from common import ROOT, default_data_dir, kept_folds, kept_folds_parser, machine_lines, markdown_table
from threshold_rules import stratified_half

sys.path.insert(0, str(ROOT))
import dataset  # noqa: E402
from scratch_detector.calibration import PSEUDO_COUNT, expected_calibration_error, fit_temperature  # noqa: E402
from scratch_detector.evaluation import select_samples  # noqa: E402
from scratch_detector.model import fold_batchnorm, load_checkpoint, predict_logits  # noqa: E402

TARGET = 0.03  # the ECE target on one test split


def fold_logits(checkpoint: Path, data_dir: Path) -> dict:
    """One fold's held-out images and the test split: logits before any temperature and labels of each, and the
    temperature stored in the fold's checkpoint."""
    model, meta = load_checkpoint(checkpoint, calibrated=False)
    fold_batchnorm(model)
    fold = {"stored_temperature": float(meta["temperature"])}
    for split, prefix in (("val", ""), ("test", "test_")):
        samples, _ = select_samples(data_dir, meta, split)
        pixels = torch.from_numpy(dataset.load_pixels(samples, int(meta["image_size"]), progress=False))
        fold[prefix + "logits"] = predict_logits(model, pixels, meta["normalization"], 64, "cpu")[0].double()
        fold[prefix + "labels"] = dataset.labels_of(samples)
    return fold


def p_defect(logits: torch.Tensor, temperature: float) -> np.ndarray:
    return (logits / temperature).softmax(1)[:, 1].numpy()


def ece_on_test_split(fold: dict, temperature: float) -> float:
    """The calibration error of one fold's model on the test split, at this temperature."""
    return expected_calibration_error(p_defect(fold["test_logits"], temperature), fold["test_labels"])


def log_loss(probabilities, labels) -> float:
    """Mean negative log-likelihood of the true label under p(defect)."""
    p = np.clip(np.asarray(probabilities, np.float64), 1e-12, 1 - 1e-12)
    return float(-np.mean(np.where(np.asarray(labels) == 1, np.log(p), np.log(1 - p))))


def cross_fitted(folds: list[dict], repeats: int, seed: int = 0, pseudo_count: float | None = None) -> dict:
    """For each halving: every fold's held-out images calibrated by the temperature of the other half, fitted
    with this pseudo-count (default: the rule's).
    -> {"pooled": [ECE of all images, per halving], "per_fold": [[ECE per fold] per halving],
        "temperatures": [every fitted T], "probabilities": [pooled p per halving], "labels": pooled labels}."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([f["labels"] for f in folds])
    result = {"pooled": [], "per_fold": [], "temperatures": [], "probabilities": [], "labels": labels}
    for _ in range(repeats):
        pooled = []
        for fold in folds:
            half = stratified_half(fold["labels"], rng)
            p = np.empty(len(fold["labels"]))
            for fitted_on, scored in ((half, ~half), (~half, half)):
                temperature = fit_temperature(fold["logits"][fitted_on], fold["labels"][fitted_on], pseudo_count)
                result["temperatures"].append(temperature)
                p[scored] = p_defect(fold["logits"][scored], temperature)
            pooled.append(p)
        result["per_fold"].append([expected_calibration_error(p, f["labels"]) for p, f in zip(pooled, folds)])
        result["probabilities"].append(np.concatenate(pooled))
        result["pooled"].append(expected_calibration_error(result["probabilities"][-1], labels))
    return result


def parse_args(argv=None):
    p = kept_folds_parser(__doc__)
    p.add_argument("--pseudo-counts", type=float, nargs="+", default=[PSEUDO_COUNT, 1.0],
                   help="smoothed-target pseudo-counts to compare on the halves (default: %(default)s)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    folds = [fold_logits(checkpoint, default_data_dir(args.data_dir)) for checkpoint in kept_folds(args.folds)]
    for fold in folds:
        fold["temperature"] = fit_temperature(fold["logits"], fold["labels"])
    crossed = cross_fitted(folds, args.repeats)
    halves = np.median(np.asarray(crossed["per_fold"]), 0)
    print("\n".join(f"- {line}" for line in machine_lines()))
    print(f"- {len(folds)} folds from {args.folds}; test split {len(folds[0]['test_labels'])} images, "
          f"{int(folds[0]['test_labels'].sum())} scratches; {args.repeats} halvings; the rule's pseudo-count "
          f"{PSEUDO_COUNT:g}\n")
    rows, test_p, test_y, test_ece = [], [], [], []
    for index, fold in enumerate(folds):
        held_out = expected_calibration_error(p_defect(fold["logits"], fold["temperature"]), fold["labels"])
        test_p.append(p_defect(fold["test_logits"], fold["temperature"])), test_y.append(fold["test_labels"])
        test_ece.append(expected_calibration_error(test_p[-1], fold["test_labels"]))  # from test_p: p computed once
        rows.append([str(index), f"{len(fold['labels'])} ({int(fold['labels'].sum())})",
                     f"{fold['temperature']:.3f} (stored {fold['stored_temperature']:.3f})",
                     f"{held_out:.4f}", f"**{test_ece[-1]:.4f}**",
                     f"{ece_on_test_split(fold, fold['stored_temperature']):.4f}",
                     f"{ece_on_test_split(fold, 1.0):.4f}", f"{halves[index]:.4f}"])
    in_sample = np.concatenate([p_defect(f["logits"], f["temperature"]) for f in folds])
    rows.append(["all", f"{len(crossed['labels'])} ({int(crossed['labels'].sum())})", "",
                 f"{expected_calibration_error(in_sample, crossed['labels']):.4f}",
                 f"median {np.median(test_ece):.4f}; {sum(e > TARGET for e in test_ece)} of {len(folds)} over {TARGET}",
                 "", "", f"{np.median(crossed['pooled']):.4f}"])
    print(markdown_table(["fold", "held-out images (scratches)", "temperature (fitted on them)",
                          "ECE held out (in-sample)", "ECE on the test split", "test split, the stored temperature",
                          "test split, no temperature",
                          "ECE held out, temperature from the other half"], rows))
    temperatures = np.asarray(crossed["temperatures"])
    pooled = np.concatenate(test_p)
    print(f"\nThe test split under all {len(folds)} models together ({len(pooled)} scorings): ECE "
          f"{expected_calibration_error(pooled, np.concatenate(test_y)):.4f}. Temperatures fitted on half a fold: "
          f"median {np.median(temperatures):.3f} ({np.percentile(temperatures, 10):.3f} to "
          f"{np.percentile(temperatures, 90):.3f}, 10th to 90th percentile).")
    print("\nThe rule's pseudo-count, compared on the halves (no test split): median over the halvings\n")
    rows = []
    for count in args.pseudo_counts:
        halved = crossed if count == PSEUDO_COUNT else cross_fitted(folds, args.repeats, pseudo_count=count)
        per_fold = np.median(np.asarray(halved["per_fold"]), 0)
        losses = [log_loss(p, halved["labels"]) for p in halved["probabilities"]]
        rows.append([f"{count:g}" + (" (the rule's)" if count == PSEUDO_COUNT else ""),
                     f"{np.median(halved['temperatures']):.3f}", f"{np.median(halved['pooled']):.4f}",
                     ", ".join(f"{e:.4f}" for e in per_fold), f"{np.median(losses):.4f}"])
    print(markdown_table(["pseudo-count", "temperature", "ECE, all held-out images", "ECE per fold",
                          "log loss"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
