"""bench/robustness.py's rule for the magnification rows: a scratch counts when at least half its box stays in the
magnified view. The share must be measured on the window perturb.magnify really keeps."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import robustness  # noqa: E402
from scratch_detector import perturb  # noqa: E402


def voc(tmp_path, boxes, size=(200, 200)):
    """A VOC file with these 1-based inclusive boxes (xmin, ymin, xmax, ymax), as NEU-DET writes them."""
    objects = "".join(f"<object><name>scratches</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
                      f"<ymax>{d}</ymax></bndbox></object>" for a, b, c, d in boxes)
    path = tmp_path / "scratches_1.xml"
    path.write_text(f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height><depth>1</depth></size>"
                    f"{objects}</annotation>")
    return path


@pytest.mark.parametrize("factor", [1.25, 1.5, 2.0])
def test_the_window_is_what_magnify_keeps(factor):
    image = np.zeros((200, 200, 3), np.uint8)
    top, left, height, width = perturb.magnify_window(200, 200, factor)
    image[top:top + height, left:left + width] = 255
    assert perturb.magnify(image, factor).min() == 255  # everything in view comes from inside the window
    image[top:top + height, left:left + width] = 0
    assert perturb.magnify(image, factor).max() == 0


def test_share_in_view_of_a_centred_a_cropped_and_a_straddling_box(tmp_path):
    # 1.5x keeps rows and columns 34..166 (133 px) of 200
    assert robustness.share_in_view(voc(tmp_path, [(91, 11, 110, 190)]), (200, 200), 1.0) == 1.0
    assert robustness.share_in_view(voc(tmp_path, [(80, 80, 120, 120)]), (200, 200), 1.5) == 1.0
    assert robustness.share_in_view(voc(tmp_path, [(1, 1, 20, 200)]), (200, 200), 1.5) == 0.0
    straddling = robustness.share_in_view(voc(tmp_path, [(15, 91, 54, 110)]), (200, 200), 1.5)  # x 14..53
    assert straddling == pytest.approx(20 / 40)
    # two boxes count as one area; a box in annotation pixels is scaled to the image it annotates
    assert robustness.share_in_view(voc(tmp_path, [(1, 1, 20, 20), (91, 91, 110, 110)]), (200, 200), 1.5) == 0.5
    assert robustness.share_in_view(voc(tmp_path, [(1, 1, 10, 100)], size=(100, 100)), (200, 200), 1.5) == 0.0
