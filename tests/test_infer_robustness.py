"""infer.py (and train.py's checkpoint) on hostile inputs: nothing crashes, nothing is lost, nothing runs.

Scripts run as separate processes, as a user starts them (only the non-finite-loss check calls train.main
in-process: it stops in its first epoch). OMP_NUM_THREADS=1 keeps torch from fighting other processes on a
busy 2-core machine; it changes nothing the tests check.
"""
from __future__ import annotations

import csv
import io
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
from conftest import ROOT, run_script, save_image
from scratch_detector.inference import remove_stale_overlays
from scratch_detector.model import load_checkpoint
from scratch_detector.runtime import interrupts_deferred, printable, run_main
from scratch_detector.settings import overlay_names
from scratch_detector.tiler import Tiler

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
COLUMNS = ["image", "prediction", "label", "defect_probability", "gradcam", "status", "tiles", "max_tile", "familiar",
           "unfamiliarity"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def start(script: str, *args, cwd: Path, stdout=subprocess.PIPE, stderr=subprocess.PIPE) -> subprocess.Popen:
    """Start a script with default SIGINT handling even if this test run was started in the background."""
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=ENV, text=True,
                            stdout=stdout, stderr=stderr,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def infer_run(*args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_script("infer.py", *args, cwd=cwd, env=ENV, timeout=timeout)


def read_rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def temp_files(folder: Path) -> list[Path]:
    """Temp files of atomic writes: .predictions.csv.<pid>.tmp, .x_gradcam.png.<pid>.tmp, .curves.png.tmp.png"""
    return [p for p in folder.rglob("*") if (p.name.startswith(".") and ".tmp" in p.name) or p.name.endswith(".tmp")]


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# The messy folder
# ---------------------------------------------------------------------------------------------------------
def bomb_png(path: Path, width: int = 30000, height: int = 30000) -> None:
    """A valid little PNG whose header claims width x height pixels."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    struct.pack_into(">II", data, 16, width, height)  # IHDR data starts after signature(8) + length(4) + type(4)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def make_messy_folder(root: Path) -> tuple[set[str], set[str]]:
    """Returns (relpaths that must decode, relpaths that must be error rows)."""
    good, bad = set(), set()

    def add(relpath, kind="plain", size=64, mode="L", seed=0):
        save_image(root / relpath, kind, size, seed, mode)
        good.add(relpath)

    add("good_scratch.png", "scratch", seed=1)
    add("good_plain.jpg", seed=2)
    add("sub dir/name with spaces.png", "scratch", seed=3)
    add("UPPER.JPG", seed=4, mode="RGB")
    add("UPPER2.PNG", seed=5)
    add("kratzer_ä.png", "scratch", seed=6)
    add("äöü/日本語.jpg", seed=7)
    add("line1/same.png", "scratch", seed=8)
    add("line2/same.png", seed=9)
    add("pair/a.jpg", seed=10)
    add("pair/a.png", "scratch", seed=11)
    add("pair/a_jpg.png", seed=12)       # the name a.jpg's overlay gets renamed to must not collide
    add("modes/rgba.png", mode="RGBA", seed=13)
    add("modes/palette.png", mode="P", seed=14)
    add("modes/eight_bit.bmp", seed=15)
    add("modes/cmyk.jpg", mode="CMYK", seed=16)
    Image.fromarray((np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)).save(
        root / "modes" / "sixteen.tif")
    good.add("modes/sixteen.tif")
    Image.new("L", (1, 1), 128).save(root / "tiny_1x1.png")
    good.add("tiny_1x1.png")
    huge = Image.new("RGB", (6000, 4000), (120, 120, 120))
    huge.paste((240, 240, 240), (2000, 0, 2040, 4000))
    huge.save(root / "huge_6000x4000.jpg", quality=85)
    good.add("huge_6000x4000.jpg")
    # a file name that is not valid UTF-8 (an old zip): Linux hands Python a surrogate escape
    raw = os.path.join(os.fsencode(root), b"latin1_\xe4.png")
    with open(raw, "wb") as handle:
        handle.write((root / "good_scratch.png").read_bytes())
    good.add(os.fsdecode(b"latin1_\xe4.png"))

    (root / "broken").mkdir()
    (root / "broken" / "zero.jpg").write_bytes(b"")
    jpeg = (root / "good_plain.jpg").read_bytes()
    (root / "broken" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "broken" / "text.png").write_text("this is not a picture\n")
    bomb_png(root / "broken" / "bomb.png")
    bad |= {"broken/zero.jpg", "broken/truncated.jpg", "broken/text.png", "broken/bomb.png"}

    (root / "notes.txt").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "sub dir" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return good, bad


def wait_with_rusage(proc: subprocess.Popen, timeout: float) -> int:
    """Wait for proc; return its own peak RSS in bytes (not the maximum over every child so far)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_maxrss * 1024  # Linux: kilobytes
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise AssertionError(f"{proc.args} did not finish in {timeout} s")


def test_messy_folder(tmp_path, decisive_checkpoint):
    checkpoint = decisive_checkpoint
    images = tmp_path / "in"
    good, bad = make_messy_folder(images)
    baseline_in = tmp_path / "baseline"
    save_image(baseline_in / "one.png", "scratch")
    out = tmp_path / "outputs"

    # the same program on one small image at the same time: the memory it needs anyway
    with open(tmp_path / "messy.log", "w") as messy_log, open(tmp_path / "base.log", "w") as base_log:
        messy = start("infer.py", "--model", checkpoint, "--input", images, "--output", out, "--batch-size", "4",
                      cwd=tmp_path, stdout=messy_log, stderr=subprocess.STDOUT)
        base = start("infer.py", "--model", checkpoint, "--input", baseline_in, "--output", tmp_path / "base_out",
                     cwd=tmp_path, stdout=base_log, stderr=subprocess.STDOUT)
        messy_rss = wait_with_rusage(messy, 300)
        base_rss = wait_with_rusage(base, 300)
    log = (tmp_path / "messy.log").read_text()
    assert messy.returncode == 0, log
    assert base.returncode == 0, (tmp_path / "base.log").read_text()
    assert "Traceback" not in log

    rows = read_rows(out / "predictions.csv")
    expected = sorted(good | bad)
    assert [r["image"] for r in rows] == [printable(r) for r in expected]  # one row each, by path
    by_name = dict(zip(expected, rows))
    threshold = 0.5
    for relpath in sorted(good):
        row = by_name[relpath]
        assert row["status"] == "ok", row
        assert row["prediction"] in dataset.BINARY_CLASSES
        assert int(row["label"]) == dataset.BINARY_CLASSES.index(row["prediction"])
        probability = float(row["defect_probability"])
        assert 0.0 <= probability <= 1.0
        if abs(probability - threshold) > 1e-3:
            assert int(row["label"]) == int(probability >= threshold)
        overlay = out / row["gradcam"]
        assert row["gradcam"].startswith("gradcam/") and overlay.is_file(), row
        with Image.open(overlay) as picture:
            assert picture.format == "JPEG" and picture.width >= 2 and picture.height > 8
    for relpath in sorted(bad):
        row = by_name[relpath]
        assert re.fullmatch(r"error: \S.{3,}", row["status"]), row
        assert row["prediction"] == row["label"] == row["defect_probability"] == row["gradcam"] == ""
    assert "ecompression" in by_name["broken/bomb.png"]["status"]  # Pillow's limit, reported as such

    overlays = [r["gradcam"] for r in rows if r["gradcam"]]
    assert len(set(overlays)) == len(overlays) == len(good)
    assert len({o.lower() for o in overlays}) == len(overlays)
    assert by_name["pair/a.jpg"]["gradcam"] != by_name["pair/a.png"]["gradcam"]
    on_disk = sorted(p.relative_to(out).as_posix() for p in (out / "gradcam").rglob("*") if p.is_file())
    assert on_disk == sorted(overlays)
    assert not temp_files(out)

    # the probabilities are the checkpoint's own on the preprocessed image (not a canned number)
    probabilities = [float(r["defect_probability"]) for r in rows if r["status"] == "ok"]
    assert max(probabilities) - min(probabilities) > 0.05  # the model does tell these images apart
    net, meta = load_checkpoint(checkpoint)
    for relpath in ("good_scratch.png", "modes/sixteen.tif", "tiny_1x1.png"):
        with torch.no_grad():
            logits = net(dataset.preprocess(images / relpath, meta["image_size"], meta["normalization"])[None])
        assert float(by_name[relpath]["defect_probability"]) == pytest.approx(
            float(logits.softmax(1)[0, 1]), abs=2e-4), relpath
        assert by_name[relpath]["tiles"] == "1"
    # the 6000x4000 photo is tiled at native scale (200 px tiles, each shrunk to the model's 64 px): its
    # p(defect) is its hottest tile's, recomputed here from the photo without infer.py's code
    huge = by_name["huge_6000x4000.jpg"]
    positions = Tiler(dataset.NATIVE_SIZE).positions(4000, 6000)
    assert int(huge["tiles"]) == len(positions) == 40 * 27
    with Image.open(images / "huge_6000x4000.jpg") as photo:
        photo.load()
        tiles = np.stack([np.asarray(photo.crop((x, y, x + 200, y + 200)).resize((64, 64), Image.BILINEAR))
                          for x, y in positions])
    with torch.no_grad():
        tile_p = torch.cat([net(dataset.normalize(tiles[i:i + 120], meta["normalization"])).softmax(1)[:, 1]
                            for i in range(0, len(tiles), 120)]).numpy()
    assert float(huge["defect_probability"]) == pytest.approx(float(tile_p.max()), abs=2e-4)
    x, y, w, h = map(int, huge["max_tile"].split(","))
    assert (w, h) == (200, 200) and tile_p[positions.index((x, y))] == pytest.approx(tile_p.max(), abs=2e-4)

    # memory: the 6000x4000 photo never sits in memory as floats (288 MB as float32, 72 MB even as bytes)
    full_float32 = 6000 * 4000 * 3 * 4
    assert messy_rss - base_rss < full_float32 / 2, (messy_rss, base_rss)


def test_model_streams_change_nothing_but_speed(tmp_path, decisive_checkpoint):
    """Two model copies working on alternate batches give the very same CSV and overlays as one."""
    images = tmp_path / "in"
    for i in range(22):  # 6 batches of 4, the last one short
        save_image(images / f"img_{i:02d}.png", "scratch" if i % 3 == 0 else "plain", seed=i)
    results = {}
    for streams in (1, 2):
        out = tmp_path / f"out_{streams}"
        result = infer_run("--model", decisive_checkpoint, "--input", images, "--output", out, "--batch-size", "4",
                           "--streams", streams, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"{streams} model stream{'s' if streams > 1 else ''} x 1 thread" in result.stdout
        overlays = {p.name: p.read_bytes() for p in (out / "gradcam").iterdir()}
        results[streams] = (read_rows(out / "predictions.csv"), overlays)
    rows, overlays = results[2]
    assert len(rows) == len(overlays) == 22 and all(r["status"] == "ok" for r in rows)
    assert len({r["defect_probability"] for r in rows}) > 5  # real, differing outputs
    assert results[2] == results[1]


# ---------------------------------------------------------------------------------------------------------
# Folders that are not there, empty, or not writable
# ---------------------------------------------------------------------------------------------------------
def test_empty_and_missing_input(tmp_path, tiny_checkpoint):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    runs = {name: start("infer.py", "--model", tiny_checkpoint, "--input", folder, "--output", tmp_path / name,
                        cwd=tmp_path) for name, folder in (("empty", empty), ("missing", tmp_path / "nowhere"))}
    for name, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=300)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        line = assert_one_line_error(result, "python train.py", "test_images/", "--input")
        assert str(empty if name == "empty" else tmp_path / "nowhere") in line
        assert not (tmp_path / name / "predictions.csv").exists()


def test_unwritable_output_fails_before_any_work(tmp_path):
    """The output check comes before the model is even read: a missing --model is not what gets reported."""
    images = tmp_path / "in"
    save_image(images / "x.png")
    blocker = tmp_path / "a_file"
    blocker.write_text("a regular file, not a folder")
    runs = {target: start("infer.py", "--model", tmp_path / "no_model.pth", "--input", images, "--output", target,
                          cwd=tmp_path) for target in (blocker / "outputs",)}
    for target, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=300)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        line = assert_one_line_error(result, str(target), "output")
        assert "no_model.pth" not in line
    assert blocker.read_text() == "a regular file, not a folder"


# ---------------------------------------------------------------------------------------------------------
# Two runs into one output folder
# ---------------------------------------------------------------------------------------------------------
def test_second_run_replaces_results_and_keeps_user_files(tmp_path, tiny_checkpoint):
    out = tmp_path / "outputs"
    (out / "gradcam").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    save_image(out / "gradcam" / "mine.png", seed=99)
    save_image(out / "gradcam" / "mine_gradcam.png", seed=98)  # looks like ours, but no CSV ever listed it
    user_files = {p: p.read_bytes() for p in (out / "notes.txt", out / "gradcam" / "mine.png",
                                              out / "gradcam" / "mine_gradcam.png")}

    first, second = tmp_path / "first", tmp_path / "second"
    for relpath in ("keep.png", "gone.png", "deep/gone_too.jpg"):
        save_image(first / relpath, seed=len(relpath))
    for relpath in ("keep.png", "new.png"):
        save_image(second / relpath, "scratch", seed=len(relpath))

    result = infer_run("--model", tiny_checkpoint, "--input", first, "--output", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    first_rows = read_rows(out / "predictions.csv")
    assert [r["image"] for r in first_rows] == ["deep/gone_too.jpg", "gone.png", "keep.png"]
    first_overlays = {r["image"]: out / r["gradcam"] for r in first_rows}
    assert all(p.is_file() for p in first_overlays.values())

    result = infer_run("--model", tiny_checkpoint, "--input", second, "--output", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_rows(out / "predictions.csv")
    assert [r["image"] for r in rows] == ["keep.png", "new.png"]
    assert all(r["status"] == "ok" and (out / r["gradcam"]).is_file() for r in rows)
    assert not first_overlays["gone.png"].exists() and not first_overlays["deep/gone_too.jpg"].exists()
    assert first_overlays["keep.png"].is_file()
    for path, content in user_files.items():
        assert path.read_bytes() == content, path
    assert not temp_files(out)

    # switching to PNG overlays replaces the JPEG ones instead of leaving them beside
    result = infer_run("--model", tiny_checkpoint, "--input", second, "--output", out, "--overlay-format", "png",
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    as_png = read_rows(out / "predictions.csv")
    assert [r["gradcam"] for r in as_png] == [r["gradcam"][:-len("jpg")] + "png" for r in rows]
    assert all((out / r["gradcam"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for r in as_png)
    files = sorted(p.relative_to(out / "gradcam").as_posix() for p in (out / "gradcam").rglob("*") if p.is_file())
    assert files == ["keep_gradcam.png", "mine.png", "mine_gradcam.png", "new_gradcam.png"]


def test_stale_overlay_cleanup_only_touches_overlays(tmp_path):
    """A hand-edited predictions.csv must not make the next run delete the user's files."""
    out = tmp_path / "outputs"
    save_image(out / "gradcam" / "old_gradcam.png")
    (out / "notes.txt").write_text("mine")
    save_image(out / "gradcam" / "photo.png")
    outside = save_image(tmp_path / "elsewhere_gradcam.png")
    (out / "gradcam" / "link_gradcam.png").symlink_to(outside)
    old = {"gradcam/old_gradcam.png", "gradcam/../notes.txt", "notes.txt", "gradcam/photo.png",
           "gradcam/../../elsewhere_gradcam.png", "gradcam/link_gradcam.png", "gradcam/kept_gradcam.png"}
    save_image(out / "gradcam" / "sub" / "older_gradcam.jpg")
    old.add("gradcam/sub/older_gradcam.jpg")
    removed = remove_stale_overlays(out, old, {"gradcam/kept_gradcam.png"})
    assert removed == 2 and not (out / "gradcam" / "old_gradcam.png").exists()
    assert not (out / "gradcam" / "sub" / "older_gradcam.jpg").exists()
    assert (out / "notes.txt").exists() and (out / "gradcam" / "photo.png").exists() and outside.exists()


def test_output_inside_input_is_not_read_back(tmp_path):
    save_image(tmp_path / "photos" / "a.png")
    save_image(tmp_path / "photos" / "results" / "gradcam" / "a_gradcam.png")  # a previous run's overlay
    save_image(tmp_path / "photos" / "results" / "kept.png")
    found = sorted(dataset.walk_images(tmp_path / "photos", skip=tmp_path / "photos" / "results" / "gradcam"))
    assert found == ["a.png", "results/kept.png"]


def test_overlay_names_never_collide():
    relpaths = ["a.jpg", "a.png", "a_jpg.png", "A.JPG", "x/b.tif", "x/b.TIF", "x/b_tif.png", "x/B_tif_2.png"]
    names = overlay_names(relpaths)
    assert set(names) == set(relpaths)
    assert len({n.lower() for n in names.values()}) == len(relpaths)
    assert all(n.startswith("gradcam/") and n.endswith("_gradcam.jpg") for n in names.values())
    assert names["x/b_tif.png"].startswith("gradcam/x/")
    assert overlay_names(["one.png"]) == {"one.png": "gradcam/one_gradcam.jpg"}
    assert overlay_names(["one.png"], "png") == {"one.png": "gradcam/one_gradcam.png"}


# ---------------------------------------------------------------------------------------------------------
# Signals: the CSV is the old one or a complete new one, and no temp file is left behind
# ---------------------------------------------------------------------------------------------------------
N_MANY = 300


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("many")
    for i in range(N_MANY):
        save_image(folder / f"img_{i:04d}.png", "scratch" if i % 3 == 0 else "plain", size=200, seed=i)
    return folder


def wait_for(condition, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the signal could be sent"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_infer_interrupted(tmp_path, tiny_checkpoint, many_images, signum):
    out = tmp_path / "outputs"
    out.mkdir()
    previous = "image,prediction,label,defect_probability,gradcam,status\r\nold.png,defect,1,0.9000,,ok\r\n"
    (out / "predictions.csv").write_text(previous, newline="")
    before = (out / "predictions.csv").read_bytes()

    proc = start("infer.py", "--model", tiny_checkpoint, "--input", many_images, "--output", out,
                 "--batch-size", "2", "--streams", "2", cwd=tmp_path)
    wait_for(lambda: (out / "gradcam").is_dir() and any((out / "gradcam").iterdir()), proc)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=240)

    assert proc.returncode != 0
    assert "Traceback" not in stderr, stderr
    after = (out / "predictions.csv").read_bytes()
    if after != before:  # the run had already finished its work: then the new file is complete
        assert len(read_rows(out / "predictions.csv")) == N_MANY
    assert not temp_files(out), temp_files(out)
    assert not temp_files(tmp_path)


def test_second_interrupt_waits_for_the_cleanup():
    """Inside interrupts_deferred a signal is held until the block ends, then raised as KeyboardInterrupt."""
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            for signum in (signal.SIGINT, signal.SIGTERM):
                os.kill(os.getpid(), signum)
                time.sleep(0.05)  # Python runs the handler here: it records the signal and returns
                steps.append(signum)
    assert steps == [signal.SIGINT, signal.SIGTERM]  # the block ran to its end
    assert {signum: signal.getsignal(signum) for signum in before} == before
    with interrupts_deferred():  # no signal: nothing raised
        steps.append("quiet")
    assert steps[-1] == "quiet"


def test_train_interrupted_keeps_checkpoint(tmp_path, tiny_checkpoint, neu_dir):
    model_path = tmp_path / "m.pth"
    shutil.copyfile(tiny_checkpoint, model_path)
    before = model_path.read_bytes()
    proc = start("train.py", "--data-dir", neu_dir, "--max-per-class", 12, "--epochs", 3, "--image-size", 64,
                 "--pretrained", "none", "--output", model_path, "--reports", tmp_path / "r", "--test-images", "",
                 cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    for line in proc.stdout:  # the per-epoch lines: stop it after epoch 1, well before the save
        lines.append(line)
        if "epoch 1/3: train loss" in line:
            break
    assert any("epoch 1/3: train loss" in line for line in lines) and proc.poll() is None, "".join(lines) + proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)

    assert proc.returncode != 0, "".join(lines) + stdout
    assert "Traceback" not in stderr, stderr
    assert model_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["m.pth"]
    assert not temp_files(tmp_path)


def test_train_stops_on_non_finite_loss(tmp_path, tiny_checkpoint, neu_dir, capsys):
    import train

    model_path = tmp_path / "m.pth"
    shutil.copyfile(tiny_checkpoint, model_path)
    before = model_path.read_bytes()
    previous_handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_main(lambda: train.main(["--data-dir", str(neu_dir), "--max-per-class", "12", "--epochs", "3",
                                         "--image-size", "32", "--pretrained", "none", "--lr", "1e30",
                                         "--output", str(model_path), "--reports", str(tmp_path / "r"),
                                         "--test-images", ""]))
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diverged" in err[0] and "--lr" in err[0], err
    assert model_path.read_bytes() == before
    assert not temp_files(tmp_path)
