"""Measure the shipped model: classification metrics, and whether its heatmaps point at the scratch.

    python evaluate.py                      # held-out test split -> outputs/metrics.json + outputs/report.pdf
    python evaluate.py --split val          # the split the default CAM was chosen on
    python evaluate.py --data-dir NEW --split all   # every image of a separate test set

Localization uses the NEU-DET boxes (ANNOTATIONS/*.xml, matched to images by file name) of the scratch
images, with the heatmap for class "defect" resized to the image's original geometry:
  pointing game  = mean over images of the share of the heatmap's maximal pixels inside a ground-truth box (one
                   maximum: hit or miss; a tie scores what a random tie-break would); a flat map has no
                   maximum and is a miss, so a CAM that says nothing cannot score;
  energy in box  = share of the heatmap's total mass inside the boxes (a uniform map scores ~0.19 here).
"""
from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import dataset
from gradcam import GradCAM, METHODS, resolve_layer
from infer import DEFAULT_CAM, DEFAULT_CAM_LAYER
from model import fold_batchnorm, load_checkpoint, pick_device, predict_probabilities
from runtime import UserError, atomic_write, ensure_writable_dir, run_main

SWEEP_LAYERS = [f"features.{i}" for i in range(0, 9)]


# ---------------------------------------------------------------------------------------------------------
# Classification metrics
# ---------------------------------------------------------------------------------------------------------
def binary_metrics(probabilities, labels, threshold: float) -> dict:
    """Accuracy, precision, recall (scratches found), specificity, F1, log-loss, confusion matrix."""
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


# ---------------------------------------------------------------------------------------------------------
# Localization
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


def localization_scores(model, pixels, boxes, normalization: str, method: str, layer: str, batch_size: int,
                        device) -> dict:
    """Pointing game and energy-in-box of one CAM method x layer over (pixels, (size, boxes)) pairs: each
    heatmap is resized to its image's original (width, height) and scored with pointing_hit (a fraction for
    ties, 0 for a flat map) and energy_in_box, then averaged over the images."""
    cam = GradCAM(model, resolve_layer(model, layer), method)
    hits, energies = [], []
    for start in range(0, len(pixels), batch_size):
        images = dataset.normalize(pixels[start:start + batch_size], normalization).to(device)
        heatmaps = cam(images, target_class=1).cpu()
        for heatmap, (size, image_boxes) in zip(heatmaps, boxes[start:start + batch_size]):
            original = F.interpolate(heatmap[None, None], size=(size[1], size[0]), mode="bilinear",
                                     align_corners=False)[0, 0].numpy()
            mask = box_mask(size, image_boxes)
            hits.append(pointing_hit(original, mask))
            energies.append(energy_in_box(original, mask))
    return {"method": method, "layer": layer, "pointing_game": float(np.mean(hits)) if hits else float("nan"),
            "energy_in_box": float(np.mean(energies)) if energies else float("nan"), "n_images": len(hits)}


# ---------------------------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------------------------
def select_samples(data_dir: Path, meta: dict, split: str) -> tuple[list, dict]:
    """The images to evaluate: the checkpoint's own val/test split re-derived (and verified), or all."""
    samples, layout = dataset.find_samples(data_dir, require_all_classes=(split != "all"))
    info = {"data_dir": str(data_dir), "layout": layout, "split": split}
    if split == "all":
        return samples, {**info, "n_images_in_data": len(samples)}
    recorded = meta.get("split") or {}
    limit = int((meta.get("hyperparameters") or {}).get("max_per_class", 0))
    samples = dataset.first_per_class(samples, limit)
    seed = int(recorded.get("seed", meta.get("seed", 0)))
    splits = dataset.split_samples(samples, seed)
    if recorded.get("cv_folds"):
        splits = dataset.cross_validation_fold(splits, int(recorded["cv_fold"]), int(recorded["cv_folds"]), seed)
    if recorded.get("test_digest") and dataset.split_digest(splits["test"]) != recorded["test_digest"]:
        raise UserError(f"the test split re-derived from {data_dir} differs from the one this model was trained "
                        f"with (other data?); for a separate test set use --split all")
    return splits[split], {**info, **{f"n_{name}": len(items) for name, items in splits.items()}}


def evaluate(args) -> dict:
    output = ensure_writable_dir(args.output, "the output folder")
    device = pick_device(args.device)
    model, meta = load_checkpoint(args.model, device)
    fold_batchnorm(model)
    data_dir = dataset.resolve_data_dir(args.data_dir)
    samples, split_info = select_samples(data_dir, meta, args.split)
    if not samples:
        raise UserError(f"no images in the {args.split} split")
    image_size, threshold = int(meta["image_size"]), float(meta["threshold"])

    print(f"evaluating {len(samples)} images ({args.split}) with {args.model}")
    pixels = torch.from_numpy(dataset.load_pixels(samples, image_size))
    labels = dataset.labels_of(samples)
    probabilities = predict_probabilities(model, pixels, meta["normalization"], args.batch_size, device).numpy()
    metrics = binary_metrics(probabilities, labels, threshold)
    predicted = probabilities >= threshold
    metrics["roc_auc"] = roc_auc(probabilities, labels)
    metrics["per_class"] = {
        c: {"count": int(sum(s.neu_class == c for s in samples)),
            "correct_fraction": float(np.mean([predicted[i] == s.label for i, s in enumerate(samples)
                                               if s.neu_class == c])) if any(s.neu_class == c for s in samples)
            else float("nan")}
        for c in dataset.NEU_CLASSES}
    metrics["misclassified"] = [s.relpath for i, s in enumerate(samples) if predicted[i] != s.label]

    annotations = find_annotations(data_dir)
    boxed = [i for i, s in enumerate(samples) if s.label == 1 and Path(s.relpath).stem in annotations]
    boxes = [read_boxes(annotations[Path(samples[i].relpath).stem]) for i in boxed]
    table = []
    if boxed:
        combos = [(m, l) for m in METHODS for l in SWEEP_LAYERS] if args.sweep else []
        if (args.cam, args.cam_layer) not in combos:
            combos.append((args.cam, args.cam_layer))
        for method, layer in tqdm(combos, desc="localization", unit="cam", file=sys.stdout):
            table.append(localization_scores(model, pixels[boxed], boxes, meta["normalization"], method, layer,
                                             args.batch_size, device))
        default = next(r for r in table if (r["method"], r["layer"]) == (args.cam, args.cam_layer))
        metrics["localization"] = default
    else:
        print("no ANNOTATIONS (*.xml) for the scratch images here: localization skipped")
        metrics["localization"] = None
    metrics["localization_table"] = table
    metrics["model"] = {k: meta.get(k) for k in ("arch", "pretrained", "epochs", "image_size",
                                                 "normalization", "threshold", "seed", "date", "split",
                                                 "val_metrics", "hyperparameters")}
    metrics["data"] = split_info
    metrics["probabilities"] = {s.relpath: round(float(p), 6) for s, p in zip(samples, probabilities)}

    with atomic_write(output / "metrics.json") as handle:
        json.dump(metrics, handle, indent=2)
    print(summary_line(metrics))
    if not args.no_report:
        import report
        pages = report.write_report(output, metrics, meta, samples, pixels, probabilities, boxed, boxes,
                                    model, args, device)
        print(f"report: {output / 'report.pdf'} ({pages} pages) and its figures as PNG in {output}/")
        page = write_review(output, samples, pixels, probabilities, threshold, meta, split_info, model, args,
                            device)
        print(f"review page: {page} (overlays in {output / REVIEW_OVERLAY_DIR}/)")
    print(f"metrics: {output / 'metrics.json'}")
    return metrics


REVIEW_OVERLAY_DIR = "eval_overlays"


def write_review(output: Path, samples, pixels, probabilities, threshold: float, meta: dict, data: dict, model,
                 args, device) -> Path:
    """review.html beside report.pdf: every evaluated image with its verdict, true label (wrong verdicts marked)
    and an overlay like infer.py's (args.cam on args.cam_layer, class defect) in eval_overlays/. Overlays that
    this run did not write (an earlier evaluation of other images) are removed from that folder."""
    import review
    from gradcam import encode_overlay, render_overlay
    from infer import OVERLAY_DIR, overlay_names
    from pipeline import DISPLAY_MAX_SIDE
    from PIL import Image

    names = {relpath: REVIEW_OVERLAY_DIR + name[len(OVERLAY_DIR):]
             for relpath, name in overlay_names([s.relpath for s in samples]).items()}
    cam = GradCAM(model, resolve_layer(model, args.cam_layer), args.cam)
    rows, written = [], set()
    for start in tqdm(range(0, len(samples), args.batch_size), desc="review page", unit="batch", file=sys.stdout):
        end = min(start + args.batch_size, len(samples))
        images = dataset.normalize(pixels[start:end], meta["normalization"]).to(device)
        heatmaps = cam(images, target_class=1).cpu().numpy()
        for sample, heatmap, probability in zip(samples[start:end], heatmaps, probabilities[start:end]):
            prediction = dataset.BINARY_CLASSES[int(probability >= threshold)]
            overlay, status = names[sample.relpath], "ok"
            try:
                shown = dataset.open_image(sample.path, int(meta["image_size"]))
                shown.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE), Image.BILINEAR)
                encoded = encode_overlay(render_overlay(np.asarray(shown), heatmap, prediction, float(probability)))
                with atomic_write(output / overlay, "wb", fsync=False) as handle:
                    handle.write(encoded)
                written.add(overlay)
            except Exception as error:  # one overlay failing must not cost the page
                overlay, status = "", f"error: overlay not written: {type(error).__name__}: {error}"
            rows.append({"image": sample.relpath, "prediction": prediction, "defect_probability": float(probability),
                         "gradcam": overlay, "status": status, "truth": dataset.BINARY_CLASSES[sample.label]})
    folder = output / REVIEW_OVERLAY_DIR
    for old in folder.rglob("*_gradcam.jpg") if folder.is_dir() else ():
        if old.relative_to(output).as_posix() not in written and not old.is_symlink():
            old.unlink()
    summary = review.model_summary(args.model, meta, threshold, data=f"{data['data_dir']} ({data['layout']})",
                                   split=f"{data['split']} ({len(samples)} images)",
                                   explanation=f"{args.cam} on {args.cam_layer}")
    return review.write_review_page(output / "review.html", rows, summary,
                                    title="Scratch detector: evaluation review")


def summary_line(metrics: dict) -> str:
    cm = metrics["confusion_matrix"]
    text = (f"{metrics['n_images']} images: accuracy {metrics['accuracy']:.4f}, scratch recall {metrics['recall']:.4f}, "
            f"precision {metrics['precision']:.4f}, specificity {metrics['specificity']:.4f}, "
            f"ROC AUC {metrics['roc_auc']:.4f} (tn {cm['tn']} fp {cm['fp']} fn {cm['fn']} tp {cm['tp']})")
    loc = metrics.get("localization")
    if loc:
        text += (f"; {loc['method']} on {loc['layer']}: pointing game {loc['pointing_game']:.3f}, "
                 f"energy in box {loc['energy_in_box']:.3f} ({loc['n_images']} scratch images)")
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help=f"NEU data (default: $NEU_DATA_DIR, else {dataset.DEFAULT_DATA_DIR})")
    p.add_argument("--model", default="model_binary.pth")
    p.add_argument("--split", choices=["test", "val", "all"], default="test",
                   help="the model's held-out test split (default), its validation split, or every image")
    p.add_argument("--output", default="outputs", help="folder for metrics.json, report.pdf, figures")
    p.add_argument("--cam", choices=sorted(METHODS), default=DEFAULT_CAM)
    p.add_argument("--cam-layer", default=DEFAULT_CAM_LAYER)
    p.add_argument("--no-sweep", dest="sweep", action="store_false",
                   help=f"score only --cam/--cam-layer, not every method x {SWEEP_LAYERS[0]}..{SWEEP_LAYERS[-1]}")
    p.add_argument("--no-report", action="store_true", help="metrics.json only")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return p.parse_args(argv)


def main(argv=None) -> int:
    evaluate(parse_args(argv))
    return 0


if __name__ == "__main__":
    run_main(main, skip_teardown=True)
