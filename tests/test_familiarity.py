"""Unfamiliar images and calibrated p(defect) (issue 17): familiarity.py, calibration.py, and what infer.py and
evaluate.py make of them."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script, save_image, steel_like_batch

import dataset
from scratch_detector import familiarity
from scratch_detector.calibration import (PSEUDO_COUNT, apply_temperature, ece_if_calibrated, ece_interval,
                                          expected_calibration_error, fit_temperature, reliability_table)
from scratch_detector.model import load_checkpoint, predict_features, predict_logits


def far_away_image(size: int = 64) -> np.ndarray:
    """Nothing like the steel textures: large colour blocks and a hard diagonal edge."""
    y, x = np.mgrid[:size, :size]
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 0] = np.where(x > y, 255, 0)
    image[..., 1] = ((x // (size // 4)) % 2) * 255
    image[..., 2] = ((y // (size // 4)) % 2) * 255
    return image


def read_rows(output) -> dict[str, dict]:
    with open(output / "predictions.csv", newline="", encoding="utf-8") as handle:
        return {row["image"]: row for row in csv.DictReader(handle)}


# ---------------------------------------------------------------------------------------------------------
# The score
# ---------------------------------------------------------------------------------------------------------
def test_ledoit_wolf_shrinks_a_singular_sample_covariance_to_an_invertible_one():
    rng = np.random.default_rng(0)
    centered = rng.normal(size=(20, 50))
    centered -= centered.mean(0)
    covariance, shrinkage = familiarity.ledoit_wolf(centered)
    assert np.linalg.matrix_rank(centered.T @ centered) < 50  # more dimensions than images: singular
    assert 0 < shrinkage <= 1
    assert np.all(np.linalg.eigvalsh(covariance) > 0)
    scales = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    many = rng.normal(size=(5000, 5)) * scales  # plenty of images: hardly any shrinkage, the true covariance
    covariance, shrinkage = familiarity.ledoit_wolf(many - many.mean(0))
    assert shrinkage < 0.05 and np.allclose(covariance, np.diag(scales ** 2), rtol=0.1, atol=1.0)
    isotropic = rng.normal(size=(5000, 5))  # already a scaled identity: shrinking all the way costs nothing
    assert familiarity.ledoit_wolf(isotropic - isotropic.mean(0))[1] > 0.5


def test_score_is_the_mahalanobis_distance_to_the_nearest_class_mean():
    stats = {"means": torch.tensor([[0.0, 0.0], [10.0, 0.0]]), "precision": torch.diag(torch.tensor([1.0, 0.25]))}
    points = torch.tensor([[0.0, 0.0], [9.0, 0.0], [0.0, 4.0], [5.0, 2.0]])
    expected = [0.0, 1.0, 2.0, np.sqrt(25 + 1)]
    assert np.allclose(familiarity.score(points, stats).numpy(), expected)


def test_fit_sets_the_cutoff_at_the_validation_quantile():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(400, 8))
    val = rng.normal(size=(1000, 8))
    stats = familiarity.fit(train, np.zeros(400), val, quantile=0.9)
    scores = familiarity.score(torch.tensor(val, dtype=torch.float32), stats).numpy()
    assert np.mean(scores <= stats["cutoff"]) == pytest.approx(0.9, abs=0.002)
    assert familiarity.valid(stats) and stats["layer"] == familiarity.LAYER
    far = familiarity.score(torch.full((1, 8), 8.0), stats).item()
    assert not familiarity.is_familiar(far, stats["cutoff"]) and familiarity.is_familiar(0.0, stats["cutoff"])
    assert familiarity.is_familiar(None, stats["cutoff"]) is None and familiarity.is_familiar(1.0, None) is None


def test_a_frame_is_unfamiliar_when_most_of_its_tiles_are():
    assert familiarity.frame_score([1.0, 1.0, 9.0]) == 1.0
    assert familiarity.frame_score([1.0, 9.0, 9.0]) == 9.0


def test_statistics_from_the_model_flag_a_far_away_input_and_not_a_training_like_one(familiar_checkpoint):
    model, meta = load_checkpoint(familiar_checkpoint)
    stats = meta["familiarity"]
    new_steel = torch.from_numpy(steel_like_batch(range(140, 150)))
    far = torch.from_numpy(far_away_image()[None])
    for pixels, familiar in ((new_steel, True), (far, False)):
        features = predict_logits(model, pixels, "per-image", 8, "cpu", familiarity.layers(stats))[1]
        scores = familiarity.unfamiliarity(features, pixels, stats)
        verdicts = [familiarity.is_familiar(float(v), stats["cutoff"]) for v in scores]
        assert verdicts == [familiar] * len(pixels), (familiar, scores, stats["cutoff"])


def test_the_fit_reads_the_same_features_from_a_pass_stopped_at_the_layer(familiar_checkpoint):
    """train.py fits the statistics from predict_features, which stops each pass at LAYER; inference reads them
    from the whole pass. The two must agree exactly, and the stopped pass must not reach the head."""
    model, _ = load_checkpoint(familiar_checkpoint)
    pixels = torch.from_numpy(steel_like_batch(range(150, 155)))
    whole = predict_logits(model, pixels, "per-image", 4, "cpu", familiarity.LAYER)[1]
    head_calls = []
    hook = model.classifier.register_forward_hook(lambda *_: head_calls.append(1))
    try:
        stopped = predict_features(model, pixels, "per-image", 4, "cpu", familiarity.LAYER)
    finally:
        hook.remove()
    assert torch.equal(stopped, whole) and stopped.shape == (len(pixels), whole.shape[1])
    assert head_calls == []
    # the tap is gone: a later whole pass runs to the end
    assert predict_logits(model, pixels, "per-image", 4, "cpu")[0].shape == (len(pixels), 2)


def test_pixel_statistics_by_hand():
    flat = np.full((1, 8, 8, 3), 77, np.uint8)
    assert familiarity.pixel_statistics(flat).tolist() == [[0.0, 0.0, 0.0]]  # no spread, no steps: log 1
    y, x = np.mgrid[:8, :8]
    checks = np.repeat((((x + y) % 2) * 255).astype(np.uint8)[None, ..., None], 3, axis=3)
    spread = 127.5  # half the pixels 0, half 255; neighbours 1 px apart always differ, 4 px apart never
    expected = [np.log(1 + spread), np.log(256 / (1 + spread)), np.log(1 / (1 + spread))]
    assert np.allclose(familiarity.pixel_statistics(checks)[0].numpy(), expected, atol=1e-5)
    batch = torch.from_numpy(steel_like_batch(range(3)))  # 6 images, in chunks of 4 and 2: the same rows
    assert torch.equal(familiarity.pixel_statistics(batch, chunk=4), familiarity.pixel_statistics(batch))


def test_flat_and_smooth_frames_are_flagged_by_the_pixel_statistics(familiar_checkpoint):
    """Per-image standardisation hides a flat frame's missing texture from the network: the same statistics
    fitted on the features alone (what an older checkpoint holds, and how it is still scored) call two flat
    frames familiar; with the pixel statistics all three frames are flagged."""
    model, meta = load_checkpoint(familiar_checkpoint)
    stats = meta["familiarity"]
    assert familiarity.valid(stats) and stats["pixel_statistics"] == list(familiarity.PIXEL_STATISTICS)
    ramp = np.repeat(np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))[None, ..., None], 3, axis=3)
    grey, bright = np.full((1, 64, 64, 3), 128, np.uint8), np.full((1, 64, 64, 3), 250, np.uint8)
    frames = torch.from_numpy(np.concatenate([grey, bright, ramp]))

    def features_of(pixels, layers=stats["layer"]):
        return predict_logits(model, pixels, "per-image", 16, "cpu", layers)[1]
    scores = familiarity.unfamiliarity(features_of(frames, familiarity.layers(stats)), frames, stats)
    assert [familiarity.is_familiar(float(v), stats["cutoff"]) for v in scores] == [False] * 3, scores

    older = familiarity.fit_model(features_of, torch.from_numpy(steel_like_batch(range(60))),
                                  np.tile(["plain", "scratch"], 60), torch.from_numpy(steel_like_batch(range(60, 100))),
                                  with_pixels=False)
    assert familiarity.valid(older) and "pixel_center" not in older
    assert familiarity.describe(features_of(frames), frames, older).shape == features_of(frames).shape
    flat_scores = familiarity.unfamiliarity(features_of(frames[:2]), frames[:2], older)
    assert [familiarity.is_familiar(float(v), older["cutoff"]) for v in flat_scores] == [True, True], flat_scores


# ---------------------------------------------------------------------------------------------------------
# The temperature
# ---------------------------------------------------------------------------------------------------------
def test_fit_temperature_recovers_the_overconfidence_of_known_logits():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 3, 20_000)
    labels = (rng.random(20_000) < 1 / (1 + np.exp(-z))).astype(int)  # calibrated at logit z
    logits = torch.tensor(np.stack([np.zeros_like(z), 2.5 * z], 1))  # 2.5 times too confident
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)


def test_a_perfectly_separated_validation_split_does_not_drive_p_to_zero_and_one():
    """Smoothed targets: with 38 scratches and 190 others all on the right side, p(defect) of a scratch settles
    near (38 + a) / (38 + 2a), not at 1 (the plain likelihood would take T to its lower bound); Platt's a = 1
    softens more than the default a = 0.5."""
    rng = np.random.default_rng(3)
    z = np.r_[rng.normal(6, 1.5, 38), rng.normal(-6, 1.5, 190)]
    labels = np.r_[np.ones(38), np.zeros(190)]
    logits = torch.tensor(np.stack([np.zeros_like(z), z], 1))
    for a in (PSEUDO_COUNT, 1.0):
        temperature = fit_temperature(logits, labels, a)
        assert temperature > 0.5  # far from T_MIN: p(defect) is not driven to 0 and 1
        p = (logits / temperature).softmax(1)[:, 1].numpy()
        assert p[:38].mean() == pytest.approx((38 + a) / (38 + 2 * a), abs=0.02)
        assert p[38:].mean() == pytest.approx(a / (190 + 2 * a), abs=0.01)
    assert fit_temperature(logits, labels) == fit_temperature(logits, labels, PSEUDO_COUNT)
    assert fit_temperature(logits, labels, 1.0) > fit_temperature(logits, labels, 0.5)


def test_expected_calibration_error_by_hand():
    p, y = [0.05, 0.15, 0.95, 0.96], [0, 0, 1, 0]
    table = reliability_table(p, y)
    assert [row["count"] for row in table] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert table[9]["scratch_rate"] == 0.5 and table[9]["mean_p"] == pytest.approx(0.955)
    assert expected_calibration_error(p, y) == pytest.approx((0.05 + 0.15 + 2 * 0.455) / 4)


def test_ece_interval_resamples_the_images():
    # every image alike: every resample has the same ECE, so the interval is that point
    assert ece_interval([0.9] * 50, [1] * 50) == pytest.approx((0.1, 0.1))
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 1, 300)
    y = (rng.uniform(0, 1, 300) < p).astype(int)  # calibrated by construction
    low, high = ece_interval(p, y)
    assert 0 < low < high < 0.2
    assert ece_interval(p, y) == (low, high)  # a fixed seed: the same predictions, the same interval
    p4 = rng.uniform(0, 1, 1200)
    y4 = (rng.uniform(0, 1, 1200) < p4).astype(int)
    low4, high4 = ece_interval(p4, y4)
    assert high4 - low4 < (high - low) * 0.75  # four times the images: about half as wide
    shifted = np.clip(p4 + 0.2, 0, 1)  # over-confident in 'scratch': the whole interval moves up
    assert ece_interval(shifted, y4)[0] > high4


def test_ece_if_calibrated_is_what_chance_alone_gives():
    assert ece_if_calibrated([0.0] * 40 + [1.0] * 10) == 0.0  # certain predictions: labels drawn as they say
    rng = np.random.default_rng(2)
    p = rng.uniform(0, 1, 300)
    chance = ece_if_calibrated(p)
    assert 0 < chance < 0.2 and ece_if_calibrated(p) == chance
    # labels drawn from p themselves: under the line about 95 times in 100
    under = [expected_calibration_error(p, rng.uniform(size=300) < p) <= chance for _ in range(200)]
    assert 0.88 <= np.mean(under) <= 0.99
    assert expected_calibration_error(np.clip(p + 0.2, 0, 1), rng.uniform(size=300) < p) > chance  # over-confident


def test_apply_temperature_divides_the_logits():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(5, 4)
    before = model(x).detach()
    assert torch.allclose(apply_temperature(model, 0.4)(x), before / 0.4, atol=1e-5)


def test_temperature_is_applied_exactly_once_in_infer_and_evaluate(familiar_checkpoint, tmp_path):
    """The same file gets the same p(defect) from infer.py and evaluate.py, and it is softmax(raw logits / T)."""
    data = tmp_path / "neu"
    for i in range(3):
        save_image(data / f"Sc_{i}.png", "scratch", size=64, seed=60 + i)
        save_image(data / f"Cr_{i}.png", size=64, seed=70 + i)
    result = run_script("infer.py", "--input", data, "--output", tmp_path / "infer", "--model", familiar_checkpoint,
                        "--no-cam")
    assert result.returncode == 0, result.stderr
    inferred = {name: float(row["defect_probability"]) for name, row in read_rows(tmp_path / "infer").items()}
    result = run_script("evaluate.py", "--data-dir", data, "--split", "all", "--model", familiar_checkpoint,
                        "--no-sweep", "--no-report", "--output", tmp_path / "eval")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    evaluated = {name.rsplit("/", 1)[-1]: p for name, p in metrics["probabilities"].items()}
    assert sorted(inferred) == sorted(evaluated)

    raw, meta = load_checkpoint(familiar_checkpoint, calibrated=False)
    assert meta["temperature"] == 0.5
    names = sorted(inferred)
    found = dataset.find_samples(data, require_all_classes=False)[0]
    pixels = torch.from_numpy(dataset.load_pixels(found, 64, progress=False))
    samples = [s.relpath.rsplit("/", 1)[-1] for s in found]
    logits = predict_logits(raw, pixels, "per-image", 8, "cpu")[0]
    once = dict(zip(samples, (logits / 0.5).softmax(1)[:, 1].tolist()))
    without = dict(zip(samples, logits.softmax(1)[:, 1].tolist()))
    for name in names:
        assert inferred[name] == pytest.approx(once[name], abs=2e-4), name
        assert evaluated[name] == pytest.approx(once[name], abs=2e-4), name
    assert max(abs(once[n] - without[n]) for n in names) > 0.01  # the temperature changes p: the check can fail
    assert "calibration error (ECE)" in result.stdout and metrics["calibration"]["temperature"] == 0.5


# ---------------------------------------------------------------------------------------------------------
# What the user sees
# ---------------------------------------------------------------------------------------------------------
def test_infer_marks_the_far_away_image_and_warns_when_many_are(familiar_checkpoint, tmp_path):
    images = tmp_path / "images"
    for seed in (80, 81, 82):
        save_image(images / f"steel_{seed}.png", size=64, seed=seed)
    Image.fromarray(far_away_image()).save(images / "far.png")
    Image.fromarray(np.tile(far_away_image(200), (1, 3, 1))).save(images / "far_frame.png")  # tiled: 200 px tiles
    result = run_script("infer.py", "--input", images, "--output", tmp_path / "out", "--model", familiar_checkpoint)
    assert result.returncode == 0, result.stderr
    rows = read_rows(tmp_path / "out")
    assert {name: row["familiar"] for name, row in rows.items()} == {
        "steel_80.png": "yes", "steel_81.png": "yes", "steel_82.png": "yes", "far.png": "no", "far_frame.png": "no"}
    assert all(float(row["unfamiliarity"]) >= 0 for row in rows.values())
    assert rows["far.png"]["prediction"] in ("defect", "non-defect")  # it keeps its verdict
    assert int(rows["far_frame.png"]["tiles"]) > 1
    assert "2 of 5 images unfamiliar" in result.stdout
    assert "do not look like the training data" in result.stdout  # 40 % > 20 %

    steel_only = tmp_path / "steel_only"
    steel_only.mkdir()
    for seed in (80, 81, 82):
        (steel_only / f"steel_{seed}.png").write_bytes((images / f"steel_{seed}.png").read_bytes())
    result = run_script("infer.py", "--input", steel_only, "--output", tmp_path / "out2", "--model",
                        familiar_checkpoint, "--no-cam")
    assert result.returncode == 0, result.stderr
    assert "0 of 3 images unfamiliar" in result.stdout and "do not look like" not in result.stdout


def test_a_checkpoint_without_statistics_still_infers_and_says_why(tiny_checkpoint, tmp_path):
    images = tmp_path / "images"
    save_image(images / "a.png", seed=1)
    result = run_script("infer.py", "--input", images, "--output", tmp_path / "out", "--model", tiny_checkpoint)
    assert result.returncode == 0, result.stderr
    row = read_rows(tmp_path / "out")["a.png"]
    assert row["prediction"] in ("defect", "non-defect") and row["familiar"] == row["unfamiliarity"] == ""
    assert "familiarity: not checked" in result.stdout
    page = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert "trained without familiarity statistics" in page


# ---------------------------------------------------------------------------------------------------------
# The deep score beside the early one
# ---------------------------------------------------------------------------------------------------------
def test_a_tap_on_two_layers_gives_both_side_by_side_and_stops_after_the_last(familiar_checkpoint):
    model, meta = load_checkpoint(familiar_checkpoint)
    stats = meta["familiarity"]
    assert familiarity.layers(stats) == (familiarity.LAYER, familiarity.DEEP_LAYER)
    pixels = torch.from_numpy(steel_like_batch(range(160, 163)))
    both = predict_logits(model, pixels, "per-image", 4, "cpu", familiarity.layers(stats))[1]
    early = predict_logits(model, pixels, "per-image", 4, "cpu", familiarity.LAYER)[1]
    deep = predict_logits(model, pixels, "per-image", 4, "cpu", familiarity.DEEP_LAYER)[1]
    assert torch.equal(both, torch.cat([early, deep], 1))
    assert early.shape[1] == familiarity.early_width(stats) and deep.shape[1] == stats["deep"]["means"].shape[1] - 3
    head_calls = []
    hook = model.classifier.register_forward_hook(lambda *_: head_calls.append(1))
    try:
        stopped = predict_features(model, pixels, "per-image", 4, "cpu", familiarity.layers(stats))
    finally:
        hook.remove()
    assert torch.equal(stopped, both) and head_calls == []


def test_the_score_is_the_larger_of_the_two_in_the_early_units(familiar_checkpoint):
    model, meta = load_checkpoint(familiar_checkpoint)
    stats = meta["familiarity"]
    deep = stats["deep"]
    assert familiarity.valid(stats) and deep["layer"] == familiarity.DEEP_LAYER and deep["n_train"] == 120
    assert stats["n_train"] == 120 * (familiarity.COPIES + 1)  # the early score reads the copies, the deep one not
    pixels = torch.from_numpy(np.concatenate([steel_like_batch(range(170, 172)), far_away_image()[None]]))
    features = predict_logits(model, pixels, "per-image", 8, "cpu", familiarity.layers(stats))[1]
    width = familiarity.early_width(stats)
    early = familiarity.score(familiarity.describe(features[:, :width], pixels, stats), stats)
    deep_score = familiarity.score(familiarity.describe(features[:, width:], pixels, deep), deep)
    expected = torch.maximum(early, deep_score * stats["cutoff"] / deep["cutoff"])
    assert torch.allclose(familiarity.unfamiliarity(features, pixels, stats), expected)
    # either score over its own cut-off flags the image
    ratio = deep_score / deep["cutoff"]
    assert ((expected > stats["cutoff"]) == ((early > stats["cutoff"]) | (ratio > 1))).all()
    # without "deep" (a checkpoint fitted before it) the early score alone, from the early features alone
    older = {k: v for k, v in stats.items() if k != "deep"}
    assert torch.allclose(familiarity.unfamiliarity(features[:, :width], pixels, older), early)


def test_damaged_deep_statistics_are_refused():
    rng = np.random.default_rng(3)
    early = familiarity.fit(rng.normal(size=(80, 4)), np.zeros(80, int), rng.normal(size=(20, 4)))
    deep = familiarity.fit(rng.normal(size=(80, 6)), np.zeros(80, int), rng.normal(size=(20, 6)),
                           layer=familiarity.DEEP_LAYER)
    assert familiarity.valid({**early, "deep": deep})
    assert not familiarity.valid({**early, "deep": {**deep, "precision": deep["precision"][:3]}})
    assert not familiarity.valid({**early, "deep": {**deep, "deep": deep}})       # no deeper nesting
    assert not familiarity.valid({**early, "deep": {**deep, "cutoff": float("nan")}})


def test_one_pass_reads_both_layers_and_fits_what_two_passes_fit(familiar_checkpoint):
    """fit_model(deep=True) reads the clean images' early and deep features in one pass; the statistics must be
    those of separate passes (each stopped at its layer), number for number."""
    model, _ = load_checkpoint(familiar_checkpoint)

    def features_of(pixels, layers=familiarity.LAYER):
        return predict_features(model, pixels, "per-image", 16, "cpu", layers)
    train, val = torch.from_numpy(steel_like_batch(range(20))), torch.from_numpy(steel_like_batch(range(20, 30)))
    classes = np.tile(["plain", "scratch"], 20)
    stats = familiarity.fit_model(features_of, train, classes, val, deep=True)
    early_only = familiarity.fit_model(features_of, train, classes, val)
    parts = (("train", train), ("val", val))
    deep = {part: features_of(pixels, familiarity.DEEP_LAYER) for part, pixels in parts}
    separate = familiarity.fit_deep({"deep": deep, **{part: (None, familiarity.pixel_statistics(pixels))
                                                     for part, pixels in parts}}, classes)
    for key in ("means", "precision", "pixel_center", "pixel_scale"):
        assert torch.equal(stats[key], early_only[key]) and torch.equal(stats["deep"][key], separate[key])
    assert stats["cutoff"] == early_only["cutoff"] and stats["deep"]["cutoff"] == separate["cutoff"]
