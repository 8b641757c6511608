"""bench/unfamiliar.py's nearest-neighbour candidate: whitened by the shipped score's shared covariance, its
distance between two vectors is their Mahalanobis distance, so the candidate differs from the shipped score only
in what it measures against (every training vector instead of the class means)."""
from __future__ import annotations

import sys

import numpy as np
import torch

from conftest import ROOT, bench_module

sys.path.insert(0, str(ROOT / "bench"))
import unfamiliar  # noqa: E402  (bench/unfamiliar.py)
from scratch_detector import familiarity  # noqa: E402


def test_the_whitened_distance_is_the_mahalanobis_distance_and_zero_on_a_training_vector():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(6, 6))
    train = rng.normal(size=(300, 6)) @ mixing  # correlated features
    stats = familiarity.fit(train, np.zeros(len(train), int), train[:50])
    whiten = unfamiliar.whitening(stats)
    reference = torch.as_tensor(train, dtype=torch.float32)
    nearest = {"reference": reference @ whiten, "whiten": whiten}
    queries = torch.as_tensor(rng.normal(size=(5, 6)) @ mixing, dtype=torch.float32)
    got = unfamiliar.nearest_score(queries @ whiten, nearest)
    precision = stats["precision"].double()
    gaps = queries.double()[:, None, :] - reference.double()[None]
    expected = torch.einsum("qnd,de,qne->qn", gaps, precision, gaps).sqrt().min(1).values
    assert torch.allclose(got.double(), expected, rtol=1e-4)
    assert unfamiliar.nearest_score(reference[:3] @ whiten, nearest).max() < 1e-3  # a training vector is at 0


def test_the_third_held_out_set_is_built_from_what_the_bench_requirements_install(tmp_path):
    bench_module("skimage")
    bench_module("pydicom")
    made = unfamiliar.write_non_steel(tmp_path, unfamiliar.NON_STEEL_THIRD)
    assert len(made) == len(unfamiliar.NON_STEEL_THIRD) == 15
    from PIL import Image
    for name, source, path in made:
        pixels = np.asarray(Image.open(path).convert("L"), np.float64)
        assert source and pixels.std() > 1, name  # a picture, not a blank (the disparity map's inf once made one)
