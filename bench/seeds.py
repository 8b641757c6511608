"""Is the recipe robust or lucky? Train with several seeds (each makes its own split) and score each model on
its own validation and test splits, clean and under bench/robustness.py's camera changes.

    python bench/seeds.py                                   # python train.py defaults, seeds 0 1 2
    python bench/seeds.py --seeds 0 1 2 3 4 --jobs 2
    python bench/seeds.py -- --augment dihedral --normalization imagenet    # another recipe

Each run is `python train.py --seed S [args after --]` as a whole child process, writing into a temp folder
(the committed model_binary.pth and test_images/ are never touched). The table gives, per seed, validation and
test accuracy, scratch recall and false alarms at the checkpoint's threshold, the test split's calibration error
(ECE of p(defect) at the checkpoint's temperature, as evaluate.py), and the worst accuracy and recall
over the eight camera changes on its test split (the recall also with magnified scratches counted only when they
keep at least half their box in view, bench/robustness.py's rule); then the mean and the worst seed.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import (bench_parser, load_average, markdown_table, parse_with_script_args,
                    train_child, training_bench_start)
from robustness import IN_VIEW, robustness_rows

ROOT = Path(__file__).resolve().parents[1]
OWNED_BY_BENCH = ("--data-dir", "--output", "--reports", "--test-images", "--seed")


def parse_args(argv=None):
    p = bench_parser(__doc__, model=False)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="trainings at once (default 1: timings stay honest)")
    p.add_argument("--no-robustness", dest="robustness", action="store_false", help="clean metrics only")
    p.add_argument("--json", help="also write every figure to this JSON file")
    return parse_with_script_args(p, argv, OWNED_BY_BENCH)


def train(seed: int, data_dir: Path, train_args: list[str], work: Path) -> tuple[Path, float]:
    return train_child(work / f"seed{seed}", data_dir, ["--seed", str(seed), *train_args])


def score(checkpoint: Path, data_dir: Path, robustness: bool) -> dict:
    """Clean val and test metrics of one checkpoint, and its camera-change rows on the test split."""
    import dataset
    from scratch_detector.evaluation import select_samples
    from scratch_detector.calibration import expected_calibration_error
    from scratch_detector.metrics import binary_metrics, find_annotations
    from scratch_detector.model import load_checkpoint, pick_device, predict_probabilities

    device = pick_device("auto")
    model, meta = load_checkpoint(checkpoint, device)
    result = {"threshold": float(meta["threshold"])}
    for split in ("val", "test"):
        samples, _ = select_samples(data_dir, meta, split)
        pixels = dataset.load_pixels(samples, int(meta["image_size"]), progress=False)
        import torch
        probabilities = predict_probabilities(model, torch.from_numpy(pixels), meta["normalization"], 64, device)
        p, labels = probabilities.numpy(), dataset.labels_of(samples)
        m = binary_metrics(p, labels, float(meta["threshold"]))
        result[split] = dict(accuracy=m["accuracy"], recall=m["recall"], false_alarms=m["confusion_matrix"]["fp"],
                             misses=m["confusion_matrix"]["fn"], n=m["n_images"],
                             ece=expected_calibration_error(p, labels),
                             wrong=[s.relpath for s, value in zip(samples, p.tolist())
                                    if (value >= meta["threshold"]) != bool(s.label)])
        if split == "test" and robustness:
            result["robustness"] = robustness_rows(model, meta, samples, device, progress=False,
                                                   annotations=find_annotations(data_dir))
    return result


def one_seed(seed: int, args, data_dir: Path, work: Path) -> dict:
    checkpoint, wall = train(seed, data_dir, args.script_args, work)
    result = {"seed": seed, "train_wall_s": wall, **score(checkpoint, data_dir, args.robustness)}
    shutil.rmtree(checkpoint.parent)
    print(f"seed {seed}: {wall:.0f}s; val acc {result['val']['accuracy']:.4f} recall {result['val']['recall']:.4f}; "
          f"test acc {result['test']['accuracy']:.4f} recall {result['test']['recall']:.4f} "
          f"wrong {result['test']['wrong']}", flush=True)
    return result


def worst_asked(result: dict, key: str) -> float:
    """The worst `key` over the camera changes the recipe is asked to survive; a row without `key` (in_view_recall
    exists for the magnifications only) gives its plain recall."""
    return min(r.get(key, r["recall"]) for r in result["robustness"] if r["asked"])


def main(argv=None) -> int:
    args = parse_args(argv)
    data_dir, command, machine = training_bench_start(args, f"--seed S, seeds {args.seeds}")
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="seeds_") as work:
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            results = list(pool.map(lambda s: one_seed(s, args, data_dir, Path(work)), args.seeds))

    columns = [  # (header, value of one seed's result, higher is better, format)
        ("val accuracy", lambda r: r["val"]["accuracy"], True, "{:.4f}"),
        ("val recall", lambda r: r["val"]["recall"], True, "{:.4f}"),
        ("val false alarms", lambda r: r["val"]["false_alarms"], False, "{:.3g}"),
        ("test accuracy", lambda r: r["test"]["accuracy"], True, "{:.4f}"),
        ("test recall", lambda r: r["test"]["recall"], True, "{:.4f}"),
        ("test false alarms", lambda r: r["test"]["false_alarms"], False, "{:.3g}"),
        ("test ECE", lambda r: r["test"]["ece"], False, "{:.4f}"),
        ("train wall s", lambda r: r["train_wall_s"], False, "{:.0f}"),
    ]
    if args.robustness:
        columns += [("worst camera change: accuracy", lambda r: worst_asked(r, "accuracy"), True, "{:.4f}"),
                    ("worst camera change: recall", lambda r: worst_asked(r, "recall"), True, "{:.4f}"),
                    (f"worst camera change: recall, magnified scratches at least {IN_VIEW:.0%} in view",
                     lambda r: worst_asked(r, "in_view_recall"), True, "{:.4f}")]
    rows = [[r["seed"], *(fmt.format(get(r)) for _, get, _, fmt in columns)] for r in results]
    values = [[get(r) for r in results] for _, get, _, _ in columns]
    rows.append(["mean", *(fmt.format(sum(v) / len(v)) for v, (_, _, _, fmt) in zip(values, columns))])
    rows.append(["worst", *(fmt.format(min(v) if higher else max(v)) for v, (_, _, higher, fmt) in zip(values, columns))])
    print(f"\n## Seeds ({command})\n")
    print("\n".join(f"- {line}" for line in machine) + f"\n- load average at the end: {load_average()}\n")
    print(markdown_table(["seed", *(c[0] for c in columns)], rows))
    for r in results:
        if r["test"]["wrong"]:
            print(f"- seed {r['seed']} test errors: {', '.join(r['test']['wrong'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
