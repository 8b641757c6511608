"""The recipe's figure without the test split: k-fold cross-validation over train + validation.

    python bench/crossval.py                          # python train.py defaults, seed 0, 5 folds
    python bench/crossval.py --folds 5 --only 0 1     # some folds only (each is one full training)
    python bench/crossval.py -- --explain-weight 0    # another recipe
    python bench/crossval.py --camera                 # also each fold under bench/robustness.py's camera changes
    python bench/crossval.py --keep folds/            # keep each fold's checkpoint and log (bench/threshold_rules.py)

Each fold is `python train.py --cv-fold K N [args after --]` as a child process in a temp folder: the seed's test
split is left out of every fold, train + validation are dealt into N stratified folds, and fold K is the
validation split of that training. The table gives each fold's held-out figures at the threshold that training
chose on that same fold (so a little optimistic for the threshold, never for the weights), and their sum over
the folds (every train + validation image held out once). The test split is not touched.

--camera scores each fold's model on its held-out fold under the camera changes of bench/robustness.py too, and
sums them over the folds: the camera figure with five times the scratches of one split, the instrument to compare
recipes on when one split's 38 scratches differ by one or two images between retrainings.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from common import (ROOT, bench_parser, load_average, markdown_table, parse_with_script_args,
                    train_child, training_bench_start)
from robustness import IN_VIEW, robustness_rows
from scratch_detector.evaluation import select_samples
from scratch_detector.metrics import find_annotations
from scratch_detector.model import load_checkpoint

OWNED_BY_BENCH = ("--data-dir", "--output", "--reports", "--test-images", "--cv-fold")


def parse_args(argv=None):
    p = bench_parser(__doc__, model=False)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--only", type=int, nargs="+", help="run these folds only (0-based)")
    p.add_argument("--json", help="also write every figure to this JSON file")
    p.add_argument("--camera", action="store_true",
                   help="also score each fold's held-out images under bench/robustness.py's camera changes")
    p.add_argument("--keep", type=Path, help="keep each fold's checkpoint, reports and log in this folder "
                   "(DIR/foldK/model.pth), to score them again later; it must not exist yet")
    args = parse_with_script_args(p, argv, OWNED_BY_BENCH)
    if args.keep is not None and args.keep.exists():
        p.error(f"--keep {args.keep} already exists: name a new folder, so no earlier fold is overwritten")
    args.only = sorted(set(args.only if args.only is not None else range(args.folds)))
    if args.folds < 2 or not all(0 <= k < args.folds for k in args.only):
        p.error("--folds must be >= 2 and --only within 0..folds-1")
    return args


def one_fold(fold: int, folds: int, data_dir: Path, train_args: list[str], work: Path, camera: bool = False) -> dict:
    checkpoint, wall = train_child(work / f"fold{fold}", data_dir, ["--cv-fold", str(fold), str(folds), *train_args])
    meta = torch.load(checkpoint, map_location="cpu", weights_only=True)
    held_out = meta["val_metrics"]
    result = {"fold": fold, "train_wall_s": wall, "threshold": held_out["threshold"],
              "n": held_out["n_images"], **held_out["confusion_matrix"]}
    print(f"fold {fold}: {wall:.0f}s, held out {result}", flush=True)
    if camera:
        model, meta = load_checkpoint(checkpoint)
        samples, _ = select_samples(data_dir, meta, "val")  # the held-out fold, re-derived from the checkpoint
        result["camera"] = robustness_rows(model, meta, samples, "cpu", progress=False,
                                           annotations=find_annotations(data_dir))
        worst = min(result["camera"], key=lambda r: r["recall"])
        print(f"fold {fold}: camera changes scored; lowest recall {worst['recall']:.4f} ({worst['perturbation']})",
              flush=True)
    return result


def camera_table(results: list[dict]) -> str:
    """Each camera change summed over the folds: every train + validation image once, at its fold's threshold."""
    rows = []
    for index, first in enumerate(results[0]["camera"]):
        per_fold = [r["camera"][index] for r in results]
        n = sum(r["n_images"] for r in per_fold)
        scratches = sum(r["n_scratches"] for r in per_fold)
        misses, alarms = sum(r["misses"] for r in per_fold), sum(r["false_alarms"] for r in per_fold)
        in_view = "-"
        if all("in_view_scratches" in r for r in per_fold):
            kept = sum(r["in_view_scratches"] for r in per_fold)
            missed = sum(r["in_view_misses"] for r in per_fold)
            in_view = f"{(kept - missed) / kept:.4f} ({missed} of {kept})" if kept else "-"
        rows.append([first["perturbation"] + ("" if first["asked"] else " (other value)"),
                     f"{(n - misses - alarms) / n:.4f}", f"{(scratches - misses) / scratches:.4f} "
                     f"({scratches - misses} of {scratches})", alarms, misses, in_view])
    return markdown_table(["perturbation", "accuracy", "scratch recall", "false alarms", "missed scratches",
                           f"recall of the scratches at least {IN_VIEW:.0%} in view (missed)"], rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    data_dir, command, machine = training_bench_start(args, f"--cv-fold K {args.folds}, folds {args.only}")
    with tempfile.TemporaryDirectory(prefix="crossval_") as temporary:
        work = args.keep or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        results = [one_fold(k, args.folds, data_dir, args.script_args, work, args.camera) for k in args.only]

    def row(name, r):
        n, wrong = r["tn"] + r["fp"] + r["fn"] + r["tp"], r["fp"] + r["fn"]
        recall = r["tp"] / (r["tp"] + r["fn"]) if r["tp"] + r["fn"] else float("nan")
        return [name, n, f"{(n - wrong) / n:.4f}", f"{recall:.4f} ({r['tp']} of {r['tp'] + r['fn']})", r["fp"],
                r["fn"]]

    total = {k: sum(r[k] for r in results) for k in ("tn", "fp", "fn", "tp")}
    print(f"\n## Cross-validation ({command}, {args.folds} folds over train + validation)\n")
    print("\n".join(f"- {line}" for line in machine) + f"\n- load average at the end: {load_average()}\n")
    rows = [row(f"fold {r['fold']}", r) for r in results] + [row("all held out", total)]
    print(markdown_table(["fold", "images", "accuracy", "scratch recall", "false alarms", "misses"], rows))
    if args.camera:
        print(f"\n## Camera changes on the held-out folds ({command}; folds {args.only}, summed)\n")
        print(camera_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "folds": args.folds, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
