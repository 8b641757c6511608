"""Fine-tune EfficientNet-B0 to tell scratches (defect) from the other NEU classes; writes model_binary.pth.

    python train.py                       # 5 epochs on CPU, defaults below
    python train.py --data-dir ~/NEU-DET --epochs 5 --device auto
    python train.py --init model_binary.pth --labels labels.csv --data-dir FOLDER --replay ~/NEU-DET
                                          # fine-tune on your own labelled images (writes model_finetuned.pth)

Starts from ImageNet features (torchvision's B0 weights when they can be had, else the ImageNet Lite0
convolutions that requirements.txt installs; --pretrained says which), and teaches the heatmap where the scratch
is: a loss on the share of the LayerCAM map outside the NEU-DET boxes and the transplanted marks
(scratch_detector/explain_loss.py). Data are decoded once into memory; the last epoch is kept; the decision threshold is chosen
on the validation split (rule: metrics.choose_threshold), never on the test split; the held-out test images are copied
to test_images/, and earlier copies of images this model trained on are removed from there.
The augmentation policy (--augment) is scratch_detector/augment.py.

Fine-tuning (--init, --labels, --replay; scratch_detector/finetune.py): starts from a trained checkpoint instead
of ImageNet, trains on a labelled list (the review page's labels.csv) split like NEU, mixes in NEU images from the
starting model's own training split so nothing is forgotten, averages part of the starting weights back in
(--start-weight), and ends with the old and the new model side by side on the labelled images neither trained on.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import dataset
from scratch_detector import explain_loss, familiarity, finetune
from scratch_detector.augment import (AUGMENTATIONS, PROBABILITY_NAMES, augment, box_masks, policy, scratch_boxes,
                                      scratch_mark_bank, transplant)
from scratch_detector.curves import plot_curves
from scratch_detector.metrics import binary_metrics, find_annotations
from scratch_detector.model import (PRETRAINED_CHOICES, build_model, freeze_first_blocks, model_from_checkpoint,
                                    pick_device, predict_probabilities, refresh_batchnorm, save_checkpoint)
from scratch_detector.posthoc import fit_after_training
from scratch_detector.runtime import UserError, ensure_writable_dir, release_free_memory, run_main, write_csv
from scratch_detector.training_data import copy_test_images, gather_splits

# Defaults: the shipped model_binary.pth is `python train.py` with exactly these.
DEFAULTS = dict(
    epochs=5,
    batch_size=16,         # twice the updates of 32 in the same 5 epochs, and no slower per image on a CPU
    lr=1e-3,               # AdamW peak learning rate (10% linear warm-up, then cosine to 0)
    weight_decay=0.05,
    image_size=dataset.NATIVE_SIZE,  # NEU's own 200 x 200: no resampling, a 1-pixel scratch stays 1 pixel
    normalization="per-image",
    augment="dihedral,camera,zoom,transplant",
    seed=0,
    pretrained="auto",
    explain_layer="features.2",
    explain_weight=1.0,
    explain_every=16,      # the heatmap loss on every 16th batch: bench/README.md, how often the heatmap loss runs
    freeze_blocks=0,       # blocks kept at their starting weights; 2 was not fast enough to pay (bench/README.md)
    early_epochs=0,        # the first N epochs on images shrunk to early_size: faster, but the heatmap pointed
    early_size=160,        # less well at 3 x 160 px (bench/README.md, progressive resizing), so off
    refresh_batchnorm=False,  # on for a fine-tune (finetune.FINETUNE_DEFAULTS)
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help=f"NEU data (default: $NEU_DATA_DIR, else {dataset.DEFAULT_DATA_DIR}); with "
                   "--labels, the folder the labels' paths are relative to (default: the labels file's folder)")
    p.add_argument("--labels", help="train on a labelled list instead of NEU: a CSV 'image,label' (label defect or "
                   "non-defect), e.g. the review page's labels.csv; split 70/15/15 like NEU")
    p.add_argument("--init", metavar="CHECKPOINT", help="start from this trained model instead of ImageNet "
                   f"(fine-tuning; then --epochs defaults to {finetune.FINETUNE_DEFAULTS['epochs']} and --lr to "
                   f"{finetune.FINETUNE_DEFAULTS['lr']}, and image size and normalization are the checkpoint's)")
    p.add_argument("--replay", metavar="NEU_DIR", help="with --labels: mix in NEU images from this NEU copy (the "
                   f"starting model's training split; {finetune.REPLAY_PER_IMAGE} per labelled training image, at "
                   f"least {finetune.REPLAY_MIN}) so the model keeps what it knew")
    p.add_argument("--start-weight", type=float, metavar="SHARE", help="with --init: at the end, average this "
                   "share of the starting model's weights back into the fine-tuned ones, so that a few labelled "
                   f"images do not pull it too far from what it knew (0 = off; default: "
                   f"{finetune.FINETUNE_DEFAULTS['start_weight']})")
    p.add_argument("--output", help="checkpoint to write (default: model_binary.pth; with --init, model_finetuned.pth)")
    p.add_argument("--reports", default="outputs", help="folder for splits.csv, training_log.csv, "
                   "training_curves.png (default: %(default)s)")
    p.add_argument("--test-images", help="copy the held-out test images here (never overwrites; '' to skip; "
                   "default: test_images, or nothing with --labels)")
    p.add_argument("--pretrained", choices=PRETRAINED_CHOICES, default=DEFAULTS["pretrained"],
                   help="initialisation: torchvision's ImageNet weights (imagenet), ImageNet Lite0's convolutions "
                   "from the installed package (lite0), random (none), or the first of those that can be had "
                   "(auto, default)")
    p.add_argument("--epochs", type=int, help=f"default: {DEFAULTS['epochs']}")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, help=f"AdamW peak learning rate (default: {DEFAULTS['lr']})")
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    p.add_argument("--image-size", type=int, help=f"model input in pixels (default: {DEFAULTS['image_size']}, NEU's "
                   "own size; other sizes are resized)")
    p.add_argument("--normalization", choices=dataset.NORMALIZATIONS,
                   help="per-image standardisation (default) or fixed ImageNet mean/std")
    p.add_argument("--augment", default=DEFAULTS["augment"],
                   help=f"comma-separated, from {', '.join(AUGMENTATIONS)}, or 'none' (default: %(default)s)")
    p.add_argument("--augment-prob", nargs="+", default=[], metavar="NAME=P",
                   help="replace how often an augmentation is drawn, e.g. blur=0.5 zoom=0.5 (names: "
                   f"{', '.join(PROBABILITY_NAMES)}; default: scratch_detector/augment.py's); for trying a recipe")
    p.add_argument("--explain-weight", type=float, default=DEFAULTS["explain_weight"],
                   help="weight of the loss on the heatmap's share outside the scratch boxes (explain_loss.py; "
                   "0 = off; default: %(default)s)")
    p.add_argument("--explain-layer", default=DEFAULTS["explain_layer"],
                   help="layer whose LayerCAM map that loss shapes (default: %(default)s)")
    p.add_argument("--explain-every", type=int, default=DEFAULTS["explain_every"],
                   help="apply that loss on every N-th batch (default: %(default)s)")
    p.add_argument("--freeze-blocks", type=int, default=DEFAULTS["freeze_blocks"], metavar="N",
                   help="keep the first N blocks of the network at their starting weights (ImageNet or --init): "
                   "their backward pass is skipped; ignored with random init (default: %(default)s)")
    p.add_argument("--early-epochs", type=int, metavar="N", help="train the first N epochs on images shrunk to "
                   f"--early-size, the rest at --image-size: cheaper epochs while the weights move most (default: "
                   f"{DEFAULTS['early_epochs']}; with --init {finetune.FINETUNE_DEFAULTS['early_epochs']})")
    p.add_argument("--early-size", type=int, default=DEFAULTS["early_size"], metavar="PX",
                   help="image size of those early epochs (default: %(default)s)")
    p.add_argument("--refresh-batchnorm", action=argparse.BooleanOptionalAction,
                   help="after the last epoch (and --start-weight's averaging), recompute the BatchNorm statistics "
                   "from the training images as inference sees them (default: off; with --init on)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--cv-fold", type=int, nargs=2, metavar=("K", "N"),
                   help="cross-validation: the same test split, train + validation dealt into N folds, fold K "
                   "(0-based) the validation split (bench/crossval.py)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--max-per-class", type=int, default=0,
                   help="use only the first N images of each class (quick runs and tests; 0 = all)")
    args = p.parse_args(argv)
    defaults = {**DEFAULTS, **(finetune.FINETUNE_DEFAULTS if args.init else {})}
    if args.start_weight is not None and not args.init:
        p.error("--start-weight averages the --init model back in: it needs --init")
    resolved = ("epochs", "lr", "early_epochs", "refresh_batchnorm")
    for key in resolved + (("start_weight",) if args.init else ("image_size", "normalization")):
        if getattr(args, key) is None:  # --init: the image size and normalization are the checkpoint's own
            setattr(args, key, defaults[key])
    if args.init and not 0 <= args.start_weight <= 1:
        p.error("--start-weight must be between 0 and 1")
    if args.output is None:
        args.output = "model_finetuned.pth" if args.init else "model_binary.pth"
    if args.test_images is None:
        args.test_images = "" if args.labels else "test_images"
    if args.replay and not args.labels:
        p.error("--replay mixes NEU images into a labelled list: it needs --labels")
    if args.init and args.cv_fold:
        p.error("--init keeps its starting model's split; --cv-fold cannot be combined with it")
    if args.init and Path(args.output).expanduser().resolve() == Path(args.init).expanduser().resolve():
        p.error(f"--output {args.output} would overwrite the model it starts from; choose another --output")
    if args.epochs < 1 or args.batch_size < 1 or (args.image_size or 32) < 32 or args.lr <= 0:
        p.error("--epochs and --batch-size must be >= 1, --image-size >= 32, --lr > 0")
    if args.cv_fold and not 0 <= args.cv_fold[0] < args.cv_fold[1]:
        p.error("--cv-fold K N needs 0 <= K < N")
    if args.explain_weight < 0 or args.explain_every < 1:
        p.error("--explain-weight must be >= 0 and --explain-every >= 1")
    if args.freeze_blocks < 0:
        p.error("--freeze-blocks must be >= 0")
    if args.init and args.early_epochs:
        p.error("--early-epochs shrinks the images of a training from ImageNet; a fine-tune (--init) keeps its "
                "checkpoint's image size")
    if args.early_epochs and not (0 < args.early_epochs < args.epochs and 32 <= args.early_size < args.image_size):
        p.error(f"--early-epochs must leave at least one of the {args.epochs} epochs at --image-size "
                f"{args.image_size}, and --early-size must be from 32 to below it")
    explained_block = args.explain_layer.split(".")
    if args.explain_weight > 0 and explained_block[0] == "features" and len(explained_block) > 1 \
            and explained_block[1].isdigit() and args.freeze_blocks > int(explained_block[1]):
        p.error(f"--freeze-blocks {args.freeze_blocks} would freeze {args.explain_layer}, whose heatmap the "
                f"heatmap loss shapes; freeze at most {explained_block[1]} blocks, or --explain-weight 0")
    args.augment_prob = parse_probabilities(p, args.augment_prob)
    try:
        args.policy = policy(args.augment_prob)
    except ValueError as error:
        p.error(f"--augment-prob: {error}")
    args.augment = tuple(a.strip() for a in args.augment.split(",") if a.strip() not in ("", "none"))
    unknown = [a for a in args.augment if a not in AUGMENTATIONS]
    if unknown or {"flips", "dihedral"} <= set(args.augment):
        p.error(f"--augment takes a comma-separated list from {', '.join(AUGMENTATIONS)} (flips or dihedral, "
                f"not both), or none; got {', '.join(unknown) or 'both flips and dihedral'}")
    return args


def parse_probabilities(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, float]:
    """--augment-prob's NAME=P items -> {name: p} (augment.policy checks the names and values); a parser error
    names an item that is not NAME=P."""
    probabilities = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            probabilities[name.strip()] = float(value)
        except ValueError:
            parser.error(f"--augment-prob takes NAME=P (e.g. blur=0.5), got {item!r}")
    return probabilities


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


def backward_finite(loss: torch.Tensor, epoch: int, lr: float) -> None:
    """loss.backward(), unless the loss is not finite: then stop, before the optimizer takes the step."""
    if not torch.isfinite(loss):
        raise UserError(f"training diverged: loss is {loss.item()} in epoch {epoch}; "
                        f"try a lower --lr (now {lr}). The previous checkpoint was kept.")
    loss.backward()


def epoch_image_size(args, epoch: int) -> int:
    """The input size of this epoch: --early-size for the first --early-epochs, then --image-size."""
    return args.early_size if epoch <= args.early_epochs else args.image_size


def shrink(images: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised (B, 3, S, S) images resampled to size x size, antialiased (a scratch one pixel wide fades but
    does not vanish or alias); unchanged at their own size. The box masks stay at full size: the heatmap loss
    pools them to the map's grid, whatever the input size."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).contiguous(memory_format=torch.channels_last)


def train_one_epoch(model, pixels, labels, optimizer, scheduler, args, generator, device, epoch, marks=None,
                    masks=None, capture=None):
    """One pass over the training pixels in a seeded random order; returns (mean loss, accuracy).
    marks: scratch_mark_bank's (marks, their masks), for "transplant" (None: off). masks: the training
    images' box masks and capture: an explain_loss.LayerCamCapture on the model, for the heatmap loss on every
    args.explain_every-th batch (None: off)."""
    model.train()
    batches = batch_indices(torch.randperm(len(labels), generator=generator), args.batch_size)
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(batches, desc=f"epoch {epoch}/{args.epochs}", unit="batch", leave=False, file=sys.stdout)
    for step, index in enumerate(bar):
        images, targets = pixels[index], labels[index]
        explain = capture is not None and step % args.explain_every == 0
        batch_masks = masks[index] if explain else None
        if marks is not None and explain:
            images, targets, batch_masks = transplant(images, targets, marks[0], generator, marks[1], batch_masks,
                                                      args.policy)
        elif marks is not None:
            images, targets = transplant(images, targets, marks[0], generator, settings=args.policy)
        if explain:
            images, batch_masks = augment(images, generator, args.augment, batch_masks, args.policy)
        else:
            images = augment(images, generator, args.augment, settings=args.policy)
        images = shrink(dataset.normalize(images, args.normalization), epoch_image_size(args, epoch)).to(device)
        targets = targets.to(device)
        logits = model(images)
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        # The two losses are backpropagated one after the other, the cross-entropy's graph freed before the
        # heatmap loss's own forward pass: the same gradients as their sum's, with less memory at the peak.
        backward_finite(loss, epoch, args.lr)
        loss_value = loss.item()
        if explain:
            boxed = batch_masks.flatten(1).amax(1) > 0
            if boxed.any():
                heatmap = args.explain_weight * explain_loss.heatmap_loss(
                    model, capture, images[boxed.to(device)], batch_masks[boxed].to(device))
                backward_finite(heatmap, epoch, args.lr)
                loss_value += heatmap.item()
        optimizer.step()
        scheduler.step()
        total_loss += loss_value * len(index)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(index)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
    release_free_memory()  # the heatmap-loss steps free far more than they keep; without this RSS grows each epoch
    return total_loss / seen, correct / seen


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    output = Path(args.output)
    ensure_writable_dir(output.parent if str(output.parent) else Path("."), "the checkpoint folder")
    reports = ensure_writable_dir(args.reports, "the reports folder")

    init_meta = start_state = None
    if args.init:
        model, init, init_meta = model_from_checkpoint(args.init)
        if args.start_weight > 0:  # kept only to be averaged back in at the end
            start_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
        for key in ("image_size", "normalization"):
            if getattr(args, key) not in (None, init_meta[key]):
                raise UserError(f"--{key.replace('_', '-')} {getattr(args, key)} differs from {args.init}'s "
                                f"{init_meta[key]}: a fine-tune keeps its starting model's input")
            setattr(args, key, init_meta[key])
    else:
        model, init = build_model(args.pretrained)
    # random init has no filters worth keeping: nothing is frozen then
    args.freeze_blocks = args.freeze_blocks if args.init or not init.startswith("none") else 0
    if args.freeze_blocks:
        frozen = freeze_first_blocks(model, args.freeze_blocks)
        print(f"frozen: the first {args.freeze_blocks} blocks ({frozen} parameters) keep their starting weights")
    if args.early_epochs:
        print(f"progressive resizing: epochs 1-{args.early_epochs} at {args.early_size} px, then {args.image_size} px")

    data = gather_splits(args, init_meta, reports)
    splits, own_train, replay = data["splits"], data["own_train"], data["replay"]

    print(f"model: efficientnet_b0, 2 classes, init: {init}; device {device}; image size {args.image_size}, "
          f"{args.normalization} normalization; augment: {', '.join(args.augment) or 'none'}"
          + "".join(f", {name} p {value:g}" for name, value in args.augment_prob.items()))
    model.to(device=device, memory_format=torch.channels_last)

    pixels = {name: torch.from_numpy(dataset.load_pixels(items, args.image_size)) for name, items in splits.items()}
    labels = {name: torch.from_numpy(dataset.labels_of(items)) for name, items in splits.items()}

    marks = masks = capture = None
    # NEU-DET boxes, by image file: the NEU data's, or (with --labels) the replayed images' only
    annotated = splits["train"][own_train:] if args.labels else splits["train"]
    box_dir = Path(args.replay) if args.labels and args.replay else None if args.labels else data["data_dir"]
    annotations = {}
    if box_dir is not None and ("transplant" in args.augment or args.explain_weight > 0):
        by_stem = find_annotations(box_dir.expanduser().resolve())
        annotations = {s.path: by_stem[Path(s.path).stem] for s in annotated if Path(s.path).stem in by_stem}
    if "transplant" in args.augment:
        marks = scratch_mark_bank(splits["train"], pixels["train"].numpy(), annotations)
        print(f"transplant: marks of {0 if marks is None else len(marks[0])} annotated training scratches"
              + ("" if marks is not None else " (no boxes found: skipped)"))
    if args.explain_weight > 0:
        boxes = scratch_boxes(splits["train"], annotations)
        if any(b is not None for b in boxes):
            masks = box_masks(boxes, args.image_size)
            capture = explain_loss.LayerCamCapture(model.get_submodule(args.explain_layer))
        print(f"heatmap loss: LayerCAM {args.explain_layer} outside the boxes of "
              f"{sum(b is not None for b in boxes)} training scratches and the transplanted marks, weight "
              f"{args.explain_weight}, every {args.explain_every} batches" if masks is not None else
              "heatmap loss: no scratch boxes found: skipped")

    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(batch_indices(torch.arange(len(labels["train"])), args.batch_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, one_cycle(args.epochs * steps_per_epoch))

    log_rows = []
    for epoch in range(1, args.epochs + 1):
        epoch_start = time.time()
        train_loss, train_acc = train_one_epoch(model, pixels["train"], labels["train"], optimizer, scheduler,
                                                args, generator, device, epoch, marks, masks, capture)
        val_prob = predict_probabilities(model, pixels["val"], args.normalization, 2 * args.batch_size, device)
        val = binary_metrics(val_prob, labels["val"], 0.5)
        row = dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, val_loss=val["loss"],
                   val_acc=val["accuracy"], val_recall=val["recall"], seconds=time.time() - epoch_start)
        log_rows.append(row)
        print(f"epoch {epoch}/{args.epochs}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
              f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f} scratch recall {val['recall']:.4f} | "
              f"{row['seconds']:.1f}s")

    # The last epoch is kept: the learning rate has annealed to 0, and under this much augmentation 5 epochs
    # underfit (training loss stays above validation loss), so the epochs' validation losses differ by the
    # noise of a few hard images rather than by overfitting (bench/README.md).
    # Then, from the validation split: the temperature that calibrates p(defect), the threshold on the calibrated
    # p, and the familiarity statistics (training images and camera-changed copies; cut-off from validation).
    if capture is not None:
        capture.remove()
    if start_state is not None:
        finetune.blend_with_start(model, start_state, args.start_weight)
        print(f"averaged {args.start_weight:g} of {Path(args.init).name}'s weights back in (--start-weight)")
    if args.refresh_batchnorm:
        refreshed = refresh_batchnorm(model, pixels["train"], args.normalization, 2 * args.batch_size, device)
        print(f"BatchNorm statistics of {refreshed} layers recomputed from the {len(labels['train'])} training images")
    # A fine-tune keeps its starting model's temperature: fitted on its own few labelled validation images it made
    # p(defect) less calibrated, on the new line and on NEU (bench/README.md, your own line).
    kept_temperature = None if init_meta is None else init_meta["temperature"]
    fitted = fit_after_training(model, pixels["train"], [s.neu_class for s in splits["train"]], pixels["val"],
                                labels["val"], args.normalization, 2 * args.batch_size, device, args.seed,
                                temperature=kept_temperature)
    threshold, temperature, val = fitted["threshold"], fitted["temperature"], fitted["val_metrics"]
    source = "validation likelihood" if kept_temperature is None else f"{Path(args.init).name}'s, kept"
    print(f"kept epoch {args.epochs}; temperature {temperature:.3f} ({source}); threshold "
          f"{threshold:.4f} on the calibrated p (validation Youden J, widest margin in log-odds): val acc "
          f"{val['accuracy']:.4f}, scratch recall {val['recall']:.4f}, specificity {val['specificity']:.4f}")
    print(f"familiarity: {familiarity.LAYER} of {len(splits['train'])} training images and {familiarity.COPIES} "
          f"camera-changed copies, and {familiarity.DEEP_LAYER} of the images alone; unfamiliar beyond "
          f"{fitted['familiarity']['cutoff']:.2f} ({familiarity.CUTOFF_QUANTILE:.1%} of validation images and "
          f"copies within, and of the images alone for {familiarity.DEEP_LAYER})")

    log_fields = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_recall", "seconds"]
    write_csv(reports / "training_log.csv", log_fields,
              [[f"{r[k]:.6f}" if isinstance(r[k], float) else r[k] for k in log_fields] for r in log_rows])
    plot_curves(log_rows, reports / "training_curves.png")

    save_checkpoint(output, model, {
        "image_size": args.image_size,
        "normalization": args.normalization,
        **({"mean": list(dataset.IMAGENET_MEAN), "std": list(dataset.IMAGENET_STD)}
           if args.normalization == "imagenet" else {}),
        "threshold": threshold,
        "temperature": temperature,
        "familiarity": fitted["familiarity"],
        "pretrained": init,
        "epochs": args.epochs,
        "seed": args.seed,
        "hyperparameters": {**{k: getattr(args, k) for k in ("batch_size", "lr", "weight_decay", "max_per_class",
                                                             "explain_weight", "explain_layer", "explain_every",
                                                             "freeze_blocks", "early_epochs", "refresh_batchnorm")},
                            **({"early_size": args.early_size} if args.early_epochs else {}),
                            "augment": list(args.augment),
                            **({"augment_prob": args.augment_prob} if args.augment_prob else {}),
                            **({"start_weight": args.start_weight} if args.init else {})},
        "data": {"layout": data["layout"], "n_images": len(data["samples"]),
                 **({"labels": str(args.labels), "data_dir": str(data["data_dir"])} if args.labels else {}),
                 **({"replay": str(args.replay), "n_replay_train": len(splits["train"]) - own_train,
                     "n_replay_val": len(replay["val"])} if args.replay else {})},
        **({"init": {"path": str(args.init), "sha256": init_meta["sha256"], "pretrained": init_meta.get("pretrained"),
                     "threshold": init_meta["threshold"]}} if init_meta is not None else {}),
        **({"neu_split": data["neu_split"]} if data["neu_split"] is not None else {}),
        "split": {"fractions": list(dataset.SPLIT_FRACTIONS), "seed": data["split_seed"],
                  "max_per_class": data["max_per_class"],
                  **({"cv_fold": args.cv_fold[0], "cv_folds": args.cv_fold[1]} if args.cv_fold else {}),
                  **{f"n_{name}": len(items) for name, items in splits.items()},
                  "test_digest": dataset.split_digest(splits["test"])},
        "val_metrics": {"threshold": threshold, **val},
        "train_seconds": round(time.time() - started, 1),
    })
    print(f"saved {output} ({time.time() - started:.0f}s)")
    if init_meta is not None and args.labels:
        finetune.print_before_after(args.init, output, pixels["test"], labels["test"], args.normalization,
                                    2 * args.batch_size, device)
    if args.test_images:
        copied, present, removed = copy_test_images(splits["test"], Path(args.test_images),
                                                    splits["train"] + splits["val"])
        print(f"test split: {copied} images copied to {args.test_images}/ ({present} already there"
              + (f"; {removed} removed that this model trained or validated on" if removed else "")
              + "); run: python infer.py")
    return 0


if __name__ == "__main__":
    run_main(main, skip_teardown=True)
