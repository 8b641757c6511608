"""bench/new_line.py: each model's familiarity flags, counted as infer.py would flag them, beside its verdicts (a
checkpoint without statistics has none to count); each line's camera change, drawn the same for the same image;
the new line under further draws of its noise, counted as the table counts."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import torch

from conftest import ROOT, steel_like_batch

sys.path.insert(0, str(ROOT / "bench"))
import new_line  # noqa: E402  (bench/new_line.py)
from robustness import perturbed_pixels  # noqa: E402
from scratch_detector import familiarity  # noqa: E402
from scratch_detector.model import load_checkpoint, predict_logits  # noqa: E402


def far_away(n: int) -> np.ndarray:
    y, x = np.mgrid[:64, :64]
    image = np.stack([np.where(x > y, 255, 0), (x // 16 % 2) * 255, (y // 16 % 2) * 255], -1).astype(np.uint8)
    return np.repeat(image[None], n, 0)


def test_the_unfamiliar_count_is_what_the_checkpoint_flags(familiar_checkpoint, tiny_checkpoint):
    steel = torch.from_numpy(steel_like_batch(range(180, 183)))
    mixed = torch.cat([steel, torch.from_numpy(far_away(2))])
    labels = np.tile([0, 1], 4)[:len(mixed)]
    sets = {"steel": (steel, labels[:len(steel)]), "mixed": (mixed, labels)}
    scored = new_line.score(familiar_checkpoint, sets)
    model, meta = load_checkpoint(familiar_checkpoint)
    stats = meta["familiarity"]
    for name, (pixels, _) in sets.items():
        features = predict_logits(model, pixels, "per-image", 8, "cpu", familiarity.layers(stats))[1]
        expected = int((familiarity.unfamiliarity(features, pixels, stats) > stats["cutoff"]).sum())
        assert scored[name]["unfamiliar"] == expected
    assert scored["mixed"]["unfamiliar"] >= scored["steel"]["unfamiliar"] + 2   # both far-away images flagged
    assert new_line.cells(scored["mixed"])[-1] == f"{scored['mixed']['unfamiliar']} / {len(mixed)}"
    without = new_line.score(tiny_checkpoint, {"steel": sets["steel"]})
    assert without["steel"]["unfamiliar"] is None and new_line.cells(without["steel"])[-1] == "-"


def test_each_line_is_its_camera_change_and_draws_the_same_noise_for_the_same_image():
    image = steel_like_batch([7])[0]
    sample, other = SimpleNamespace(relpath="IMAGES/a.jpg"), SimpleNamespace(relpath="IMAGES/b.jpg")
    for name, (_, change) in new_line.LINES.items():
        seen = new_line.line_image(sample, image, name)
        assert seen.shape == image.shape and seen.dtype == np.uint8 and not np.array_equal(seen, image), name
        assert np.array_equal(seen, new_line.line_image(sample, image, name)), name  # drawn again: the same
    noisy = new_line.DEFAULT_LINE
    assert not np.array_equal(new_line.line_image(sample, image, noisy), new_line.line_image(other, image, noisy))
    assert np.array_equal(new_line.line_image(sample, image, "blur2.5"), new_line.line_image(other, image, "blur2.5"))
    flat = new_line.line_image(sample, image, noisy).astype(float)
    assert flat.std() < image.astype(float).std()  # contrast x0.3 flattens more than noise sigma 10 adds back


def test_draws_of_the_noise_keep_draw_zero_and_count_what_score_counts(decisive_checkpoint):
    images = list(steel_like_batch(range(3)))
    change = new_line.LINES[new_line.DEFAULT_LINE][1]
    assert new_line.redrawn(change, 0) is change  # draw 0 is the table's
    draws = [perturbed_pixels(images, new_line.redrawn(change, d), 64) for d in range(3)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert torch.equal(draws[2], perturbed_pixels(images, new_line.redrawn(change, 2), 64))  # the same when redrawn
    labels = np.tile([0, 1], 3)
    _, meta = load_checkpoint(decisive_checkpoint)
    counted = new_line.draws_found(decisive_checkpoint, draws, labels)
    for d, pixels in enumerate(draws):
        matrix = new_line.score(decisive_checkpoint, {"line": (pixels, labels)})["line"]["confusion_matrix"]
        assert (counted["found"][d], counted["false_alarms"][d]) == (matrix["tp"], matrix["fp"])
    model, _ = load_checkpoint(decisive_checkpoint)
    wrong = np.zeros(len(labels), dtype=int)
    for pixels in draws:
        p = predict_logits(model, pixels, meta["normalization"], 8, "cpu")[0].softmax(1)[:, 1].numpy()
        wrong += (p >= meta["threshold"]) != (labels == 1)
    assert np.array_equal(counted["wrong"], wrong)
    assert new_line.draw_cells(counted, 3)[1] == f"{sum(f == 3 for f in counted['found'])} of 3"
