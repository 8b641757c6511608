"""Images per second and peak memory of `python infer.py` (CSV + a Grad-CAM overlay per image), beside the
peer baseline: the per-image loop that pytorch-grad-cam's README shows, on the same images and checkpoint.

    python bench/infer_speed.py                         # N = 300 and 3000, 3 alternating rounds
    python bench/infer_speed.py --sizes 40 80 --repeat 1 --model /tmp/bench_model.pth   # quick check
    python bench/infer_speed.py --peer-size 224         # the peer at 224 px (then not the same computation)
    python bench/infer_speed.py --sizes 300 -- --cam gradcam --cam-layer features.8   # the peer's own CAM
    python bench/infer_speed.py --skip-peer --model-only  # infer.py against its model-only rate

--model-only also times, in each round after infer.py, the model alone (`bench/profile_parts.py --model-only`:
infer.py's model streams on images decoded in advance, the same streams and batch) on the same N, and reports
infer.py's whole-process rate as a share of it: how close to the machine's limit the tool runs.

Both sides are whole child processes timed the same way: wall time from start to exit (imports and model
load included), images/s = N / wall, peak RSS of the child. Arguments after `--` go to infer.py. They alternate (ours, peer, ours, peer ...) so
that a change in machine load hits both. The N input images are NEU images repeated, as symlinks in a temp
folder; outputs go to temp folders and are deleted after each run.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from common import (IMAGE_EXTENSIONS, ROOT, bench_parser, check, default_data_dir, input_order, load_average,
                    machine_lines, markdown_table, median, neu_images, parse_with_script_args, run_child)

PEER = "pytorch-grad-cam README loop"


# ---------------------------------------------------------------------------------------------------------
# The peer: pytorch-grad-cam used as its README shows, one image at a time. Runs in its own process.
# ---------------------------------------------------------------------------------------------------------
def peer_worker(input_dir: Path, output_dir: Path, model_path: Path, size: int) -> int:
    """GradCAM on model.features[-1] for class 1 (defect) -> show_cam_on_image -> cv2.imwrite, per image.

    Same checkpoint, loaded with our load_checkpoint; same normalisation; image_size from the checkpoint
    unless `size` is given. Its heatmap equals gradcam.py's 'gradcam' method on features.8 (infer.py's
    default is layercam on features.1). The CAM object is built once, as in the README's
    `with GradCAM(...) as cam:`, the peer's fastest use. It writes a JPEG per image (OpenCV's default quality
    95), as pytorch-grad-cam's cam.py example does (`cv2.imwrite(f'{args.method}_cam.jpg', cam_image)`), and
    no CSV."""
    sys.path.insert(0, str(ROOT))
    import cv2
    import numpy as np
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import preprocess_image, show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    import dataset
    from scratch_detector.model import load_checkpoint

    started = time.perf_counter()  # after imports, as infer.py's own timer
    model, meta = load_checkpoint(model_path)
    size = size or int(meta["image_size"])
    per_image = meta["normalization"] == "per-image"
    print(f"peer: image size {size} (checkpoint {meta['image_size']}), normalization {meta['normalization']}")
    paths = sorted(p for p in input_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    output_dir.mkdir(parents=True, exist_ok=True)
    targets = [ClassifierOutputTarget(1)]
    with GradCAM(model=model, target_layers=[model.features[-1]]) as cam:
        for path in paths:
            rgb_img = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
            # Shrinking with INTER_AREA averages pixels as Pillow's bilinear in infer.py does, so both sides
            # feed the model nearly the same input (INTER_LINEAR moved p(defect) by up to 0.08 at 200 -> 112 px)
            shrink = rgb_img.shape[0] > size or rgb_img.shape[1] > size
            rgb_img = cv2.resize(rgb_img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
            rgb_img = np.float32(rgb_img) / 255
            if per_image:  # the checkpoint's own normalisation: each image's mean and std (dataset.normalize)
                mean, std = float(rgb_img.mean()), max(float(rgb_img.std()), dataset.MIN_STD / 255)
                input_tensor = preprocess_image(rgb_img, mean=[mean] * 3, std=[std] * 3)
            else:
                input_tensor = preprocess_image(rgb_img, mean=meta["mean"], std=meta["std"])
            grayscale_cam = cam(input_tensor=input_tensor, targets=targets)[0, :]
            visualization = show_cam_on_image(rgb_img, grayscale_cam, use_rgb=True)
            cv2.imwrite(str(output_dir / f"{path.stem}_cam.jpg"), cv2.cvtColor(visualization, cv2.COLOR_RGB2BGR))
    seconds = time.perf_counter() - started
    print(f"peer: {len(paths)} images; {seconds:.1f}s, {len(paths) / seconds:.1f} images/s")
    return 0


# ---------------------------------------------------------------------------------------------------------
# The bench
# ---------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = bench_parser(__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[300, 3000],
                   help="numbers of input images (default: 300 3000)")
    p.add_argument("--repeat", type=int, default=3, help="alternating rounds per size (default: %(default)s)")
    p.add_argument("--peer-size", type=int, default=0,
                   help="run the peer at this image size instead of the checkpoint's (e.g. 224)")
    p.add_argument("--skip-peer", action="store_true", help="time infer.py only")
    p.add_argument("--model-only", action="store_true", help="also the model-only rate, and infer.py's share of it")
    p.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)  # internal: be the peer process
    p.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parse_with_script_args(p, argv, ("--input", "--output", "--model"))
    if args.repeat < 1 or min(args.sizes) < 1 or args.peer_size < 0:
        p.error("--repeat and --sizes must be >= 1, --peer-size >= 0")
    return args


def build_inputs(sources: list[Path], n: int, folder: Path) -> None:
    """N symlinks to the NEU images in input_order. infer.py (os.walk + Pillow) and the peer (cv2.imread) both
    follow symlinks."""
    folder.mkdir()
    width = max(5, len(str(n - 1)))
    for i, source in enumerate(input_order(sources, n)):
        (folder / f"{i:0{width}d}_{source.name}").symlink_to(source)


def rate_from_log(log: Path) -> float:
    """The images/s the program printed itself (timed after its imports), or nan."""
    found = re.findall(r"([\d.]+) images/s", log.read_text(errors="replace"))
    return float(found[-1]) if found else float("nan")


def run_ours(model: Path, inputs: Path, n: int, work: Path, tag: str, infer_args: list[str]) -> dict:
    output = work / "ours_out"
    run = run_child([sys.executable, "infer.py", "--input", str(inputs), "--output", str(output),
                     "--model", str(model), *infer_args], work / f"ours_{tag}.log")
    check(run, "infer.py")
    with open(output / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    overlays = sum(1 for _ in (output / "gradcam").rglob("*_gradcam.*"))
    if len(rows) != n or overlays != n or any(r["status"] != "ok" for r in rows):
        sys.exit(f"infer.py did not do the full job: {len(rows)} CSV rows, {overlays} overlays for {n} images")
    shutil.rmtree(output)
    cam = re.search(r"; (\S+ on \S+|no CAM); ", run.log.read_text(errors="replace"))
    return dict(wall_s=run.wall_s, rss=run.peak_rss_mib, rate=n / run.wall_s, own_rate=rate_from_log(run.log),
                cam=cam[1] if cam else "?")


def run_peer(model: Path, inputs: Path, n: int, work: Path, tag: str, peer_size: int) -> dict:
    output = work / "peer_out"
    run = run_child([sys.executable, str(Path(__file__).resolve()), "--peer-worker", "--input", str(inputs),
                     "--output", str(output), "--model", str(model), "--peer-size", str(peer_size)],
                    work / f"peer_{tag}.log")
    check(run, "the peer loop")
    overlays = sum(1 for _ in output.glob("*_cam.jpg"))
    if overlays != n:
        sys.exit(f"the peer wrote {overlays} overlays for {n} images")
    size, checkpoint_size = re.search(r"peer: image size (\d+) \(checkpoint (\d+)\)", run.log.read_text()).groups()
    shutil.rmtree(output)
    return dict(wall_s=run.wall_s, rss=run.peak_rss_mib, rate=n / run.wall_s, own_rate=rate_from_log(run.log),
                size=int(size), checkpoint_size=int(checkpoint_size))


def run_model_only(model: Path, data_dir: Path, n: int, work: Path, tag: str) -> dict:
    """bench/profile_parts.py --model-only on N images, one timed pass, in its own process."""
    run = run_child([sys.executable, str(Path(__file__).with_name("profile_parts.py")), "--model-only", "--model",
                     str(model), "--data-dir", str(data_dir), "--images", str(n), "--rounds", "1"],
                    work / f"model_only_{tag}.log")
    check(run, "the model-only rate")
    found = re.search(r"model only: ([\d.]+) images/s \(\d+ images, (.*), median", run.log.read_text())
    return dict(rate=float(found[1]), how=found[2])


def warm_up(sources: list[Path]) -> None:
    """Untimed: read every NEU file and import the libraries once, so the first timed run does not pay
    for a cold disk cache that the later ones skip."""
    for path in sources:
        path.read_bytes()
    run = run_child([sys.executable, "-c", "import torch, torchvision, cv2, PIL, tqdm, pytorch_grad_cam"],
                    Path(os.devnull))
    check(run, "the warm-up import")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.peer_worker:
        return peer_worker(args.input, args.output, Path(args.model).resolve(), args.peer_size)
    model = Path(args.model).resolve()
    if not model.is_file():
        sys.exit(f"error: checkpoint not found: {model} (train one, or pass --model)")
    data_dir = default_data_dir(args.data_dir)
    sources = neu_images(data_dir)
    machine = machine_lines()
    print("\n".join(machine))
    print(f"data: {data_dir} ({len(sources)} images, repeated as symlinks); model: {model}")
    print(f"ours: python infer.py (its defaults: CSV + side-by-side overlay JPEG per image)\n"
          f"peer: {PEER} (pytorch-grad-cam GradCAM on features[-1], ClassifierOutputTarget(1), batch of 1, "
          f"show_cam_on_image + cv2.imwrite JPEG)" + (" -- skipped" if args.skip_peer else ""), flush=True)
    warm_up(sources)

    results = {}
    with tempfile.TemporaryDirectory(prefix="infer_speed_") as tmp:
        work = Path(tmp)
        for n in args.sizes:
            inputs = work / f"images_{n}"
            build_inputs(sources, n, inputs)
            results[n] = {"ours": [], "peer": [], "model": []}
            for round_ in range(1, args.repeat + 1):
                tag = f"{n}_{round_}"
                ours = run_ours(model, inputs, n, work, tag, args.script_args)
                results[n]["ours"].append(ours)
                line = (f"N={n} round {round_}: infer.py {ours['wall_s']:.1f}s = {ours['rate']:.1f} img/s, "
                        f"peak RSS {ours['rss']:.0f} MiB")
                if not args.skip_peer:
                    peer = run_peer(model, inputs, n, work, tag, args.peer_size)
                    results[n]["peer"].append(peer)
                    line += (f" | peer ({peer['size']} px) {peer['wall_s']:.1f}s = {peer['rate']:.1f} img/s, "
                             f"peak RSS {peer['rss']:.0f} MiB")
                if args.model_only:
                    alone = run_model_only(model, data_dir, n, work, tag)
                    results[n]["model"].append(alone)
                    line += f" | model only {alone['rate']:.1f} img/s ({alone['how']})"
                print(line, flush=True)
            shutil.rmtree(inputs)

    peer_sizes = {p["size"] for r in results.values() for p in r["peer"]}
    other_size = any(p["size"] != p["checkpoint_size"] for r in results.values() for p in r["peer"])
    ours_cam = next(iter(results.values()))["ours"][0]["cam"]
    print(f"\nimages/s = N / wall seconds of the whole process (Python start, imports, model load, every image "
          f"decoded, explained and written), median of {args.repeat} round(s); 'after imports' = the rate the "
          f"process printed itself, timed from after its imports (includes model load).\npeak RSS = the child's "
          f"high-water resident memory (wait4 ru_maxrss), the largest over the rounds.")
    if other_size:
        print(f"NOTE: --peer-size {args.peer_size}: the peer ran at {args.peer_size} px while infer.py ran at the "
              f"checkpoint's size, so the two did NOT compute the same thing.")
    print(f"\n## Inference speed: python infer.py vs {PEER}\n")
    print("\n".join(f"- {line}" for line in machine))
    print(f"- load average at the end: {load_average()}")
    print(f"- infer.py {' '.join(args.script_args) or 'defaults'} ({ours_cam}); peer: pytorch-grad-cam "
          f"{version('grad-cam')} GradCAM on features[-1], "
          f"batch of 1")
    print(f"- checkpoint {model.name}; peer image size {', '.join(map(str, sorted(peer_sizes))) or '-'} px; "
          f"{args.repeat} alternating round(s) per N\n")
    header = ["N images", "infer.py img/s", "peer img/s", "infer.py / peer", "infer.py peak RSS MiB",
              "peer peak RSS MiB", "infer.py img/s after imports", "peer img/s after imports"]
    rows = []
    for n, result in results.items():
        ours, peer = result["ours"], result["peer"]
        ours_rate, peer_rate = median([r["rate"] for r in ours]), median([r["rate"] for r in peer])
        rows.append([n, f"{ours_rate:.1f}", f"{peer_rate:.1f}" if peer else "-",
                     f"{ours_rate / peer_rate:.2f}x" if peer else "-", f"{max(r['rss'] for r in ours):.0f}",
                     f"{max(r['rss'] for r in peer):.0f}" if peer else "-",
                     f"{median([r['own_rate'] for r in ours]):.1f}",
                     f"{median([r['own_rate'] for r in peer]):.1f}" if peer else "-"])
    print(markdown_table(header, rows))
    if args.model_only:
        print(f"\n## infer.py against the model alone ({next(iter(results.values()))['model'][0]['how']})\n")
        shares = []
        for n, result in results.items():
            whole, alone = median([r["rate"] for r in result["ours"]]), median([r["rate"] for r in result["model"]])
            after = median([r["own_rate"] for r in result["ours"]])
            shares.append([n, f"{whole:.1f}", f"{after:.1f}", f"{alone:.1f}", f"{whole / alone:.0%}",
                           f"{after / alone:.0%}"])
        print(markdown_table(["N images", "infer.py img/s (whole process)", "infer.py img/s after imports",
                              "model only img/s", "whole process / model only", "after imports / model only"],
                             shares))
    if len(results) > 1:
        memory = ", ".join(f"N={n}: {max(r['rss'] for r in result['ours']):.0f} MiB" for n, result in results.items())
        print(f"\ninfer.py peak RSS by input size: {memory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
