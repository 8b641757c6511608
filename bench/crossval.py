"""The recipe's figure without the test split: k-fold cross-validation over train + validation.

    python bench/crossval.py                          # python train.py defaults, seed 0, 5 folds
    python bench/crossval.py --folds 5 --only 0 1     # some folds only (each is one full training)
    python bench/crossval.py -- --explain-weight 0    # another recipe

Each fold is `python train.py --cv-fold K N [args after --]` as a child process in a temp folder: the seed's test
split is left out of every fold, train + validation are dealt into N stratified folds, and fold K is the
validation split of that training. The table gives each fold's held-out figures at the threshold that training
chose on that same fold (so a little optimistic for the threshold, never for the weights), and their sum over
the folds (every train + validation image held out once). The test split is not touched.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from common import (ROOT, bench_parser, load_average, markdown_table, parse_with_script_args,
                    train_child, training_bench_start)

OWNED_BY_BENCH = ("--data-dir", "--output", "--reports", "--test-images", "--cv-fold")


def parse_args(argv=None):
    p = bench_parser(__doc__, model=False)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--only", type=int, nargs="+", help="run these folds only (0-based)")
    p.add_argument("--json", help="also write every figure to this JSON file")
    args = parse_with_script_args(p, argv, OWNED_BY_BENCH)
    args.only = sorted(set(args.only if args.only is not None else range(args.folds)))
    if args.folds < 2 or not all(0 <= k < args.folds for k in args.only):
        p.error("--folds must be >= 2 and --only within 0..folds-1")
    return args


def one_fold(fold: int, folds: int, data_dir: Path, train_args: list[str], work: Path) -> dict:
    checkpoint, wall = train_child(work / f"fold{fold}", data_dir, ["--cv-fold", str(fold), str(folds), *train_args])
    meta = torch.load(checkpoint, map_location="cpu", weights_only=True)
    held_out = meta["val_metrics"]
    result = {"fold": fold, "train_wall_s": wall, "threshold": held_out["threshold"],
              "n": held_out["n_images"], **held_out["confusion_matrix"]}
    print(f"fold {fold}: {wall:.0f}s, held out {result}", flush=True)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    data_dir, command, machine = training_bench_start(args, f"--cv-fold K {args.folds}, folds {args.only}")
    with tempfile.TemporaryDirectory(prefix="crossval_") as work:
        results = [one_fold(k, args.folds, data_dir, args.script_args, Path(work)) for k in args.only]

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
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "folds": args.folds, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
