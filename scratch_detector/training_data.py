"""Which images a training run learns, validates and tests on: the split (NEU's 70/15/15 by seed, the starting
model's own split for a fine-tune, a cross-validation fold), the NEU replay beside a labelled list, splits.csv,
and the held-out test images copied to test_images/ for infer.py, so that folder holds only images the current
model has never seen."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import dataset

from .finetune import MIN_VALIDATION, replay_counts, replay_samples
from .runtime import UserError


def gather_splits(args, init_meta: dict | None, reports: Path) -> dict:
    """The images to train, validate and test on, split, and splits.csv written. NEU data: split 70/15/15 with
    --seed (with --init: the starting model's own split, so its test images stay unseen). A labels file: its
    images split the same way, plus NEU replay (finetune.py) in train and validation. -> {splits, own_train (the
    first own_train training samples are the data's own, the rest replay), replay, samples, layout, data_dir,
    neu_split, split_seed, max_per_class}."""
    data_dir = dataset.resolve_data_dir(args.data_dir, args.labels)
    if args.labels:
        samples, layout = dataset.read_labels(args.labels, data_dir), "labels"
        print(f"data: {len(samples)} labelled images from {args.labels} ({sum(s.label for s in samples)} scratches), "
              f"relative to {data_dir}")
    else:
        samples, layout = dataset.find_samples(data_dir)
    neu_split = None if init_meta is None else dataset.split_record(init_meta)
    if neu_split is not None and not args.labels:  # the starting model's own split: its test images stay unseen
        split_seed, max_per_class = int(neu_split["seed"]), int(neu_split.get("max_per_class", 0))
        splits = dataset.recorded_splits(samples, neu_split)
    else:
        split_seed, max_per_class = args.seed, args.max_per_class
        splits = dataset.split_samples(dataset.first_per_class(samples, max_per_class), split_seed)
    if args.cv_fold:
        splits = dataset.cross_validation_fold(splits, *args.cv_fold, args.seed)
    own_train = len(splits["train"])
    if not splits["train"] or not splits["val"]:
        raise UserError("too few images for a train/val split; use more data or a larger --max-per-class")
    replay = None
    if args.replay:
        n_train, n_val = replay_counts(len(splits["train"]), len(splits["val"]))
        neu_split = neu_split or {"seed": args.seed, "max_per_class": 0}
        replay = replay_samples(args.replay, neu_split, n_train, n_val, args.seed)
        print(f"replay: {len(replay['train'])} NEU training images from {args.replay} beside {own_train} labelled "
              f"ones; validation: {len(splits['val'])} labelled"
              + (f" + {len(replay['val'])} NEU images (fewer than {MIN_VALIDATION} labelled)"
                 if replay["val"] else ""))
        splits["train"] += replay["train"]
        splits["val"] += replay["val"]
    elif args.labels and len(splits["val"]) < MIN_VALIDATION:
        print(f"warning: the threshold and temperature are chosen on only {len(splits['val'])} validation images; "
              f"label more, or add --replay NEU_DIR to top the validation split up with NEU images", file=sys.stderr)
    dataset.write_splits_csv(splits, reports / "splits.csv")
    print("split: " + ", ".join(f"{name} {len(items)}" for name, items in splits.items())
          + (f" (the split of {args.init})" if init_meta is not None and not args.labels else
             f" (seed {args.seed}; duplicates kept together)") + f" -> {reports / 'splits.csv'}")

    return dict(splits=splits, own_train=own_train, replay=replay, samples=samples, layout=layout, data_dir=data_dir,
                neu_split=neu_split, split_seed=split_seed, max_per_class=max_per_class)


def copy_test_images(samples, folder: Path, seen=()) -> tuple[int, int, int]:
    """Copy held-out test images into `folder` (never overwriting), and remove the copies there of `seen`
    images (this model's training and validation images: an earlier seed's test images that this model has
    seen, which infer.py must not be shown as unseen). Files that are not such copies are left alone.
    Returns (copied, already present, removed)."""
    folder.mkdir(parents=True, exist_ok=True)
    copied = present = removed = 0
    for sample in seen:
        for name in (Path(sample.relpath).name, sample.relpath.replace("/", "__")):
            target = folder / name
            if target.is_file() and target.stat().st_size == sample.path.stat().st_size \
                    and target.read_bytes() == sample.path.read_bytes():
                target.unlink()
                removed += 1
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
    return copied, present, removed
