"""Metrics: binary classification (confusion counts, ROC, precision-recall), the decision-threshold rule,
and how well a heatmap points at a scratch's annotated boxes (Pascal VOC files, as NEU-DET's).

Localization scores the heatmap for class "defect" as the overlay draws it (overlay.drawn_heat: resized to the
image's original geometry, smoothed, heat below the floor not drawn; smoothing=0, floor=0 scores the raw map):
  pointing game  = mean over images of the share of the heatmap's maximal pixels inside a ground-truth box (one
                   maximum: hit or miss; a tie scores what a random tie-break would); a flat map has no
                   maximum and is a miss, so a CAM that says nothing cannot score;
  energy in box  = share of the heatmap's total mass inside the boxes (a uniform map scores the boxes' share
                   of the image).
"""
from __future__ import annotations

import math
import statistics
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

import dataset
from gradcam import GradCAM, resolve_layer

from .overlay import HEAT_FLOOR, SMOOTHING, drawn_heat


# ---------------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------------
def wilson_interval(successes: int, n: int, level: float = 0.95) -> list[float]:
    """Wilson score interval of a proportion: what `successes` of `n` allows the true rate to be. It stays inside
    [0, 1] and is not empty at 0 or n (38 of 38 scratches found still allows a recall of about 0.91)."""
    if not n:
        return [float("nan"), float("nan")]
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    rate = successes / n
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [0.0 if successes == 0 else centre - half, 1.0 if successes == n else centre + half]


def binary_metrics(probabilities, labels, threshold: float) -> dict:
    """Accuracy, precision, recall (scratches found), specificity, F1, log-loss, confusion matrix, and the 95 %
    Wilson intervals of accuracy, recall and specificity (a few hundred images leave them wide)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    predicted = (probabilities >= threshold).astype(int)
    tp = int(np.sum((predicted == 1) & (labels == 1)))
    tn = int(np.sum((predicted == 0) & (labels == 0)))
    fp = int(np.sum((predicted == 1) & (labels == 0)))
    fn = int(np.sum((predicted == 0) & (labels == 1)))

    def ratio(a, b):
        return a / b if b else float("nan")

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    clipped = np.clip(probabilities, 1e-7, 1 - 1e-7)
    return {
        "n_images": int(len(labels)),
        "threshold": float(threshold),
        "accuracy": ratio(tp + tn, len(labels)),
        "precision": precision,
        "recall": recall,
        "specificity": ratio(tn, tn + fp),
        "f1": ratio(2 * precision * recall, precision + recall) if tp else 0.0,
        "loss": float(-np.mean(np.where(labels == 1, np.log(clipped), np.log(1 - clipped)))) if len(labels) else float("nan"),
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "intervals_95": {"accuracy": wilson_interval(tp + tn, len(labels)), "recall": wilson_interval(tp, tp + fn),
                         "specificity": wilson_interval(tn, tn + fp)},
    }


def roc_auc(probabilities, labels) -> float:
    """Area under the ROC curve = P(score of a random defect > score of a random non-defect), ties count half."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels)
    positives, negatives = probabilities[labels == 1], probabilities[labels == 0]
    if not len(positives) or not len(negatives):
        return float("nan")
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


def curve_points(probabilities, labels):
    """ROC (fpr, tpr) and precision-recall points for every threshold, highest threshold first."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels)
    thresholds = np.concatenate([[np.inf], np.unique(probabilities)[::-1]])
    tpr, fpr, precision = [], [], []
    for t in thresholds:
        predicted = probabilities >= t
        tp, fp = np.sum(predicted & (labels == 1)), np.sum(predicted & (labels == 0))
        tpr.append(tp / max(1, np.sum(labels == 1)))
        fpr.append(fp / max(1, np.sum(labels == 0)))
        precision.append(tp / (tp + fp) if tp + fp else 1.0)
    return np.array(fpr), np.array(tpr), np.array(precision), thresholds


def clipped_log_odds(probabilities, eps: float = 1e-6) -> np.ndarray:
    """log(p / (1 - p)) with p clipped to [eps, 1 - eps]: the scale choose_threshold cuts on."""
    probabilities = np.clip(np.asarray(probabilities, dtype=np.float64), eps, 1 - eps)
    return np.log(probabilities / (1 - probabilities))


def choose_threshold(probabilities, labels, eps: float = 1e-6) -> float:
    """The decision threshold, chosen on validation data.

    Rule: maximise Youden's J (recall + specificity - 1) over all cut points; among the cut points that tie,
    take the widest gap between a non-defect score and a defect score, and cut in its middle measured in
    log-odds, the scale on which the network's scores live. (Halfway in probability would put the cut next
    to the scratches whenever the non-defects sit near 0: a gap from 0.01 to 0.6 is cut at 0.11, not 0.31.)
    Scores are clipped to [eps, 1 - eps]. With no validation defects or no non-defects, 0.5.
    """
    labels = np.asarray(labels)
    if not (labels == 1).any() or not (labels == 0).any():
        return 0.5
    log_odds = clipped_log_odds(probabilities, eps)
    scores = np.unique(np.concatenate([[math.log(eps / (1 - eps)), math.log((1 - eps) / eps)], log_odds]))
    best_j, tied = -np.inf, []
    for low, high in zip(scores[:-1], scores[1:]):
        predicted = log_odds >= (low + high) / 2
        j = predicted[labels == 1].mean() + (~predicted[labels == 0]).mean() - 1
        if j > best_j + 1e-12:
            best_j, tied = j, [(low, high)]
        elif abs(j - best_j) <= 1e-12:
            tied.append((low, high))
    low, high = max(tied, key=lambda interval: interval[1] - interval[0])
    return float(1 / (1 + math.exp(-(low + high) / 2)))


# ---------------------------------------------------------------------------------------------------------
# Localization: how well a heatmap points at the annotated scratch
# ---------------------------------------------------------------------------------------------------------
def read_boxes(xml_path: Path) -> tuple[tuple[int, int], list[tuple[int, int, int, int]]]:
    """Pascal VOC file -> ((width, height), [(x0, y0, x1, y1) as 0-based half-open pixel ranges])."""
    root = ET.parse(xml_path).getroot()
    size = root.find("size")
    width, height = int(float(size.find("width").text)), int(float(size.find("height").text))
    boxes = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        x0, y0, x1, y1 = (int(float(box.find(k).text)) for k in ("xmin", "ymin", "xmax", "ymax"))
        # VOC coordinates are 1-based and inclusive
        boxes.append((max(0, x0 - 1), max(0, y0 - 1), min(width, x1), min(height, y1)))
    return (width, height), boxes


def box_mask(size: tuple[int, int], boxes) -> np.ndarray:
    width, height = size
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    return mask


def pointing_hit(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Pointing-game score of one heatmap in [0, 1]: 1 if its maximum lies inside the boxes, 0 if outside.

    Ties score the share of the maximal pixels inside, what a random tie-break gives on average: counting a
    tie as a hit when any maximal pixel is inside would let a flat map (all tied) hit every box. A flat map
    (max == min, e.g. all zeros) points nowhere and scores 0."""
    peak = heatmap.max()
    if not np.isfinite(peak) or peak <= heatmap.min():
        return 0.0
    return float(mask[heatmap == peak].mean())


def energy_in_box(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of the heatmap's mass inside the boxes; an all-zero map has no mass and scores 0."""
    total = float(heatmap.sum())
    return float(heatmap[mask].sum()) / total if total > 0 else 0.0


def find_annotations(data_dir: Path) -> dict[str, Path]:
    """Image stem -> VOC annotation file, for every *.xml under the data folder."""
    return {p.stem: p for p in data_dir.rglob("*") if p.suffix.lower() == ".xml"}


def cam_maps(model, pixels, normalization: str, method: str, layer: str, batch_size: int, device) -> np.ndarray:
    """(N, H, W) heatmaps for class defect, at the model's input size (gradcam's [0, 1] scaling)."""
    cam = GradCAM(model, resolve_layer(model, layer), method)
    maps = [cam(dataset.normalize(pixels[start:start + batch_size], normalization).to(device), target_class=1).cpu()
            for start in range(0, len(pixels), batch_size)]
    return np.concatenate([m.numpy() for m in maps]) if maps else np.zeros((0, 1, 1), np.float32)


def score_maps(heatmaps, boxes, smoothing: float = SMOOTHING, floor: float = HEAT_FLOOR) -> dict:
    """Pointing game and energy in box of heatmaps against their (size, boxes), each map scored as drawn on
    its image's original (width, height) (overlay.drawn_heat with this smoothing and floor), then averaged."""
    hits, energies = [], []
    for heatmap, (size, image_boxes) in zip(heatmaps, boxes):
        drawn = drawn_heat(heatmap, size, smoothing=smoothing, floor=floor)
        mask = box_mask(size, image_boxes)
        hits.append(pointing_hit(drawn, mask))
        energies.append(energy_in_box(drawn, mask))
    return {"pointing_game": float(np.mean(hits)) if hits else float("nan"),
            "energy_in_box": float(np.mean(energies)) if energies else float("nan"), "n_images": len(hits),
            "map": {"smoothing": smoothing, "floor": floor}}


def localization_scores(model, pixels, boxes, normalization: str, method: str, layer: str, batch_size: int,
                        device, smoothing: float = SMOOTHING, floor: float = HEAT_FLOOR) -> dict:
    """Pointing game and energy-in-box of one CAM method x layer over (pixels, (size, boxes)) pairs, on the
    map as the overlay draws it (score_maps: pointing_hit, a fraction for ties, 0 for a flat map; and
    energy_in_box), averaged over the images."""
    maps = cam_maps(model, pixels, normalization, method, layer, batch_size, device)
    return {"method": method, "layer": layer, **score_maps(maps, boxes, smoothing, floor)}
