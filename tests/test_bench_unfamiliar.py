"""bench/unfamiliar.py's trade-off table and clean-only candidate: the shipped score at other cut-offs counts,
per quantile, exactly the images over that quantile of the validation scores; the clean-only fit reads the clean
images alone, never their camera-changed copies."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, bench_module

sys.path.insert(0, str(ROOT / "bench"))
import unfamiliar  # noqa: E402  (bench/unfamiliar.py)
from scratch_detector import familiarity  # noqa: E402


def test_each_row_counts_the_images_over_that_validation_quantile():
    val = np.arange(1, 101, dtype=float)           # quantile q of 1..100 is 1 + 99 q
    test = np.array([10.0, 96.0, 99.5, 150.0])
    others = {"a": [50.0, 98.0, 200.0], "b": [0.5]}
    camera = {"blur": np.array([97.0, 99.0, 101.0])}
    rows = unfamiliar.trade_off_rows(val, test, others, camera, quantiles=(0.95, 0.99, 1.0))
    assert [r["cutoff"] for r in rows] == [np.quantile(val, q) for q in (0.95, 0.99, 1.0)]
    assert [r["test_flagged"] for r in rows] == [3, 2, 1]       # over 95.05, 99.01, 100
    assert [r["a_flagged"] for r in rows] == [2, 1, 1]
    assert [r["b_flagged"] for r in rows] == [0, 0, 0]
    assert [r["camera_flagged"]["blur"] for r in rows] == [3, 1, 1]


def test_the_shipped_quantile_reproduces_the_cutoff_train_py_sets():
    rng = np.random.default_rng(0)
    train, val = rng.normal(size=(400, 5)), rng.normal(size=(200, 5))
    stats = familiarity.fit(train, np.zeros(400, int), val)
    val_scores = familiarity.score(torch.as_tensor(val, dtype=torch.float32), stats).numpy()
    row, = unfamiliar.trade_off_rows(val_scores, val_scores, {}, {}, quantiles=(stats["quantile"],))
    assert abs(row["cutoff"] - stats["cutoff"]) < 1e-6
    assert row["test_flagged"] == int((val_scores > stats["cutoff"]).sum()) <= 1


def test_the_clean_only_fit_ignores_the_copies():
    rng = np.random.default_rng(1)
    classes = np.repeat(["crazing", "scratches"], 50)
    shifted = rng.normal(size=(100, 4)) + (classes == "scratches")[:, None] * 3
    clean_train = torch.as_tensor(shifted, dtype=torch.float32)
    clean_val = torch.as_tensor(rng.normal(size=(40, 4)), dtype=torch.float32)
    pixel = lambda n: torch.as_tensor(rng.normal(size=(n, 3)), dtype=torch.float32)
    far = lambda n: torch.full((n, 4), 50.0)  # copies far from every clean image: they would move means and cut-off
    copies = {"train": (torch.cat([clean_train, far(100 * familiarity.COPIES)]), pixel(100 * (familiarity.COPIES + 1))),
              "val": (torch.cat([clean_val, far(40 * familiarity.COPIES)]), pixel(40 * (familiarity.COPIES + 1)))}
    stats = unfamiliar.fit_early_clean(copies, classes)
    assert stats["n_train"] == 100 and stats["n_val"] == 40
    assert torch.allclose(stats["means"][1, :4], clean_train[50:].mean(0), atol=1e-5)
    assert torch.allclose(stats["pixel_center"], copies["train"][1][:100].mean(0), atol=1e-5)
    with_copies = familiarity.fit_copies(copies, classes)
    assert with_copies["n_train"] == 100 * (familiarity.COPIES + 1)        # the shipped fit reads the copies:
    assert (with_copies["means"][1, :4] - clean_train[50:].mean(0)).abs().min() > 10  # its means move to them


def test_a_gimp_pattern_is_read_as_its_pixels(tmp_path):
    rng = np.random.default_rng(2)
    for depth in (1, 2, 3, 4):
        pixels = rng.integers(0, 256, (5, 7, depth), dtype=np.uint8)
        name = b"a pattern\x00"
        header = np.array([24 + len(name), 1, 7, 5, depth], ">u4").tobytes() + b"GPAT" + name
        path = tmp_path / f"p{depth}.pat"
        path.write_bytes(header + pixels.tobytes())
        got = unfamiliar.read_gimp_pattern(path)
        assert np.array_equal(got, pixels[..., 0] if depth <= 2 else pixels[..., :3])
    (tmp_path / "bad.pat").write_bytes(np.array([24, 1, 1, 1, 1], ">u4").tobytes() + b"XXXX" + b"\x00")
    with pytest.raises(ValueError, match="not a GIMP pattern"):
        unfamiliar.read_gimp_pattern(tmp_path / "bad.pat")


def test_the_fifth_held_out_set_holds_no_earlier_picture_and_no_near_duplicate():
    bench_module("pydicom")
    images = {name: np.asarray(load()) for name, (_, load) in unfamiliar.fifth_set().items()}
    assert images and not {f"dicom_{name[:-4]}" for name in unfamiliar.USED_DICOM} & set(images)
    assert all(min(a.shape[:2]) >= unfamiliar.MIN_SIDE and a.dtype == np.uint8 for a in images.values())
    from PIL import Image
    small = [np.asarray(Image.fromarray(a).convert("L").resize((64, 64), Image.BILINEAR), np.float32)
             for a in images.values()]
    gaps = [np.abs(a - b).mean() for i, a in enumerate(small) for b in small[:i]]
    assert min(gaps) >= unfamiliar.NEAR_DUPLICATE
