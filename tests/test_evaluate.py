"""Metric and localization arithmetic on small cases with answers worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_voc
from torch import nn

from gradcam import METHODS
from scratch_detector.metrics import (binary_metrics, box_mask, choose_threshold, energy_in_box, localization_scores,
                                      pointing_hit, read_boxes, roc_auc, wilson_interval)


def test_voc_boxes_are_one_based_inclusive(tmp_path):
    size, boxes = read_boxes(write_voc(tmp_path / "a.xml", (200, 100), [(1, 1, 10, 5), (191, 91, 200, 100)]))
    assert size == (200, 100)
    assert boxes == [(0, 0, 10, 5), (190, 90, 200, 100)]
    mask = box_mask(size, boxes)
    assert mask.shape == (100, 200)
    assert mask.sum() == 10 * 5 + 10 * 10
    assert mask[0, 0] and mask[4, 9] and not mask[5, 9] and not mask[4, 10] and mask[99, 199]


def test_pointing_game_hit_and_miss():
    mask = box_mask((20, 20), [(5, 5, 10, 10)])
    heatmap = np.zeros((20, 20))
    heatmap[7, 8] = 1.0
    assert pointing_hit(heatmap, mask) == 1.0  # one maximum, inside
    heatmap[7, 8], heatmap[15, 15] = 0.5, 1.0
    assert pointing_hit(heatmap, mask) == 0.0  # one maximum, outside


@pytest.mark.parametrize("value", [0.0, 0.6])
def test_pointing_game_flat_map_is_a_miss(value):
    # every pixel ties for the maximum, several inside the box: a map with no signal must not score
    mask = box_mask((20, 20), [(0, 0, 19, 19)])  # the box covers 90% of the image
    assert pointing_hit(np.full((20, 20), value), mask) == 0.0


def test_pointing_game_tie_scores_the_share_inside():
    mask = box_mask((20, 20), [(5, 5, 10, 10)])
    heatmap = np.full((20, 20), 0.1)
    for y, x in [(6, 6), (0, 0), (15, 3), (19, 19)]:  # 4 maximal pixels, 1 inside: a random pick hits 1 in 4
        heatmap[y, x] = 1.0
    assert pointing_hit(heatmap, mask) == pytest.approx(0.25)


def test_energy_in_box_known_answers():
    mask = box_mask((10, 10), [(0, 0, 5, 4)])  # 20 of 100 pixels
    assert energy_in_box(np.ones((10, 10)), mask) == pytest.approx(0.20)  # uniform map: the box's area share
    only_inside = np.where(mask, 0.7, 0.0)
    assert energy_in_box(only_inside, mask) == pytest.approx(1.0)
    half = np.where(mask, 1.0, 0.25)  # inside mass 20, outside 80 * 0.25 = 20
    assert energy_in_box(half, mask) == pytest.approx(0.5)
    assert energy_in_box(np.zeros((10, 10)), mask) == 0.0


class BrightSpotNet(nn.Module):
    """Stub classifier whose CAM is known: features.0 averages the channels (a 1x1 conv), the defect logit is
    the spatial mean of that, so every method's CAM for class 1 is the image's bright spot and nothing else."""

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(3, 1, 1)
        nn.init.constant_(conv.weight, 1 / 3)
        nn.init.zeros_(conv.bias)
        self.features = nn.Sequential(conv)

    def forward(self, x):
        score = self.features(x).mean(dim=(2, 3))
        return torch.cat([-score, score], 1)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_localization_scores_keep_width_and_height_apart(method):
    # The model sees a square 32 px image with a bright 3x3 spot at 80% of the width, 20% of the height; the
    # original was 40 wide x 80 high, so the spot is at x ~ 32, y ~ 16 there: the right box scores 1, the
    # transposed box 0. A heatmap resized to (width, height) no longer fits the (height, width) mask; a
    # transposed heatmap, or boxes with x and y swapped, point at x ~ 16, y ~ 32, in the transposed box.
    pixels = np.full((1, 32, 32, 3), 100, dtype=np.uint8)
    pixels[0, 5:8, 24:27] = 250  # rows 5-7 (y), columns 24-26 (x)
    size = (40, 80)  # (width, height) of the original image
    right, transposed = (26, 8, 38, 24), (8, 26, 24, 38)  # (x0, y0, x1, y1); the second swaps x and y
    model = BrightSpotNet().eval()
    scores = {name: localization_scores(model, pixels, [(size, [box])], "per-image", method, "features.0", 8,
                                        torch.device("cpu"))
              for name, box in (("right", right), ("transposed", transposed))}
    assert scores["right"]["pointing_game"] == 1.0 and scores["right"]["n_images"] == 1
    assert scores["transposed"]["pointing_game"] == 0.0
    assert scores["right"]["energy_in_box"] > 0.9 and scores["transposed"]["energy_in_box"] < 0.01


def test_localization_scores_flat_image_scores_nothing():
    # an even grey image: per-image standardisation gives zeros, the CAM is flat zero, no point and no energy
    pixels = np.full((2, 32, 32, 3), 120, dtype=np.uint8)
    boxes = [((40, 80), [(0, 0, 40, 60)])] * 2  # the box covers 75% of the image
    result = localization_scores(BrightSpotNet().eval(), pixels, boxes, "per-image", "layercam", "features.0", 8,
                                 torch.device("cpu"))
    assert result["pointing_game"] == 0.0 and result["energy_in_box"] == 0.0 and result["n_images"] == 2


def test_binary_metrics_by_hand():
    probabilities = [0.9, 0.2, 0.6, 0.4, 0.1]
    labels = [1, 0, 0, 1, 0]
    m = binary_metrics(probabilities, labels, threshold=0.5)  # predicted 1, 0, 1, 0, 0
    assert m["confusion_matrix"] == {"tn": 2, "fp": 1, "fn": 1, "tp": 1}
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(1 / 2)
    assert m["n_images"] == 5
    # threshold is inclusive: p == t is a defect
    assert binary_metrics([0.5], [1], threshold=0.5)["recall"] == 1.0


def test_wilson_interval_known_values():
    # textbook values: 0 of 10 allows up to 0.2775; all 38 of 38 scratches found still allows a recall of 0.908
    assert wilson_interval(0, 10) == pytest.approx([0.0, 0.27753], abs=1e-5)
    assert wilson_interval(38, 38) == pytest.approx([0.90819, 1.0], abs=1e-5)
    assert wilson_interval(5, 10) == pytest.approx([0.23659, 0.76341], abs=1e-5)
    low, high = wilson_interval(7, 40)
    assert [1 - high, 1 - low] == pytest.approx(wilson_interval(33, 40))  # symmetric in success and failure
    assert np.isnan(wilson_interval(0, 0)).all()
    m = binary_metrics([0.9, 0.2, 0.6, 0.4, 0.1], [1, 0, 0, 1, 0], threshold=0.5)
    assert m["intervals_95"] == {"accuracy": wilson_interval(3, 5), "recall": wilson_interval(1, 2),
                                 "specificity": wilson_interval(2, 3)}


def test_roc_auc_by_hand():
    # defects 0.9, 0.4 vs non-defects 0.2, 0.6, 0.1: 0.9 beats 3, 0.4 beats 2 -> 5 of 6 pairs
    assert roc_auc([0.9, 0.2, 0.6, 0.4, 0.1], [1, 0, 0, 1, 0]) == pytest.approx(5 / 6)
    assert roc_auc([0.3, 0.3], [1, 0]) == pytest.approx(0.5)  # a tie counts half
    assert np.isnan(roc_auc([0.3], [1]))


def test_threshold_rule_separable_takes_middle_of_the_gap():
    # highest non-defect 0.30, lowest defect 0.70: every cut in between is perfect; take the middle
    assert choose_threshold([0.1, 0.3, 0.7, 0.95], [0, 0, 1, 1]) == pytest.approx(0.5)
    # the middle in log-odds: odds sqrt(0.02 / 0.98 * 0.2 / 0.8), not the probabilities' midpoint 0.11
    assert choose_threshold([0.01, 0.02, 0.2, 0.9], [0, 0, 1, 1]) == pytest.approx(0.0667, abs=1e-4)


def test_threshold_rule_maximises_youden_j():
    probabilities = [0.05, 0.1, 0.35, 0.4, 0.6, 0.8, 0.9]
    labels = [0, 0, 1, 0, 1, 1, 1]
    t = choose_threshold(probabilities, labels)
    best = max(binary_metrics(probabilities, labels, c)["recall"] + binary_metrics(probabilities, labels, c)["specificity"]
               for c in np.linspace(0, 1, 1001))
    m = binary_metrics(probabilities, labels, t)
    assert m["recall"] + m["specificity"] == pytest.approx(best)
