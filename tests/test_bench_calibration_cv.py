"""bench/calibration_cv.py: a held-out image's p(defect) comes from a temperature fitted on the other half of its
fold, never on itself; the cross-fitted temperature finds a known miscalibration and the ECE falls with it."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import calibration_cv  # noqa: E402


def synthetic_fold(n: int, scale: float, seed: int) -> dict:
    """Labels drawn from true log-odds z, logits that say scale * z: a model overconfident by `scale`."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, n)
    labels = (rng.uniform(size=n) < 1 / (1 + np.exp(-z))).astype(int)
    logits = torch.from_numpy(np.stack([np.zeros(n), scale * z], 1))
    return {"logits": logits, "labels": labels, "temperature": 1.0}


def test_each_image_is_calibrated_by_a_temperature_fitted_without_it(monkeypatch):
    folds = [synthetic_fold(60, 1.0, 0), synthetic_fold(40, 1.0, 1)]
    for f in folds:  # the logits name their image: row i has logit i + 1000 * fold
        f["logits"][:, 1] = torch.arange(len(f["labels"]), dtype=torch.float64)
    folds[1]["logits"][:, 1] += 1000
    fitted, scored = [], []
    real_fit, real_p = calibration_cv.fit_temperature, calibration_cv.p_defect
    monkeypatch.setattr(calibration_cv, "fit_temperature",
                        lambda logits, labels, *rule: fitted.append(set(logits[:, 1].tolist()))
                        or real_fit(logits, labels, *rule))
    monkeypatch.setattr(calibration_cv, "p_defect",
                        lambda logits, t: scored.append(set(logits[:, 1].tolist())) or real_p(logits, t))
    result = calibration_cv.cross_fitted(folds, repeats=2)
    assert len(fitted) == len(scored) == 2 * 2 * 2  # 2 halvings x 2 folds x 2 halves
    for seen, calibrated in zip(fitted, scored):
        assert not seen & calibrated                 # never fitted on an image it calibrates
        assert len(seen | calibrated) in (60, 40)    # and the two halves make the whole fold
    assert len(result["pooled"]) == 2 and len(result["probabilities"][0]) == 100


def test_a_known_overconfidence_is_found_and_undone():
    folds = [synthetic_fold(400, 2.0, seed) for seed in range(3)]
    result = calibration_cv.cross_fitted(folds, repeats=3)
    assert 1.6 < np.median(result["temperatures"]) < 2.5     # the logits say twice the true log-odds
    uncalibrated = calibration_cv.expected_calibration_error(
        np.concatenate([calibration_cv.p_defect(f["logits"], 1.0) for f in folds]), result["labels"])
    assert np.median(result["pooled"]) < 0.6 * uncalibrated


def test_folds_must_exist(tmp_path):
    with pytest.raises(SystemExit, match="crossval.py --keep"):
        calibration_cv.main(["--folds", str(tmp_path)])
