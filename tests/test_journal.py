"""The run journal alone, with synthetic rows (no model): resume, start-over, torn lines, assembly, kill -9, memory."""
from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import tracemalloc
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scratch_detector import storage as journal  # noqa: E402
from scratch_detector.runtime import UserError, write_csv  # noqa: E402
from scratch_detector.storage import RunJournal, file_sha256  # noqa: E402

HEADER = ["image", "prediction", "label", "defect_probability", "gradcam", "status"]
DET_HEADER = ["image", "tile", "x", "y", "defect_probability"]
KEY = {"model": "0" * 64, "threshold": 0.5, "image_size": 200, "cam": "layercam", "input": "/line3"}
# str order, as the input listing sorts: '-' < '.' < '/', upper case before lower, a non-UTF-8 name's
# surrogate escape after every letter
ODD = ["a-b.png", "a.png", "a/b.png", "B.png", "b\udce4d.png", "caf\u00e9.jpg", "comma, \"quote\".png"]


def make_keys(n: int) -> list[str]:
    return sorted(ODD + [f"cam{i % 3}/frame{i:06d}.png" for i in range(n - len(ODD))])


def iter_keys(n: int):
    """Sorted keys without a list, so that a memory measurement sees only the journal's own."""
    for camera in range(3):
        for i in range(n // 3):
            yield f"cam{camera}/frame{i:08d}.png"


def overlay_name(key: str) -> str:
    return f"gradcam/{key}_gradcam.ovl"


def overlay_bytes(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest() * 64


def row(key: str) -> list:
    h = int.from_bytes(hashlib.md5(key.encode("utf-8", "surrogateescape")).digest()[:4], "big")
    if h % 17 == 0:
        return [key, "", "", "", "", "error: OSError: cannot identify image file"]
    p = (h % 10_000) / 10_000
    return [key, "defect" if p >= 0.5 else "non-defect", int(p >= 0.5), f"{p:.4f}", overlay_name(key), "ok"]


def detections(key: str) -> list[list]:
    h = key.encode("utf-8", "surrogateescape")[-5] % 3
    return [[key, t, 150 * t, 0, 0.25 * t + 0.125] for t in range(h)]


def expected(tmp_path: Path, keys, header=HEADER, rows_of=lambda k: [row(k)]) -> bytes:
    path = tmp_path / f"expected-{header[1]}.csv"
    write_csv(path, header, [r for k in keys for r in rows_of(k)])
    return path.read_bytes()


def record_all(j: RunJournal, keys, out: Path | None = None) -> None:
    for k in keys:
        files = []
        if out is not None and row(k)[4]:
            (out / overlay_name(k)).parent.mkdir(parents=True, exist_ok=True)
            (out / overlay_name(k)).write_bytes(overlay_bytes(k))
            files = [overlay_name(k)]
        j.record(k, files=files, predictions=[row(k)], detections=detections(k))


def assemble(j: RunJournal, out: Path, keys) -> tuple[bytes, bytes]:
    j.assemble(keys, predictions=(out / "predictions.csv", HEADER), detections=(out / "detections.csv", DET_HEADER))
    return (out / "predictions.csv").read_bytes(), (out / "detections.csv").read_bytes()


def segments(out: Path) -> list[Path]:
    return sorted((out / journal.JOURNAL_DIR).glob(journal.SEGMENT_GLOB))


def test_resume_skips_recorded_keys(tmp_path):
    keys, out, log = make_keys(100), tmp_path / "out", []
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in the driver: what was recorded is kept
        with RunJournal.open(out, KEY, log=log.append) as j:
            assert list(j.pending(keys)) == keys and j.skipped == 0
            record_all(j, keys[:40])
            raise KeyboardInterrupt
    assert log == []
    with RunJournal.open(out, dict(KEY), log=log.append) as j:
        todo = list(j.pending(keys))
        assert todo == keys[40:] and j.skipped == 40
        assert log == [f"resuming the unfinished run in {out} (--restart to start over)"]
        record_all(j, todo)
        seen = []
        assert j.assemble(keys, on_item=lambda k, t: seen.append(k),
                          predictions=(out / "predictions.csv", HEADER)) == 100 and seen == keys
    assert (out / "predictions.csv").read_bytes() == expected(tmp_path, keys)


def test_changed_key_starts_over_with_a_message(tmp_path):
    keys, out, log = make_keys(30), tmp_path / "out", []
    with RunJournal.open(out, KEY, log=log.append) as j:
        record_all(j, keys[:10])
    with RunJournal.open(out, {**KEY, "model": "f" * 64, "threshold": 0.4}, log=log.append) as j:
        assert log == [f"model, threshold changed since the unfinished run in {out}: starting over"]
        assert list(j.pending(keys)) == keys
    with RunJournal.open(out, {**KEY, "model": "f" * 64, "threshold": 0.4}, log=log.append) as j:
        assert list(j.pending(keys)) == keys  # the new key was kept: nothing to resume, nothing discarded
    assert len(log) == 1


def test_restart_discards_the_journal(tmp_path):
    keys, out, log = make_keys(30), tmp_path / "out", []
    with RunJournal.open(out, KEY, log=log.append) as j:
        record_all(j, keys[:10])
    with RunJournal.open(out, KEY, restart=True, log=log.append) as j:
        assert log == [f"--restart: discarding the unfinished run in {out}"]
        assert list(j.pending(keys)) == keys and segments(out) == []


@pytest.mark.parametrize("damage", ["cut last line", "garbage tail", "zeroed tail", "flipped byte"])
def test_torn_or_damaged_lines_are_redone(tmp_path, damage):
    keys, out, log = make_keys(20), tmp_path / "out", []
    with RunJournal.open(out, KEY, log=log.append) as j:
        record_all(j, keys)
    [segment] = segments(out)
    data = segment.read_bytes()
    lines = data.splitlines(keepends=True)
    if damage == "cut last line":  # kill -9 or a power cut in the middle of a write
        segment.write_bytes(data[:-len(lines[-1]) // 2])
        redo = [keys[-1]]
    elif damage == "garbage tail":
        segment.write_bytes(data + b'1a2b3c4d ["cam0/frame000003.png",{"predic')
        redo = []
    elif damage == "zeroed tail":  # a power cut after the size grew but before the data landed
        segment.write_bytes(data + b"\0" * 4096)
        redo = []
    else:
        middle = sum(map(len, lines[:7])) + 30
        segment.write_bytes(data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1:])
        redo = [keys[7]]
    with RunJournal.open(out, KEY, log=log.append) as j:
        assert list(j.pending(keys)) == redo
        assert j.damaged == 1 and log[-1].startswith("ignored 1 torn or damaged journal line(s)")
        record_all(j, redo)
        assert assemble(j, out, keys)[0] == expected(tmp_path, keys)


def test_assemble_is_write_csv_of_all_rows(tmp_path):
    """Records a little out of order, one item recorded twice (the newest wins), inputs deleted since they
    were recorded (left out), odd file names: the bytes of write_csv over the current inputs in order."""
    keys, out = make_keys(3000), tmp_path / "out"
    order = keys[:]
    for start in range(0, len(order), 40):  # as a driver's threads finish items: out of order within batches
        chunk = order[start:start + 40]
        random.Random(start).shuffle(chunk)
        order[start:start + 40] = chunk
    with RunJournal.open(out, KEY) as j:
        j.record(keys[3], predictions=[[keys[3], "stale", 9, "0.9999", "", "ok"]])
        j.flush()
        record_all(j, order)
    current = [k for i, k in enumerate(keys) if i % 7 != 3]  # some inputs deleted before the rerun
    with RunJournal.open(out, KEY) as j:
        assert list(j.pending(current)) == []
        predictions, tiles = assemble(j, out, current)
    assert predictions == expected(tmp_path, current)
    assert tiles == expected(tmp_path, current, DET_HEADER, detections)
    assert len(segments(out)) == 1  # the local order never needed a second segment


def test_far_out_of_order_records_split_segments_and_are_merged(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "WINDOW", 4)
    monkeypatch.setattr(journal, "MAX_SEGMENTS", 3)
    keys, out = make_keys(300), tmp_path / "out"
    order = keys[:]
    random.Random(1).shuffle(order)
    with RunJournal.open(out, KEY) as j:
        j.flush_every = 10
        record_all(j, order[:150])
    assert len(segments(out)) > 3
    with RunJournal.open(out, KEY) as j:  # merged at open
        assert len(segments(out)) <= 3
        assert list(j.pending(keys)) == sorted(order[150:])
        record_all(j, order[150:])
        assert assemble(j, out, keys)[0] == expected(tmp_path, keys)
    assert len(segments(out)) <= 3


@pytest.mark.parametrize("syncfs", [True, False], ids=["syncfs", "fsync-each"])
def test_missing_or_misnamed_overlay_is_redone(tmp_path, monkeypatch, syncfs):
    if not syncfs:
        monkeypatch.setattr(journal, "_syncfs", None)
    keys, out = make_keys(60), tmp_path / "out"
    with RunJournal.open(out, KEY) as j:
        record_all(j, keys, out)
    with_overlay = [k for k in keys if row(k)[4]]
    (out / overlay_name(with_overlay[5])).unlink()
    renamed = with_overlay[9]  # an input added since changed how this overlay is named
    expected_files = lambda k: [overlay_name(k) + ("x" if k == renamed else "")]
    with RunJournal.open(out, KEY) as j:
        assert list(j.pending(keys, expected_files)) == sorted([with_overlay[5], renamed])
        assert list(j.pending(keys)) == [with_overlay[5]]


def test_assemble_refuses_an_unfinished_run(tmp_path):
    keys, out = make_keys(30), tmp_path / "out"
    out.mkdir()
    (out / "predictions.csv").write_text("old\n")
    with RunJournal.open(out, KEY) as j:
        record_all(j, keys[:-1])
        with pytest.raises(RuntimeError, match=r"1 input\(s\) have no result"):
            assemble(j, out, keys)
    assert (out / "predictions.csv").read_text() == "old\n" and not (out / "detections.csv").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_unsorted_keys_are_refused(tmp_path):
    with RunJournal.open(tmp_path, KEY) as j:
        with pytest.raises(ValueError, match="sorted"):
            list(j.pending(["b.png", "a.png"]))


def test_one_run_per_output_folder_and_finish_leaves_nothing(tmp_path):
    keys, out, log = make_keys(20), tmp_path / "out", []
    with RunJournal.open(out, KEY, log=log.append) as j:
        with pytest.raises(UserError, match="another run is writing"):
            RunJournal.open(out, KEY)
        record_all(j, keys)
        assemble(j, out, keys)
        j.finish()
    assert sorted(p.name for p in out.iterdir()) == ["detections.csv", "predictions.csv"]
    with RunJournal.open(out, KEY, log=log.append) as j:  # a finished run is not resumed: a rerun redoes all
        assert list(j.pending(keys)) == keys and log == []


def test_file_sha256_streams_the_file(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"weights" * 100_000)
    assert file_sha256(path) == hashlib.sha256(b"weights" * 100_000).hexdigest()


CHILD = """
import sys, time
root, tests, out, n, delay = sys.argv[1:]
sys.path[:0] = [root, tests]
from pathlib import Path
import test_journal as t
from scratch_detector.runtime import atomic_write
from scratch_detector.storage import RunJournal
out, keys = Path(out), t.make_keys(int(n))
with RunJournal.open(out, t.KEY, log=lambda message: None) as j:
    j.flush_every = 16
    todo = list(j.pending(keys, expected_files=lambda k: [t.overlay_name(k)]))
    print(j.skipped, flush=True)
    for i, k in enumerate(todo, 1):
        r = t.row(k)
        if r[4]:  # the overlay first, renamed into place; then its record
            with atomic_write(out / r[4], "wb", fsync=False) as handle:
                handle.write(t.overlay_bytes(k)[:1000])
                handle.flush()
                handle.write(t.overlay_bytes(k)[1000:])
        j.record(k, files=[r[4]] if r[4] else [], predictions=[r], detections=t.detections(k))
        print(i, flush=True)
        time.sleep(float(delay))
    t.assemble(j, out, keys)
print("done", flush=True)
"""


def test_sigkill_mid_run_then_rerun_gives_the_clean_bytes(tmp_path):
    """kill -9 twice at random points (after a random number of records, wherever the child then is: in an
    overlay, a record or a flush), then the same command again: the clean run's CSVs, byte for byte, and
    every overlay whole."""
    n, seed = 1000, int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    keys = make_keys(n)

    def start(out: Path, delay: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", CHILD, str(ROOT), str(ROOT / "tests"), str(out), str(n),
                                 str(delay)], stdout=subprocess.PIPE, text=True)

    clean = start(tmp_path / "clean", 0)
    assert clean.communicate(timeout=60)[0].split() == ["0", *map(str, range(1, n + 1)), "done"]
    clean_bytes = [(tmp_path / "clean" / name).read_bytes() for name in ("predictions.csv", "detections.csv")]
    assert clean_bytes == [expected(tmp_path, keys), expected(tmp_path, keys, DET_HEADER, detections)]

    out, skipped = tmp_path / "killed", []
    for _ in range(2):
        child = start(out, 0.001)  # a pause per item, so that the kill lands long before the end
        skipped.append(int(child.stdout.readline()))
        target = rng.randrange(50, 450)
        while int(child.stdout.readline()) < target:
            pass
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL, f"the run finished before the kill (seed {seed})"
        child.stdout.close()
        assert not (out / "predictions.csv").exists()
    final = start(out, 0)
    output = final.communicate(timeout=60)[0].split()
    skipped.append(int(output[0]))
    assert output[-1] == "done" and final.returncode == 0
    assert 0 == skipped[0] < skipped[1] <= skipped[2] < n, f"seed {seed}: skipped {skipped}"
    assert [(out / name).read_bytes() for name in ("predictions.csv", "detections.csv")] == clean_bytes, seed
    for k in keys:
        if row(k)[4]:
            assert (out / overlay_name(k)).read_bytes() == overlay_bytes(k), (seed, k)


def test_memory_stays_flat_with_the_number_of_rows(tmp_path):
    """open + resume + assemble of 5k and 50k recorded rows: the same small peak, far below the rows
    themselves (50k, not more: tracemalloc slows the reading several times)."""
    peaks = {}
    for n in (5_000, 50_000):
        out = tmp_path / str(n)
        with RunJournal.open(out, KEY) as j:
            j.flush_every = 100_000
            for k in iter_keys(n):
                j.record(k, predictions=[row(k)])
        tracemalloc.start()
        with RunJournal.open(out, KEY) as j:
            deque(j.pending(iter_keys(n)), maxlen=0)
            assert j.skipped == n // 3 * 3
            j.assemble(iter_keys(n), predictions=(out / "predictions.csv", HEADER))
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    from conftest import assert_memory_flat  # here, not at the top: CHILD imports this module and needs no torch
    assert_memory_flat(peaks, lambda n: [row(k) for k in iter_keys(n)])
