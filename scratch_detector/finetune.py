"""Fine-tuning on a user's own labelled images (train.py --init CHECKPOINT --labels labels.csv --replay NEU):
which NEU images are mixed in so the model keeps what it knew, how a small validation split is topped up, how much
of the starting model is averaged back in at the end, and the before/after table train.py prints on the user's
held-out images.

Replay: REPLAY_PER_IMAGE NEU training images per labelled training image, and at least REPLAY_MIN. One to one
makes every batch about half the new line and half NEU, so each update is pulled back towards what the model
already gets right, at twice the cost of the labelled images alone; the floor keeps a handful of labels from
outweighing NEU's six textures. The replayed images come from the starting model's own NEU training split, and
the validation top-up from its validation split, so the NEU test split stays unseen by both models and
`evaluate.py` can still score them on it. Measured in bench/README.md (`python bench/new_line.py`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import dataset

from .metrics import binary_metrics
from .model import load_checkpoint, predict_probabilities

REPLAY_PER_IMAGE = 1
REPLAY_MIN = 64
# A threshold and a temperature chosen on a handful of images are noise: below this many labelled validation
# images, NEU validation images (from the replay folder) make up the difference.
MIN_VALIDATION = 60
# What --init changes in train.py's defaults: fewer epochs (a minute on 2 cores for 80 labelled images and their
# replay), a quarter of the starting weights averaged back in at the end (blend_with_start), and then the
# BatchNorm statistics recomputed for the averaged weights (model.refresh_batchnorm). Chosen on the new line's
# validation split (bench/README.md, "Your own line"). The temperature is not refitted: train.py keeps the
# starting model's.
FINETUNE_DEFAULTS = dict(epochs=3, lr=1e-3, start_weight=0.25, early_epochs=0, refresh_batchnorm=True)


def blend_with_start(model: torch.nn.Module, start_state: dict, start_weight: float) -> None:
    """Average the starting model back into the fine-tuned one, in place: start_weight x start + (1 - start_weight)
    x fine-tuned, for every parameter and BatchNorm statistic (counters stay the fine-tune's). Why (WiSE-FT,
    Wortsman et al. 2022): the two models sit in one basin, and the average keeps most of what the fine-tune
    learned about the new line while undoing much of what it forgot of NEU; a few labelled images pull the
    weights further than they can justify."""
    blended = {name: start_weight * start_state[name].to(value.dtype) + (1 - start_weight) * value
               if value.is_floating_point() else value
               for name, value in model.state_dict().items()}
    model.load_state_dict(blended)


def spread_pick(samples: list, count: int, rng: np.random.Generator) -> list:
    """`count` samples drawn at random, as evenly over the classes as they allow (round robin over classes)."""
    by_class = [[s for s in samples if s.neu_class == c] for c in dataset.CLASSES]
    queues = [[group[i] for i in rng.permutation(len(group))] for group in by_class if group]
    picked = []
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop())
    return sorted(picked, key=lambda s: s.relpath)


def replay_samples(replay_dir: str | Path, record: dict, n_train: int, n_val: int, seed: int) -> dict[str, list]:
    """NEU images to mix in: n_train from the training split `record` describes (dataset.split_record of the
    starting model), n_val from its validation split. Their relpaths start with 'replay/' in splits.csv."""
    samples, _ = dataset.find_samples(replay_dir, verbose=False)
    splits = dataset.recorded_splits(samples, record)
    rng = np.random.default_rng([seed, 18])
    return {name: [dataset.Sample(s.path, f"replay/{s.relpath}", s.neu_class)
                   for s in spread_pick(splits[name], count, rng)]
            for name, count in (("train", n_train), ("val", n_val))}


def replay_counts(n_train: int, n_val: int) -> tuple[int, int]:
    """(NEU training images, NEU validation images) to add to n_train and n_val labelled ones."""
    return max(REPLAY_MIN, REPLAY_PER_IMAGE * n_train), max(0, MIN_VALIDATION - n_val)


def held_out_rows(models: dict, pixels: torch.Tensor, labels, predict) -> list[dict]:
    """{name: (model, threshold)} scored on the same images -> one row each: name, accuracy, recall, false
    alarms, misses (counts, not only rates: the user's held-out set is small). predict(model, pixels) -> p."""
    rows = []
    for name, (model, threshold) in models.items():
        metrics = binary_metrics(predict(model, pixels), labels, threshold)
        matrix = metrics["confusion_matrix"]
        rows.append({"model": name, "accuracy": metrics["accuracy"], "recall": metrics["recall"],
                     "false_alarms": matrix["fp"], "missed": matrix["fn"], "scratches": matrix["fn"] + matrix["tp"],
                     "images": metrics["n_images"]})
    return rows


def format_rows(rows: list[dict]) -> str:
    width = max(len(r["model"]) for r in rows)
    lines = [f"  {'model':<{width}}  accuracy  scratches found  false alarms"]
    lines += [f"  {r['model']:<{width}}  {r['accuracy']:8.4f}  {r['scratches'] - r['missed']:>6} of {r['scratches']:<6}"
              f"  {r['false_alarms']:>5} of {r['images'] - r['scratches']}" for r in rows]
    return "\n".join(lines)


def print_before_after(start_checkpoint: str | Path, new_checkpoint: Path, pixels: torch.Tensor, labels: torch.Tensor,
                       normalization: str, batch_size: int, device) -> None:
    """The starting model and the fine-tuned one on the labelled images neither trained on, side by side, each
    with its own calibration and threshold, as infer.py would run them."""
    if not len(labels):
        print("no labelled images were held out for a before/after comparison (label more images)")
        return
    models = {f"before ({Path(start_checkpoint).name})": load_checkpoint(start_checkpoint, device),
              f"after ({new_checkpoint.name})": load_checkpoint(new_checkpoint, device)}
    rows = held_out_rows(
        {name: (model, float(meta["threshold"])) for name, (model, meta) in models.items()}, pixels, labels,
        lambda model, batch: predict_probabilities(model, batch, normalization, batch_size, device))
    print(f"held-out labelled images ({len(labels)}, {int(labels.sum())} scratches; outputs/splits.csv lists them):\n"
          + format_rows(rows))
