"""Shared fixtures. Tests make their own small images; real NEU data only through $NEU_DATA_DIR."""
from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dataset  # noqa: E402
from scratch_detector import familiarity  # noqa: E402
from scratch_detector.model import build_model, predict_features, save_checkpoint  # noqa: E402


def run_script(script: str, *args, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run one of the project's scripts as a user would: a separate process, output captured."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def kill9_when(proc: subprocess.Popen, ready, timeout: float, what: str, watch=lambda: None) -> None:
    """kill -9 `proc` as soon as ready() is true (watch() runs on every look); fails if it ends first or
    `timeout` passes. Never leaves it running."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"the run ended before it was killed ({what})"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            watch()
            time.sleep(0.02)
        watch()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


VOC = """<annotation><size><width>{w}</width><height>{h}</height><depth>1</depth></size>
{objects}</annotation>"""
VOC_OBJECT = ("<object><name>scratches</name><difficult>0</difficult><bndbox><xmin>{}</xmin><ymin>{}</ymin>"
              "<xmax>{}</xmax><ymax>{}</ymax></bndbox></object>")


def write_voc(path: Path, size: tuple[int, int], boxes) -> Path:
    """A Pascal VOC annotation as NEU-DET's: size (width, height), boxes 1-based inclusive (x0, y0, x1, y1)."""
    path.write_text(VOC.format(w=size[0], h=size[1], objects="".join(VOC_OBJECT.format(*b) for b in boxes)))
    return path


def assert_memory_flat(peaks: dict[int, int], held_rows) -> None:
    """peaks: tracemalloc peaks of the same work on 5,000 and 50,000 items. They must stay about the same, and
    far below what holding 50,000 rows (held_rows(50_000), lists as a naive version would keep) costs."""
    tracemalloc.start()
    held = held_rows(50_000)
    rows_50k = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del held
    print(f"peaks {peaks}; 50k rows held as lists: {rows_50k}")
    assert peaks[50_000] < peaks[5_000] * 1.25 + 200_000, peaks
    assert peaks[50_000] < rows_50k / 4, (peaks, rows_50k)


def synthetic_image(kind: str = "plain", size: int = 64, seed: int = 0) -> np.ndarray:
    """A grey steel-like texture; kind='scratch' adds a bright vertical line. uint8 HxW."""
    rng = np.random.default_rng(seed)
    image = rng.normal(128, 12, (size, size)).clip(0, 255)
    if kind == "scratch":
        image[:, size // 3:size // 3 + 2] = 235
    return image.astype(np.uint8)


def save_image(path: Path, kind: str = "plain", size: int = 64, seed: int = 0, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_image(kind, size, seed)).convert(mode).save(path)
    return path


def random_model_with_spread(seed: int, normalization: str):
    """Random weights whose probabilities differ between images (a fresh model puts every image at p = 0.5:
    untouched BatchNorm statistics, a 0.01-std head): one pass in train mode over synthetic 64 px images sets
    the statistics, a wider head spreads the logits. -> (model in eval mode, initialisation)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net, init = build_model("none")
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None
                module.reset_running_stats()
        batch = np.stack([np.repeat(synthetic_image(kind, 64, s)[..., None], 3, axis=2)
                          for s in range(6) for kind in ("plain", "scratch")])
        with torch.no_grad():
            net.train()(dataset.normalize(batch, normalization))
        net.eval()
        torch.nn.init.normal_(net.classifier[1].weight, std=0.5)
    return net, init


@pytest.fixture(scope="module")
def one_torch_thread():
    """In-process torch on one thread: two threads fighting the scripts these tests start, on a 2-core
    machine, run several times slower. Changes nothing the tests check."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def unavailable(what: str, reason: str, warn: bool = False):
    """Something `what` needs is missing: a failure in CI (.ci/run provides everything), a skip elsewhere, with
    the reason as a warning too when `warn`."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} cannot run in CI: {reason}")
    if warn:
        warnings.warn(f"{what} skipped: {reason}")
    pytest.skip(reason)


def bench_module(name: str):
    """A module only bench/requirements.txt installs (.ci/run installs it)."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        unavailable(f"tests that need {name}", f"{name} not installed ({error}); pip install -r bench/requirements.txt")


@pytest.fixture(scope="session")
def neu_dir() -> Path:
    """The real NEU-DET copy ($NEU_DATA_DIR). Required in CI; skipped elsewhere when unset."""
    value = os.environ.get("NEU_DATA_DIR")
    if not value or not Path(value).is_dir():
        unavailable("the NEU data tests", "NEU_DATA_DIR not set (it must point at the NEU-DET copy)")
    return Path(value).resolve()  # tests run scripts from other working directories


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained (random-init, seeded) checkpoint at 64 px: valid format, instant to make."""
    torch.manual_seed(0)
    model, init = build_model("none")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(path, model, {"image_size": 64, "normalization": "per-image", "threshold": 0.5, "pretrained": init,
                                  "epochs": 0, "seed": 0})
    return path


@pytest.fixture(scope="module")
def decisive_checkpoint(tmp_path_factory):
    """Random weights like tiny_checkpoint, but whose probabilities differ between images
    (random_model_with_spread); an ImageNet-normalised model in the older checkpoint format (mean/std, no
    'normalization' key), which infer.py still reads."""
    net, init = random_model_with_spread(5, "imagenet")
    path = tmp_path_factory.mktemp("decisive") / "decisive.pth"
    save_checkpoint(path, net, {"image_size": 64, "mean": list(dataset.IMAGENET_MEAN),
                                "std": list(dataset.IMAGENET_STD), "threshold": 0.5, "pretrained": init})
    return path


def steel_like_batch(seeds, size: int = 64) -> np.ndarray:
    """uint8 (N, size, size, 3) of synthetic_image's plain and scratch textures, one of each per seed."""
    return np.stack([np.repeat(synthetic_image(kind, size, s)[..., None], 3, axis=2)
                     for s in seeds for kind in ("plain", "scratch")])


@pytest.fixture(scope="module")
def familiar_checkpoint(tmp_path_factory):
    """A checkpoint with known familiarity statistics and a temperature of 0.5: random weights with spread
    (random_model_with_spread), statistics fitted on synthetic steel-like textures (seeds 0-59) and their
    camera-changed copies, with the cut-off from seeds 60-99 and theirs, and the deep score from the same images
    without copies, by the function train.py uses."""
    net, init = random_model_with_spread(7, "per-image")

    def features_of(pixels, layer=familiarity.LAYER):
        return predict_features(net, pixels, "per-image", 16, "cpu", layer)
    stats = familiarity.fit_model(features_of, torch.from_numpy(steel_like_batch(range(60))),
                                  np.tile(["plain", "scratch"], 60), torch.from_numpy(steel_like_batch(range(60, 100))),
                                  deep=True)
    path = tmp_path_factory.mktemp("familiar") / "familiar.pth"
    save_checkpoint(path, net, {"image_size": 64, "normalization": "per-image", "threshold": 0.5, "pretrained": init,
                                "temperature": 0.5, "familiarity": stats})
    return path
