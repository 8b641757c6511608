"""p(defect) that means what it says: one temperature T, fitted on the validation logits (Guo et al. 2017),
divides the logits before the softmax. train.py fits and stores it ("temperature"); load_checkpoint applies
it, once, by dividing the head's weights and bias (apply_temperature), so every reader of a checkpoint
(infer, evaluate, the benches) gets the same calibrated p from the same file. A checkpoint without one
has T = 1. Also the expected calibration error and the reliability table that evaluate.py reports.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

# T is searched on a log grid within these bounds.
T_MIN, T_MAX = 0.05, 20.0
# The smoothed targets' pseudo-count per class (smoothed_targets). Jeffreys' 0.5 rather than Platt's 1: with
# either, a temperature fitted on half of a held-out fold calibrated the other half, but with 0.5 better, in
# every fold of the cross-validation (bench/README.md, calibration; `python bench/calibration_cv.py`).
PSEUDO_COUNT = 0.5
RELIABILITY_BINS = 10
# The ECE's uncertainty: a percentile interval over this many resamples of the images, with a fixed seed so that
# the same predictions always report the same interval.
BOOTSTRAP_ROUNDS, BOOTSTRAP_SEED = 2000, 0


def smoothed_targets(labels: torch.Tensor, pseudo_count: float | None = None) -> torch.Tensor:
    """Smoothed targets: (N+ + a) / (N+ + 2a) for the scratches and a / (N- + 2a) for the rest, instead of 1
    and 0 (a = pseudo_count, default PSEUDO_COUNT). When the model separates the validation split perfectly (it
    often does), the plain likelihood keeps rising as T falls to 0 and every p becomes 0 or 1; these targets say
    what so few images can support, so T stops where p(defect) is as sure as the validation split's size allows.
    a = 1 is Platt's (1999) add-one; a = 0.5, Jeffreys' prior, is the default."""
    a = PSEUDO_COUNT if pseudo_count is None else float(pseudo_count)
    positives = float((labels == 1).sum())
    negatives = float(len(labels)) - positives
    return torch.where(labels == 1, (positives + a) / (positives + 2 * a), a / (negatives + 2 * a)).double()


def negative_log_likelihood(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    """Cross-entropy of p(defect) = softmax(logits / T)[:, 1] against soft targets (the share that is a scratch)."""
    log_p = torch.log_softmax(logits.double() / temperature, 1)
    return float(-(targets * log_p[:, 1] + (1 - targets) * log_p[:, 0]).mean())


def fit_temperature(logits, labels, pseudo_count: float | None = None) -> float:
    """The T in [T_MIN, T_MAX] that minimises the validation cross-entropy against smoothed_targets (with this
    pseudo_count; default PSEUDO_COUNT): a coarse log grid, then golden-section refinement (the loss is unimodal
    in log T)."""
    logits = torch.as_tensor(logits).double()
    targets = smoothed_targets(torch.as_tensor(labels).long(), pseudo_count)
    grid = np.exp(np.linspace(np.log(T_MIN), np.log(T_MAX), 61))
    losses = [negative_log_likelihood(logits, targets, t) for t in grid]
    best = int(np.argmin(losses))
    low, high = np.log(grid[max(best - 1, 0)]), np.log(grid[min(best + 1, len(grid) - 1)])
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        if negative_log_likelihood(logits, targets, np.exp(a)) < negative_log_likelihood(logits, targets, np.exp(b)):
            high = b
        else:
            low = a
    return float(np.exp((low + high) / 2))


def apply_temperature(model: nn.Module, temperature: float) -> nn.Module:
    """Divide the last Linear layer's weight and bias by T: its logits become logits / T."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.weight.div_(temperature)
        head.bias.div_(temperature)
    return model


def reliability_table(probabilities, labels, bins: int = RELIABILITY_BINS) -> list[dict]:
    """Equal-width bins of predicted p(defect): per bin its count, mean predicted p and observed scratch rate
    (the reliability diagram's points). Empty bins are kept, with count 0."""
    p, y = np.asarray(probabilities, np.float64), np.asarray(labels, np.float64)
    index = np.minimum((p * bins).astype(int), bins - 1)
    table = []
    for b in range(bins):
        inside = index == b
        n = int(inside.sum())
        table.append({"low": b / bins, "high": (b + 1) / bins, "count": n,
                      "mean_p": float(p[inside].mean()) if n else float("nan"),
                      "scratch_rate": float(y[inside].mean()) if n else float("nan")})
    return table


def expected_calibration_error(probabilities, labels, bins: int = RELIABILITY_BINS) -> float:
    """ECE of p(defect) as a probability of 'scratch': the count-weighted mean |observed rate - mean p| over
    equal-width bins."""
    p, y = np.asarray(probabilities, np.float64), np.asarray(labels, np.float64)
    if not len(p):
        return float("nan")
    index = np.minimum((p * bins).astype(int), bins - 1)  # reliability_table's bins, counted in one pass
    gaps = np.bincount(index, weights=y, minlength=bins) - np.bincount(index, weights=p, minlength=bins)
    return float(np.abs(gaps).sum() / len(p))


def ece_interval(probabilities, labels, level: float = 0.95, rounds: int = BOOTSTRAP_ROUNDS,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """A bootstrap percentile interval of the ECE: the images resampled with replacement. On a few hundred
    images the ECE moves by more than a target's margin, so a figure next to a target needs its spread. Like the
    ECE itself it leans high (resampling adds noise to every bin's gap): read it with ece_if_calibrated."""
    p, y = np.asarray(probabilities, np.float64), np.asarray(labels, np.float64)
    if not len(p):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):  # one resample at a time: memory stays that of one copy of the predictions
        draw = rng.integers(0, len(p), len(p))
        values.append(expected_calibration_error(p[draw], y[draw]))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def ece_if_calibrated(probabilities, level: float = 0.95, rounds: int = BOOTSTRAP_ROUNDS,
                      seed: int = BOOTSTRAP_SEED) -> float:
    """The ECE that a perfectly calibrated model making exactly these predictions would stay under with
    probability `level` on this many images: labels drawn as Bernoulli(p) (consistency resampling, Broecker and
    Smith 2007). The ECE is never 0 on a finite split; an observed ECE above this is more than chance."""
    p = np.asarray(probabilities, np.float64)
    if not len(p):
        return float("nan")
    rng = np.random.default_rng(seed)
    values = [expected_calibration_error(p, rng.uniform(size=len(p)) < p) for _ in range(rounds)]
    return float(np.percentile(values, level * 100))


def calibration_summary(logits: torch.Tensor, labels, temperature: float) -> dict:
    """ECE of p(defect) with the checkpoint's temperature (the p every reader gets), its 95 % bootstrap
    interval and what a perfectly calibrated model would show, the ECE without the temperature, and the
    reliability table. `logits` are load_checkpoint's: already divided by the temperature."""
    calibrated = logits.softmax(1)[:, 1].numpy()
    raw = (logits * temperature).softmax(1)[:, 1].numpy()
    return {"temperature": float(temperature), "ece": expected_calibration_error(calibrated, labels),
            "ece_interval_95": list(ece_interval(calibrated, labels)),
            "ece_if_calibrated_95": ece_if_calibrated(calibrated),
            "ece_without_temperature": expected_calibration_error(raw, labels),
            "reliability": reliability_table(calibrated, labels)}
