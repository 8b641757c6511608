"""train.py's pieces: the augmentation (symmetries, camera, zoom, transplant), the learning-rate schedule, and
keeping the last epoch."""
from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_script, synthetic_image, write_voc

import dataset
import train
from scratch_detector import augment as augmentation
from scratch_detector import explain_loss, perturb
from scratch_detector.evaluation import select_samples
from scratch_detector.metrics import binary_metrics
from scratch_detector.model import (build_model, freeze_first_blocks, load_checkpoint, predict_probabilities,
                                    refresh_batchnorm)

FLIPS = {0, 2, 5, 7}  # perturb.dihedral's identity, half turn (both flips), and the up-down and left-right flips


def random_batch(n: int, size: int = 12, seed: int = 0) -> torch.Tensor:
    """n distinct random uint8 images whose 8 symmetries are all different (checked): no symmetry of one
    image equals a symmetry of another, so an output can be traced back to exactly one input and one k."""
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    variants = {perturb.dihedral(image, k).tobytes() for image in images for k in range(8)}
    assert len(variants) == 8 * n, "test images must be non-symmetric and distinct"
    return torch.from_numpy(images)


def symmetries_used(inputs: torch.Tensor, outputs: torch.Tensor) -> list[int]:
    """For each i, the k with outputs[i] == dihedral(inputs[i], k); fails if there is none."""
    found = []
    for i, (x, y) in enumerate(zip(inputs.numpy(), outputs.numpy())):
        ks = [k for k in range(8) if np.array_equal(y, perturb.dihedral(x, k))]
        assert len(ks) == 1, f"output {i} is not a symmetry of input {i}"
        found.append(ks[0])
    return found


def test_dihedral_gives_exact_symmetries_of_each_image_in_order():
    batch = random_batch(64)
    before = batch.clone()
    generator = torch.Generator().manual_seed(1)
    used = []
    for _ in range(3):
        out = augmentation.augment(batch, generator, ("dihedral",))
        assert out.dtype == torch.uint8 and out.shape == batch.shape
        used += symmetries_used(batch, out)  # image i -> a symmetry of image i: labels stay aligned
    assert torch.equal(batch, before), "augment must not change its input"
    assert set(used) == set(range(8))  # 192 draws: every symmetry occurs
    counts = np.bincount(used, minlength=8)
    assert counts.min() >= 8, counts  # roughly uniform (expected 24 each)
    assert len(set(used[:64])) > 1  # different images get different symmetries in one batch


def test_flips_use_only_the_four_flip_symmetries():
    batch = random_batch(64, seed=1)
    generator = torch.Generator().manual_seed(2)
    used = []
    for _ in range(2):
        used += symmetries_used(batch, augmentation.augment(batch, generator, ("flips",)))
    assert set(used) == FLIPS


@pytest.mark.parametrize("kinds", [("dihedral",), augmentation.AUGMENTATIONS[1:]])
def test_same_seed_same_batch(kinds):
    batch = random_batch(16, size=32, seed=2)
    first = augmentation.augment(batch, torch.Generator().manual_seed(7), kinds)
    again = augmentation.augment(batch, torch.Generator().manual_seed(7), kinds)
    other = augmentation.augment(batch, torch.Generator().manual_seed(8), kinds)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def line_strength(image: np.ndarray) -> float:
    """How strongly one row or column stands out from the rest, in units of the image's own spread: large
    for a scratch in either orientation, whatever the brightness, contrast, blur or noise; ~1 for texture."""
    grey = image.astype(np.float64).mean(-1)
    profile = np.concatenate([grey.mean(0), grey.mean(1)])
    return float((profile.max() - np.median(profile)) / (grey.std() + 1.0))


@pytest.mark.parametrize("seed", range(4))
def test_default_augmentation_changes_images_but_keeps_each_ones_identity(seed):
    """Among plain textures, one image has a bright scratch through the centre (a zoom window always contains
    the centre). After dihedral + camera + zoom, the image that still shows a scratch is the same one."""
    size, n = 64, 8
    scratched = seed * 3 % n
    images = []
    for i in range(n):
        grey = synthetic_image("plain", size, seed=10 * seed + i)
        if i == scratched:
            grey[:, size // 2 - 1:size // 2 + 1] = 235
        images.append(np.repeat(grey[..., None], 3, axis=2))
    batch = torch.from_numpy(np.stack(images))
    before = batch.clone()
    strengths_in = [line_strength(image) for image in images]
    assert strengths_in[scratched] > 3 * max(s for i, s in enumerate(strengths_in) if i != scratched)

    out = augmentation.augment(batch, torch.Generator().manual_seed(seed))
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    assert torch.equal(batch, before)
    changed = [not torch.equal(a, b) for a, b in zip(out, batch)]
    assert sum(changed) >= n // 2
    strengths = [line_strength(image) for image in out.numpy()]
    assert max(strengths) == strengths[scratched], strengths
    others = [s for i, s in enumerate(strengths) if i != scratched]
    assert strengths[scratched] > 3 * max(others), strengths


# ---------------------------------------------------------------------------------------------------------
# --augment-prob: how often each augmentation is drawn, settable for trying a recipe
# ---------------------------------------------------------------------------------------------------------
def test_policy_replaces_only_the_named_probabilities():
    settings = augmentation.policy({"blur": 0.5, "zoom": 1.0, "transplant": 0.0})
    assert settings["camera"]["blur"] == {**augmentation.CAMERA["blur"], "p": 0.5}
    assert settings["zoom"] == {**augmentation.ZOOM, "p": 1.0}
    assert settings["transplant"] == {**augmentation.TRANSPLANT, "p": 0.0}
    assert all(settings["camera"][name] == augmentation.CAMERA[name] for name in augmentation.CAMERA if name != "blur")
    assert augmentation.policy() == {"camera": augmentation.CAMERA, "zoom": augmentation.ZOOM,
                                     "transplant": augmentation.TRANSPLANT}
    for wrong, message in (({"focus": 0.5}, "unknown augmentation focus"), ({"noise": 1.5}, "between 0 and 1")):
        with pytest.raises(ValueError, match=message):
            augmentation.policy(wrong)


def test_augment_draws_each_change_as_often_as_the_policy_says():
    batch = random_batch(16, size=24, seed=3)
    kinds = ("camera", "zoom")
    never = augmentation.policy({name: 0.0 for name in augmentation.PROBABILITY_NAMES})
    assert torch.equal(augmentation.augment(batch, torch.Generator().manual_seed(1), kinds, settings=never), batch)
    only_blur = augmentation.policy({**{name: 0.0 for name in augmentation.PROBABILITY_NAMES}, "blur": 1.0})
    blurred = augmentation.augment(batch, torch.Generator().manual_seed(1), kinds, settings=only_blur)
    assert all(not torch.equal(a, b) for a, b in zip(blurred, batch))
    # a blur keeps the mean grey level and smooths: every image's pixel spread shrinks
    assert all(a.float().std() < b.float().std() for a, b in zip(blurred, batch))
    # the default settings are the module's own: the same batch as before --augment-prob existed
    default = augmentation.augment(batch, torch.Generator().manual_seed(1))
    assert torch.equal(default, augmentation.augment(batch, torch.Generator().manual_seed(1),
                                                     settings=augmentation.policy({})))


def test_transplant_follows_the_policy():
    rng = np.random.default_rng(1)
    batch = torch.from_numpy(np.repeat(rng.integers(90, 160, (20, 16, 16, 1), dtype=np.uint8), 3, axis=3))
    labels = torch.zeros(20, dtype=torch.long)
    marks = torch.from_numpy(rng.uniform(-30, 30, (2, 16, 16)).astype(np.float32))
    for p, expected in ((0.0, 0), (1.0, 20)):
        _, out_labels = augmentation.transplant(batch, labels, marks, torch.Generator().manual_seed(0),
                                                settings=augmentation.policy({"transplant": p}))
        assert int(out_labels.sum()) == expected


def test_augment_prob_is_parsed_and_checked(capsys):
    args = train.parse_args(["--augment-prob", "blur=0.5", "zoom=0.4"])
    assert args.augment_prob == {"blur": 0.5, "zoom": 0.4}
    assert args.policy["camera"]["blur"]["p"] == 0.5 and args.policy["zoom"]["p"] == 0.4
    assert train.parse_args([]).policy == augmentation.policy()
    for item, message in (("blur", "takes NAME=P"), ("blur=x", "takes NAME=P"), ("focus=0.5", "unknown"),
                          ("blur=2", "between 0 and 1")):
        with pytest.raises(SystemExit):
            train.parse_args(["--augment-prob", item])
        assert message in capsys.readouterr().err


def test_checkpoint_records_the_probabilities_it_trained_with(neu_dir, tmp_path):
    result = run_script("train.py", "--data-dir", neu_dir, "--output", tmp_path / "m.pth", "--reports",
                        tmp_path / "outputs", "--max-per-class", 4, "--epochs", 1, "--image-size", 48,
                        "--pretrained", "none", "--test-images", "", "--augment-prob", "blur=0.5", "transplant=0",
                        "--freeze-blocks", 2, "--refresh-batchnorm",
                        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "blur p 0.5, transplant p 0" in result.stdout
    _, meta = load_checkpoint(tmp_path / "m.pth")
    assert meta["hyperparameters"]["augment_prob"] == {"blur": 0.5, "transplant": 0.0}
    # random init has nothing worth keeping: no block frozen, and the checkpoint says so
    assert meta["hyperparameters"]["freeze_blocks"] == 0 and "frozen" not in result.stdout
    assert meta["hyperparameters"]["refresh_batchnorm"] and "BatchNorm statistics of 49 layers" in result.stdout


def test_frozen_blocks_keep_their_weights_and_the_blocks_above_train(one_torch_thread):
    torch.manual_seed(0)
    model, _ = build_model("none")
    start = {name: value.clone() for name, value in model.state_dict().items()}
    frozen = freeze_first_blocks(model, 2)
    assert frozen == sum(p.numel() for block in list(model.features)[:2] for p in block.parameters()) > 0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    F.cross_entropy(model(torch.randn(4, 3, 48, 48)), torch.tensor([0, 1, 0, 1])).backward()
    optimizer.step()
    for name, parameter in model.named_parameters():
        if name.startswith(("features.0.", "features.1.")):
            assert parameter.grad is None and torch.equal(parameter, start[name]), name
    above = {n: p for n, p in model.named_parameters() if n.startswith("features.2.")}
    assert all(p.grad is not None for p in above.values())
    assert sum(not torch.equal(p, start[n]) for n, p in above.items()) > len(above) // 2
    # their BatchNorm statistics still follow the data
    assert not torch.equal(model.state_dict()["features.0.1.running_mean"], start["features.0.1.running_mean"])


def test_freeze_blocks_cannot_freeze_the_layer_the_heatmap_loss_shapes(capsys):
    assert train.parse_args(["--freeze-blocks", "2"]).freeze_blocks == 2
    with pytest.raises(SystemExit):
        train.parse_args(["--freeze-blocks", "3"])
    assert "would freeze features.2" in capsys.readouterr().err
    assert train.parse_args(["--freeze-blocks", "3", "--explain-weight", "0"]).freeze_blocks == 3


# ---------------------------------------------------------------------------------------------------------
# The learning-rate schedule
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("total, warmup, start", [(100, 0.1, 0.04), (1000, 0.25, 0.1), (37, 0.1, 0.0)])
def test_one_cycle_warms_up_then_decays_to_zero(total, warmup, start):
    factor = train.one_cycle(total, warmup=warmup, start=start)
    values = [factor(step) for step in range(total + 1)]
    peak = round(warmup * total)
    assert values[0] == pytest.approx(start)
    assert values[peak] == pytest.approx(1.0)
    assert max(values) == pytest.approx(1.0)
    rising, falling = np.diff(values[:peak + 1]), np.diff(values[peak:])
    assert (rising > 0).all()  # linear warm-up
    assert np.allclose(rising, (1 - start) / peak)
    assert (falling < 0).all()  # strictly down after the peak
    assert values[total - 1] < 0.01  # the last step trains at almost no learning rate
    assert values[total] == pytest.approx(0.0, abs=1e-12)
    halfway = peak + (total - peak) // 2
    if (total - peak) % 2 == 0:
        assert values[halfway] == pytest.approx(0.5)  # cosine: half the peak halfway down


@pytest.mark.parametrize("total", [1, 2, 3])
def test_one_cycle_on_very_short_runs(total):
    factor = train.one_cycle(total)
    values = [factor(step) for step in range(total)]
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values)
    assert values[0] == pytest.approx(0.04)
    if total > 1:
        assert max(values) == pytest.approx(1.0)  # the peak is reached even in 2 steps

    # as train.main uses it: LambdaLR over an optimizer, one scheduler step per batch
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([weight], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1e-3 * v for v in values])


# ---------------------------------------------------------------------------------------------------------
# train.main keeps the last epoch, and stores the validation metrics of exactly those weights
# ---------------------------------------------------------------------------------------------------------
EPOCHS = 3
# --lr 0.003 --seed 2 from the ImageNet start: validation loss rises (about 0.46, 2.7, 7.0), so the last epoch is
# not the one with the lowest validation loss, and keeping the best (or first) epoch's weights would be caught.
# Not the random-init start: at this size its outputs are all but equal, so its threshold is cut between two
# images' p 3e-8 apart, and which side an image falls on changed with the CPU.
TRAIN_ARGS = ["--max-per-class", 8, "--epochs", EPOCHS, "--image-size", 48, "--batch-size", 16,
              "--pretrained", "lite0", "--test-images", "", "--lr", 0.003, "--seed", 2]


@pytest.fixture(scope="module")
def trained(neu_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("kept_epoch")
    result = run_script("train.py", "--data-dir", neu_dir, "--output", work / "model.pth",
                        "--reports", work / "outputs", *TRAIN_ARGS, cwd=work,
                        env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    with open(work / "outputs" / "training_log.csv", newline="") as handle:
        log = list(csv.DictReader(handle))
    return work / "model.pth", log


def test_last_epoch_is_the_one_kept(trained, neu_dir, one_torch_thread):
    path, log = trained
    assert [int(row["epoch"]) for row in log] == list(range(1, EPOCHS + 1))
    val_losses = [float(row["val_loss"]) for row in log]
    assert int(np.argmin(val_losses)) + 1 != EPOCHS, (
        f"validation losses {val_losses}: the last epoch must not be the lowest for the test to tell the last "
        f"from the best; pick another --seed/--lr")

    raw, meta = load_checkpoint(path, calibrated=False)
    assert meta["epochs"] == EPOCHS and "best_epoch" not in meta

    # the saved weights are the last epoch's: recompute the validation loss (of the raw p, which the training log
    # reports) from the re-derived val split
    samples, info = select_samples(neu_dir, meta, "val")
    assert len(samples) == meta["split"]["n_val"] == info["n_val"]
    pixels = torch.from_numpy(dataset.load_pixels(samples, int(meta["image_size"]), progress=False))
    probabilities = predict_probabilities(raw, pixels, meta["normalization"], 32, "cpu").numpy()
    loss = binary_metrics(probabilities, dataset.labels_of(samples), meta["threshold"])["loss"]
    assert loss == pytest.approx(val_losses[-1], abs=1e-4)
    assert min(abs(loss - v) for v in val_losses[:-1]) > 1e-3
    # the stored validation metrics are those of the calibrated p (what every reader gets) at the stored threshold
    model, _ = load_checkpoint(path)
    calibrated = predict_probabilities(model, pixels, meta["normalization"], 32, "cpu").numpy()
    again = binary_metrics(calibrated, dataset.labels_of(samples), meta["threshold"])
    assert np.abs(calibrated - meta["threshold"]).min() > 1e-4, (
        f"p {np.sort(calibrated)} against threshold {meta['threshold']}: an image within float noise of the "
        f"threshold may fall either side on another CPU's kernels; pick another --seed/--lr")
    assert again["confusion_matrix"] == meta["val_metrics"]["confusion_matrix"]
    assert again["loss"] == pytest.approx(meta["val_metrics"]["loss"], abs=1e-4)
    assert meta["val_metrics"]["threshold"] == meta["threshold"]


# ---------------------------------------------------------------------------------------------------------
# Transplant: a scratch's marks onto a non-scratch image, which then counts as a scratch
# ---------------------------------------------------------------------------------------------------------
def test_scratch_marks_are_the_lines_local_contrast_inside_its_boxes_only():
    image = np.full((80, 80), 100, np.uint8)
    image[10:60, 30] = 180          # the scratch, inside its box
    image[40:44, 70:74] = 20        # a dark spot outside every box
    marks = perturb.scratch_marks(image, [(28, 10, 33, 60)])
    assert marks.dtype == np.float32 and marks.shape == image.shape
    assert marks[35, 30] > 40                                   # the line stands out...
    assert abs(marks[35, 20]) < 8 and abs(marks[35, 40]) < 8    # ...its plate does not come along
    assert np.abs(marks[:, 60:]).max() < 1e-3                   # nothing outside the box (+ margin, feather)
    assert np.abs(perturb.scratch_marks(np.full((40, 40), 77, np.uint8), [(0, 0, 40, 40)])).max() < 1e-3


def test_transplant_makes_scratches_of_some_clean_images_and_leaves_the_rest_alone():
    rng = np.random.default_rng(0)
    n = 96
    grey = rng.integers(90, 160, (n, 16, 16, 1), dtype=np.uint8)
    batch = torch.from_numpy(np.repeat(grey, 3, axis=3))  # NEU images are grey: three equal channels
    labels = torch.tensor([i % 2 for i in range(n)])            # half scratches, half not
    marks = torch.from_numpy(rng.uniform(-30, 30, (3, 16, 16)).astype(np.float32))
    before = batch.clone(), labels.clone()
    out, out_labels = augmentation.transplant(batch, labels, marks, torch.Generator().manual_seed(3))
    again = augmentation.transplant(batch, labels, marks, torch.Generator().manual_seed(3))
    assert torch.equal(out, again[0]) and torch.equal(out_labels, again[1])   # a seed gives the same batch
    assert torch.equal(batch, before[0]) and torch.equal(labels, before[1])   # the inputs are not changed

    changed = [i for i in range(n) if not torch.equal(out[i], batch[i])]
    assert all(labels[i] == 0 for i in changed), "a scratch image is never changed"
    assert torch.equal(out_labels, torch.tensor([int(labels[i] == 1 or i in changed) for i in range(n)]))
    assert 2 <= len(changed) <= 20  # p = 0.2 of 48 clean images: about 10
    lo, hi = augmentation.TRANSPLANT["strength"]
    for i in changed:
        added = out[i].numpy().astype(np.float32)[..., 0] - batch[i].numpy().astype(np.float32)[..., 0]
        assert all(np.array_equal(out[i][..., 0], out[i][..., c]) for c in (1, 2))
        fits = []  # which mark, in which orientation, at which strength, explains the added pixels?
        for mark in marks.numpy():
            for k in range(8):
                turned = perturb.dihedral(mark, k)
                strength = float((added * turned).sum() / (turned * turned).sum())
                if np.abs(added - strength * turned).max() <= 0.6:  # rounding to uint8, strength fitted
                    fits.append(strength)
        assert len(fits) == 1 and lo - 0.01 <= fits[0] <= hi + 0.01, (i, fits)


def test_scratch_mark_bank_takes_annotated_scratches_with_boxes_at_the_input_size(tmp_path):
    """Boxes annotated on a 200 px image mark the same place in 100 px pixels; non-scratches and scratches
    without boxes give no marks."""
    def sample(name, neu_class):
        return dataset.Sample(tmp_path / f"{name}.jpg", f"{name}.jpg", neu_class)

    image = np.full((100, 100, 3), 100, np.uint8)
    image[:, 15] = 200   # the annotated scratch: x 28..34 of 200 -> 14..17 of 100
    image[:, 60] = 200   # an unannotated line
    write_voc(tmp_path / "scratches_1.xml", (200, 200), [(29, 1, 34, 200)])
    write_voc(tmp_path / "crazing_1.xml", (200, 200), [(1, 1, 200, 200)])
    samples = [sample("scratches_1", "scratches"), sample("crazing_1", "crazing"), sample("scratches_2", "scratches")]
    annotations = {samples[0].path: tmp_path / "scratches_1.xml", samples[1].path: tmp_path / "crazing_1.xml"}
    bank, masks = augmentation.scratch_mark_bank(samples, np.stack([image] * 3), annotations)
    assert bank.shape == (1, 100, 100)
    assert bank[0, 50, 15] > 40 and bank[0, :, 40:].abs().max() < 1e-3
    assert masks.shape == (1, 100, 100) and masks[0, :, 14:17].min() == 1 and masks[0].sum() == 100 * 3
    assert augmentation.scratch_mark_bank(samples[1:], np.stack([image] * 2), annotations) is None


def test_early_epochs_train_on_shrunk_images_and_the_rest_at_full_size(one_torch_thread):
    args = train.parse_args(["--early-epochs", "1", "--early-size", "40", "--image-size", "48", "--epochs", "2",
                             "--augment", "none", "--batch-size", "4"])
    torch.manual_seed(0)
    model, _ = build_model("none")
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(tuple(inputs[0].shape[-2:])))
    pixels = random_batch(8, size=48)
    labels = torch.tensor([0, 1] * 4)
    masks = torch.zeros(8, 48, 48)
    masks[:, 10:30, 20:24] = 1  # a box on every image, at full size
    capture = explain_loss.LayerCamCapture(model.get_submodule(args.explain_layer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train.one_cycle(4))
    generator = torch.Generator().manual_seed(0)
    for epoch in (1, 2):
        seen.clear()
        loss, _ = train.train_one_epoch(model, pixels, labels, optimizer, scheduler, args, generator, "cpu", epoch,
                                        masks=masks, capture=capture)
        size = 40 if epoch == 1 else 48
        # two batches, each with its cross-entropy pass and, on the first, the heatmap loss's own pass
        assert seen == [(size, size)] * 3 and math.isfinite(loss)
    assert train.parse_args([]).early_epochs == train.DEFAULTS["early_epochs"]


def test_early_epochs_are_checked(capsys):
    for argv, message in ((["--early-epochs", "5"], "at least one of the 5 epochs"),
                          (["--early-epochs", "2", "--early-size", "200"], "from 32 to below it"),
                          (["--init", "model_binary.pth", "--early-epochs", "1"], "keeps its checkpoint's image size")):
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        assert message in capsys.readouterr().err
    assert train.parse_args(["--init", "model_binary.pth"]).early_epochs == 0
    assert not train.parse_args([]).refresh_batchnorm and train.parse_args(["--init", "m.pth"]).refresh_batchnorm
    assert not train.parse_args(["--init", "m.pth", "--no-refresh-batchnorm"]).refresh_batchnorm


def test_refresh_batchnorm_sets_each_statistic_to_the_images_own(one_torch_thread):
    torch.manual_seed(0)
    model, _ = build_model("none")
    pixels = random_batch(6, size=48)
    first_conv, first_norm = model.features[0][0], model.features[0][1]
    assert refresh_batchnorm(model, pixels, "per-image", 6, "cpu") == sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        out = first_conv(dataset.normalize(pixels, "per-image"))
    assert torch.allclose(first_norm.running_mean, out.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(first_norm.running_var, out.var((0, 2, 3), correction=1), rtol=1e-4)
    # momentum restored, the model left in eval mode, and no randomness (stochastic depth stays off): twice the same
    assert first_norm.momentum == 0.1 and not model.training
    state = {k: v.clone() for k, v in model.state_dict().items()}
    refresh_batchnorm(model, pixels, "per-image", 6, "cpu")
    assert all(torch.allclose(state[k], v) for k, v in model.state_dict().items())
