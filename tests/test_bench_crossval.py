"""bench/crossval.py --camera: each camera change is summed over the folds' held-out images, so the table counts
every train + validation image once (rates from the summed counts, not the mean of the folds' rates)."""
from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import crossval  # noqa: E402


def row(name, asked, n, scratches, misses, alarms, in_view=None):
    r = dict(perturbation=name, asked=asked, n_images=n, n_scratches=scratches, misses=misses, false_alarms=alarms)
    if in_view:
        r.update(in_view_scratches=in_view[0], in_view_misses=in_view[1])
    return r


def test_camera_rows_are_summed_over_the_folds():
    folds = [{"camera": [row("none", True, 250, 40, 0, 1), row("1.5x magnification", True, 250, 40, 3, 0, (30, 1)),
                         row("gamma 0.7", False, 250, 40, 0, 0)]},
             {"camera": [row("none", True, 260, 44, 1, 0), row("1.5x magnification", True, 260, 44, 5, 2, (33, 0)),
                         row("gamma 0.7", False, 260, 44, 0, 0)]}]
    lines = crossval.camera_table(folds).splitlines()
    assert lines[2] == "| none | 0.9961 | 0.9881 (83 of 84) | 1 | 1 | - |"  # 2 errors of 510; 83 of 84 found
    assert lines[3] == "| 1.5x magnification | 0.9804 | 0.9048 (76 of 84) | 2 | 8 | 0.9841 (1 of 63) |"
    assert lines[4] == "| gamma 0.7 (other value) | 1.0000 | 1.0000 (84 of 84) | 0 | 0 | - |"


def test_keep_refuses_a_folder_that_exists(tmp_path):
    """--keep must never write fold checkpoints over an earlier run's."""
    with pytest.raises(SystemExit):
        crossval.parse_args(["--keep", str(tmp_path)])
    assert crossval.parse_args(["--keep", str(tmp_path / "new")]).keep == tmp_path / "new"
