"""infer.py --engine ray on a local Ray instance of 2 CPUs: the local engine's outputs, bad files and tiled
frames included; sized so that the read tasks can run (a deadlock fails on the time limit instead of hanging
CI); and a run killed with SIGKILL resumes.

Needs `pip install -r requirements-ray.txt`. Without Ray these tests skip, saying so; with CI set (CI=true)
they fail instead, since .ci/run installs it.
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT, kill9_when, run_script, save_image, unavailable
from scratch_detector.storage import JOURNAL_DIR, SEGMENT_GLOB

try:
    import ray  # noqa: F401
    RAY_MISSING = None
except ImportError as error:
    RAY_MISSING = f"ray not importable ({error}); pip install -r requirements-ray.txt"

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
RAY_TIMEOUT = 240   # far over what a whole Ray run on these few images takes: beyond it, a deadlock
N_GOOD = 56


@pytest.fixture(scope="module", autouse=True)
def ray_available():
    if RAY_MISSING:
        unavailable("the Ray tests", RAY_MISSING)


def make_folder(root: Path) -> None:
    """N_GOOD small images (one with a name that is not UTF-8), 2 frames larger than a tile, 4 bad files."""
    for i in range(N_GOOD):
        save_image(root / f"line{i % 2}" / f"coil {i:03d}.png", "scratch" if i % 3 == 0 else "plain", size=64,
                   seed=i)
    for i, (width, height) in enumerate([(200, 150), (96, 300)]):
        save_image(root / f"frame_{i}.png", "scratch", size=max(width, height), seed=100 + i)
        with Image.open(root / f"frame_{i}.png") as image:
            image.crop((0, 0, width, height)).save(root / f"frame_{i}.png")
    with open(os.path.join(os.fsencode(root), b"latin1_\xe4.png"), "wb") as handle:
        handle.write((root / "line0" / "coil 000.png").read_bytes())
    (root / "bad").mkdir()
    (root / "bad" / "zero.jpg").write_bytes(b"")
    (root / "bad" / "text.png").write_text("not an image")
    data = (root / "line1" / "coil 001.png").read_bytes()
    (root / "bad" / "truncated.png").write_bytes(data[:len(data) // 2])
    (root / "bad" / "fake.bmp").write_bytes(b"BM" + bytes(40))


def args(images: Path, out: Path, model: Path, *more) -> list[str]:
    return ["--model", model, "--input", images, "--output", out, "--tile-size", 64, "--batch-size", 4, *more]


def ray_args(*more) -> list[str]:
    return ["--engine", "ray", "--ray-cpus", 2, *more]


def read(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def assert_same_results(local: Path, other: Path) -> None:
    """The rows of two runs: equal, p(defect) within 1e-4; every overlay there and readable."""
    for name, p_column in (("predictions.csv", "defect_probability"), ("detections.csv", "defect_probability")):
        a, b = read(local / name), read(other / name)
        assert len(a) == len(b) and [r["image"] for r in a] == [r["image"] for r in b], name
        for x, y in zip(a, b):
            assert {k: v for k, v in x.items() if k != p_column} == {k: v for k, v in y.items() if k != p_column}
            if x[p_column]:
                assert abs(float(x[p_column]) - float(y[p_column])) <= 1e-4, (x, y)
    for row in read(other / "predictions.csv"):
        if row["gradcam"]:
            with Image.open(other / row["gradcam"]) as overlay:
                overlay.load()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, decisive_checkpoint):
    work = tmp_path_factory.mktemp("ray")
    images = work / "images"
    make_folder(images)
    local = work / "local"
    result = run_script("infer.py", *args(images, local, decisive_checkpoint), env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = read(local / "predictions.csv")
    assert len(rows) == N_GOOD + 3 + 4
    assert sum(r["status"].startswith("error:") for r in rows) == 4
    assert sum(r["tiles"] not in ("", "1") for r in rows) == 2
    return work, images, local


def test_ray_gives_the_local_engines_results(folder, decisive_checkpoint):
    work, images, local = folder
    out = work / "ray"
    started = time.monotonic()
    result = run_script("infer.py", *args(images, out, decisive_checkpoint), *ray_args(), env=ENV, timeout=RAY_TIMEOUT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    print(f"ray run: {time.monotonic() - started:.1f}s")
    assert "Ray on this machine: 2 actors x 1 thread(s), 0.5 CPU each; read tasks 1 CPU" in result.stdout
    assert "Traceback" not in result.stderr
    assert_same_results(local, out)
    assert sorted(p.name for p in out.iterdir()) == ["detections.csv", "gradcam", "index.html", "predictions.csv"]


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (Ray's local instance: gcs, raylet, workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie, left unreaped by a container's init, is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_killed_ray_run_resumes(folder, decisive_checkpoint):
    """kill -9 of the Ray driver once some images are recorded; the same command again finishes the rest."""
    work, images, local = folder
    out = work / "ray_killed"
    command = [sys.executable, str(ROOT / "infer.py"), *map(str, args(images, out, decisive_checkpoint, "--batch-size", 2)),
               *map(str, ray_args())]
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree: set[int] = set()
    try:
        kill9_when(proc, lambda: any(p.stat().st_size for p in (out / JOURNAL_DIR).glob(SEGMENT_GLOB)), RAY_TIMEOUT,
                   "the first journal records", watch=lambda: tree.update(descendants(proc.pid)))
    finally:
        # the local instance dies with its driver, but two agents linger for up to a minute: after a few
        # seconds, whatever of it is still there is ended here (only the processes of this run's tree)
        end = time.monotonic() + 5
        while time.monotonic() < end and any(alive(pid) for pid in tree):
            time.sleep(0.2)
        for pid in filter(alive, tree):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        end = time.monotonic() + 10
        while time.monotonic() < end and any(alive(pid) for pid in tree):
            time.sleep(0.1)
    assert not (out / "predictions.csv").exists()
    assert not [pid for pid in tree if alive(pid)], "processes of the killed run still running"
    result = run_script("infer.py", *args(images, out, decisive_checkpoint), *ray_args(), env=ENV, timeout=RAY_TIMEOUT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"resuming the unfinished run in {out}" in result.stdout
    done_before = int(result.stdout.split(" done by an earlier run")[0].rsplit("(", 1)[1])
    assert 0 < done_before < N_GOOD + 7
    assert_same_results(local, out)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_actor_sizing_leaves_room_for_reads():
    from scratch_detector.engines.ray_pool import actor_sizing

    two = actor_sizing([2.0])
    assert (two.actors, two.cpus_per_actor, two.read_cpus) == (2, 0.5, 1.0)
    assert actor_sizing([1.0]).actors == 1 and actor_sizing([1.0]).cpus_per_actor + 0.5 <= 1.0
    for nodes in ([16.0] * 4, [2.0, 16.0], [8.0, 8.0, 64.0], [3.0], [1.0, 1.0]):
        sizing = actor_sizing(nodes)
        assert sizing.actors == sum(int(c) for c in nodes)
        # packed however Ray likes, some node still has a read task's CPUs free
        assert sizing.actors * sizing.cpus_per_actor <= sum(nodes) - sizing.read_cpus * len(nodes) + 1e-9
        assert sizing.cpus_per_actor * (min(nodes) // sizing.cpus_per_actor) <= min(nodes)
    assert actor_sizing([2.0], actors=8).cpus_per_actor <= 1 / 8
