"""Metric and localization arithmetic on small cases with answers worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest

from evaluate import binary_metrics, box_mask, energy_in_box, pointing_hit, read_boxes, roc_auc
from train import choose_threshold

VOC = """<annotation><size><width>{w}</width><height>{h}</height><depth>1</depth></size>
{objects}</annotation>"""
OBJECT = ("<object><name>scratches</name><difficult>0</difficult><bndbox><xmin>{}</xmin><ymin>{}</ymin>"
          "<xmax>{}</xmax><ymax>{}</ymax></bndbox></object>")


def write_voc(path, size, boxes):
    path.write_text(VOC.format(w=size[0], h=size[1], objects="".join(OBJECT.format(*b) for b in boxes)))
    return path


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
    assert pointing_hit(heatmap, mask)
    heatmap[7, 8], heatmap[15, 15] = 0.5, 1.0
    assert not pointing_hit(heatmap, mask)


def test_energy_in_box_known_answers():
    mask = box_mask((10, 10), [(0, 0, 5, 4)])  # 20 of 100 pixels
    assert energy_in_box(np.ones((10, 10)), mask) == pytest.approx(0.20)  # uniform map: the box's area share
    only_inside = np.where(mask, 0.7, 0.0)
    assert energy_in_box(only_inside, mask) == pytest.approx(1.0)
    half = np.where(mask, 1.0, 0.25)  # inside mass 20, outside 80 * 0.25 = 20
    assert energy_in_box(half, mask) == pytest.approx(0.5)
    assert energy_in_box(np.zeros((10, 10)), mask) == 0.0


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


def test_roc_auc_by_hand():
    # defects 0.9, 0.4 vs non-defects 0.2, 0.6, 0.1: 0.9 beats 3, 0.4 beats 2 -> 5 of 6 pairs
    assert roc_auc([0.9, 0.2, 0.6, 0.4, 0.1], [1, 0, 0, 1, 0]) == pytest.approx(5 / 6)
    assert roc_auc([0.3, 0.3], [1, 0]) == pytest.approx(0.5)  # a tie counts half
    assert np.isnan(roc_auc([0.3], [1]))


def test_threshold_rule_separable_takes_middle_of_the_gap():
    # highest non-defect 0.30, lowest defect 0.70: every cut in between is perfect; take the middle
    assert choose_threshold([0.1, 0.3, 0.7, 0.95], [0, 0, 1, 1]) == pytest.approx(0.5)
    assert choose_threshold([0.01, 0.02, 0.2, 0.9], [0, 0, 1, 1]) == pytest.approx(0.11)


def test_threshold_rule_maximises_youden_j():
    probabilities = [0.05, 0.1, 0.35, 0.4, 0.6, 0.8, 0.9]
    labels = [0, 0, 1, 0, 1, 1, 1]
    t = choose_threshold(probabilities, labels)
    best = max(binary_metrics(probabilities, labels, c)["recall"] + binary_metrics(probabilities, labels, c)["specificity"]
               for c in np.linspace(0, 1, 1001))
    m = binary_metrics(probabilities, labels, t)
    assert m["recall"] + m["specificity"] == pytest.approx(best)
