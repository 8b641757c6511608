"""report.pdf of an evaluation (evaluation.py): one matplotlib figure per page, each also saved as a PNG beside it."""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

import dataset  # noqa: E402
from gradcam import GradCAM, resolve_layer  # noqa: E402

from .curves import training_curves_figure  # noqa: E402
from .metrics import curve_points  # noqa: E402

GALLERY_PER_PAGE = 12
GALLERY_CORRECT = 12  # correctly detected scratches shown (all misclassified images are always shown)


def _save(fig, pdf: PdfPages, output: Path, name: str) -> None:
    pdf.savefig(fig)
    fig.savefig(output / f"eval_{name}.png", dpi=90)
    plt.close(fig)


def title_page(metrics: dict, meta: dict) -> plt.Figure:
    fig = plt.figure(figsize=(8.27, 11.69))
    loc = metrics.get("localization")
    cm = metrics["confusion_matrix"]
    data = metrics["data"]
    calibration = metrics["calibration"]
    low, high = calibration["ece_interval_95"]
    lines = [
        ("Steel-surface scratch detector: evaluation report", 16, "bold"),
        ("", 10, None),
        ("Model", 13, "bold"),
        (f"{meta.get('arch')} with a 2-way head; initialisation: {meta.get('pretrained')}", 10, None),
        (f"epochs {meta.get('epochs')}, image size {meta.get('image_size')} px, "
         f"{meta.get('normalization')} normalization, seed {meta.get('seed')}", 10, None),
        (f"decision threshold p(defect) >= {meta.get('threshold'):.4f}; trained {meta.get('date')}", 10, None),
        ("", 10, None),
        ("Data", 13, "bold"),
        (f"{data['data_dir']} ({data['layout']}); evaluated split: {data['split']}", 10, None),
        ("split sizes: " + ", ".join(f"{k[2:]} {v}" for k, v in data.items() if k.startswith("n_")), 10, None),
        ("", 10, None),
        ("Headline numbers", 13, "bold"),
        (f"{metrics['n_images']} images: accuracy {metrics['accuracy']:.4f}, scratch recall {metrics['recall']:.4f}, "
         f"precision {metrics['precision']:.4f}", 10, None),
        (f"specificity {metrics['specificity']:.4f}, F1 {metrics['f1']:.4f}, ROC AUC {metrics['roc_auc']:.4f}", 10, None),
        (f"confusion: tn {cm['tn']}, fp {cm['fp']}, fn {cm['fn']}, tp {cm['tp']}; "
         f"misclassified: {len(metrics['misclassified'])}", 10, None),
        ("95 % intervals (Wilson): accuracy {:.4f} to {:.4f}, scratch recall {:.4f} to {:.4f}, specificity {:.4f} "
         "to {:.4f}".format(*(v for key in ("accuracy", "recall", "specificity")
                             for v in metrics["intervals_95"][key])), 10, None),
        (f"calibration error (ECE, 10 bins) {calibration['ece']:.4f} at temperature {calibration['temperature']:.3f}, "
         f"95 % bootstrap interval {low:.4f} to {high:.4f}", 10, None),
        (f"(a perfectly calibrated model making these predictions: under {calibration['ece_if_calibrated_95']:.4f} "
         "95 times in 100)", 10, None),
        ("familiarity not checked (no statistics in this model)" if metrics.get("familiarity") is None else
         f"{metrics['familiarity']['n_unfamiliar']} images unfamiliar", 10, None),
    ]
    if loc:
        lines.append((f"Grad-CAM ({loc['method']} on {loc['layer']}, class defect, {loc['n_images']} boxed scratch "
                      f"images): pointing game {loc['pointing_game']:.3f}, energy in box {loc['energy_in_box']:.3f}",
                      10, None))
    else:
        lines.append(("Localization: no bounding boxes in this data layout", 10, None))
    y = 0.95
    for text, size, weight in lines:
        fig.text(0.07, y, text, fontsize=size, fontweight=weight or "normal", va="top", wrap=True)
        y -= 0.032 if size < 13 else 0.04
    return fig


def training_curves_page(log_path: Path) -> plt.Figure | None:
    if not log_path.is_file():
        return None
    with open(log_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return None
    fig = training_curves_figure([{key: int(value) if key == "epoch" else float(value) for key, value in r.items()}
                                  for r in rows])
    fig.suptitle(f"Training curves ({log_path})")
    fig.tight_layout()
    return fig


def curves_page(metrics: dict, probabilities, labels, threshold: float) -> plt.Figure:
    fig, (ax_cm, ax_roc, ax_pr) = plt.subplots(1, 3, figsize=(15, 4.8))
    cm = metrics["confusion_matrix"]
    grid = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])
    ax_cm.imshow(grid, cmap="Blues")
    for (row, col), value in np.ndenumerate(grid):
        ax_cm.text(col, row, str(value), ha="center", va="center", fontsize=14,
                   color="white" if value > grid.max() / 2 else "black")
    ax_cm.set(xticks=[0, 1], yticks=[0, 1], xticklabels=dataset.BINARY_CLASSES, yticklabels=dataset.BINARY_CLASSES,
              xlabel="predicted", ylabel="true", title=f"Confusion matrix (threshold {threshold:.3f})")
    fpr, tpr, precision, _ = curve_points(probabilities, labels)
    point = metrics
    ax_roc.plot(fpr, tpr, "-", drawstyle="steps-post")
    ax_roc.plot(1 - point["specificity"], point["recall"], "ro", label=f"operating point (t={threshold:.3f})")
    ax_roc.set(xlabel="false positive rate", ylabel="scratch recall", title=f"ROC (AUC {metrics['roc_auc']:.4f})",
               xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax_pr.plot(tpr, precision, "-", drawstyle="steps-post")
    ax_pr.plot(point["recall"], point["precision"], "ro", label=f"operating point (t={threshold:.3f})")
    ax_pr.set(xlabel="scratch recall", ylabel="precision", title="Precision-recall", xlim=(-0.02, 1.02),
              ylim=(-0.02, 1.02))
    for ax in (ax_roc, ax_pr):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")
    fig.tight_layout()
    return fig


def per_class_page(metrics: dict) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = list(metrics["per_class"])
    values = [metrics["per_class"][n]["correct_fraction"] for n in names]
    bars = ax.bar(names, values, color=["tab:red" if n == dataset.DEFECT_CLASS else "tab:blue" for n in names])
    for bar, name in zip(bars, names):
        info = metrics["per_class"][name]
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01,
                f"{info['correct_fraction']:.3f}\n(n={info['count']})", ha="center", va="bottom", fontsize=8)
    ax.set(ylim=(0, 1.15), ylabel="fraction classified correctly",
           title="Accuracy per NEU source class (scratches = defect, red; the rest must be called non-defect)")
    ax.tick_params(axis="x", rotation=15)
    fig.tight_layout()
    return fig


def gallery_pages(items: list[dict], title: str) -> list[plt.Figure]:
    """items: dicts with image (RGB), heatmap (same size), boxes, caption. Grid of 4 x 3 per page."""
    figures = []
    for start in range(0, len(items), GALLERY_PER_PAGE):
        chunk = items[start:start + GALLERY_PER_PAGE]
        fig, axes = plt.subplots(3, 4, figsize=(11.69, 8.27))
        for ax in axes.flat:
            ax.axis("off")
        for ax, item in zip(axes.flat, chunk):
            ax.imshow(item["image"])
            ax.imshow(item["heatmap"], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            for x0, y0, x1, y1 in item["boxes"]:
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="lime", lw=1.5))
            ax.set_title(item["caption"], fontsize=8)
        page = start // GALLERY_PER_PAGE + 1
        pages = (len(items) + GALLERY_PER_PAGE - 1) // GALLERY_PER_PAGE
        fig.suptitle(f"{title} (page {page}/{pages}; green: ground-truth boxes)")
        fig.tight_layout()
        figures.append(fig)
    return figures


def localization_page(table: list[dict], default: dict | None) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(8.27, 1.2 + 0.28 * max(1, len(table))))
    ax.axis("off")
    if table:
        cells = [[r["method"], r["layer"], f"{r['pointing_game']:.3f}", f"{r['energy_in_box']:.3f}", r["n_images"]]
                 for r in table]
        t = ax.table(cellText=cells, colLabels=["method", "layer", "pointing game", "energy in box", "images"],
                     loc="center", cellLoc="center")
        t.scale(1, 1.2)
        for row, r in enumerate(table, start=1):
            if default and (r["method"], r["layer"]) == (default["method"], default["layer"]):
                for col in range(5):
                    t[row, col].set_facecolor("#ffe9a8")
        ax.set_title("Localization of the 'defect' heatmap on boxed scratch images (default highlighted)")
    else:
        ax.text(0.5, 0.5, "No bounding boxes in this data: localization not measured", ha="center")
    fig.tight_layout()
    return fig


def reliability_page(calibration: dict) -> plt.Figure:
    """Predicted p(defect) against the observed scratch rate, per bin, with each bin's count written on it."""
    fig, ax = plt.subplots(figsize=(8.27, 8.27))
    rows = [r for r in calibration["reliability"] if r["count"]]
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", label="perfectly calibrated")
    ax.plot([r["mean_p"] for r in rows], [r["scratch_rate"] for r in rows], "o-", color="#1f5fae",
            label="this model (bins of 0.1)")
    for r in rows:
        ax.annotate(f"n={r['count']}", (r["mean_p"], r["scratch_rate"]), textcoords="offset points", xytext=(6, -12),
                    fontsize=8)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("predicted p(defect) (mean of the bin)")
    ax.set_ylabel("observed share of scratches in the bin")
    ax.set_title(f"Reliability: ECE {calibration['ece']:.4f} at temperature {calibration['temperature']:.3f} "
                 f"({calibration['ece_without_temperature']:.4f} without)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def write_report(output: Path, metrics: dict, meta: dict, samples, pixels, probabilities, boxed, boxes,
                 model, args, device) -> int:
    """Write output/report.pdf; returns the number of pages."""
    labels = dataset.labels_of(samples)
    threshold = float(meta["threshold"])
    figures = [("title", title_page(metrics, meta))]
    curves = training_curves_page(output / "training_log.csv")
    if curves is not None:
        figures.append(("training_curves", curves))
    figures.append(("confusion_roc_pr", curves_page(metrics, probabilities, labels, threshold)))
    figures.append(("per_class", per_class_page(metrics)))
    figures.append(("reliability", reliability_page(metrics["calibration"])))

    predicted = probabilities >= threshold
    box_of = dict(zip(boxed, boxes))
    correct = [i for i in boxed if predicted[i]][:GALLERY_CORRECT]
    wrong = [i for i, s in enumerate(samples) if predicted[i] != s.label]
    cam = GradCAM(model, resolve_layer(model, args.cam_layer), args.cam)

    def items_for(indices):
        items = []
        for start in range(0, len(indices), args.batch_size):
            chunk = indices[start:start + args.batch_size]
            heatmaps = cam(dataset.normalize(pixels[chunk], meta["normalization"]).to(device), target_class=1).cpu()
            for i, heatmap in zip(chunk, heatmaps):
                image = np.asarray(dataset.open_image(samples[i].path, int(meta["image_size"])))
                size = image.shape[:2]
                resized = torch.nn.functional.interpolate(heatmap[None, None], size=size, mode="bilinear",
                                                          align_corners=False)[0, 0].numpy()
                truth = samples[i].neu_class
                items.append({"image": image, "heatmap": resized, "boxes": box_of.get(i, ((0, 0), []))[1],
                              "caption": f"{Path(samples[i].relpath).name}\n{truth}, p(defect)={probabilities[i]:.3f}"})
        return items

    for number, figure in enumerate(gallery_pages(items_for(correct), "Correctly detected scratches"), 1):
        figures.append((f"gallery_correct_{number}", figure))
    if wrong:
        for number, figure in enumerate(gallery_pages(items_for(wrong), "Misclassified images"), 1):
            figures.append((f"gallery_misclassified_{number}", figure))
    figures.append(("localization", localization_page(metrics["localization_table"], metrics.get("localization"))))

    tmp = output / ".report.pdf.tmp"
    try:
        with PdfPages(tmp) as pdf:
            for name, figure in figures:
                _save(figure, pdf, output, name)
        tmp.replace(output / "report.pdf")
    finally:
        tmp.unlink(missing_ok=True)
    return len(figures)
