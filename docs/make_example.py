"""Make docs/example_overlay.jpg, the picture in the README, from synthetic steel, not from NEU images
(which are not redistributed): a streaky grey texture with and without a thin drawn scratch, run through
`python infer.py` with the shipped model, the two overlays stacked.

    python docs/make_example.py
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def synthetic_pair(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(clean, scratched) 200 x 200 grey images: rolling streaks plus sensor noise; the scratch is 2 px wide."""
    rng = np.random.default_rng(seed)
    streaks = cv2.GaussianBlur(rng.normal(0, 1, (200, 200)), (0, 0), sigmaX=25, sigmaY=2)
    clean = 120 + 80 * streaks + rng.normal(0, 6, (200, 200))
    scratched = clean.copy()
    for y in range(200):
        x = int(70 + 0.25 * y + 6 * np.sin(y / 30))
        scratched[y, x:x + 2] += 45
        scratched[y, x - 1] += 15
    return tuple(np.clip(image, 0, 255).astype(np.uint8) for image in (clean, scratched))


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        images, out = Path(tmp) / "images", Path(tmp) / "out"
        images.mkdir()
        clean, scratched = synthetic_pair()
        cv2.imwrite(str(images / "a_scratch.png"), scratched)
        cv2.imwrite(str(images / "b_clean.png"), clean)
        subprocess.run([sys.executable, str(ROOT / "infer.py"), "--input", str(images), "--output", str(out)],
                       cwd=ROOT, check=True)
        overlays = [cv2.imread(str(out / "gradcam" / f"{name}_gradcam.jpg")) for name in ("a_scratch", "b_clean")]
        target = ROOT / "docs" / "example_overlay.jpg"
        cv2.imwrite(str(target), cv2.vconcat(overlays), [cv2.IMWRITE_JPEG_QUALITY, 90])
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
