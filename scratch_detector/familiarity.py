"""How unlike the training images an image is: the Mahalanobis distance (Lee et al. 2018) of its mean-pooled
features at one early block (LAYER) to the nearest NEU class mean of the training images, under one shared,
shrunk covariance. It is read from the forward pass the verdict already makes (FeatureTap): no second model,
no second pass.

Why an early block, and why camera-changed copies: the pooled 1280-d vector the head reads keeps what tells a
scratch from the rest, and a photo of a horse can look like that too; an early block describes the texture of
the image, which is what a wrong camera or a wrong picture changes. Fitted on clean images alone, that texture
score also flags mild blur and noise that the model classifies right; so train.py fits it on the training images
plus COPIES copies under the training's own camera, zoom and symmetry augmentation, and sets the cut-off on the
validation split with the same copies: the score that CUTOFF_QUANTILE of them stay under. The measurements and
the candidates that lost: bench/README.md (`python bench/unfamiliar.py`).

Why pixel statistics beside the features: dataset.normalize standardises each image by its own mean and spread,
so a flat grey frame, a lens cap and a smooth gradient reach the network looking alike, and alike to steel.
PIXEL_STATISTICS describe what that removes or blurs: the image's spread (its contrast) and how fast the grey
level changes between neighbours at two distances relative to that spread (its roughness). They are appended,
standardised, to the pooled features, and the one distance covers both.

Why a second, deeper score beside it (DEEP_LAYER, under "deep"): what the camera-changed copies teach the early
score to accept, a blurred or magnified NEU image, is also what smooth pictures look like there (a CT slice, a
photograph with large smooth areas, an enlarged small photo). The deepest block before the head was trained under
that same camera augmentation, so it moves little with the camera, and fitted on the clean images alone it still
tells steel from such pictures. An image is unfamiliar when either distance is over its own cut-off; the deep one
is reported in the early one's units (scaled by the ratio of the cut-offs), so one score and one cut-off reach
the CSV. Chosen on held-out non-steel sets with a rule written first: bench/README.md.

The checkpoint stores the statistics under "familiarity"; an older checkpoint has none and its images are scored
as unknown (None); one fitted before the pixel statistics has no "pixel_center" and is scored on features alone;
one fitted before the deep score has no "deep" and is scored on the early block alone.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from .augment import augment

CUTOFF_QUANTILE = 0.995
METHOD = "mahalanobis"
LAYER = "features.3"
DEEP_LAYER = "features.7"  # the last block before the head's 1 x 1 convolution
COPIES = 2
COPY_AUGMENTATION = ("dihedral", "camera", "zoom")
PIXEL_STATISTICS = ("log spread", "log roughness at 1 px", "log roughness at 4 px")
ROUGHNESS_LAGS = (1, 4)


class StopForward(Exception):
    """Raised by a FeatureTap with stop=True once it holds the layer's output: the rest of the pass is not needed."""


class FeatureTap:
    """Keeps the mean-pooled output (B, C) of one layer, or of several (their outputs side by side, in the order
    given), from the model's latest forward pass (forward hooks). stop=True ends the pass once the last of them
    has run (StopForward): fitting the statistics needs nothing after it, so the layers after it need not run."""

    def __init__(self, model: nn.Module, layer: str | tuple[str, ...] = LAYER, stop: bool = False):
        self.layers = (layer,) if isinstance(layer, str) else tuple(layer)
        self.kept: dict[str, torch.Tensor] = {}
        self.stop = stop
        self.handles = [model.get_submodule(name).register_forward_hook(self._keeper(name)) for name in self.layers]

    def _keeper(self, name: str):
        def keep(module, inputs, output):
            self.kept[name] = output.detach().float().mean((2, 3))
            if self.stop and len(self.kept) == len(self.layers):
                raise StopForward
        return keep

    def take(self) -> torch.Tensor:
        kept, self.kept = self.kept, {}
        if len(kept) < len(self.layers):
            raise RuntimeError("no forward pass since the last take()")
        return torch.cat([kept[name] for name in self.layers], 1)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def layers(stats: dict) -> tuple[str, ...]:
    """The layers whose pooled outputs the score reads, in the order unfamiliarity() expects them side by side."""
    return (stats["layer"],) + ((stats["deep"]["layer"],) if "deep" in stats else ())


def pixel_statistics(pixels, chunk: int = 64) -> torch.Tensor:
    """uint8 (N, S, S, 3) pixels -> (N, 3) float: PIXEL_STATISTICS of each image's grey level. Roughness at lag k:
    the mean absolute difference between pixels k apart (across and down), over the spread; +1 keeps a flat
    frame finite. `chunk` images at a time: train.py passes every training image at once, and the float
    differences of all of them would hold several hundred MB."""
    pixels = torch.as_tensor(pixels)
    if len(pixels) > chunk:
        return torch.cat([pixel_statistics(pixels[i:i + chunk], chunk) for i in range(0, len(pixels), chunk)])
    grey = pixels.float().mean(-1)
    spread = grey.flatten(1).std(1, correction=0)
    columns = [torch.log1p(spread)]
    for lag in ROUGHNESS_LAGS:
        step = ((grey[:, lag:] - grey[:, :-lag]).abs().mean((1, 2))
                + (grey[:, :, lag:] - grey[:, :, :-lag]).abs().mean((1, 2))) / 2
        columns.append(torch.log((step + 1) / (spread + 1)))
    return torch.stack(columns, 1)


def describe(features: torch.Tensor, pixels, stats: dict) -> torch.Tensor:
    """The vector the score measures: the pooled features, and when `stats` has them (a checkpoint fitted since
    they were added), the standardised pixel statistics of the same images appended."""
    return with_pixel_statistics(features, pixel_statistics(pixels) if has_pixel_statistics(stats) else None, stats)


def has_pixel_statistics(stats: dict) -> bool:
    return stats.get("pixel_center") is not None


def with_pixel_statistics(features: torch.Tensor, pixel_stats: torch.Tensor | None, stats: dict) -> torch.Tensor:
    """describe() from pixel statistics already computed (PIXEL_STATISTICS of the same images, or None)."""
    if not has_pixel_statistics(stats):
        return features.float()
    extra = (pixel_stats - stats["pixel_center"]) / stats["pixel_scale"]
    return torch.cat([features.float(), extra.to(features.device)], 1)


def unfamiliarity(features: torch.Tensor, pixels, stats: dict) -> torch.Tensor:
    """(B, C) pooled features of layers(stats), side by side, and the (B, S, S, 3) uint8 pixels they came from ->
    (B,) score: the early block's distance (score()), or with a deep score the larger of it and the deep distance
    in the early one's units; unfamiliar beyond stats["cutoff"] either way."""
    pixel_stats = pixel_statistics(pixels) if has_pixel_statistics(stats) else None
    if "deep" not in stats:
        return score(with_pixel_statistics(features, pixel_stats, stats), stats)
    early, deep = early_width(stats), stats["deep"]
    deep_pixels = pixel_stats if has_pixel_statistics(deep) else None
    return torch.maximum(score(with_pixel_statistics(features[:, :early], pixel_stats, stats), stats),
                         score(with_pixel_statistics(features[:, early:], deep_pixels, deep), deep)
                         * (float(stats["cutoff"]) / float(deep["cutoff"])))


def early_width(stats: dict) -> int:
    """How many of the features side by side (layers(stats)) are the early block's: the rest are the deep one's."""
    return stats["means"].shape[1] - (len(PIXEL_STATISTICS) if has_pixel_statistics(stats) else 0)


def ledoit_wolf(centered: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit & Wolf (2004) shrinkage of the covariance of `centered` (n, d) toward a scaled identity ->
    (covariance, shrinkage in [0, 1]). With ~1000 images and 1280 features the sample covariance is singular;
    the shrunk one is well conditioned and its inverse is the precision the score needs."""
    n, d = centered.shape
    sample = centered.T @ centered / n
    mu = np.trace(sample) / d
    target_gap = sample.copy()
    target_gap[np.diag_indices(d)] -= mu
    delta = (target_gap ** 2).sum() / d
    squares = centered ** 2
    beta = ((squares.T @ squares).sum() / n - (sample ** 2).sum()) / (d * n)
    shrinkage = float(min(beta, delta) / delta) if delta > 0 else 1.0
    covariance = (1 - shrinkage) * sample
    covariance[np.diag_indices(d)] += shrinkage * mu
    return covariance, shrinkage


def fit(train_features, train_labels, val_features, quantile: float = CUTOFF_QUANTILE, layer: str = LAYER,
        pixel_center=None, pixel_scale=None) -> dict:
    """The statistics the checkpoint stores: class means and shared precision from the training features (one
    mean per label), the cut-off from the validation scores. Plain tensors and numbers: a weights_only
    checkpoint holds them. With pixel_center/scale, the features already end in the standardised pixel
    statistics (describe())."""
    features = np.asarray(train_features, np.float64)
    labels = np.asarray(train_labels)
    classes = sorted(set(labels.tolist()))
    means = np.stack([features[labels == c].mean(0) for c in classes])
    centered = features - means[np.searchsorted(classes, labels)]
    covariance, shrinkage = ledoit_wolf(centered)
    stats = {"method": METHOD, "layer": layer, "means": torch.tensor(means, dtype=torch.float32),
             "precision": torch.tensor(np.linalg.inv(covariance), dtype=torch.float32),
             "shrinkage": shrinkage, "n_train": int(len(features))}
    if pixel_center is not None:
        stats.update(pixel_center=torch.as_tensor(pixel_center, dtype=torch.float32),
                     pixel_scale=torch.as_tensor(pixel_scale, dtype=torch.float32),
                     pixel_statistics=list(PIXEL_STATISTICS))
    val_scores = score(torch.as_tensor(np.asarray(val_features), dtype=torch.float32), stats)
    stats.update(cutoff=float(np.quantile(val_scores.numpy(), quantile)), quantile=quantile,
                 n_val=int(len(val_scores)))
    return stats


def score(features: torch.Tensor, stats: dict) -> torch.Tensor:
    """(B, C) pooled features -> (B,) distance to the nearest training class mean (in units of the shared
    covariance's standard deviations; larger is less familiar)."""
    means = stats["means"].to(features.device)
    precision = stats["precision"].to(features.device)
    gaps = features.float()[:, None, :] - means[None]                      # B x classes x C
    squared = torch.einsum("bcd,de,bce->bc", gaps, precision, gaps)
    return squared.clamp(min=0).min(1).values.sqrt()


def with_copies(pixels: torch.Tensor, generator: torch.Generator, copies: int = COPIES):
    """Yield `pixels` (uint8 N, S, S, 3), then `copies` augmented copies of them (COPY_AUGMENTATION)."""
    yield pixels
    for _ in range(copies):
        yield augment(pixels, generator, COPY_AUGMENTATION)


def copy_features(features_of: Callable[..., torch.Tensor], train_pixels: torch.Tensor, val_pixels: torch.Tensor,
                  seed: int = 0, deep: bool = False) -> dict:
    """The training and validation images and their COPIES copies, as fit_model() draws them (one generator,
    the training images' copies first) -> {"train": (features at LAYER, pixel statistics), "val": (...)}, the
    rows in the order of with_copies(). deep=True: also {"deep": {"train": features at DEEP_LAYER of the images
    alone, "val": ...}}, read in the same pass as their features at LAYER (features_of(pixels, layers) gives the
    layers side by side), so the deep score costs one pass instead of two."""
    generator = torch.Generator().manual_seed(seed)
    deep_features = {}

    def described(part, pixels):
        images, *copies = list(with_copies(pixels, generator))
        early = [features_of(p) for p in copies]
        if deep:
            both = features_of(images, (LAYER, DEEP_LAYER))
            width = early[0].shape[1] if early else features_of(images[:1]).shape[1]
            early.insert(0, both[:, :width])
            deep_features[part] = both[:, width:]
        else:
            early.insert(0, features_of(images))
        return torch.cat(early), torch.cat([pixel_statistics(p) for p in (images, *copies)])
    described_parts = {"train": described("train", train_pixels), "val": described("val", val_pixels)}
    return described_parts | ({"deep": deep_features} if deep else {})


def fit_copies(copies: dict, train_classes, with_pixels: bool = True, layer: str = LAYER) -> dict:
    """fit() on copy_features()'s output (labels: the training images' NEU classes), the cut-off from the
    validation images and their copies. The pixel statistics are standardised by the training images' and copies'
    own; with_pixels=False fits the features alone (the score before pixel statistics, for comparison)."""
    (train, train_pixel_stats), (val, val_pixel_stats) = copies["train"], copies["val"]
    classes = np.tile(np.asarray(train_classes), len(train) // len(train_classes))  # the images, then each copy
    if not with_pixels:
        return fit(train.numpy(), classes, val.numpy(), layer=layer)
    center, scale = train_pixel_stats.mean(0), train_pixel_stats.std(0).clamp(min=1e-6)
    return fit(torch.cat([train, (train_pixel_stats - center) / scale], 1).numpy(), classes,
               torch.cat([val, (val_pixel_stats - center) / scale], 1).numpy(), layer=layer,
               pixel_center=center, pixel_scale=scale)


def fit_model(features_of: Callable[..., torch.Tensor], train_pixels: torch.Tensor, train_classes,
              val_pixels: torch.Tensor, seed: int = 0, with_pixels: bool = True, deep: bool = False) -> dict:
    """fit_from_copies() on the features (features_of: uint8 pixels -> (N, C) features at LAYER) and pixel
    statistics of the training images and their copies, with the cut-off from the validation images and their
    copies. deep=True (features_of(pixels, layers) then gives several layers side by side): the deep score too."""
    return fit_from_copies(copy_features(features_of, train_pixels, val_pixels, seed, deep), train_classes,
                           with_pixels)


def fit_from_copies(copies: dict, train_classes, with_pixels: bool = True) -> dict:
    """The statistics train.py stores, from copy_features()'s output: the early score (fit_copies), and the deep
    score under "deep" when the copies hold deep features (fit_deep)."""
    stats = fit_copies(copies, train_classes, with_pixels)
    if "deep" in copies:
        stats["deep"] = fit_deep(copies, train_classes, with_pixels)
    return stats


def fit_deep(copies: dict, train_classes, with_pixels: bool = True) -> dict:
    """The deep score's statistics, from copy_features(deep=True)'s output: the features at DEEP_LAYER and the pixel
    statistics of the clean training images alone (no copies: the first rows of each part), the cut-off from the
    clean validation images -> fit_copies() at DEEP_LAYER."""
    clean = {part: (features, copies[part][1][:len(features)]) for part, features in copies["deep"].items()}
    return fit_copies(clean, train_classes, with_pixels, layer=DEEP_LAYER)


def is_familiar(value: float | None, cutoff: float | None) -> bool | None:
    """True/False against the checkpoint's cut-off (stats["cutoff"]); None when either is missing (an older
    checkpoint) or the score is NaN."""
    if value is None or cutoff is None or value != value:
        return None
    return bool(value <= cutoff)


def frame_score(tile_scores) -> float:
    """A tiled image's score: the median of its tiles', so the frame is unfamiliar when most tiles are."""
    return float(np.median(np.asarray(tile_scores, np.float64)))


def valid(stats, nested: bool = False) -> bool:
    """Whether familiarity statistics fit together (load_checkpoint refuses damaged ones); a deep score's (under
    "deep") must too, and holds none of its own."""
    try:
        if "deep" in stats and (nested or not valid(stats["deep"], nested=True)):
            return False
        pixels = stats.get("pixel_center")
        return bool(stats["method"] == METHOD and isinstance(stats["layer"], str) and stats["means"].ndim == 2
                    and tuple(stats["precision"].shape) == (stats["means"].shape[1],) * 2
                    and np.isfinite(float(stats["cutoff"]))
                    and (pixels is None or tuple(pixels.shape) == tuple(stats["pixel_scale"].shape)
                         == (len(PIXEL_STATISTICS),)))
    except (KeyError, TypeError, AttributeError, ValueError):
        return False
