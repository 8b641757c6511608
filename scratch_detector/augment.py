"""The training augmentation policy: what each kind in train.py's --augment does to a batch, and with what
probabilities and ranges. All randomness comes from a torch.Generator, so a seed gives the same batches.

    dihedral / flips   one of the 8 symmetries of the square / the 4 flips (perturb.dihedral)
    zoom               ZOOM: a closer camera (perturb.magnify)
    camera             CAMERA: gain, contrast, gamma, blur, noise, JPEG (camera_change)
    transplant         TRANSPLANT: a scratch's marks added to a non-scratch image, which becomes a scratch

policy() is that set with some probabilities replaced (train.py --augment-prob blur=0.5): a candidate recipe then
runs from the committed code, and its checkpoint says what it drew.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from . import explain_loss, perturb
from .metrics import read_boxes

AUGMENTATIONS = ("flips", "dihedral", "camera", "zoom", "transplant")
# Random camera changes ("camera" in --augment): each applied to an image with probability p, its parameter
# drawn uniformly from the range (log-uniformly for factors). Wider than any one line's drift, so the model
# learns that brightness, focus, noise and compression do not make a scratch.
CAMERA = dict(
    gain=dict(p=0.5, factor=(0.6, 1.6), offset=(-25, 25)),
    contrast=dict(p=0.5, factor=(0.5, 1.6)),
    gamma=dict(p=0.3, exponent=(0.65, 1.55)),
    blur=dict(p=0.25, sigma=(0.3, 1.6)),
    noise=dict(p=0.25, sigma=(2.0, 12.0)),
    jpeg=dict(p=0.25, quality=(20, 95)),
)
ZOOM = dict(p=0.3, factor=(1.0, 1.7))  # "zoom": a closer camera, the window anywhere in the image
# "transplant": a non-scratch training image, with probability p, gets the marks of a random training scratch
# (perturb.scratch_marks, inside its annotated boxes) in a random orientation and strength, and becomes a
# scratch. Every NEU image holds one class, so without it a model can learn "the scratch class's plate" rather
# than "a line on any plate", and miss a scratch on crazing or patches (bench/README.md, large frames).
TRANSPLANT = dict(p=0.2, strength=(0.6, 1.4))
# The probabilities train.py's --augment-prob NAME=P may replace (policy()), so that a candidate recipe runs from
# the committed code and its checkpoint records what it drew.
PROBABILITY_NAMES = (*CAMERA, "zoom", "transplant")


def policy(probabilities: dict[str, float] | None = None) -> dict:
    """{"camera": CAMERA, "zoom": ZOOM, "transplant": TRANSPLANT}, each change's probability p replaced where
    `probabilities` names it (PROBABILITY_NAMES); ranges stay. A ValueError names a wrong name or p."""
    probabilities = dict(probabilities or {})
    unknown = sorted(set(probabilities) - set(PROBABILITY_NAMES))
    if unknown:
        raise ValueError(f"unknown augmentation {', '.join(unknown)}; choose from {', '.join(PROBABILITY_NAMES)}")
    wrong = [f"{name}={p}" for name, p in probabilities.items() if not 0 <= p <= 1]
    if wrong:
        raise ValueError(f"a probability is between 0 and 1, got {', '.join(wrong)}")

    def drawn(name: str, settings: dict) -> dict:
        return {**settings, "p": float(probabilities.get(name, settings["p"]))}
    return {"camera": {name: drawn(name, settings) for name, settings in CAMERA.items()},
            "zoom": drawn("zoom", ZOOM), "transplant": drawn("transplant", TRANSPLANT)}


DEFAULT_POLICY = policy()


def _uniform(low: float, high: float, draw: float, log: bool = False) -> float:
    """Map a uniform draw in [0, 1) onto [low, high), evenly or (log=True, for factors) evenly in ratio."""
    if log:
        return math.exp(math.log(low) + draw * (math.log(high) - math.log(low)))
    return low + draw * (high - low)


def camera_change(image: np.ndarray, draws: np.ndarray, rng: np.random.Generator, camera: dict = CAMERA
                  ) -> np.ndarray:
    """Apply each of the camera changes (CAMERA, or a policy()'s "camera") with its probability: optics first
    (blur), then the sensor (gain, contrast, gamma, noise), then compression (JPEG), as a real image is made.
    draws: 13 uniforms."""
    c = camera
    if draws[0] < c["blur"]["p"]:
        image = perturb.blur(image, _uniform(*c["blur"]["sigma"], draws[1]))
    if draws[2] < c["gain"]["p"]:
        image = perturb.gain(image, _uniform(*c["gain"]["factor"], draws[3], log=True),
                             _uniform(*c["gain"]["offset"], draws[4]))
    if draws[5] < c["contrast"]["p"]:
        image = perturb.contrast(image, _uniform(*c["contrast"]["factor"], draws[6], log=True))
    if draws[7] < c["gamma"]["p"]:
        image = perturb.gamma(image, _uniform(*c["gamma"]["exponent"], draws[8], log=True))
    if draws[9] < c["noise"]["p"]:
        image = perturb.noise(image, _uniform(*c["noise"]["sigma"], draws[10]), rng)
    if draws[11] < c["jpeg"]["p"]:
        image = perturb.jpeg(image, round(_uniform(*c["jpeg"]["quality"], draws[12])))
    return image


def augment(batch: torch.Tensor, generator: torch.Generator, kinds=AUGMENTATIONS[1:], masks=None,
            settings: dict = DEFAULT_POLICY):
    """A randomly changed copy of a uint8 (N, S, S, 3) batch of square images; labels stay as they are.
    With `masks` (float32 (N, S, S) scratch boxes), returns (images, masks), the masks moved as their images.
    settings: a policy() (default: CAMERA and ZOOM as they are).

    dihedral: one of the 8 symmetries (4 quarter turns x mirror), exact: scratches run in every direction
    in NEU (boxes wider than tall and taller than wide), so every orientation is as likely as any other.
    flips: up-down and left-right flips only (4 of the 8). zoom: ZOOM. camera: CAMERA.
    All randomness comes from `generator`, so a seed gives the same batches.
    """
    images = batch.numpy()
    draws = torch.rand(len(images), 18, generator=generator, dtype=torch.float64).numpy()
    seeds = torch.randint(0, 2**31 - 1, (len(images),), generator=generator).tolist()
    out, moved = [], []
    for i, (image, draw, seed) in enumerate(zip(images, draws, seeds)):
        mask = None if masks is None else masks[i].numpy()[..., None]
        symmetry = None
        if "dihedral" in kinds:
            symmetry = int(draw[0] * 8)
        elif "flips" in kinds:
            symmetry = (0, 2, 5, 7)[int(draw[0] * 4)]  # identity, half turn, 2 mirrors
        if symmetry is not None:
            image = perturb.dihedral(image, symmetry)
            mask = None if mask is None else perturb.dihedral(mask, symmetry)
        if "zoom" in kinds and draw[1] < settings["zoom"]["p"]:
            factor, center = _uniform(*settings["zoom"]["factor"], draw[2], log=True), (draw[3], draw[4])
            image = perturb.magnify(image, factor, center=center)
            mask = None if mask is None else perturb.magnify(mask, factor, center=center)
        if "camera" in kinds:
            image = camera_change(image, draw[5:18], np.random.default_rng(seed), settings["camera"])
        out.append(image)
        moved.append(mask)
    images = torch.from_numpy(np.stack(out))
    return images if masks is None else (images, torch.from_numpy(np.stack(moved)[..., 0]))


def scratch_boxes(samples, annotations: dict) -> list:
    """Per sample: its NEU-DET ((width, height), boxes) when it is a scratch with a box file, else None.
    annotations: image path -> its VOC file (by path, not name: a user's image may share a NEU image's name)."""
    found = []
    for sample in samples:
        xml = annotations.get(sample.path)
        found.append(read_boxes(xml) if sample.label == 1 and xml is not None else None)
    return found


def box_masks(boxes: list, image_size: int) -> torch.Tensor:
    """float32 (N, S, S): each sample's scratch boxes (scratch_boxes) as a mask; all zeros where it has none."""
    shape = (image_size, image_size)
    return torch.from_numpy(np.stack([np.zeros(shape, np.float32) if b is None else
                                      explain_loss.boxes_mask(*b, shape) for b in boxes]))


def scratch_mark_bank(samples, pixels: np.ndarray, annotations: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """float32 (M, S, S) each: the marks of every training scratch that has boxes, at the model's input size
    (boxes scaled from the annotated size), and the masks of those boxes. None when no scratch has boxes:
    transplant is then skipped."""
    marks, masks = [], []
    for sample, image, found in zip(samples, pixels, scratch_boxes(samples, annotations)):
        if found is None:
            continue
        (width, height), boxes = found
        sx, sy = image.shape[1] / width, image.shape[0] / height
        boxes = [(round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy)) for x0, y0, x1, y1 in boxes]
        marks.append(perturb.scratch_marks(image[..., 0], boxes))
        masks.append(explain_loss.boxes_mask(*found, image.shape[:2]))
    return (torch.from_numpy(np.stack(marks)), torch.from_numpy(np.stack(masks))) if marks else None


def transplant(batch: torch.Tensor, targets: torch.Tensor, marks: torch.Tensor, generator: torch.Generator,
               mark_masks: torch.Tensor | None = None, masks: torch.Tensor | None = None,
               settings: dict = DEFAULT_POLICY):
    """TRANSPLANT (or settings["transplant"], settings a policy()) on a uint8 (N, S, S, 3) batch: -> (new batch,
    new labels). Scratch images are untouched.
    With `mark_masks` (the bank's box masks) and the batch's `masks`: -> (batch, labels, masks), a changed
    image's mask being its pasted mark's box."""
    draws = torch.rand(len(batch), 3, generator=generator, dtype=torch.float64).tolist()
    picks = torch.randint(0, len(marks), (len(batch),), generator=generator).tolist()
    images, targets = batch.clone(), targets.clone()
    masks = None if masks is None else masks.clone()
    for i, (draw, pick) in enumerate(zip(draws, picks)):
        if targets[i] == 1 or draw[0] >= settings["transplant"]["p"]:
            continue
        mark = perturb.dihedral(marks[pick].numpy(), int(draw[1] * 8))
        strength = _uniform(*settings["transplant"]["strength"], draw[2], log=True)
        planted = images[i].numpy().astype(np.float32) + strength * mark[..., None]
        images[i] = torch.from_numpy(np.clip(np.rint(planted), 0, 255).astype(np.uint8))
        targets[i] = 1
        if masks is not None:
            masks[i] = torch.from_numpy(perturb.dihedral(mark_masks[pick].numpy(), int(draw[1] * 8)))
    return (images, targets) if masks is None else (images, targets, masks)
