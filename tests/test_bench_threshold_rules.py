"""bench/threshold_rules.py: each rule's threshold comes from one half of a fold and decides only the other half,
every scratch is counted once per halving, and the clean-first rule never gives up a clean image for the copies."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import threshold_rules  # noqa: E402
from scratch_detector.metrics import choose_threshold  # noqa: E402


def fold(n_other=40, n_scratch=10):
    labels = np.array([0] * n_other + [1] * n_scratch)
    clean = np.where(labels == 1, 0.99, 0.3)
    blurred = np.where(labels == 1, 0.6, 0.05)        # a change that drops every scratch to 0.6
    copies = [np.where(labels == 1, 0.6, 0.2)] * 2    # the copies say: cut between 0.2 and 0.6
    return {"labels": labels, "rows": {"none": clean, "blur": blurred}, "copies": copies, "in_view": {}}


def test_every_image_is_scored_once_per_halving_by_the_threshold_of_the_other_half():
    rules = {"high": lambda p, c, y: 0.9, "low": lambda p, c, y: 0.5, "seen": lambda p, c, y: float(len(p))}
    errors, thresholds = threshold_rules.cross_fitted([fold(), fold(20, 6)], rules, repeats=3)
    assert errors["high"]["blur"].tolist() == [16.0, 0.0]  # all 10 + 6 scratches missed, once per halving
    assert errors["low"]["blur"].tolist() == [0.0, 0.0]
    assert errors["high"]["none"].tolist() == [0.0, 0.0]
    # a rule sees half a fold: 25 of 50 images (20 + 5), then 13 of 26 (10 + 3), in each of 2 swaps x 3 repeats
    assert sorted(set(thresholds["seen"])) == [13.0, 25.0] and len(thresholds["seen"]) == 12


def test_clean_first_then_copies_cuts_where_the_copies_separate_without_losing_a_clean_image():
    f = fold()
    y, clean = f["labels"], f["rows"]["none"]
    t = threshold_rules.clean_first_then_copies(clean, f["copies"], y)
    assert 0.3 < t < 0.6                                 # under the copies' scratches, over every clean plate
    assert ((clean >= t) == (y == 1)).all()              # and still every clean image right
    assert choose_threshold(clean, y) > 0.6              # the clean-only rule cuts above the blurred scratches


def test_folds_must_exist(tmp_path):
    with pytest.raises(SystemExit, match="crossval.py --keep"):
        threshold_rules.main(["--folds", str(tmp_path)])
