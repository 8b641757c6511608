"""Resumable runs of infer.py's local engine (the journal wired in): kill -9 mid-run, then the same command
finishes the rest with the clean run's bytes; a changed model or threshold starts over; --restart; and the
on-disk input listing (storage.py) names overlays exactly as settings.overlay_names does.

Scripts run as separate processes on one torch thread, as in test_infer_robustness.py.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset
from scratch_detector import storage as listing
from scratch_detector.inference import list_images, remove_orphan_temp_files
from scratch_detector.settings import overlay_names
from scratch_detector.storage import lines_on_disk
from conftest import ROOT, assert_memory_flat, kill9_when, run_script, save_image

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
N_IMAGES = 500
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_images(folder: Path, n: int) -> None:
    for i in range(n):
        save_image(folder / f"cam{i % 3}" / f"frame_{i:05d}.png", "scratch" if i % 4 == 0 else "plain", size=96,
                   seed=i)
    (folder / "cam0" / "broken.png").write_bytes(b"not a png")  # an error row is recorded and kept too


def infer_args(images: Path, out: Path, model: Path, *more) -> list[str]:
    return ["--model", str(model), "--input", str(images), "--output", str(out), "--batch-size", "8", *more]


def kill_when_recorded(command: list[str], out: Path, at_least: int, timeout: float = 240) -> int:
    """Start `command`; once `at_least` images are durably in its journal, kill -9 it. -> journal lines then."""
    log = out.with_name(out.name + ".stderr")
    with open(log, "w") as stderr:
        proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr)
        seen = []
        kill9_when(proc, lambda: seen.append(lines_on_disk(out)) or seen[-1] >= at_least, timeout,
                   f"{at_least} journal records (its stderr: {log})")
    return seen[-1]


def overlays(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in (out / "gradcam").rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, decisive_checkpoint):
    """N_IMAGES images through a clean run, and a copy of an output folder whose run was killed with
    SIGKILL after some images were recorded (each test resumes its own copy)."""
    work = tmp_path_factory.mktemp("resume")
    images = work / "images"
    make_images(images, N_IMAGES)
    clean = work / "clean"
    result = run_script("infer.py", *infer_args(images, clean, decisive_checkpoint), env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    killed = work / "killed"
    command = [sys.executable, str(ROOT / "infer.py"), *infer_args(images, killed, decisive_checkpoint)]
    lines = kill_when_recorded(command, killed, at_least=50)
    assert not (killed / "predictions.csv").exists()
    return work, images, clean, killed, lines


def resume_copy(runs, name: str) -> Path:
    work, _, _, killed, _ = runs
    target = work / name
    shutil.copytree(killed, target, symlinks=True)
    return target


def test_sigkill_then_rerun_gives_the_clean_bytes(runs, decisive_checkpoint):
    work, images, clean, _, lines = runs
    out = resume_copy(runs, "resumed")
    # a half-written overlay, as kill -9 leaves it: never trusted, removed on resume
    half = out / "gradcam" / "cam1" / ".frame_00001_gradcam.jpg.99999.tmp"
    half.parent.mkdir(parents=True, exist_ok=True)  # the kill may come before the run reached cam1/
    half.write_bytes(b"\xff\xd8 half")
    result = run_script("infer.py", *infer_args(images, out, decisive_checkpoint), env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"resuming the unfinished run in {out}" in result.stdout
    done_before = int(result.stdout.split(" done by an earlier run")[0].rsplit("(", 1)[1])
    assert lines <= done_before < N_IMAGES + 1, (lines, done_before)
    for name in ("predictions.csv", "detections.csv"):
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    # the same overlay files, each whole; pixels as the clean run's up to float noise (a resumed run batches
    # the images differently, which moves CAM values by float rounding and can flip a pixel's rounding)
    resumed, reference = overlays(out), overlays(clean)
    assert sorted(resumed) == sorted(reference) and len(resumed) == N_IMAGES
    for name in resumed:
        with Image.open(out / name) as picture, Image.open(clean / name) as expected:
            assert picture.format == "JPEG" and picture.size == expected.size
            difference = np.abs(np.asarray(picture, np.int16) - np.asarray(expected, np.int16))
            assert difference.mean() < 0.5, (name, difference.mean())
    assert not (out / ".journal").exists()  # finished: the next run starts fresh
    assert not remove_orphan_temp_files(out)
    page = (out / "index.html").read_text(encoding="utf-8")
    assert f"<b>{N_IMAGES + 1}</b><span>images</span>" in page


def test_changed_threshold_or_model_starts_over(runs, decisive_checkpoint, tiny_checkpoint):
    work, images, clean, _, _ = runs
    out = resume_copy(runs, "threshold")
    result = run_script("infer.py", *infer_args(images, out, decisive_checkpoint, "--threshold", "0.4"), env=ENV,
                        timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"threshold changed since the unfinished run in {out}: starting over" in result.stdout
    assert "done by an earlier run" not in result.stdout
    rows = (out / "predictions.csv").read_text().splitlines()[1:]
    assert len(rows) == N_IMAGES + 1
    assert all(row.split(",")[2] == str(int(float(row.split(",")[3]) >= 0.4)) for row in rows if ",ok," in row)

    out = resume_copy(runs, "model")
    other = work / "other.pth"
    shutil.copyfile(tiny_checkpoint, other)
    result = run_script("infer.py", *infer_args(images, out, other), env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    changed = result.stdout.split(" changed since the unfinished run in ")[0].splitlines()[-1].split(", ")
    assert "model" in changed and f"changed since the unfinished run in {out}: starting over" in result.stdout
    assert "done by an earlier run" not in result.stdout


def test_restart_starts_over(runs, decisive_checkpoint):
    work, images, clean, _, _ = runs
    out = resume_copy(runs, "restart")
    result = run_script("infer.py", *infer_args(images, out, decisive_checkpoint, "--restart"), env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"--restart: discarding the unfinished run in {out}" in result.stdout
    assert "done by an earlier run" not in result.stdout
    assert (out / "predictions.csv").read_bytes() == (clean / "predictions.csv").read_bytes()


# ---------------------------------------------------------------------------------------------------------
# the input listing (storage.py) in-process
# ---------------------------------------------------------------------------------------------------------
ODD = ["a.jpg", "a.png", "a_jpg.png", "A.JPG", "x/b.tif", "x/b.TIF", "x/b_tif.png", "x/B_tif_2.png", "X/b.png",
       "X/b_2.png", "x/b_2.png", "deep/er/c.bmp", "Deep/Er/C.bmp", "a-b.png", "a/b.png", "b\udce4d.png",
       "b\\udce4d.png", "caf\u00e9.jpg", "CAF\u00c9.jpg", "line\nbreak.png", "comma, \"quote\".png", "a.b/c.png"]


def test_listing_names_overlays_as_overlay_names(tmp_path, monkeypatch):
    """Folder by folder, external sort with tiny chunks: the names and order of one overlay_names call."""
    monkeypatch.setattr(listing, "CHUNK", 5)
    monkeypatch.setattr(listing, "FAN_IN", 3)
    rng = random.Random(0)
    relpaths = ODD + [f"{rng.choice(['p', 'P', 'q', 'p/r', 'P/R'])}/{rng.choice(['f', 'F', 'f_2'])}{i % 7}."
                      f"{rng.choice(['png', 'jpg', 'PNG'])}" for i in range(300)]
    relpaths = sorted(set(relpaths))
    root = tmp_path / "in"
    for relpath in relpaths:
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "skip.png").write_bytes(b"")
    (root / "notes.txt").write_bytes(b"")
    found = sorted(dataset.walk_images(root))
    assert found == relpaths
    for file_format in ("jpg", "png"):
        out = tmp_path / f"out_{file_format}"
        out.mkdir()
        result = list_images(root, out, file_format)
        expected = overlay_names(found, file_format)
        assert list(result) == [(r, expected[r]) for r in found]
        assert list(result) == list(result)  # read again: the same
        subset = found[::3]
        assert list(result.subset(iter(subset))) == [(r, expected[r]) for r in subset]
        name_of = result.cursor()
        assert [name_of(r) for r in subset] == [expected[r] for r in subset]
        assert list(out.iterdir()) == []  # the temp files have no names


def test_sorted_records_memory_stays_flat(tmp_path, monkeypatch):
    """Sorting 5k and 50k paths in chunks of 2k: the same peak, about one chunk, far below the records.
    (A merge also holds a read block per chunk file, FAN_IN at most: small blocks here, to see the chunk.)"""
    monkeypatch.setattr(listing, "CHUNK", 2_000)
    monkeypatch.setattr(listing, "READ_BLOCK", 4096)
    peaks = {}
    for n in (5_000, 50_000):
        rng = random.Random(n)
        tracemalloc.start()
        records = listing.SortedRecords(tmp_path)
        for i in range(n):
            records.add([f"cam{rng.randrange(9)}/2026-11-{rng.randrange(30):02d}/frame_{rng.randrange(10**9):09d}.png",
                         "x"])
        result = records.sort()
        previous = None
        for record in result:
            assert previous is None or previous <= record
            previous = record
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert result.count == n
        result.close()
    assert_memory_flat(peaks, lambda n: [[f"cam{i % 9}/2026-11-{i % 30:02d}/frame_{i:09d}.png", "x"] for i in range(n)])


def test_record_file_keeps_any_name(tmp_path):
    records = listing.RecordFile(tmp_path)
    records.write_lines(json.dumps([name], ensure_ascii=True).encode() + b"\n" for name in ODD)
    assert [name for [name] in records] == ODD
