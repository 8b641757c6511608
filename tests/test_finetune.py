"""Fine-tuning on your own labelled images: train.py --init --labels --replay, evaluate.py --labels, and the
labels file's errors."""
from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import dataset
import train
from conftest import run_script, save_image
from scratch_detector import finetune
from scratch_detector.model import load_checkpoint

THREADS = {**os.environ, "OMP_NUM_THREADS": "1"}


def write_labels(folder, rows, header=("image", "label")):
    path = folder / "labels.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path


@pytest.fixture(scope="module")
def own_line(tmp_path_factory):
    """A user's folder of 24 synthetic images (12 with a bright line) in subfolders, with hostile names, and the
    labels.csv the review page would download for it."""
    folder = tmp_path_factory.mktemp("own_line")
    rows = []
    for i in range(24):
        kind = "scratch" if i % 2 else "plain"
        name = f"cam {i % 3}/img,{i} \"q\" é.png"
        save_image(folder / name, kind, size=64, seed=100 + i)
        rows.append((name, "defect" if kind == "scratch" else "non-defect"))
    return folder, write_labels(folder, rows)


@pytest.fixture(scope="module")
def start_model(neu_dir, tmp_path_factory):
    """A quickly trained NEU model at 48 px, the checkpoint a fine-tune starts from."""
    work = tmp_path_factory.mktemp("start")
    result = run_script("train.py", "--data-dir", neu_dir, "--output", work / "start.pth", "--reports", work / "r",
                        "--max-per-class", 8, "--epochs", 1, "--image-size", 48, "--pretrained", "none",
                        "--test-images", "", cwd=work, env=THREADS, timeout=300)
    assert result.returncode == 0, result.stderr
    return work / "start.pth"


@pytest.fixture(scope="module")
def finetuned(start_model, own_line, neu_dir, tmp_path_factory):
    folder, labels = own_line
    work = tmp_path_factory.mktemp("finetuned")
    # a learning rate so small that the weights cannot leave their start: where they are shows where they began
    result = run_script("train.py", "--init", start_model, "--labels", labels, "--replay", neu_dir,
                        "--epochs", 1, "--lr", 1e-9, "--reports", work / "r", cwd=work, env=THREADS, timeout=300)
    assert result.returncode == 0, result.stderr
    return work / "model_finetuned.pth", result.stdout


def test_finetune_starts_from_the_given_weights_and_records_where_it_started(start_model, finetuned):
    path, stdout = finetuned
    start, start_meta = load_checkpoint(start_model, calibrated=False)
    tuned, meta = load_checkpoint(path, calibrated=False)
    digest = hashlib.sha256(start_model.read_bytes()).hexdigest()
    assert meta["pretrained"].startswith(f"fine-tuned from start.pth (sha256 {digest[:12]})")
    assert start_meta["pretrained"] in meta["pretrained"]
    assert meta["init"]["sha256"] == digest and meta["image_size"] == 48  # the starting model's input, not 200
    # the starting model's temperature, kept rather than fitted on the fine-tune's few validation images
    assert meta["temperature"] == start_meta["temperature"] != 1.0
    assert f"temperature {start_meta['temperature']:.3f} (start.pth's, kept)" in stdout
    convs = [name for name, p in start.named_parameters() if p.ndim == 4]
    start_weights, tuned_weights = dict(start.named_parameters()), dict(tuned.named_parameters())
    assert max((tuned_weights[n] - start_weights[n]).abs().max().item() for n in convs) < 1e-5
    assert meta["neu_split"]["test_digest"] == start_meta["split"]["test_digest"]
    assert meta["data"]["layout"] == "labels" and meta["data"]["n_replay_train"] > 0
    # the default share of the start averaged back in, applied and recorded
    assert meta["hyperparameters"]["start_weight"] == finetune.FINETUNE_DEFAULTS["start_weight"] > 0
    assert f"averaged {finetune.FINETUNE_DEFAULTS['start_weight']:g} of start.pth's weights back in" in stdout
    # then the BatchNorm statistics recomputed for the averaged weights, by default
    assert meta["hyperparameters"]["refresh_batchnorm"] is finetune.FINETUNE_DEFAULTS["refresh_batchnorm"] is True
    assert "BatchNorm statistics of 49 layers recomputed" in stdout


def test_finetune_splits_the_labelled_images_and_mixes_in_neu_training_images_only(start_model, finetuned, neu_dir):
    path, stdout = finetuned
    with open(path.parent / "r" / "splits.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    own = [r for r in rows if not r["image"].startswith("replay/")]
    replay = [r for r in rows if r["image"].startswith("replay/")]
    assert len(own) == 24 and {r["split"] for r in own} == {"train", "val", "test"}
    assert all({r["label"] for r in own if r["split"] == s} == {"0", "1"} for s in ("train", "val", "test"))
    assert {r["neu_class"] for r in own} == {dataset.DEFECT_CLASS, dataset.OTHER_CLASS}
    # replayed images come from the starting model's training and validation splits, never its test split
    _, start_meta = load_checkpoint(start_model)
    samples, _ = dataset.find_samples(neu_dir, verbose=False)
    start_splits = dataset.recorded_splits(samples, dataset.split_record(start_meta))
    for split in ("train", "val"):
        names = {r["image"][len("replay/"):] for r in replay if r["split"] == split}
        assert names and names <= {s.relpath for s in start_splits[split]}
    assert not any(r["split"] == "test" for r in replay)
    # the table on the held-out labelled images, before and after
    assert "held-out labelled images" in stdout and "before (start.pth)" in stdout
    assert "after (model_finetuned.pth)" in stdout


def test_finetuned_model_infers_and_evaluates_on_the_labels_and_on_neu(finetuned, own_line, neu_dir, tmp_path):
    path, _ = finetuned
    folder, labels = own_line
    result = run_script("infer.py", "--model", path, "--input", folder, "--output", tmp_path / "out", "--no-cam",
                        env=THREADS, timeout=300)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "out" / "predictions.csv", newline="", encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == 24

    _, meta = load_checkpoint(path)
    result = run_script("evaluate.py", "--model", path, "--labels", labels, "--split", "test", "--no-sweep",
                        "--no-report", "--output", tmp_path / "ev", env=THREADS, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "fine-tuned from start.pth" in result.stdout
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    held_out = [r for r in csv.DictReader(open(path.parent / "r" / "splits.csv", newline=""))
                if r["split"] == "test"]
    assert metrics["n_images"] == len(held_out) == meta["split"]["n_test"]
    assert sorted(metrics["probabilities"]) == sorted(r["image"] for r in held_out)

    # on NEU, the fine-tuned model is scored on its starting model's test split: neither trained on it
    result = run_script("evaluate.py", "--model", path, "--data-dir", neu_dir, "--split", "test", "--no-sweep",
                        "--no-report", "--output", tmp_path / "neu", env=THREADS, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "neu" / "metrics.json").read_text())["n_images"] == meta["neu_split"]["n_test"]


@pytest.mark.parametrize("rows, message", [
    ([("a.png", "defect"), ("missing.png", "defect")], "line 3: image not found"),
    ([("a.png", "maybe")], "line 2: label 'maybe'"),
    ([("a.png", "defect"), ("b.png", "non-defect"), ("./a.png", "defect")], "line 4: './a.png' is already listed on line 2"),
    ([("../outside.png", "defect")], "line 2: '../outside.png' is outside"),
])
def test_labels_file_errors_name_the_line(tmp_path, rows, message):
    folder = tmp_path / "line"
    save_image(folder / "a.png")
    save_image(folder / "b.png")
    save_image(tmp_path / "outside.png")
    labels = write_labels(folder, rows)
    with pytest.raises(dataset.DataError, match=message.replace("(", r"\(")):
        dataset.read_labels(labels, folder)


def test_train_reports_a_bad_labels_file_as_one_line_and_refuses_to_overwrite_its_start(tmp_path, tiny_checkpoint):
    folder = tmp_path / "line"
    save_image(folder / "a.png")
    labels = write_labels(folder, [("a.png", "defect"), ("a.png", "non-defect")])
    result = run_script("train.py", "--init", tiny_checkpoint, "--labels", labels, cwd=tmp_path, env=THREADS)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{labels} line 3: 'a.png' is already listed on line 2" in result.stderr
    assert not (tmp_path / "model_finetuned.pth").exists()

    result = run_script("train.py", "--init", tiny_checkpoint, "--labels", labels, "--output", tiny_checkpoint)
    assert result.returncode == 2 and "would overwrite the model it starts from" in result.stderr


def test_labels_read_back_as_written_and_split_stratified_by_label(tmp_path):
    folder = tmp_path / "line"
    names = [f"sub/{i},\"x\" {chr(0x4e00 + i)}.png" for i in range(20)]
    for i, name in enumerate(names):
        save_image(folder / name, "scratch" if i < 6 else "plain", seed=i)
    words = ["Defect", "1", "scratch", "defect", "defect", "defect"] + ["non-defect", "0", "Not a scratch"] + \
        ["non-defect"] * 11
    labels = write_labels(folder, list(zip(names, words)))
    samples = dataset.read_labels(labels, folder)
    assert sorted(s.relpath for s in samples) == sorted(names)
    assert {s.relpath: s.label for s in samples} == {n: int(i < 6) for i, n in enumerate(names)}
    splits = dataset.split_samples(samples, seed=3)
    assert sorted(s.relpath for part in splits.values() for s in part) == sorted(names)
    assert all(any(s.label for s in splits[name]) and not all(s.label for s in splits[name]) for name in splits)


def test_replay_draws_evenly_over_classes_from_the_recorded_split():
    rng = np.random.default_rng(0)
    samples = [dataset.Sample(Path(f"/x/{c}_{i}.jpg"), f"{c}_{i}.jpg", c)
               for c in dataset.NEU_CLASSES for i in range(10)]
    picked = finetune.spread_pick(samples, 14, rng)
    counts = {c: sum(s.neu_class == c for s in picked) for c in dataset.NEU_CLASSES}
    assert len(picked) == 14 and sorted(counts.values()) == [2, 2, 2, 2, 3, 3]
    assert len(finetune.spread_pick(samples[:5], 14, rng)) == 5  # never more than there are
    assert finetune.replay_counts(10, 5) == (finetune.REPLAY_MIN, finetune.MIN_VALIDATION - 5)
    assert finetune.replay_counts(500, 100) == (500 * finetune.REPLAY_PER_IMAGE, 0)


def two_small_models():
    """(start, tuned): one small conv + BatchNorm net with two different sets of weights and running statistics."""
    torch.manual_seed(0)
    start, tuned = (torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)) for _ in range(2))
    for model, batches in ((start, 2), (tuned, 5)):  # different BatchNorm statistics and batch counters
        model.train()
        for _ in range(batches):
            model(torch.randn(2, 3, 8, 8) * batches)
    with torch.no_grad():  # as if trained: BatchNorm's scale and shift move too
        for parameter in tuned.parameters():
            parameter.add_(torch.randn_like(parameter))
    return start, tuned


@pytest.mark.parametrize("share", [0.0, 0.25, 1.0])
def test_blend_with_start_averages_weights_and_batchnorm_statistics(share):
    start, tuned = two_small_models()
    start_state = {k: v.clone() for k, v in start.state_dict().items()}
    tuned_state = {k: v.clone() for k, v in tuned.state_dict().items()}
    finetune.blend_with_start(tuned, start_state, share)
    blended = tuned.state_dict()
    for name, value in blended.items():
        if value.is_floating_point():
            assert torch.allclose(value, share * start_state[name] + (1 - share) * tuned_state[name], atol=1e-7)
            assert not torch.equal(start_state[name], tuned_state[name])  # the two really differ
        else:  # BatchNorm's counter stays the fine-tune's
            assert torch.equal(value, tuned_state[name])
    ends = {0.0: tuned_state, 1.0: start_state}
    if share in ends:  # the ends are the models themselves, exactly
        assert all(torch.equal(v, ends[share][n]) for n, v in blended.items() if v.is_floating_point())


@pytest.mark.parametrize("argv, message", [(["--start-weight", "0.5"], "it needs --init"),
                                          (["--init", "m.pth", "--start-weight", "1.5"], "between 0 and 1")])
def test_start_weight_is_checked(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert message in capsys.readouterr().err
