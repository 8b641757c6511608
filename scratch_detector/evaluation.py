"""One evaluation of a checkpoint on labelled NEU images: metrics.json, and unless --no-report, report.pdf
(report.py) and review.html (review.py, overlays drawn by the inference pipeline). evaluate.py parses the
command line and calls evaluate(); the metrics themselves are metrics.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import dataset
from gradcam import METHODS, GradCAM, resolve_layer

from . import familiarity
from .calibration import calibration_summary
from .metrics import binary_metrics, find_annotations, localization_scores, read_boxes, roc_auc
from .model import fold_batchnorm, load_checkpoint, pick_device, predict_logits
from .pipeline import Aggregator, decode, finish_item
from .review import model_summary, write_review_page
from .runtime import UserError, atomic_write, ensure_writable_dir
from .settings import OVERLAY_DIR, overlay_names

SWEEP_LAYERS = [f"features.{i}" for i in range(0, 9)]
REVIEW_OVERLAY_DIR = "eval_overlays"


def select_samples(data_dir: Path, meta: dict, split: str, labels: str | Path | None = None) -> tuple[list, dict]:
    """The images to evaluate: the checkpoint's own val/test split re-derived (and verified), or all.
    labels: a labels file (dataset.read_labels) whose paths are relative to data_dir, instead of NEU data."""
    if labels:
        samples, layout = dataset.read_labels(labels, data_dir), "labels"
    else:
        samples, layout = dataset.find_samples(data_dir, require_all_classes=(split != "all"))
    info = {"data_dir": str(data_dir), "layout": layout, "split": split, **({"labels": str(labels)} if labels else {})}
    if split == "all":
        return samples, {**info, "n_images_in_data": len(samples)}
    try:
        splits = dataset.recorded_splits(samples, dataset.split_record(meta, neu=not labels))
    except dataset.DataError:
        raise UserError(f"the test split re-derived from {labels or data_dir} differs from the one this model was "
                        f"trained with (other data?); for a separate test set use --split all") from None
    return splits[split], {**info, **{f"n_{name}": len(items) for name, items in splits.items()}}


def evaluate(args) -> dict:
    output = ensure_writable_dir(args.output, "the output folder")
    device = pick_device(args.device)
    model, meta = load_checkpoint(args.model, device)
    fold_batchnorm(model)
    data_dir = dataset.resolve_data_dir(args.data_dir, getattr(args, "labels", None))
    samples, split_info = select_samples(data_dir, meta, args.split, getattr(args, "labels", None))
    if not samples:
        raise UserError(f"no images in the {args.split} split")
    image_size, threshold = int(meta["image_size"]), float(meta["threshold"])

    print(f"evaluating {len(samples)} images ({args.split}) with {args.model} "
          f"(initialisation: {meta.get('pretrained') or 'unknown'})")
    pixels = torch.from_numpy(dataset.load_pixels(samples, image_size))
    labels = dataset.labels_of(samples)
    stats = meta.get("familiarity")
    logits, features = predict_logits(model, pixels, meta["normalization"], args.batch_size, device,
                                      None if stats is None else familiarity.layers(stats))
    probabilities = logits.softmax(1)[:, 1].numpy()
    scores = None if stats is None else familiarity.unfamiliarity(features, pixels, stats).numpy()
    metrics = binary_metrics(probabilities, labels, threshold)
    predicted = probabilities >= threshold
    metrics["roc_auc"] = roc_auc(probabilities, labels)
    metrics["per_class"] = {
        c: {"count": int(sum(s.neu_class == c for s in samples)),
            "correct_fraction": float(np.mean([predicted[i] == s.label for i, s in enumerate(samples)
                                               if s.neu_class == c])) if any(s.neu_class == c for s in samples)
            else float("nan")}
        for c in dataset.CLASSES if c in dataset.NEU_CLASSES or any(s.neu_class == c for s in samples)}
    metrics["misclassified"] = [s.relpath for i, s in enumerate(samples) if predicted[i] != s.label]
    metrics["calibration"] = calibration_summary(logits, labels, meta["temperature"])
    metrics["familiarity"] = None if scores is None else {
        "cutoff": float(stats["cutoff"]), "n_unfamiliar": int((scores > stats["cutoff"]).sum()),
        "share_unfamiliar": float((scores > stats["cutoff"]).mean()),
        "unfamiliar": [s.relpath for s, value in zip(samples, scores) if value > stats["cutoff"]]}

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
        from . import report
        pages = report.write_report(output, metrics, meta, samples, pixels, probabilities, boxed, boxes,
                                    model, args, device)
        print(f"report: {output / 'report.pdf'} ({pages} pages) and its figures as PNG in {output}/")
        page = write_review(output, samples, pixels, probabilities, threshold, meta, split_info, model, args,
                            device, scores)
        print(f"review page: {page} (overlays in {output / REVIEW_OVERLAY_DIR}/)")
    print(f"metrics: {output / 'metrics.json'}")
    return metrics



def write_review(output: Path, samples, pixels, probabilities, threshold: float, meta: dict, data: dict, model,
                 args, device, scores=None) -> Path:
    """review.html beside report.pdf: every evaluated image with its verdict, true label (wrong verdicts marked)
    and an overlay like infer.py's (args.cam on args.cam_layer, class defect) in eval_overlays/, drawn and
    written by the inference pipeline (decode, Aggregator, finish_item). Overlays that this run did not write
    (an earlier evaluation of other images) are removed from that folder."""
    names = {relpath: REVIEW_OVERLAY_DIR + name[len(OVERLAY_DIR):]
             for relpath, name in overlay_names([s.relpath for s in samples]).items()}
    cam = GradCAM(model, resolve_layer(model, args.cam_layer), args.cam)
    stats = meta.get("familiarity")
    aggregator = Aggregator(threshold, None if stats is None else float(stats["cutoff"]))
    image_size = int(meta["image_size"])
    rows, written = [], set()
    for start in tqdm(range(0, len(samples), args.batch_size), desc="review page", unit="batch", file=sys.stdout):
        end = min(start + args.batch_size, len(samples))
        images = dataset.normalize(pixels[start:end], meta["normalization"]).to(device)
        heatmaps = cam(images, target_class=1).cpu().numpy()
        units = [decode(s.path, s.relpath, image_size, with_display=True) for s in samples[start:end]]
        readable = [i for i, unit in enumerate(units) if unit.error is None]
        results = iter(aggregator.add_batch([units[i] for i in readable], probabilities[start:end][readable],
                                            heatmaps[readable], None if scores is None else scores[start:end][readable]))
        for i, (sample, unit, probability) in enumerate(zip(samples[start:end], units, probabilities[start:end])):
            prediction = dataset.BINARY_CLASSES[int(probability >= threshold)]
            familiar = ""
            if unit.error is None:
                item = finish_item(next(results), output, names[sample.relpath], threshold, "jpg")
                overlay, status, familiar = item.predictions[0][4], item.predictions[0][5], item.predictions[0][8]
                written.update(item.files[:1] if overlay else ())
            else:  # one overlay failing must not cost the page
                overlay, status = "", f"error: overlay not written: {unit.error}"
            rows.append({"image": sample.relpath, "prediction": prediction, "defect_probability": float(probability),
                         "gradcam": overlay, "status": status, "truth": dataset.BINARY_CLASSES[sample.label],
                         "familiar": familiar})
    folder = output / REVIEW_OVERLAY_DIR
    for old in folder.rglob("*_gradcam.jpg") if folder.is_dir() else ():
        if old.relative_to(output).as_posix() not in written and not old.is_symlink():
            old.unlink()
    summary = model_summary(args.model, meta, threshold, data=f"{data['data_dir']} ({data['layout']})",
                            split=f"{data['split']} ({len(samples)} images)",
                            explanation=f"{args.cam} on {args.cam_layer}")
    return write_review_page(output / "review.html", rows, summary, title="Scratch detector: evaluation review")


def summary_line(metrics: dict) -> str:
    cm = metrics["confusion_matrix"]
    text = (f"{metrics['n_images']} images: accuracy {metrics['accuracy']:.4f}, scratch recall {metrics['recall']:.4f}, "
            f"precision {metrics['precision']:.4f}, specificity {metrics['specificity']:.4f}, "
            f"ROC AUC {metrics['roc_auc']:.4f} (tn {cm['tn']} fp {cm['fp']} fn {cm['fn']} tp {cm['tp']}; 95 % "
            "intervals: accuracy {:.4f} to {:.4f}, scratch recall {:.4f} to {:.4f})".format(
                *metrics["intervals_95"]["accuracy"], *metrics["intervals_95"]["recall"]))
    calibration = metrics.get("calibration")
    if calibration:
        low, high = calibration["ece_interval_95"]
        text += (f"; calibration error (ECE) {calibration['ece']:.4f} at temperature {calibration['temperature']:.3f}"
                 f" ({calibration['ece_without_temperature']:.4f} without; 95 % bootstrap interval {low:.4f} to "
                 f"{high:.4f}; a perfectly calibrated model would stay under {calibration['ece_if_calibrated_95']:.4f} "
                 f"on these images 95 times in 100)")
    fam = metrics.get("familiarity")
    text += ("; familiarity not checked (no statistics in this model)" if fam is None else
             f"; {fam['n_unfamiliar']} of {metrics['n_images']} images unfamiliar")
    loc = metrics.get("localization")
    if loc:
        text += (f"; {loc['method']} on {loc['layer']}: pointing game {loc['pointing_game']:.3f}, "
                 f"energy in box {loc['energy_in_box']:.3f} ({loc['n_images']} scratch images)")
    return text
