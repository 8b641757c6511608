"""gradcam.py against the reference implementation (pytorch-grad-cam), plus its API guarantees."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from conftest import synthetic_image
from pytorch_grad_cam import GradCAM as RefGradCAM
from pytorch_grad_cam import GradCAMPlusPlus as RefGradCAMPlusPlus
from pytorch_grad_cam import LayerCAM as RefLayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import dataset
from gradcam import METHODS, GradCAM, resolve_layer, scale_per_image
from scratch_detector.model import EfficientNetB0, build_model, load_checkpoint, save_checkpoint
from scratch_detector.overlay import encode_overlay, render_overlay
from scratch_detector.settings import DEFAULT_CAM_LAYER

REFERENCE = {"gradcam": RefGradCAM, "gradcam++": RefGradCAMPlusPlus, "layercam": RefLayerCAM}
SIZE = 64  # the fixture model's input size
LAYERS = list(dict.fromkeys(["features.3", "features.5", "features.8", DEFAULT_CAM_LAYER]))  # + what infer.py explains


def synthetic_batch(seeds, size: int = SIZE) -> tuple[np.ndarray, torch.Tensor]:
    """uint8 (N, S, S, 3) images alternating plain, scratch, ... with the given seeds, and their labels."""
    kinds = ["plain" if i % 2 == 0 else "scratch" for i in range(len(seeds))]
    pixels = np.stack([np.repeat(synthetic_image(kind, size, seed)[..., None], 3, -1)
                       for kind, seed in zip(kinds, seeds)])
    return pixels, torch.tensor([kind == "scratch" for kind in kinds]).long()


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_torch_thread):
    """A network trained here for a few seconds to tell scratch from plain synthetic images, then saved and read
    back as infer.py reads it, so the network explained is the inference EfficientNetB0. Trained, its maps are
    structured (a random one gives near-constant maps that would agree vacuously); made here, the test does
    not depend on whatever model_binary.pth is committed."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net, init = build_model("none")
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        net.train()
        for step in range(24):  # the training loss is below 0.01 after about 10 steps
            pixels, labels = synthetic_batch(range(1000 * step, 1000 * step + 16))
            loss = torch.nn.functional.cross_entropy(net(dataset.normalize(pixels, "per-image")), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        # BatchNorm statistics of the final weights (the running averages lag behind 24 fast steps)
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None
                module.reset_running_stats()
        with torch.no_grad():
            for start in range(50_000, 50_064, 16):
                net(dataset.normalize(synthetic_batch(range(start, start + 16))[0], "per-image"))
    path = tmp_path_factory.mktemp("gradcam") / "trained.pth"
    save_checkpoint(path, net.eval(), {"image_size": SIZE, "normalization": "per-image", "threshold": 0.5,
                                       "pretrained": init})
    loaded, meta = load_checkpoint(path)
    assert isinstance(loaded, EfficientNetB0) and meta["image_size"] == SIZE
    pixels, labels = synthetic_batch(range(100, 108))  # the images the tests below explain
    with torch.no_grad():
        probabilities = loaded(dataset.normalize(pixels, "per-image")).softmax(1)[:, 1]
    assert ((probabilities >= 0.5).long() == labels).all(), f"the fixture model did not learn: {probabilities}"
    return loaded


def images_batch(n: int, seed: int = 100, kinds=("plain", "scratch")) -> torch.Tensor:
    """n synthetic images cycling through `kinds` (a plain texture has no defect evidence: a flat map)."""
    pixels = np.stack([np.repeat(synthetic_image(kinds[i % len(kinds)], SIZE, seed + i)[..., None], 3, -1)
                       for i in range(n)])
    return dataset.normalize(pixels, "per-image")


def minmax(maps: np.ndarray) -> np.ndarray:
    return scale_per_image(torch.as_tensor(maps, dtype=torch.float32)).numpy()


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("layer", LAYERS)
def test_matches_pytorch_grad_cam(model, method, layer):
    images = images_batch(4)
    ours = GradCAM(model, resolve_layer(model, layer), method)(images, target_class=1).numpy()
    with REFERENCE[method](model=model, target_layers=[resolve_layer(model, layer)]) as reference:
        theirs = reference(input_tensor=images, targets=[ClassifierOutputTarget(1)] * len(images))
    assert ours.shape == theirs.shape == (4, SIZE, SIZE)
    spread = np.ptp(theirs.reshape(4, -1), axis=1)
    assert (spread[1::2] > 0.5).all(), "reference maps of the scratch images are flat: the test would be vacuous"
    assert np.abs(minmax(ours) - minmax(theirs)).max() <= 0.02


def test_heatmaps_are_scaled_per_image_at_input_resolution(model):
    maps = GradCAM(model, "features.4", "gradcam")(images_batch(3, kinds=("scratch",)), target_class=1)
    assert maps.shape == (3, SIZE, SIZE)
    flat = maps.flatten(1)
    assert torch.allclose(flat.min(1).values, torch.zeros(3), atol=1e-6)
    assert torch.allclose(flat.max(1).values, torch.ones(3), atol=1e-6)


def test_batch_equals_one_at_a_time(model):
    images = images_batch(4)
    cam = GradCAM(model, "features.6", "layercam")
    together = cam(images, target_class=1)
    alone = torch.cat([cam(images[i:i + 1], target_class=1) for i in range(len(images))])
    assert torch.allclose(together, alone, atol=1e-4)


def test_target_class_changes_the_map_and_logits_are_returned(model):
    images = images_batch(2)
    cam = GradCAM(model, "features.8", "gradcam")
    defect, logits = cam.explain(images, target_class=1)
    other, _ = cam.explain(images, target_class=0)
    assert logits.shape == (2, 2)
    with torch.no_grad():
        assert torch.allclose(logits, model(images), atol=1e-5)
    assert not torch.allclose(defect, other)


def test_hooks_removed_and_gradients_untouched(model):
    layer = resolve_layer(model, "features.5")
    model.zero_grad(set_to_none=True)  # the reference implementation leaves weight gradients behind
    before = [p.requires_grad for p in model.parameters()]
    GradCAM(model, layer, "gradcam++")(images_batch(2), target_class=1)
    assert not layer._forward_hooks
    assert [p.requires_grad for p in model.parameters()] == before
    assert all(p.grad is None for p in model.parameters())


def test_hooks_removed_after_an_error(model):
    layer = resolve_layer(model, "features.5")
    with pytest.raises(RuntimeError):
        GradCAM(model, layer)(torch.zeros(1, 5, SIZE, SIZE), target_class=1)  # wrong channel count
    assert not layer._forward_hooks
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_layer_and_method_are_clear_errors(model):
    with pytest.raises(ValueError, match="features"):
        resolve_layer(model, "features.99")
    with pytest.raises(ValueError, match="gradcam"):
        GradCAM(model, "features.5", "nonsense")
    assert resolve_layer(model, "features[5]") is model.features[5]


def test_overlay_shows_image_beside_heatmap_with_verdict():
    image = np.repeat(synthetic_image("scratch", 80)[..., None], 3, -1)
    heatmap = np.zeros((20, 20), np.float32)
    heatmap[:, 6] = 1.0  # hot column where the scratch is
    overlay = render_overlay(image, heatmap, "defect", 0.9731)
    banner = overlay.shape[0] - 80
    assert overlay.shape[1] == 160 and banner > 0
    assert np.array_equal(overlay[banner:, :80], cv2.cvtColor(image, cv2.COLOR_RGB2BGR))  # original untouched
    right = overlay[banner:, 80:].astype(int)
    hot_column, cold_column = right[:, 26], right[:60, 70]  # the cold one above the colour scale's corner
    assert (hot_column[:, 2] - hot_column[:, 0]).mean() > 80  # hot: red over the grey steel
    assert np.array_equal(cold_column, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)[:60, 70])  # cold: the steel as it is
    assert (overlay[:banner] == 255).any()  # white text on the banner
    as_png = cv2.imdecode(np.frombuffer(encode_overlay(overlay, "png"), np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(as_png, overlay)  # lossless
    jpeg_bytes = encode_overlay(overlay, "jpg")
    as_jpeg = cv2.imdecode(np.frombuffer(jpeg_bytes, np.uint8), cv2.IMREAD_COLOR)
    assert jpeg_bytes[:2] == b"\xff\xd8" and as_jpeg.shape == overlay.shape
    error = np.abs(as_jpeg.astype(int) - overlay)
    assert error.mean() < 2.5 and np.percentile(error, 99) < 30  # quality 95: close to the drawn pixels
    hot = as_jpeg[banner:, 80:][:, 26].astype(int)
    assert (hot[:, 2] - hot[:, 0]).mean() > 60  # still red after JPEG
