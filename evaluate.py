"""Measure the shipped model: classification metrics, and whether its heatmaps point at the scratch.

    python evaluate.py                      # held-out test split -> outputs/metrics.json + outputs/report.pdf
    python evaluate.py --split val          # the split the default CAM was chosen on
    python evaluate.py --data-dir NEW --split all   # every image of a separate test set
    python evaluate.py --model mine.pth --labels labels.csv --data-dir FOLDER   # a fine-tuned model's held-out images

Localization uses the NEU-DET boxes (ANNOTATIONS/*.xml, matched to images by file name) of the scratch
images, with the heatmap for class "defect" resized to the image's original geometry:
  pointing game  = mean over images of the share of the heatmap's maximal pixels inside a ground-truth box (one
                   maximum: hit or miss; a tie scores what a random tie-break would); a flat map has no
                   maximum and is a miss, so a CAM that says nothing cannot score;
  energy in box  = share of the heatmap's total mass inside the boxes (a uniform map scores the boxes' share).
"""
from __future__ import annotations

import argparse

import dataset
from gradcam import METHODS
from scratch_detector.evaluation import SWEEP_LAYERS, evaluate
from scratch_detector.runtime import run_main
from scratch_detector.settings import DEFAULT_CAM, DEFAULT_CAM_LAYER


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help=f"NEU data (default: $NEU_DATA_DIR, else {dataset.DEFAULT_DATA_DIR})")
    p.add_argument("--labels", help="a labels file (image,label; e.g. the review page's labels.csv) instead of NEU "
                   "data: its paths are relative to --data-dir (default: the labels file's folder)")
    p.add_argument("--model", default="model_binary.pth")
    p.add_argument("--split", choices=["test", "val", "all"], default="test",
                   help="the model's held-out test split (default), its validation split, or every image")
    p.add_argument("--output", default="outputs", help="folder for metrics.json, report.pdf, figures")
    p.add_argument("--cam", choices=sorted(METHODS), default=DEFAULT_CAM)
    p.add_argument("--cam-layer", default=DEFAULT_CAM_LAYER)
    p.add_argument("--no-sweep", dest="sweep", action="store_false",
                   help=f"score only --cam/--cam-layer, not every method x {SWEEP_LAYERS[0]}..{SWEEP_LAYERS[-1]}")
    p.add_argument("--no-report", action="store_true", help="metrics.json only")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return p.parse_args(argv)


def main(argv=None) -> int:
    evaluate(parse_args(argv))
    return 0


if __name__ == "__main__":
    run_main(main, skip_teardown=True)
