"""Where the time goes: the parts of train.py and infer.py timed one by one, to choose what to speed up.

    python bench/profile_parts.py

Prints, on this machine: a training step at several input sizes and memory formats; a forward pass and a CAM
pass per layer, with and without BatchNorm folded into the convolutions; PNG encoding of one overlay with
OpenCV's default filters and with the one infer.py uses; decoding one NEU image; and the import time of
torch and torchvision. Median of several repeats; random inputs, the committed model for inference.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dataset  # noqa: E402
from gradcam import GradCAM, encode_png, render_overlay  # noqa: E402
from model import build_model, fold_batchnorm, load_checkpoint  # noqa: E402

from common import default_data_dir, machine_lines  # noqa: E402


def per_item_ms(work, items: int, repeats: int = 5) -> float:
    """Median milliseconds per item of `work()` (which handles `items` items), after one warm-up call."""
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / items * 1000


def training_step(size: int, channels_last: bool, batch: int = 32) -> float:
    torch.manual_seed(0)
    model, _ = build_model("none")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    labels = torch.randint(0, 2, (batch,))

    def step():
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return per_item_ms(step, batch, repeats=4)


def import_seconds(statement: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True)
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "model_binary.pth"))
    p.add_argument("--data-dir", help="NEU data for the decode timing (default: $NEU_DATA_DIR, else ../shared/neu-det)")
    args = p.parse_args(argv)
    print("\n".join(machine_lines()))

    print("\n## Training step (batch 32, AdamW), ms per image -> images/s")
    for size, channels_last in ((112, True), (112, False), (160, True), (224, True)):
        ms = training_step(size, channels_last)
        print(f"- {size} px, {'channels_last' if channels_last else 'NCHW'}: {ms:.1f} ms/img = {1000 / ms:.1f} img/s")

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
                                               ("layercam", "features.1")))
        print(f"- BatchNorm {'folded' if folded else 'as trained'}: forward {forward:.1f}; CAM pass: {cams}")

    sample = next(iter(sorted((default_data_dir(args.data_dir)).rglob("*.jpg"))))
    decode = per_item_ms(lambda: dataset.to_model_pixels(dataset.open_image(sample, size), size), 1, repeats=50)
    display = np.asarray(dataset.open_image(sample, size))
    heatmap = GradCAM(model, "features.1", "layercam")(images[:1], 1)[0].numpy()
    overlay = render_overlay(display, heatmap, "defect", 0.5)
    draw = per_item_ms(lambda: render_overlay(display, heatmap, "defect", 0.5), 1, repeats=50)
    default_png = per_item_ms(lambda: cv2.imencode(".png", overlay, [cv2.IMWRITE_PNG_COMPRESSION, 1]), 1, repeats=50)
    ours_png = per_item_ms(lambda: encode_png(overlay), 1, repeats=50)
    size_default = len(cv2.imencode(".png", overlay, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1])
    print(f"\n## One {display.shape[1]}x{display.shape[0]} image ({sample.name}), ms")
    print(f"- decode + resize: {decode:.2f}; draw overlay: {draw:.2f}")
    print(f"- PNG level 1, all row filters: {default_png:.2f} ({size_default // 1024} KiB); "
          f"infer.py's encode_png (level 1, 'sub' filter): {ours_png:.2f} ({len(encode_png(overlay)) // 1024} KiB)")

    torch_s = import_seconds("import torch")
    both_s = import_seconds("import torch, torchvision")
    print(f"\n## Start-up\n- import torch: {torch_s:.1f} s; import torch, torchvision: {both_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
