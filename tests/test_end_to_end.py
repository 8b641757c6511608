"""On the real data: train.py (1 epoch, small subset) -> infer.py -> evaluate.py, run as a user runs them."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import run_script

import dataset
from scratch_detector.evaluation import SWEEP_LAYERS
from scratch_detector.model import load_checkpoint

PER_CLASS = 12
TRAIN_ARGS = ["--max-per-class", PER_CLASS, "--epochs", 1, "--image-size", 64, "--batch-size", 16,
              "--pretrained", "none", "--seed", 3]


def train(neu_dir: Path, work: Path) -> Path:
    result = run_script("train.py", "--data-dir", neu_dir, "--output", work / "model.pth",
                        "--reports", work / "outputs", "--test-images", work / "test_images", *TRAIN_ARGS)
    assert result.returncode == 0, result.stderr
    (work / "train.log").write_text(result.stdout)
    return work


def expected_splits(neu_dir: Path) -> dict:
    samples, _ = dataset.find_samples(neu_dir, verbose=False)
    return dataset.split_samples(dataset.first_per_class(samples, PER_CLASS), seed=3)


@pytest.fixture(scope="module")
def run(neu_dir, tmp_path_factory):
    """One training run; test_images/ already holds a user's file with the name of a test image."""
    work = tmp_path_factory.mktemp("e2e")
    clash = Path(expected_splits(neu_dir)["test"][0].relpath).name
    (work / "test_images").mkdir()
    (work / "test_images" / clash).write_bytes(b"the operator's own file")
    # an earlier seed's test image that this model trains on: it must not stay among the "unseen" images
    seen = expected_splits(neu_dir)["train"][0]
    shutil.copyfile(seen.path, work / "test_images" / Path(seen.relpath).name)
    return train(neu_dir, work), clash


def test_checkpoint_metadata(run, neu_dir):
    work, _ = run
    plain = torch.load(work / "model.pth", weights_only=True)
    torchvision.models.efficientnet_b0(num_classes=2).load_state_dict(plain["state_dict"])
    _, meta = load_checkpoint(work / "model.pth")
    splits = expected_splits(neu_dir)
    assert meta["arch"] == "efficientnet_b0" and meta["classes"] == ["non-defect", "defect"]
    assert meta["image_size"] == 64 and meta["epochs"] == 1 and meta["seed"] == 3
    assert meta["pretrained"].startswith("none")
    assert 0.0 < meta["threshold"] < 1.0
    assert meta["normalization"] == "per-image" and "mean" not in meta and "std" not in meta
    assert {k: meta["split"][f"n_{k}"] for k in dataset.SPLITS} == {k: len(v) for k, v in splits.items()}
    assert meta["torch_version"] == str(torch.__version__)
    assert set(meta["val_metrics"]) >= {"accuracy", "recall", "loss", "threshold"}
    assert meta["hyperparameters"]["augment"] == ["dihedral", "camera", "zoom", "transplant"]
    # the transplant augmentation found the boxes of every training scratch (NEU-DET names them by image)
    n_scratches = sum(s.label for s in splits["train"])
    assert f"transplant: marks of {n_scratches} annotated training scratches" in (work / "train.log").read_text()


def test_reports_written(run):
    work, _ = run
    with open(work / "outputs" / "training_log.csv") as handle:
        log = list(csv.DictReader(handle))
    assert [row["epoch"] for row in log] == ["1"]
    assert set(log[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_recall", "seconds"}
    assert (work / "outputs" / "training_curves.png").stat().st_size > 1000
    with open(work / "outputs" / "splits.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 * PER_CLASS
    assert {r["split"] for r in rows} == {"train", "val", "test"}


def test_test_split_copied_without_overwriting(run, neu_dir):
    work, clash = run
    folder = work / "test_images"
    assert (folder / clash).read_bytes() == b"the operator's own file"
    test = expected_splits(neu_dir)["test"]
    for sample in test:
        name = Path(sample.relpath).name
        copy = folder / (sample.relpath.replace("/", "__") if name == clash else name)
        assert copy.read_bytes() == sample.path.read_bytes()
    assert len(list(folder.iterdir())) == len(test) + 1


def test_test_images_holds_only_images_this_model_never_saw(run, neu_dir):
    work, clash = run
    splits = expected_splits(neu_dir)
    seen = {Path(s.relpath).name for s in splits["train"] + splits["val"]}
    left = {p.name for p in (work / "test_images").iterdir()}
    assert not left & seen
    assert clash in left  # the operator's own file is not a copy of a NEU image: kept
    assert "1 removed that this model trained or validated on" in (work / "train.log").read_text()


def test_infer_then_evaluate(run, neu_dir):
    work, clash = run
    out = work / "infer_out"
    result = run_script("infer.py", "--input", work / "test_images", "--output", out, "--model", work / "model.pth")
    assert result.returncode == 0, result.stderr
    with open(out / "predictions.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == ["image", "prediction", "label", "defect_probability", "gradcam", "status", "tiles",
                                 "max_tile", "familiar", "unfamiliarity"]
    _, meta = load_checkpoint(work / "model.pth")
    assert meta["temperature"] > 0 and meta["familiarity"]["layer"] == "features.3"  # train.py fitted both
    images = sorted(p.name for p in (work / "test_images").iterdir())
    assert [r["image"] for r in rows] == images
    for row in rows:
        if row["image"] == clash:  # the operator's text file with an image name
            assert row["status"].startswith("error:") and row["gradcam"] == ""
        else:
            assert row["status"] == "ok"
            probability = float(row["defect_probability"])
            if abs(probability - meta["threshold"]) > 5e-5:  # the CSV rounds p to 4 decimals
                assert row["label"] == str(int(probability >= meta["threshold"]))
            assert row["prediction"] == dataset.BINARY_CLASSES[int(row["label"])]
            assert (out / row["gradcam"]).stat().st_size > 1000
            assert row["familiar"] == ("yes" if float(row["unfamiliarity"]) <= meta["familiarity"]["cutoff"] else "no")
    assert re.search(r"\d+ images: \d+ defect, \d+ non-defect, 1 errors", result.stdout)

    out = work / "outputs"  # where train.py left training_log.csv, as in the default flow
    result = run_script("evaluate.py", "--data-dir", neu_dir, "--model", work / "model.pth", "--output", out,
                        "--split", "test")
    assert result.returncode == 0, result.stderr
    assert f"(initialisation: {meta['pretrained']})" in result.stdout  # says what the model started from
    metrics = json.loads((out / "metrics.json").read_text())
    n_test = meta["split"]["n_test"]
    assert metrics["n_images"] == n_test
    assert sum(metrics["confusion_matrix"].values()) == n_test
    assert sum(c["count"] for c in metrics["per_class"].values()) == n_test
    # recompute accuracy from the probabilities the report stored
    probabilities = metrics["probabilities"]
    tie = {name for name, p in probabilities.items() if abs(p - metrics["threshold"]) < 2e-6}  # stored to 6 places
    correct = sum((p >= metrics["threshold"]) == name.split("/")[-1].startswith("scratches")
                  for name, p in probabilities.items() if name not in tie)
    assert correct / n_test - 1e-9 <= metrics["accuracy"] <= (correct + len(tie)) / n_test + 1e-9
    assert 1 - len(metrics["misclassified"]) / n_test == pytest.approx(metrics["accuracy"])
    loc = metrics["localization"]
    assert loc["n_images"] == sum(1 for n in probabilities if "scratches" in n)
    assert 0.0 <= loc["pointing_game"] <= 1.0 and 0.0 <= loc["energy_in_box"] <= 1.0
    assert len(metrics["localization_table"]) == 3 * len(SWEEP_LAYERS)
    # pages: title, training curves (from train.py's training_log.csv), confusion/ROC/PR, per class, reliability, galleries,
    # localization table
    correct_scratches = sum(1 for n in probabilities if "scratches" in n and n not in metrics["misclassified"])
    gallery = -(-min(12, correct_scratches) // 12) + -(-len(metrics["misclassified"]) // 12)
    pdf = (out / "report.pdf").read_bytes()
    assert len(re.findall(rb"/Type\s*/Page\b", pdf)) == 6 + gallery
    assert (out / "eval_confusion_roc_pr.png").is_file() and (out / "eval_localization.png").is_file()


def test_same_seed_same_result(run, neu_dir, tmp_path):
    work, _ = run
    again = train(neu_dir, tmp_path)
    first = load_checkpoint(work / "model.pth")
    second = load_checkpoint(again / "model.pth")
    np.testing.assert_equal(first[1]["val_metrics"], second[1]["val_metrics"])  # NaN == NaN here
    for (name, a), b in zip(first[0].state_dict().items(), second[0].state_dict().values()):
        assert torch.equal(a, b), name
