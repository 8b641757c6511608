"""The heatmap loss (explain_loss.py) and the masks it is given: boxes land where the scratch is after every
augmentation, and the loss measures the share of the LayerCAM map outside them, differentiably."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from scratch_detector import explain_loss
from scratch_detector import augment as augmentation


def test_boxes_mask_scales_voc_boxes():
    mask = explain_loss.boxes_mask((400, 200), [(100, 50, 200, 100)], (100, 100))
    assert mask.shape == (100, 100) and mask.dtype == np.float32
    assert mask[25:50, 25:50].all() and mask.sum() == 25 * 25


def marked_batch(n: int = 6, size: int = 40):
    """Images whose only bright pixels are a 3 x 9 bar, different per image, and the bar's mask."""
    images = torch.zeros(n, size, size, 3, dtype=torch.uint8)
    masks = torch.zeros(n, size, size)
    for i in range(n):
        images[i, 4 + i:7 + i, 10 + 2 * i:19 + 2 * i] = 255
        masks[i, 4 + i:7 + i, 10 + 2 * i:19 + 2 * i] = 1
    return images, masks


@pytest.mark.parametrize("kinds", [("dihedral",), ("flips",), ("dihedral", "zoom")])
def test_masks_move_with_their_images(kinds):
    """Whatever symmetry or zoom an image gets, its mask gets the same: the bright bar stays inside it."""
    images, masks = marked_batch()
    for seed in range(5):
        plain = augmentation.augment(images, torch.Generator().manual_seed(seed), kinds)
        out, moved = augmentation.augment(images, torch.Generator().manual_seed(seed), kinds, masks)
        assert torch.equal(out, plain)  # masks change nothing else: the same random draws
        for image, mask in zip(out.numpy(), moved.numpy()):
            bright = image[..., 0] > 128
            if not bright.any():  # a zoom can take the bar out of view: then its mask too
                assert mask.max() < 0.5
                continue
            assert (mask[bright] > 0.3).all()
            assert mask.sum() <= 3 * bright.sum() + 60


def test_camera_changes_leave_masks_alone():
    images, masks = marked_batch()
    _, moved = augmentation.augment(images, torch.Generator().manual_seed(0), ("camera",), masks)
    assert torch.equal(moved, masks)


def test_transplant_gives_the_pasted_marks_their_box():
    """A changed image's mask is the mark's own box mask, in the orientation the mark was pasted in."""
    size = 32
    marks = torch.zeros(1, size, size)
    marks[0, 2:5, 6:20] = 60.0
    mark_masks = (marks > 0).float()
    batch = torch.full((40, size, size, 3), 100, dtype=torch.uint8)
    labels = torch.zeros(40, dtype=torch.long)
    labels[:5] = 1
    masks = torch.zeros(40, size, size)
    masks[:5, 0:3, 0:3] = 1  # the real scratches' own boxes stay
    plain = augmentation.transplant(batch, labels, marks, torch.Generator().manual_seed(3))
    out, out_labels, out_masks = augmentation.transplant(batch, labels, marks, torch.Generator().manual_seed(3),
                                                  mark_masks, masks)
    assert torch.equal(out, plain[0]) and torch.equal(out_labels, plain[1])
    changed = (out != batch).flatten(1).any(1)
    assert changed.sum() > 0
    assert torch.equal(out_masks[:5], masks[:5])
    for image, mask, was_changed in zip(out[5:], out_masks[5:], changed[5:]):
        if was_changed:
            assert torch.equal((image[..., 0] != 100).float(), mask)
        else:
            assert mask.sum() == 0


class TwoLayer(nn.Module):
    """A feature layer (2 channels over an 8 x 8 grid) and a linear read-out of its mean, as a CNN's head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(1, 2, 1)
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_outside_share_is_zero_inside_one_outside_and_differentiable():
    torch.manual_seed(0)
    net = TwoLayer()
    with torch.no_grad():
        net.features.weight.fill_(1.0)
        net.features.bias.zero_()
        net.head.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    capture = explain_loss.LayerCamCapture(net.features)
    x = torch.zeros(2, 1, 8, 8)
    x[:, :, 2:4, 2:4] = 1.0  # activation only there
    masks = torch.zeros(2, 8, 8)
    masks[0, 2:4, 2:4] = 1  # image 0: the box covers it; image 1: the box is elsewhere
    masks[1, 6:8, 6:8] = 1
    share = explain_loss.outside_share(net(x), capture.activations, masks)
    assert share.tolist() == pytest.approx([0.0, 1.0], abs=1e-6)
    # a mask over the activation's half: half outside; and the loss moves the weights
    masks[1] = 0
    masks[1, 2:4, 2] = 1
    share = explain_loss.outside_share(net(x), capture.activations, masks)
    assert share[1].item() == pytest.approx(0.5, abs=1e-6)
    share[1].backward()
    assert net.features.weight.grad is not None
    capture.remove()
    net(x)
    assert capture.activations is not None  # kept from before: the hook is gone


def test_a_map_with_no_positive_mass_counts_as_outside():
    net = TwoLayer()
    with torch.no_grad():
        net.head.weight.zero_()
    capture = explain_loss.LayerCamCapture(net.features)
    share = explain_loss.outside_share(net(torch.rand(1, 1, 8, 8)), capture.activations, torch.ones(1, 8, 8))
    assert share.item() == 1.0
