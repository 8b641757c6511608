"""Where the time goes: the parts of train.py and infer.py timed one by one, to choose what to speed up.

    python bench/profile_parts.py

Prints, on this machine: a training step at several input sizes and memory formats; a forward pass and a CAM
pass per layer, with and without BatchNorm folded into the convolutions, and with SiLU in place or not; CAM
throughput with one batch at a time on all threads against two batches side by side on one thread each
(infer.py's streams); encoding one overlay as PNG (OpenCV's default filters, infer.py's) and as infer.py's
JPEG; decoding one NEU image; the import time of torch and torchvision, and the time Python's teardown takes
after them. Median of several repeats; random inputs, the committed model for inference.

    python bench/profile_parts.py --model-only [--images 3000]

prints only the model-only rate: what infer.py's model streams do alone (forward, CAM and familiarity score) on
NEU images decoded in advance, with the streams and batch size infer.py fits on this machine: the ceiling that
`python bench/infer_speed.py --model-only` measures infer.py's whole-process rate against.

    python bench/profile_parts.py --fits

prints only the time of what train.py fits after its last epoch (posthoc.fit_after_training: temperature,
threshold, familiarity statistics of the training and validation images and their copies), on the committed
model and its own splits, twice each, alternating: with the familiarity features read from passes stopped at
their layer (train.py now) and from whole passes (before), and checks that both fit the same statistics.

    python bench/profile_parts.py --training-memory

prints only the peak resident memory of train.py's training step (with and without the heatmap loss) and of
smaller ones, each in a fresh process: what a training step needs above the imports.

    python bench/profile_parts.py --compile

prints only train.py's plain training step eager and under torch.compile, two rounds alternating, with the
first call's seconds (the compile, from an empty cache): whether compiling pays within one training.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dataset  # noqa: E402
from gradcam import GradCAM  # noqa: E402
from scratch_detector import explain_loss, familiarity, posthoc  # noqa: E402
from scratch_detector.evaluation import select_samples  # noqa: E402
from scratch_detector.engines.local import ModelStreams  # noqa: E402
from scratch_detector.memory import fit_memory  # noqa: E402
from scratch_detector.model import build_model, fold_batchnorm, load_checkpoint, predict_logits  # noqa: E402
from scratch_detector.overlay import encode_overlay, render_overlay  # noqa: E402
from scratch_detector.pipeline import Decoded  # noqa: E402
from scratch_detector.settings import DEFAULT_CAM, DEFAULT_CAM_LAYER  # noqa: E402

from common import bench_parser, default_data_dir, input_order, machine_lines, neu_images  # noqa: E402


def per_item_ms(work, items: int, repeats: int = 5, warm_up: list | None = None) -> float:
    """Median milliseconds per item of `work()` (which handles `items` items), after one warm-up call (its
    seconds appended to `warm_up` when given: under torch.compile that call compiles)."""
    start = time.perf_counter()
    work()
    if warm_up is not None:
        warm_up.append(time.perf_counter() - start)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / items * 1000


def training_step(size: int, channels_last: bool, batch: int = 32, bf16: bool = False, explained: int = 0,
                  summed: bool = False, compiled: bool = False, warm_up: list | None = None) -> float:
    """ms per image of one AdamW step (forward, backward, update) on random input; bf16: CPU autocast;
    explained: that many images of the batch also get train.py's heatmap loss (explain_loss.heatmap_loss on
    the default CAM layer, which train.py also shapes; a box across the middle): the cost of a batch with it.
    The cross-entropy is backpropagated before the heatmap loss's forward pass, as train.py does; summed: the two
    losses added and backpropagated once instead, as train.py did before (the same gradients, more memory);
    compiled: the forward under torch.compile (inductor; the heatmap loss's double backward is not supported
    there, so only the plain step), its first call's seconds (the compile) appended to `warm_up`."""
    torch.manual_seed(0)
    model, _ = build_model("none")
    capture = explain_loss.LayerCamCapture(model.get_submodule(DEFAULT_CAM_LAYER)) if explained else None
    masks = torch.zeros(explained, size, size)
    masks[:, size // 3:2 * size // 3] = 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    forward = torch.compile(model) if compiled else model
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    labels = torch.randint(0, 2, (batch,))

    def step():
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(images), labels)
            if capture is not None and summed:
                loss = loss + explain_loss.heatmap_loss(model, capture, images[:explained], masks)
            elif capture is not None:
                loss.backward()
                loss = explain_loss.heatmap_loss(model, capture, images[:explained], masks)
        loss.backward()
        optimizer.step()
    return per_item_ms(step, batch, repeats=4, warm_up=warm_up)


def compile_rows(rounds: int = 2) -> list[str]:
    """train.py's plain step (200 px, batch 16, channels_last) eager and under torch.compile, alternating, each
    compiled round with an empty inductor cache, as a first `python train.py` would meet it: is compiling worth
    its first call? Needs a C++ compiler (inductor builds its CPU kernels with one)."""
    import torch._dynamo
    rows = []
    for round_ in range(rounds):
        for compiled in (False, True):
            warm_up = []
            with tempfile.TemporaryDirectory() as cache:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
                torch._dynamo.reset()
                ms = training_step(200, True, 16, compiled=compiled, warm_up=warm_up)
            rows.append(f"- round {round_ + 1}, {'torch.compile' if compiled else 'eager'}: {ms:.1f} ms/img, "
                        f"first call {warm_up[0]:.1f} s")
    return rows


def peak_rss_mib() -> int:
    """This process's resident high-water mark (VmHWM), MiB."""
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) // 1024 for line in handle if line.startswith("VmHWM"))


# train.py's step (200 px, batch 16, channels_last) and smaller ones: (batch, images with the heatmap loss, the
# two losses summed as train.py did before). 4 of 16 is about what a batch with NEU's boxes and the transplant's
# marks has.
TRAINING_MEMORY = ((16, 0, False), (16, 4, True), (16, 4, False), (16, 16, False), (8, 0, False), (8, 2, False))


def training_memory() -> list[str]:
    """One line per TRAINING_MEMORY step: the peak RSS of a fresh process that imports what this script imports
    and then runs that training step 5 times (training_step), against its RSS before the step: the memory of
    the step itself, which no later step of the same shape raises."""
    lines = []
    for batch, explained, summed in TRAINING_MEMORY:
        out = subprocess.run([sys.executable, __file__, "--memory-step", str(batch), str(explained), str(int(summed))],
                             check=True, capture_output=True, text=True).stdout.split()
        before, peak, ms = int(out[0]), int(out[1]), float(out[2])
        what = (f", heatmap loss on {explained} images" if explained else ", no heatmap loss") + \
            (", the two losses summed (train.py before)" if summed else "")
        lines.append(f"- batch {batch}{what}: peak {peak} MiB = {before} before the step + {peak - before} for it; "
                     f"{ms:.1f} ms/img")
    return lines


def import_seconds(statement: str, skip_teardown: bool = False) -> tuple[float, float]:
    """(seconds until `statement` has run, seconds the interpreter then takes to exit) in a fresh child;
    skip_teardown exits as runtime.run_main(..., skip_teardown=True) does."""
    end = "; import os; os._exit(0)" if skip_teardown else ""
    start = time.time()
    done = float(subprocess.run([sys.executable, "-c", f"{statement}; import time; print(time.time(), flush=True){end}"],
                                check=True, capture_output=True, text=True).stdout)
    return done - start, time.time() - done


def cam_images_per_second(model, streams: int, pixels: np.ndarray, rounds: int = 6) -> float:
    """infer.py's ModelStreams (its default CAM) over `rounds` batches per stream; torch's threads
    are shared out between the streams as infer.py does."""
    runner = ModelStreams(model, "per-image", DEFAULT_CAM, DEFAULT_CAM_LAYER, streams, torch.device("cpu"))
    batch = [Decoded(str(i), image) for i, image in enumerate(pixels)]
    try:
        runner.run_batches(iter([batch] * streams), lambda *result: None)  # warm-up
        start = time.perf_counter()
        runner.run_batches(iter([batch] * (streams * rounds)), lambda *result: None)
        return streams * rounds * len(batch) / (time.perf_counter() - start)
    finally:
        runner.close()


def model_only_rate(model_path, data_dir, images: int, rounds: int = 3) -> tuple[float, str]:
    """-> (images/s, how it ran): infer.py's model work alone, through its own ModelStreams with the streams and
    batch size infer.py fits here (memory.fit_memory): forward, CAM and familiarity score on `images` NEU
    images decoded in advance, in bench/infer_speed.py's order (common.input_order). No start-up, decoding,
    overlays or writing. Median of `rounds` passes after a warm-up."""
    model, meta = load_checkpoint(model_path)
    fold_batchnorm(model)
    size = int(meta["image_size"])
    sources = input_order(neu_images(default_data_dir(data_dir)), images)
    units = [Decoded(str(i), dataset.to_model_pixels(dataset.open_image(path, size), size))
             for i, path in enumerate(sources)]
    fit = fit_memory(None, 0, 0, size, DEFAULT_CAM_LAYER, "cpu", torch.get_num_threads())
    batches = [units[i:i + fit.batch_size] for i in range(0, len(units), fit.batch_size)]
    runner = ModelStreams(model, meta["normalization"], DEFAULT_CAM, DEFAULT_CAM_LAYER, fit.streams,
                          torch.device("cpu"), meta.get("familiarity"))
    try:
        runner.run_batches(iter(batches[:4 * runner.count]), lambda *result: None)  # warm-up
        rates = []
        for _ in range(rounds):
            start = time.perf_counter()
            runner.run_batches(iter(batches), lambda *result: None)
            rates.append(len(units) / (time.perf_counter() - start))
        return statistics.median(rates), f"{runner.describe()}, batch {fit.batch_size}"
    finally:
        runner.close()


def fit_times(model_path, data_dir, rounds: int = 2) -> list[str]:
    """Seconds of posthoc.fit_after_training on the checkpoint's own training and validation images, with the
    familiarity features from stopped passes (predict_features, train.py's) and from whole passes
    (predict_logits with features_at, the code before), alternating; the two must fit identical statistics."""
    model, meta = load_checkpoint(model_path)
    data_dir = default_data_dir(data_dir)
    split = {name: select_samples(data_dir, meta, name)[0] for name in ("train", "val")}
    pixels = {name: torch.from_numpy(dataset.load_pixels(items, int(meta["image_size"]), progress=False))
              for name, items in split.items()}
    stopped = posthoc.predict_features

    def whole(net, batch, normalization, batch_size, device, layer):
        return predict_logits(net, batch, normalization, batch_size, device, layer)[1]
    seconds, cutoffs = {}, {}
    try:
        for _ in range(rounds):
            for name, features in (("passes stopped at the layer (train.py)", stopped),
                                   ("whole passes (before)", whole)):
                posthoc.predict_features = features
                start = time.perf_counter()
                fitted = posthoc.fit_after_training(model, pixels["train"], [s.neu_class for s in split["train"]],
                                                    pixels["val"], dataset.labels_of(split["val"]),
                                                    meta["normalization"], 32, "cpu", int(meta.get("seed") or 0))
                seconds.setdefault(name, []).append(time.perf_counter() - start)
                cutoffs.setdefault(name, set()).add(fitted["familiarity"]["cutoff"])
    finally:
        posthoc.predict_features = stopped
    same = len(set.union(*cutoffs.values())) == 1
    lines = [f"\n## train.py's fits after the last epoch ({len(split['train'])} training and {len(split['val'])} "
             f"validation images, {familiarity.COPIES} copies each; seconds, {rounds} rounds alternating)"]
    lines += [f"- familiarity features from {name}: {', '.join(f'{t:.1f}' for t in times)}"
              for name, times in seconds.items()]
    lines.append(f"- the same statistics both ways: {'yes' if same else 'NO'} (cut-off "
                 f"{', '.join(f'{c:.6f}' for c in sorted(set.union(*cutoffs.values())))})")
    return lines


def main(argv=None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--training-only", action="store_true", help="time the training steps only")
    p.add_argument("--model-only", action="store_true", help="print only the model-only rate (see above)")
    p.add_argument("--images", type=int, default=300, help="--model-only: images per pass (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="--model-only: timed passes (default: %(default)s)")
    p.add_argument("--fits", action="store_true", help="time only train.py's fits after the last epoch (see above)")
    p.add_argument("--compile", action="store_true",
                   help="time only the plain training step eager against torch.compile (see compile_rows)")
    p.add_argument("--training-memory", action="store_true",
                   help="peak resident memory of train.py's training step and smaller ones, one process each")
    p.add_argument("--memory-step", nargs=3, type=int, help=argparse.SUPPRESS)  # the child of --training-memory
    args = p.parse_args(argv)
    if args.memory_step:
        before = peak_rss_mib()
        batch, explained, summed = args.memory_step
        ms = training_step(200, True, batch, explained=explained, summed=bool(summed))
        print(before, peak_rss_mib(), ms)
        return 0
    if args.training_memory:
        print("\n".join(machine_lines()))
        print("\n## Training step memory (200 px, channels_last, AdamW; random init, random input)")
        print("\n".join(training_memory()))
        return 0
    if args.compile:
        print("\n".join(machine_lines()))
        print("\n## Plain training step, 200 px, batch 16, channels_last: eager against torch.compile")
        print("\n".join(compile_rows()))
        return 0
    if args.fits:
        print("\n".join(machine_lines()))
        print("\n".join(fit_times(args.model, args.data_dir)))
        return 0
    if args.model_only:
        rate, how = model_only_rate(args.model, args.data_dir, args.images, args.rounds)
        print(f"model only: {rate:.1f} images/s ({args.images} images, {how}, median of {args.rounds})")
        return 0
    print("\n".join(machine_lines()))

    print("\n## Training step (AdamW), ms per image -> images/s; train.py: 200 px, batch 16, fp32, channels_last")
    for size, batch, channels_last, bf16, explained in (
            (200, 8, True, False, 0), (200, 16, True, False, 0), (200, 24, True, False, 0), (200, 32, True, False, 0),
            (200, 16, False, False, 0), (200, 16, True, True, 0), (200, 32, True, True, 0), (144, 16, True, False, 0),
            (112, 16, True, False, 0), (200, 16, True, False, 4), (200, 16, True, False, 16)):
        ms = training_step(size, channels_last, batch, bf16, explained)
        print(f"- {size} px, batch {batch}, {'channels_last' if channels_last else 'NCHW'}"
              f"{', bf16 autocast' if bf16 else ''}{f', heatmap loss on {explained} images' if explained else ''}: "
              f"{ms:.1f} ms/img = {1000 / ms:.1f} img/s")
    if args.training_only:
        return 0

    model, meta = load_checkpoint(args.model)
    size = int(meta["image_size"])
    images = torch.randn(32, 3, size, size).contiguous(memory_format=torch.channels_last)
    print(f"\n## Inference at {size} px, batch 32, ms per image")
    for folded in (False, True):
        if folded:
            fold_batchnorm(model)
        with torch.no_grad():
            forward = per_item_ms(lambda: model(images), 32)
        cams = ", ".join(f"{method} {layer} {per_item_ms(lambda: GradCAM(model, layer, method)(images, 1), 32):.1f}"
                         for method, layer in (("gradcam", "features.8"), ("layercam", "features.2"),
                                               ("layercam", "features.1"), ("layercam", "features.0")))
        print(f"- BatchNorm {'folded' if folded else 'as trained'}: forward {forward:.1f}; CAM pass: {cams}")

    def layercam_ms_one_thread():
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        ms = per_item_ms(lambda: GradCAM(model, DEFAULT_CAM_LAYER, DEFAULT_CAM)(images[:16], 1), 16)
        torch.set_num_threads(before)
        return ms
    silus = [m for m in model.modules() if isinstance(m, torch.nn.SiLU)]
    timings = {}
    for _ in range(3):  # alternate, so a change in machine load hits both
        for inplace in (True, False):
            for m in silus:
                m.inplace = inplace
            timings.setdefault(inplace, []).append(layercam_ms_one_thread())
    print(f"- {DEFAULT_CAM} {DEFAULT_CAM_LAYER} (folded), batch 16 on 1 thread: SiLU in place {statistics.median(timings[True]):.1f}, "
          f"not in place (infer.py) {statistics.median(timings[False]):.1f}")

    threads = torch.get_num_threads()
    if threads >= 2:
        print(f"\n## {DEFAULT_CAM} on {DEFAULT_CAM_LAYER} (folded), batches of 16 at {size} px, images/s (median of 3)")
        pixels = np.random.default_rng(0).integers(0, 256, (16, size, size, 3), dtype=np.uint8)
        for streams in (1, 2):
            rate = statistics.median(cam_images_per_second(model, streams, pixels) for _ in range(3))
            print(f"- {streams} stream(s) x {threads // streams} thread(s): {rate:.1f} images/s")

    sample = next(iter(sorted((default_data_dir(args.data_dir)).rglob("*.jpg"))))
    decode = per_item_ms(lambda: dataset.to_model_pixels(dataset.open_image(sample, size), size), 1, repeats=50)
    display = np.asarray(dataset.open_image(sample, size))
    heatmap = GradCAM(model, DEFAULT_CAM_LAYER, DEFAULT_CAM)(images[:1], 1)[0].numpy()
    overlay = render_overlay(display, heatmap, "defect", 0.5)
    draw = per_item_ms(lambda: render_overlay(display, heatmap, "defect", 0.5), 1, repeats=50)
    libpng_default = [cv2.IMWRITE_PNG_COMPRESSION, 1]
    default_png = per_item_ms(lambda: cv2.imencode(".png", overlay, libpng_default), 1, repeats=50)
    size_default = len(cv2.imencode(".png", overlay, libpng_default)[1])
    print(f"\n## One {overlay.shape[1]}x{overlay.shape[0]} overlay of {sample.name}, ms (file size)")
    print(f"- decode + resize the image: {decode:.2f}; draw the overlay: {draw:.2f}")
    print(f"- PNG level 1, all row filters: {default_png:.2f} ({size_default // 1024} KiB)")
    for file_format in ("png", "jpg"):
        ms = per_item_ms(lambda: encode_overlay(overlay, file_format), 1, repeats=50)
        print(f"- infer.py --overlay-format {file_format}: {ms:.2f} ({len(encode_overlay(overlay, file_format)) // 1024} KiB)")

    print("\n## Start-up and exit, s (a fresh Python each)")
    for statement in ("import torch", "import torch, torchvision"):
        load, teardown = import_seconds(statement)
        skipped = import_seconds(statement, skip_teardown=True)[1]
        print(f"- {statement}: {load:.1f}; then exit: {teardown:.2f} with Python's teardown, {skipped:.2f} without")
    return 0


if __name__ == "__main__":
    sys.exit(main())
