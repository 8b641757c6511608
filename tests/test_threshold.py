"""The decision threshold stored in the checkpoint is the one infer.py and evaluate.py apply.

Every other test checkpoint stores 0.5, where a program that ignored the stored value and used 0.5 would
pass; here the threshold is chosen between the model's own probabilities so that it and 0.5 disagree on at
least one image.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_model_with_spread, run_script, save_image

import dataset
from scratch_detector.calibration import fit_temperature
from scratch_detector.evaluation import select_samples
from scratch_detector.metrics import choose_threshold
from scratch_detector.model import load_checkpoint, predict_probabilities, save_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cut_between(probabilities, avoid, margin: float) -> float:
    """A threshold halfway across the widest gap between consecutive distinct probabilities (at least
    `margin` wide) that classifies at least one image differently from each threshold in `avoid`."""
    p = np.unique(np.asarray(probabilities, dtype=np.float64))
    best = None
    for low, high in zip(p[:-1], p[1:]):
        cut = (low + high) / 2
        if high - low < margin or any(((p >= cut) == (p >= other)).all() for other in avoid):
            continue
        if best is None or high - low > best[1] - best[0]:
            best = (low, high)
    assert best is not None, f"no gap of {margin} in {p} separates differently from {avoid}"
    return float((best[0] + best[1]) / 2)


def infer_rows(model: Path, images: Path, out: Path, *args) -> list[dict]:
    result = run_script("infer.py", "--model", model, "--input", images, "--output", out, *args, env=ENV,
                        timeout=300)
    assert result.returncode == 0, result.stderr
    with open(out / "predictions.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(row["status"] == "ok" for row in rows)
    return rows


def assert_labels_follow(rows: list[dict], threshold: float) -> None:
    for row in rows:
        label = int(float(row["defect_probability"]) >= threshold)
        assert row["label"] == str(label), (row, threshold)
        assert row["prediction"] == dataset.BINARY_CLASSES[label]


# ---------------------------------------------------------------------------------------------------------
# infer.py
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spread_model(tmp_path_factory):
    """A random per-image-normalised model whose probabilities differ between images, and a folder of
    synthetic images to classify."""
    work = tmp_path_factory.mktemp("threshold_infer")
    net, init = random_model_with_spread(11, "per-image")
    images = work / "images"
    for i in range(10):
        save_image(images / f"img_{i:02d}.png", "scratch" if i % 2 else "plain", 64, seed=200 + i)
    return net, init, images, work


def test_infer_applies_the_checkpoint_threshold_unless_overridden(spread_model):
    net, init, images, work = spread_model

    def checkpoint(threshold: float) -> Path:
        path = work / f"model_{threshold:.6f}.pth"
        save_checkpoint(path, net, {"image_size": 64, "normalization": "per-image", "threshold": threshold,
                                    "pretrained": init})
        return path

    # the model's probabilities first (a run at threshold 0.5; probabilities do not depend on it)
    first = infer_rows(checkpoint(0.5), images, work / "probe", "--no-cam")
    probabilities = {row["image"]: float(row["defect_probability"]) for row in first}
    assert len(probabilities) == 10
    # the CSV has 4 decimals: a gap of 0.002 keeps every rounded value on its side of the cut
    stored = cut_between(list(probabilities.values()), avoid=[0.5], margin=0.002)
    assert stored != 0.5

    rows = infer_rows(checkpoint(stored), images, work / "stored")
    assert {row["image"]: float(row["defect_probability"]) for row in rows} == probabilities  # same model
    assert_labels_follow(rows, stored)
    labels = [int(row["label"]) for row in rows]
    assert 0 < sum(labels) < len(labels)  # images on both sides of the stored threshold
    assert any(label != int(float(row["defect_probability"]) >= 0.5) for label, row in zip(labels, rows)), \
        "0.5 would classify these images the same: the test could not tell the stored threshold from 0.5"

    # --threshold overrides the stored one (a value that classifies differently from both)
    override = cut_between(list(probabilities.values()), avoid=[stored, 0.5], margin=0.002)
    rows = infer_rows(checkpoint(stored), images, work / "override", "--no-cam", "--threshold", override)
    assert_labels_follow(rows, override)
    assert [int(row["label"]) for row in rows] != labels


# ---------------------------------------------------------------------------------------------------------
# evaluate.py
# ---------------------------------------------------------------------------------------------------------
# 60 optimizer steps (24 training images, batches of 2, 5 epochs): a random-init network needs about
# that many before its BatchNorm running statistics fit its activations. After a handful of steps (1 epoch
# in batches of 16) eval mode gives every image the same probability, with no threshold between them.
TRAIN_ARGS = ["--max-per-class", 6, "--epochs", 5, "--batch-size", 2, "--image-size", 48, "--pretrained", "none"]


def test_evaluate_applies_the_checkpoint_threshold(neu_dir, tmp_path):
    path = tmp_path / "model.pth"
    result = run_script("train.py", "--data-dir", neu_dir, "--output", path, "--reports", tmp_path / "reports",
                        "--test-images", "", *TRAIN_ARGS, cwd=tmp_path, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr

    # the test split's probabilities, as evaluate.py will compute them (up to BatchNorm folding)
    model, meta = load_checkpoint(path)
    samples, _ = select_samples(neu_dir, meta, "test")
    labels = {s.relpath: s.label for s in samples}
    pixels = torch.from_numpy(dataset.load_pixels(samples, int(meta["image_size"]), progress=False))
    probabilities = predict_probabilities(model, pixels, meta["normalization"], 32, "cpu").numpy()
    threshold = cut_between(probabilities, avoid=[0.5, meta["threshold"]], margin=1e-4)

    checkpoint = torch.load(path, weights_only=True)
    checkpoint["threshold"] = threshold
    torch.save(checkpoint, path)

    out = tmp_path / "evaluation"
    result = run_script("evaluate.py", "--data-dir", neu_dir, "--model", path, "--output", out,
                        "--no-report", "--no-sweep", cwd=tmp_path, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["threshold"] == threshold and metrics["model"]["threshold"] == threshold

    reported = metrics["probabilities"]
    assert set(reported) == set(labels)
    assert np.allclose([reported[s.relpath] for s in samples], probabilities, atol=1e-4)
    predicted = {name: p >= threshold for name, p in reported.items()}
    expected = {"tn": sum(not predicted[n] and labels[n] == 0 for n in labels),
                "fp": sum(predicted[n] and labels[n] == 0 for n in labels),
                "fn": sum(not predicted[n] and labels[n] == 1 for n in labels),
                "tp": sum(predicted[n] and labels[n] == 1 for n in labels)}
    assert metrics["confusion_matrix"] == expected
    assert sorted(metrics["misclassified"]) == sorted(n for n in labels if predicted[n] != labels[n])
    at_half = {name: p >= 0.5 for name, p in reported.items()}
    assert at_half != predicted  # 0.5 would have given other verdicts: the stored threshold was applied


# ---------------------------------------------------------------------------------------------------------
# train.py chooses the threshold on the validation split, never on the test split
# ---------------------------------------------------------------------------------------------------------
def test_train_chooses_the_threshold_on_validation_not_test(neu_dir, tmp_path, monkeypatch):
    """The model's scores after training are replaced by a fixed rule per split: on validation, scratches score
    0.30 and the rest 0.10; on test, 0.95 and 0.60. The two splits call for different thresholds, and the
    checkpoint must hold validation's, on the p calibrated by the validation temperature (a train.py that chose
    on the test split, or on both, would store another)."""
    import train
    from scratch_detector import posthoc

    size, per_class = 32, 12
    samples = dataset.first_per_class(dataset.find_samples(neu_dir)[0], per_class)
    split_of, splits = {}, dataset.split_samples(samples, 0)
    for name, items in splits.items():
        assert {s.label for s in items} == {0, 1}, name
        for sample, pixels in zip(items, dataset.load_pixels(items, size, progress=False)):
            split_of[pixels.tobytes()] = (name, sample.label)
    scores = {"val": (0.10, 0.30), "test": (0.60, 0.95), "train": (0.50, 0.50)}

    def rule_logits(p):
        p = torch.tensor(p, dtype=torch.float64)
        return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], 1)

    def scored_by_split(model, pixels, normalization, batch_size, device):  # (features: predict_features, real)
        return rule_logits([scores[split][label] for split, label in
                            (split_of[image.tobytes()] for image in pixels.numpy())]), None

    monkeypatch.setattr(posthoc, "predict_logits", scored_by_split)
    path = tmp_path / "model.pth"
    assert train.main(["--data-dir", str(neu_dir), "--output", str(path), "--reports", str(tmp_path / "reports"),
                       "--test-images", "", "--max-per-class", str(per_class), "--epochs", "1", "--image-size",
                       str(size), "--pretrained", "none", "--augment", "none", "--explain-weight", "0"]) == 0
    stored = torch.load(path, weights_only=True)
    val_labels = [sample.label for sample in splits["val"]]
    val_logits = rule_logits([scores["val"][label] for label in val_labels])
    temperature = fit_temperature(val_logits, val_labels)
    assert stored["temperature"] == pytest.approx(temperature)

    def cut(low, high):  # the rule's threshold for a split scoring `low` and `high`, calibrated by T
        p = (rule_logits([low, high]) / temperature).softmax(1)[:, 1].tolist()
        return choose_threshold(p, [0, 1]), p

    (val_cut, val_p), (test_cut, test_p) = cut(0.10, 0.30), cut(0.60, 0.95)
    assert val_p[0] < val_cut < val_p[1] and test_p[0] < test_cut < test_p[1] and val_cut < test_p[0]
    assert stored["threshold"] == pytest.approx(val_cut)
