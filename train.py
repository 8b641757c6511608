"""Fine-tune EfficientNet-B0 to tell scratches (defect) from the other NEU classes; writes model_binary.pth.

    python train.py                       # 5 epochs on CPU, defaults below
    python train.py --data-dir ~/NEU-DET --epochs 5 --device auto

Data are decoded once into memory; the best validation epoch is kept; the decision threshold is chosen
on the validation split (rule: `choose_threshold`); the held-out test images are copied to test_images/.
"""
from __future__ import annotations

import argparse
import copy
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import dataset
from evaluate import binary_metrics
from model import build_model, pick_device, predict_probabilities, save_checkpoint
from runtime import UserError, ensure_writable_dir, run_main, write_csv

# Defaults: the shipped model_binary.pth is `python train.py` with exactly these.
DEFAULTS = dict(
    epochs=5,
    batch_size=32,
    lr=2e-3,               # AdamW peak learning rate (10% linear warm-up, then cosine to 0)
    weight_decay=0.05,
    image_size=112,        # NEU images are 200x200; see README "Speed" for why 112
    seed=0,
    pretrained="auto",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help=f"NEU data (default: $NEU_DATA_DIR, else {dataset.DEFAULT_DATA_DIR})")
    p.add_argument("--output", default="model_binary.pth", help="checkpoint to write (default: %(default)s)")
    p.add_argument("--reports", default="outputs", help="folder for splits.csv, training_log.csv, "
                   "training_curves.png (default: %(default)s)")
    p.add_argument("--test-images", default="test_images", help="copy the held-out test images here "
                   "(never overwrites; '' to skip; default: %(default)s)")
    p.add_argument("--pretrained", choices=["auto", "imagenet", "none"], default=DEFAULTS["pretrained"],
                   help="initialisation: imagenet weights, random (none), or imagenet if available (auto, default)")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    p.add_argument("--image-size", type=int, default=DEFAULTS["image_size"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--max-per-class", type=int, default=0,
                   help="use only the first N images of each class (quick runs and tests; 0 = all)")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.image_size < 32 or args.lr <= 0:
        p.error("--epochs and --batch-size must be >= 1, --image-size >= 32, --lr > 0")
    return args


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random up-down and left-right flips of a uint8 (N, S, S, 3) batch: exact (no interpolation), cheap,
    and they keep the whole image. No 90-degree turns: NEU scratches run along the rolling direction, so
    5 epochs of a fresh network are not spent on orientations the line camera does not produce."""
    flips = torch.randint(0, 2, (len(batch), 2), generator=generator).tolist()
    out = []
    for image, (vertical, horizontal) in zip(batch, flips):
        if vertical:
            image = image.flip(0)
        if horizontal:
            image = image.flip(1)
        out.append(image)
    return torch.stack(out)


def one_cycle(total_steps: int, warmup: float = 0.1, start: float = 0.04):
    """Learning-rate factor per step: linear warm-up from `start` to 1 over the first `warmup` of training,
    then cosine down to 0. Written out because OneCycleLR divides by zero on very short runs."""
    warmup_steps = max(1, round(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return start + (1 - start) * step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def batch_indices(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split an index order into batches; a last batch of one joins the previous one (BatchNorm needs 2)."""
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches[-2] = torch.cat([batches[-2], batches.pop()])
    return batches


def train_one_epoch(model, pixels, labels, optimizer, scheduler, args, generator, device, epoch):
    """One pass over the training pixels in a seeded random order; returns (mean loss, accuracy)."""
    model.train()
    batches = batch_indices(torch.randperm(len(labels), generator=generator), args.batch_size)
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(batches, desc=f"epoch {epoch}/{args.epochs}", unit="batch", leave=False, file=sys.stdout)
    for index in bar:
        images = dataset.normalize(augment(pixels[index], generator)).to(device)
        targets = labels[index].to(device)
        logits = model(images)
        loss = F.cross_entropy(logits, targets)
        if not torch.isfinite(loss):
            raise UserError(f"training diverged: loss is {loss.item()} in epoch {epoch}; "
                            f"try a lower --lr (now {args.lr}). The previous checkpoint was kept.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(index)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(index)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
    return total_loss / seen, correct / seen


def choose_threshold(probabilities, labels) -> float:
    """The decision threshold, chosen on validation data.

    Rule: maximise Youden's J (recall + specificity - 1) over all cut points; among the cut points that
    tie, take the middle of the widest-margin interval, i.e. halfway between the highest non-defect score
    and the lowest defect score that the threshold separates. With no validation defects, 0.5.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    if not (labels == 1).any() or not (labels == 0).any():
        return 0.5
    scores = np.unique(np.concatenate([[0.0, 1.0], probabilities]))
    best_j, tied = -np.inf, []
    for low, high in zip(scores[:-1], scores[1:]):
        cut = (low + high) / 2
        metrics = binary_metrics(probabilities, labels, cut)
        j = metrics["recall"] + metrics["specificity"] - 1
        if j > best_j + 1e-12:
            best_j, tied = j, [(low, high)]
        elif abs(j - best_j) <= 1e-12:
            tied.append((low, high))
    widest = max(tied, key=lambda interval: interval[1] - interval[0])
    return float((widest[0] + widest[1]) / 2)


def copy_test_images(samples, folder: Path) -> tuple[int, int]:
    """Copy held-out test images into `folder` (never overwriting); returns (copied, already present)."""
    folder.mkdir(parents=True, exist_ok=True)
    copied = present = 0
    for sample in samples:
        for name in (Path(sample.relpath).name, sample.relpath.replace("/", "__")):
            target = folder / name
            if not target.exists():
                shutil.copyfile(sample.path, target)
                copied += 1
                break
            if target.read_bytes() == sample.path.read_bytes():
                present += 1
                break
        else:
            print(f"warning: {folder} already has a different {Path(sample.relpath).name}; not copied",
                  file=sys.stderr)
    return copied, present


def plot_curves(log_rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in log_rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in log_rows], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in log_rows], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    ax_acc.plot(epochs, [r["train_acc"] for r in log_rows], "o-", label="train accuracy")
    ax_acc.plot(epochs, [r["val_acc"] for r in log_rows], "o-", label="validation accuracy")
    ax_acc.plot(epochs, [r["val_recall"] for r in log_rows], "s--", label="validation scratch recall")
    ax_acc.set(xlabel="epoch", title="Accuracy", ylim=(min(0.5, ax_acc.get_ylim()[0]), 1.01))
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    output = Path(args.output)
    ensure_writable_dir(output.parent if str(output.parent) else Path("."), "the checkpoint folder")
    reports = ensure_writable_dir(args.reports, "the reports folder")

    samples, layout = dataset.find_samples(dataset.resolve_data_dir(args.data_dir))
    samples = dataset.first_per_class(samples, args.max_per_class)
    splits = dataset.split_samples(samples, args.seed)
    dataset.write_splits_csv(splits, reports / "splits.csv")
    print("split: " + ", ".join(f"{name} {len(items)}" for name, items in splits.items())
          + f" (seed {args.seed}; duplicates kept together) -> {reports / 'splits.csv'}")
    if not splits["train"] or not splits["val"]:
        raise UserError("too few images for a train/val split; use more data or a larger --max-per-class")

    model, init = build_model(args.pretrained)
    print(f"model: efficientnet_b0, 2 classes, init: {init}; device {device}; image size {args.image_size}")
    model.to(device=device, memory_format=torch.channels_last)

    pixels = {name: torch.from_numpy(dataset.load_pixels(items, args.image_size)) for name, items in splits.items()}
    labels = {name: torch.from_numpy(dataset.labels_of(items)) for name, items in splits.items()}

    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(batch_indices(torch.arange(len(labels["train"])), args.batch_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, one_cycle(args.epochs * steps_per_epoch))

    log_rows, best = [], None
    for epoch in range(1, args.epochs + 1):
        epoch_start = time.time()
        train_loss, train_acc = train_one_epoch(model, pixels["train"], labels["train"], optimizer, scheduler,
                                                args, generator, device, epoch)
        val_prob = predict_probabilities(model, pixels["val"], 2 * args.batch_size, device)
        val = binary_metrics(val_prob, labels["val"], 0.5)
        row = dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, val_loss=val["loss"],
                   val_acc=val["accuracy"], val_recall=val["recall"], seconds=time.time() - epoch_start)
        log_rows.append(row)
        print(f"epoch {epoch}/{args.epochs}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
              f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f} scratch recall {val['recall']:.4f} | "
              f"{row['seconds']:.1f}s")
        if best is None or val["loss"] < best["loss"]:  # threshold-free, and smooth where accuracy ties
            best = dict(loss=val["loss"], epoch=epoch, state=copy.deepcopy(model.state_dict()), val_prob=val_prob)

    model.load_state_dict(best["state"])
    threshold = choose_threshold(best["val_prob"], labels["val"])
    val = binary_metrics(best["val_prob"], labels["val"], threshold)
    print(f"best epoch {best['epoch']}; threshold {threshold:.4f} (validation Youden J, widest margin): "
          f"val acc {val['accuracy']:.4f}, scratch recall {val['recall']:.4f}, specificity {val['specificity']:.4f}")

    log_fields = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_recall", "seconds"]
    write_csv(reports / "training_log.csv", log_fields,
              [[f"{r[k]:.6f}" if isinstance(r[k], float) else r[k] for k in log_fields] for r in log_rows])
    plot_curves(log_rows, reports / "training_curves.png")

    save_checkpoint(output, model, {
        "image_size": args.image_size,
        "mean": list(dataset.IMAGENET_MEAN),
        "std": list(dataset.IMAGENET_STD),
        "threshold": threshold,
        "pretrained": init,
        "epochs": args.epochs,
        "best_epoch": best["epoch"],
        "seed": args.seed,
        "hyperparameters": {k: getattr(args, k) for k in ("batch_size", "lr", "weight_decay", "max_per_class")},
        "data": {"layout": layout, "n_images": len(samples)},
        "split": {"fractions": list(dataset.SPLIT_FRACTIONS), "seed": args.seed,
                  **{f"n_{name}": len(items) for name, items in splits.items()},
                  "test_digest": dataset.split_digest(splits["test"])},
        "val_metrics": {"threshold": threshold, **val},
        "train_seconds": round(time.time() - started, 1),
    })
    print(f"saved {output} ({time.time() - started:.0f}s)")
    if args.test_images:
        copied, present = copy_test_images(splits["test"], Path(args.test_images))
        print(f"test split: {copied} images copied to {args.test_images}/ ({present} already there); "
              f"run: python infer.py")
    return 0


if __name__ == "__main__":
    run_main(main, skip_teardown=True)
