"""How long `python train.py` takes with its defaults, how much memory it needs, and what it is worth.

    python bench/train_speed.py                              # train.py defaults, once
    python bench/train_speed.py --repeat 3
    python bench/train_speed.py -- --epochs 1 --max-per-class 20 --pretrained none   # quick check

Each run is `python train.py` as a whole child process, writing its checkpoint, reports and test images into
a temp folder (the committed model_binary.pth and test_images/ are never touched), followed by
`python evaluate.py --no-sweep --no-report` on that checkpoint for test-split accuracy and scratch recall.
Arguments after `--` are passed on to train.py.
"""
from __future__ import annotations

import csv
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

from common import (bench_parser, check, default_data_dir, load_average, machine_lines, markdown_table, median,
                    parse_with_script_args, run_child)

OWNED_BY_BENCH = ("--data-dir", "--output", "--reports", "--test-images")  # would redirect files out of the temp dir


def parse_args(argv=None):
    p = bench_parser(__doc__, model=False)
    p.add_argument("--repeat", type=int, default=1, help="train this many times (default: %(default)s)")
    args = parse_with_script_args(p, argv, OWNED_BY_BENCH)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    return args


def epoch_seconds(training_log: Path) -> float:
    """Sum of train.py's per-epoch seconds (training pass + validation pass), from its training_log.csv."""
    with open(training_log, newline="") as handle:
        return sum(float(row["seconds"]) for row in csv.DictReader(handle))


def one_run(index: int, data_dir: Path, train_args: list[str], work: Path) -> dict:
    folder = work / f"run{index}"
    folder.mkdir()
    checkpoint = folder / "model_binary.pth"
    train = run_child([sys.executable, "train.py", "--data-dir", str(data_dir), "--output", str(checkpoint),
                       "--reports", str(folder / "reports"), "--test-images", str(folder / "test_images"),
                       *train_args], folder / "train.log")
    check(train, "train.py")
    evaluation = run_child([sys.executable, "evaluate.py", "--no-sweep", "--no-report", "--model", str(checkpoint),
                            "--data-dir", str(data_dir), "--output", str(folder / "eval")], folder / "evaluate.log")
    check(evaluation, "evaluate.py")
    metrics = json.loads((folder / "eval" / "metrics.json").read_text())
    model = metrics["model"]
    n_train, epochs = int(model["split"]["n_train"]), int(model["epochs"])
    in_epochs = epoch_seconds(folder / "reports" / "training_log.csv")
    log = train.log.read_text(errors="replace")
    fell_back = "training from RANDOM INIT" in log
    result = dict(wall_s=train.wall_s, peak_rss_mib=train.peak_rss_mib, n_train=n_train, epochs=epochs,
                  images_per_s=n_train * epochs / train.wall_s, epoch_images_per_s=n_train * epochs / in_epochs,
                  accuracy=metrics["accuracy"], recall=metrics["recall"], n_test=metrics["n_images"],
                  init=model["pretrained"], fell_back=fell_back,
                  split=(re.search(r"^split: [^>]*?(?= -> |$)", log, re.M) or [""])[0])
    print(f"run {index}: {train.wall_s:.1f}s wall, {result['images_per_s']:.1f} train images/s "
          f"({n_train} x {epochs} epochs), peak RSS {train.peak_rss_mib:.0f} MiB; test ({result['n_test']} images): "
          f"accuracy {result['accuracy']:.4f}, scratch recall {result['recall']:.4f}; init: {result['init']}",
          flush=True)
    shutil.rmtree(folder)  # holds copies of NEU test images: never keep them
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    data_dir = default_data_dir(args.data_dir)
    machine = machine_lines()
    command = " ".join(["python train.py", *args.script_args]) or "python train.py"
    print("\n".join(machine))
    print(f"data: {data_dir}\ncommand: {command} (+ --data-dir/--output/--reports/--test-images in a temp dir), "
          f"{args.repeat} run(s)", flush=True)

    results = []
    with tempfile.TemporaryDirectory(prefix="train_speed_") as work:
        for index in range(1, args.repeat + 1):
            results.append(one_run(index, data_dir, args.script_args, Path(work)))

    print("\nimages/s = training-split images x epochs / wall seconds of the whole `python train.py` process "
          "(imports, ImageNet weights, decoding, every epoch's training and validation pass, saving, copying "
          "test images).\nepoch-loop images/s = the same count / the seconds train.py spent inside its epochs "
          "(training_log.csv: training + validation passes). Each image is counted once per epoch; validation "
          "images are not counted.\npeak RSS = the train.py process's high-water resident memory (wait4 ru_maxrss). "
          "Accuracy and scratch recall: evaluate.py on the checkpoint's held-out test split, at its threshold.")
    if any(r["fell_back"] for r in results):
        print("WARNING: ImageNet weights were unavailable, so train.py fell back to RANDOM INIT (see 'init'); "
              "the accuracy below is that of a random-init model.")
    print(f"\n## Training speed ({command})\n")
    print("\n".join(f"- {line}" for line in machine))
    print(f"- load average at the end: {load_average()}")
    print(f"- {results[0]['split']}\n")
    rows = [[i, f"{r['wall_s']:.1f}", f"{r['n_train']} x {r['epochs']}", f"{r['images_per_s']:.1f}",
             f"{r['epoch_images_per_s']:.1f}", f"{r['peak_rss_mib']:.0f}", f"{r['accuracy']:.4f}",
             f"{r['recall']:.4f}", r["init"]] for i, r in enumerate(results, 1)]
    if len(results) > 1:
        rows.append(["median", f"{median([r['wall_s'] for r in results]):.1f}", "",
                     f"{median([r['images_per_s'] for r in results]):.1f}",
                     f"{median([r['epoch_images_per_s'] for r in results]):.1f}",
                     f"{median([r['peak_rss_mib'] for r in results]):.0f}",
                     f"{median([r['accuracy'] for r in results]):.4f}",
                     f"{median([r['recall'] for r in results]):.4f}", ""])
    print(markdown_table(["run", "wall s", "train images x epochs", "images/s (whole process)",
                          "images/s (epoch loop)", "peak RSS MiB", f"test accuracy (n={results[0]['n_test']})",
                          "test scratch recall", "init"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
