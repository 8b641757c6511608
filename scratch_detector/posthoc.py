"""What train.py fits once the weights are final, from the validation split: the temperature that calibrates
p(defect) (calibration.py), the decision threshold on the calibrated p (metrics.choose_threshold), and the
familiarity statistics (familiarity.py). One function, so that bench/unfamiliar.py fits an older checkpoint
exactly as train.py fits a new one.
"""
from __future__ import annotations

import torch

from . import familiarity
from .calibration import fit_temperature
from .metrics import binary_metrics, choose_threshold
from .model import predict_features, predict_logits


def fit_after_training(model, train_pixels: torch.Tensor, train_classes, val_pixels: torch.Tensor, val_labels,
                       normalization: str, batch_size: int, device, seed: int = 0,
                       temperature: float | None = None) -> dict:
    """-> {temperature, threshold, val_probabilities (calibrated), val_metrics (at the threshold), familiarity}.
    The model's own logits are not changed: load_checkpoint applies the temperature when it reads the file.
    temperature: keep this one instead of fitting it (a fine-tune keeps its starting model's: its own validation
    split is too small to fit one; bench/README.md, your own line)."""
    def features_of(pixels, layer=familiarity.LAYER):
        return predict_features(model, pixels, normalization, batch_size, device, layer)

    val_logits = predict_logits(model, val_pixels, normalization, batch_size, device)[0]
    temperature = fit_temperature(val_logits, val_labels) if temperature is None else float(temperature)
    val_probabilities = (val_logits / temperature).softmax(1)[:, 1]
    threshold = choose_threshold(val_probabilities, val_labels)
    return {"temperature": temperature, "threshold": threshold, "val_probabilities": val_probabilities,
            "val_metrics": binary_metrics(val_probabilities, val_labels, threshold),
            "familiarity": familiarity.fit_model(features_of, train_pixels, train_classes, val_pixels, seed,
                                                 deep=True)}
