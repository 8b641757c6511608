"""The checkpoint: one writer, one reader; every bad file is one clear error and never runs code;
ImageNet initialisation from the torch hub cache, offline."""
from __future__ import annotations

import builtins
import os
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models import efficientnet_b0

import dataset
from scratch_detector import model as model_module
from conftest import ROOT, save_image
from gradcam import GradCAM
from scratch_detector.model import (CheckpointError, EfficientNetB0, PretrainedUnavailable, build_model, fold_batchnorm,
                   load_checkpoint, save_checkpoint)

META = {"image_size": 64, "mean": list(dataset.IMAGENET_MEAN), "std": list(dataset.IMAGENET_STD),
        "threshold": 0.37, "pretrained": "none", "epochs": 0, "seed": 0,
        "split": {"seed": 0, "n_test": 3, "test_digest": "abc"}, "val_metrics": {"accuracy": 0.5}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_inference_network_is_torchvisions_efficientnet_b0():
    """load_checkpoint builds EfficientNetB0 from torch.nn; it must be torchvision's network exactly: the same
    state_dict keys and shapes in the same order, and the same outputs and CAMs, with BatchNorm folded or not."""
    torch.manual_seed(0)
    reference = efficientnet_b0(num_classes=2)
    for module in reference.modules():  # BatchNorm statistics away from 0/1, so eps, order and folding all matter
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, -0.2, 0.2)
    reference.eval()
    twin = EfficientNetB0(num_classes=2)
    assert ([(k, v.shape) for k, v in twin.state_dict().items()]
            == [(k, v.shape) for k, v in reference.state_dict().items()])
    twin.load_state_dict(reference.state_dict())
    twin.eval()
    images = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        expected = reference(images)
        assert (expected[:, 1] - expected[:, 0]).abs().max() > 0.1  # outputs that say something
        assert torch.allclose(twin(images), expected, rtol=1e-4, atol=1e-5)
    cams = {layer: GradCAM(reference, layer, "layercam")(images, 1) for layer in ("features.1", "features.8")}
    for layer, expected_cam in cams.items():
        assert torch.allclose(GradCAM(twin, layer, "layercam")(images, 1), expected_cam, atol=1e-4), layer
    fold_batchnorm(twin)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in twin.modules())
    with torch.no_grad():
        assert torch.allclose(twin(images), expected, rtol=1e-3, atol=1e-4)
    assert torch.allclose(GradCAM(twin, "features.1", "layercam")(images, 1), cams["features.1"], atol=1e-3)


def test_inference_scripts_do_not_import_torchvision():
    """torchvision costs seconds of start-up (it imports torch._dynamo) and inference does not need it."""
    probe = "import sys, infer, evaluate; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(1)
    net, _ = build_model("none")
    with torch.no_grad():  # make the BatchNorm statistics non-default so that they must round-trip too
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return net.eval()


def files_in(folder):
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------------------
# Round trip and atomic writing
# ---------------------------------------------------------------------------------------------------------
def test_round_trip(tmp_path, small_model):
    path = tmp_path / "model_binary.pth"
    save_checkpoint(path, small_model, META)
    assert files_in(tmp_path) == ["model_binary.pth"]  # no temp file left

    loaded, meta = load_checkpoint(path)
    original = small_model.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    for key, value in META.items():
        assert meta[key] == value, key
    assert meta["arch"] == "efficientnet_b0" and meta["classes"] == ["non-defect", "defect"]
    assert meta["torch_version"] == str(torch.__version__) and meta["date"]
    assert "state_dict" not in meta
    assert not loaded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x.contiguous(memory_format=torch.channels_last)),
                           small_model(x.contiguous(memory_format=torch.channels_last)))

    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    assert type(raw["torch_version"]) is str
    fresh = torchvision.models.efficientnet_b0(num_classes=2)
    fresh.load_state_dict(raw["state_dict"])  # strict: every key and shape fits torchvision's own model


def test_save_replaces_atomically(tmp_path, small_model):
    path = tmp_path / "m.pth"
    save_checkpoint(path, small_model, META)
    before = path.read_bytes()

    with pytest.raises(Exception):  # metadata that cannot be pickled: fails during torch.save
        save_checkpoint(path, small_model, {**META, "callback": lambda: None})
    assert path.read_bytes() == before
    assert files_in(tmp_path) == ["m.pth"]


def test_interrupted_save_keeps_old_file(tmp_path, small_model, monkeypatch):
    path = tmp_path / "m.pth"
    save_checkpoint(path, small_model, META)
    before = path.read_bytes()

    def half_then_interrupt(obj, handle, *args, **kwargs):
        handle.write(before[: len(before) // 2])
        raise KeyboardInterrupt  # Ctrl-C (or SIGTERM, which run_main turns into this) mid-write

    monkeypatch.setattr(torch, "save", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, small_model, {**META, "threshold": 0.9})
    assert path.read_bytes() == before
    assert files_in(tmp_path) == ["m.pth"]
    monkeypatch.undo()
    save_checkpoint(path, small_model, {**META, "threshold": 0.9})
    assert load_checkpoint(path)[1]["threshold"] == 0.9
    assert files_in(tmp_path) == ["m.pth"]


# ---------------------------------------------------------------------------------------------------------
# Bad checkpoints: CheckpointError in-process, one stderr line from infer.py, payloads never run
# ---------------------------------------------------------------------------------------------------------
class SystemPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class OpenPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def ours(state_dict, **extra):
    return {"state_dict": state_dict, "arch": "efficientnet_b0", "classes": ["non-defect", "defect"], **META,
            **extra}


def make_bad_checkpoints(folder, good):
    """name -> path of a checkpoint load_checkpoint must refuse. `good` is a valid checkpoint."""
    folder.mkdir()
    data = good.read_bytes()
    bad = {"missing": folder / "missing.pth"}
    bad["truncated"] = folder / "truncated.pth"
    bad["truncated"].write_bytes(data[: len(data) * 2 // 3])
    bad["text"] = folder / "notes.pth"
    bad["text"].write_text("these are my notes, not a model\n")
    bad["resnet18"] = folder / "resnet18.pth"
    torch.save(ours(torchvision.models.resnet18().state_dict()), bad["resnet18"])
    bad["three_classes"] = folder / "three.pth"
    torch.save(ours(efficientnet_b0(num_classes=3).state_dict()), bad["three_classes"])
    state = load_checkpoint(good)[0].state_dict()
    bad["os_system_payload"] = folder / "system.pth"
    torch.save(ours(state, note=SystemPayload(folder / "PWNED-system")), bad["os_system_payload"])
    return bad


EXTRA_BAD = {
    "empty": lambda f, state: f.write_bytes(b""),
    "random_bytes": lambda f, state: f.write_bytes(np.random.default_rng(17).bytes(2000)),  # IndexError in torch
    "not_a_dict": lambda f, state: torch.save([1, 2, 3], f),
    "no_metadata": lambda f, state: torch.save(state, f),
    "bare_pickle": lambda f, state: f.write_bytes(__import__("pickle").dumps({"a": 1})),
    "other_arch_name": lambda f, state: torch.save(ours(state, arch="resnet18"), f),
    "image_size_text": lambda f, state: torch.save(ours(state, image_size="big"), f),
    "threshold_out_of_range": lambda f, state: torch.save(ours(state, threshold=3.0), f),
    "other_normalisation": lambda f, state: torch.save(ours(state, mean=[0.5, 0.5, 0.5]), f),
    "unknown_normalization": lambda f, state: torch.save(ours(state, normalization="zca"), f),
    "classes_not_a_list": lambda f, state: torch.save(ours(state, classes=7), f),
    "nan_weights": lambda f, state: torch.save(
        ours({k: (v * float("nan") if v.is_floating_point() else v) for k, v in state.items()}), f),
}


def test_bad_checkpoints_raise_checkpoint_error(tmp_path, tiny_checkpoint):
    bad = make_bad_checkpoints(tmp_path / "bad", tiny_checkpoint)
    state = load_checkpoint(tiny_checkpoint)[0].state_dict()
    bad["open_payload"] = tmp_path / "bad" / "open.pth"
    torch.save(ours(state, note=OpenPayload(tmp_path / "bad" / "PWNED-open")), bad["open_payload"])
    for name, write in EXTRA_BAD.items():
        bad[name] = tmp_path / "bad" / f"{name}.pth"
        write(bad[name], state)
    bad["a_folder"] = tmp_path / "bad" / "folder.pth"
    bad["a_folder"].mkdir()
    for name, path in bad.items():
        with warnings.catch_warnings(record=True) as caught, pytest.raises(CheckpointError) as error:
            warnings.simplefilter("always")
            load_checkpoint(path)
        assert not caught, (name, [str(w.message) for w in caught])  # the error line is all the user sees
        message = str(error.value)
        assert "\n" not in message and str(path) in message and len(message) < 400, (name, message)
    assert "may carry code" in str(pytest.raises(CheckpointError, load_checkpoint, bad["os_system_payload"]).value)
    assert not list((tmp_path / "bad").glob("PWNED*"))


def test_infer_refuses_bad_checkpoints_with_one_line(tmp_path, tiny_checkpoint):
    bad = make_bad_checkpoints(tmp_path / "bad", tiny_checkpoint)
    images = tmp_path / "images"
    save_image(images / "scratch.png", "scratch")
    # all runs at once: each is mostly the interpreter importing torch
    runs = {name: subprocess.Popen([sys.executable, str(ROOT / "infer.py"), "--model", str(path), "--input",
                                    str(images), "--output", str(tmp_path / f"out-{name}")],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
            for name, path in bad.items()}
    for name, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=300)
        lines = stderr.strip().splitlines()
        assert proc.returncode != 0, name
        assert "Traceback" not in stderr, (name, stderr)
        assert len(lines) == 1, (name, stderr)
        assert lines[0].startswith("error: ") and str(bad[name]) in lines[0], (name, lines[0])
        assert not (tmp_path / f"out-{name}" / "predictions.csv").exists()
    assert not list((tmp_path / "bad").glob("PWNED*")), "a pickle payload ran"
    assert not list(tmp_path.glob("PWNED*"))


# ---------------------------------------------------------------------------------------------------------
# --pretrained: ImageNet weights from the torch hub cache, offline
# ---------------------------------------------------------------------------------------------------------
WEIGHTS_NAME = "efficientnet_b0_rwightman-7f5810bc.pth"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty $TORCH_HOME, and a network that fails at once (records every attempt)."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # so torch.hub.get_dir() reads $TORCH_HOME
    attempts = []

    def no_network(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "no network in tests")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    cache = home / "hub" / "checkpoints" / WEIGHTS_NAME
    assert torch.hub.get_dir() == str(home / "hub")
    return cache, attempts


@pytest.fixture(scope="module")
def imagenet_like():
    torch.manual_seed(1234)
    return efficientnet_b0().state_dict()  # the 1000-class model torchvision would load


def assert_backbone_is(net, state):
    for key, value in net.state_dict().items():
        if not key.startswith("classifier"):
            assert torch.equal(value, state[key]), key
    assert net.classifier[1].out_features == 2


@pytest.mark.parametrize("choice", ["imagenet", "auto"])
def test_imagenet_weights_from_cache(offline_hub, imagenet_like, choice, capsys):
    cache, attempts = offline_hub
    cache.parent.mkdir(parents=True)
    torch.save(imagenet_like, cache)
    net, init = build_model(choice)
    assert init.startswith("imagenet")
    assert_backbone_is(net, imagenet_like)
    assert not attempts  # the cached file was used; nothing was downloaded
    assert "WARNING" not in capsys.readouterr().err
    # a random-init model does not match those weights: the check above can tell them apart
    other, _ = build_model("none")
    assert not torch.equal(other.features[0][0].weight, imagenet_like["features.0.0.weight"])


@pytest.fixture
def no_lite0(tmp_path, monkeypatch):
    """The Lite0 package's weights file missing, as on an install without it."""
    from scratch_detector import lite0
    monkeypatch.setattr(lite0, "weights_file", lambda: tmp_path / "no-lite0" / lite0.WEIGHTS_NAME)


def test_auto_falls_back_to_lite0_offline(offline_hub, capsys):
    """No torchvision weights to be had: 'auto' takes the installed Lite0 convolutions, says so, and warns not."""
    _, attempts = offline_hub
    net, init = build_model("auto")
    assert init.startswith("lite0") and attempts
    assert "WARNING" not in capsys.readouterr().err
    assert net.classifier[1].out_features == 2


def test_no_weights_offline(offline_hub, no_lite0, capsys):
    cache, attempts = offline_hub
    with pytest.raises(PretrainedUnavailable) as error:
        build_model("imagenet")
    assert str(cache) in str(error.value) and "\n" not in str(error.value)
    assert attempts  # it did try to download, and failed at once
    net, init = build_model("auto")
    assert init.startswith("none")
    assert "WARNING" in capsys.readouterr().err
    assert net.classifier[1].out_features == 2
    assert not cache.exists()


def test_unusable_cached_weights(offline_hub, no_lite0, capsys):
    """A cached file of another model, or one carrying a pickle payload: an error / a warning, never a crash
    or code execution."""
    cache, _ = offline_hub
    cache.parent.mkdir(parents=True)
    for content in (torchvision.models.resnet18().state_dict(), {"x": SystemPayload(cache.parent / "PWNED")}):
        torch.save(content, cache)
        with pytest.raises(PretrainedUnavailable) as error:
            build_model("imagenet")
        assert str(cache) in str(error.value) and "\n" not in str(error.value)
        net, init = build_model("auto")
        warning = capsys.readouterr().err.strip().splitlines()
        assert init.startswith("none") and len(warning) == 1 and warning[0].startswith("WARNING"), warning
    assert not (cache.parent / "PWNED").exists()


def test_pretrained_none_never_touches_the_network(offline_hub):
    _, attempts = offline_hub
    _, init = build_model("none")
    assert init.startswith("none") and not attempts
    with pytest.raises(ValueError):
        build_model("yes")


def test_download_has_a_socket_timeout(offline_hub, monkeypatch):
    """A network that swallows packets must make the download fail, not hang: a timeout is set meanwhile."""
    seen = []

    def fake_get_state_dict(*args, **kwargs):
        seen.append(socket.getdefaulttimeout())
        raise TimeoutError("timed out")

    monkeypatch.setattr(type(model_module.imagenet_weights()), "get_state_dict", fake_get_state_dict)
    before = socket.getdefaulttimeout()
    with pytest.raises(PretrainedUnavailable):
        model_module.imagenet_state_dict(download_timeout_s=7.0)
    assert seen == [7.0] and socket.getdefaulttimeout() == before
