"""Classify every image in a folder as defect (scratch) / non-defect and draw a Grad-CAM overlay for each.

    python infer.py                                  # test_images/ -> outputs/predictions.csv + outputs/gradcam/
    python infer.py --input /line3/today --output /line3/report --no-cam

An image larger than a tile (200 px, the scale the model was trained at) on either side is cut into
overlapping tiles at that scale instead of being shrunk whole (--tile off shrinks it): its p(defect) is its
hottest tile's, every tile at or over the threshold is a row of detections.csv and a box on its overlay, and
the tiles' heatmaps are blended into one (scratch_detector/pipeline.py).

The local engine (scratch_detector/engines/local.py) decodes in a reader thread and draws and writes overlays
in a writer thread, while the model works on two batches at once; every queue is bounded, so memory does not
grow with the number of images or tiles. Batch size and stream count are fitted to --max-memory (default: half
of the available memory; scratch_detector/memory.py), and the run header says which were chosen.

Resumable: each finished image is recorded in OUT/.journal/ (scratch_detector/storage.py) once its overlay is
in place, fsync'd in batches. Rerunning the same command after a crash, Ctrl-C, kill -9 or a power cut does
only the images without a valid record; predictions.csv, detections.csv and index.html are assembled from the
journal at the end, atomically, as one uninterrupted run writes them. A different model (its SHA-256),
threshold, CAM, overlay or tiling setting, or input folder starts over, with a message; --restart always does.
Nothing held in memory grows with the number of images: the sorted input listing is on disk, results go to
the journal, and the CSVs and the review page are streamed from it.

    python infer.py --engine ray [--ray-address auto|ray://HEAD:10001]

runs the same per-image code on a Ray Data actor pool (scratch_detector/engines/ray_pool.py; pip install -r
requirements-ray.txt), on this machine or a cluster, with the same journal and the same outputs.
"""
from __future__ import annotations

import argparse

import dataset
from gradcam import METHODS
from scratch_detector.inference import run_inference
from scratch_detector.overlay import OVERLAY_FORMATS
from scratch_detector.runtime import run_main
from scratch_detector.memory import parse_memory
from scratch_detector.settings import DEFAULT_CAM, DEFAULT_CAM_LAYER, FRAME_OVERLAY_SIDE, HEATMAP_DIR


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default="test_images", help="folder of images, searched recursively (default: %(default)s)")
    p.add_argument("--output", default="outputs", help="folder for predictions.csv and gradcam/ (default: %(default)s)")
    p.add_argument("--model", default="model_binary.pth", help="checkpoint (default: %(default)s)")
    p.add_argument("--threshold", type=float, help="defect if p(defect) >= this (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="images per batch and model stream (default on a CPU: the largest of 4, 2, 1 that fits "
                        "--max-memory; on a GPU 16)")
    p.add_argument("--max-memory", default="auto",
                   help="peak memory to fit batch size and stream count into, e.g. 1.5G or 1500M; auto: half of "
                        "the memory available at start (default: %(default)s; the run header shows the choice)")
    p.add_argument("--cam", choices=sorted(METHODS), default=DEFAULT_CAM, help="CAM method (default: %(default)s)")
    p.add_argument("--cam-layer", default=DEFAULT_CAM_LAYER, help="layer to explain (default: %(default)s)")
    p.add_argument("--no-cam", action="store_true", help="predictions only, no overlays (faster)")
    p.add_argument("--overlay-format", choices=sorted(OVERLAY_FORMATS), default="jpg",
                   help="overlay files: jpg (quality 95, small and fast) or png (lossless) (default: %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--streams", type=int, default=0,
                   help="batches worked on side by side, each on its own model copy (default: 2 on a CPU with "
                        "2+ threads, else 1; fewer if --max-memory needs it)")
    p.add_argument("--tile", choices=["auto", "off"], default="auto",
                   help="auto: an image larger than --tile-size on either side is cut into overlapping tiles at "
                        "native scale, each classified and explained; off: every image is shrunk whole to the "
                        "model input (default: %(default)s)")
    p.add_argument("--tile-size", type=int, default=dataset.NATIVE_SIZE,
                   help="tile side in image pixels: the scale the model was trained at, NEU's 200 x 200 images "
                        "(each tile is resized to the checkpoint's image size) (default: %(default)s)")
    p.add_argument("--tile-stride", type=int,
                   help="largest step between tiles in image pixels (default: 3/4 of --tile-size, a quarter "
                        "overlap: every point lies 1/8 of a tile inside some tile)")
    p.add_argument("--overlay-max-side", type=int, default=FRAME_OVERLAY_SIDE,
                   help="a tiled image's overlay fits in this many pixels each way (default: %(default)s)")
    p.add_argument("--save-heatmaps", action="store_true",
                   help=f"also write each image's raw heatmap, before the overlay smooths it and drops the heat "
                        f"under its floor, as float16 .npy ({HEATMAP_DIR}/; a tiled image's at the overlay's scale)")
    p.add_argument("--restart", action="store_true",
                   help="discard the unfinished run recorded in --output and start over (default: a rerun of the "
                        "same command finishes it, doing only the images not yet done)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: threads in this process; ray: a Ray Data actor pool, on this machine or a cluster "
                        "(pip install -r requirements-ray.txt) (default: %(default)s)")
    p.add_argument("--ray-address",
                   help="--engine ray: the cluster to join, auto (the one this node belongs to) or ray://HEAD:10001 "
                        "(default: start Ray on this machine for this run)")
    p.add_argument("--ray-actors", type=int, default=0,
                   help="--engine ray: model actors (default: one per CPU of the cluster; see "
                        "scratch_detector/engines/ray_pool.py)")
    p.add_argument("--ray-cpus", type=int, default=0,
                   help="--engine ray without --ray-address: CPUs of the Ray instance started here (default: all)")
    args = p.parse_args(argv)
    if args.engine != "ray" and (args.ray_address or args.ray_actors or args.ray_cpus):
        p.error("--ray-address, --ray-actors and --ray-cpus need --engine ray")
    if args.ray_actors < 0 or args.ray_cpus < 0 or (args.ray_address and args.ray_cpus):
        p.error("--ray-actors and --ray-cpus must be >= 0; --ray-cpus is for a Ray started here, not --ray-address")
    if args.batch_size < 0 or args.streams < 0:
        p.error("--batch-size and --streams must be >= 1 (or 0: fitted to --max-memory)")
    try:
        args.max_memory = parse_memory(args.max_memory)
    except ValueError as error:
        p.error(f"--max-memory: {error}")
    if args.tile_size < 1 or not 1 <= (args.tile_stride or 1) <= args.tile_size:
        p.error("need --tile-size >= 1 and 1 <= --tile-stride <= --tile-size (else pixels fall between tiles)")
    if args.overlay_max_side < 256:
        p.error("--overlay-max-side must be >= 256")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        p.error("--threshold must be between 0 and 1")
    return args


def main(argv=None) -> int:
    return run_inference(parse_args(argv))


if __name__ == "__main__":
    run_main(main, skip_teardown=True)
