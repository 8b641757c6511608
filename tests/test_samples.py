"""The sample images in test_images/: listed and credited, the only ones git may hold, drawn from the shipped
model's own test split, and every one classified correctly by the shipped model, as a user runs it."""
from __future__ import annotations

import csv
import hashlib
import re
from collections import Counter

from conftest import ROOT, run_script

import dataset
from scratch_detector.evaluation import select_samples
from scratch_detector.model import load_checkpoint

FOLDER = ROOT / "test_images"
MAX_PER_CLASS = 6


def listed() -> list[str]:
    """File names listed in test_images/README.md, the one list of samples."""
    names = re.findall(r"^\| `([^`]+)` \|", (FOLDER / "README.md").read_text(encoding="utf-8"), re.M)
    assert names, "test_images/README.md lists no samples"
    return names


def test_samples_are_listed_credited_and_the_only_ones_git_may_hold():
    names = listed()
    assert len(names) == len(set(names))
    classes = Counter(dataset.class_from_filename(name) for name in names)
    assert set(classes) == set(dataset.NEU_CLASSES) and max(classes.values()) <= MAX_PER_CLASS, classes
    assert all((FOLDER / name).is_file() for name in names)
    text = (FOLDER / "README.md").read_text(encoding="utf-8")
    assert "Song" in text and "Northeastern University" in text  # the source is credited
    exceptions = {line[len("!test_images/"):] for line in (ROOT / ".gitignore").read_text().splitlines()
                  if line.startswith("!test_images/")}
    assert "test_images/*" in (ROOT / ".gitignore").read_text().splitlines()
    assert exceptions == set(names) | {"README.md"}, "each listed sample, and nothing else, is let into git"


def test_samples_come_from_the_shipped_models_test_split(neu_dir):
    _, meta = load_checkpoint(ROOT / "model_binary.pth")
    test_split, _ = select_samples(neu_dir, meta, "test")
    digests = {s.path.name: hashlib.sha256(s.path.read_bytes()).hexdigest() for s in test_split}
    for name in listed():
        assert hashlib.sha256((FOLDER / name).read_bytes()).hexdigest() == digests.get(name), name


def test_shipped_model_classifies_every_sample(tmp_path):
    """`python infer.py` on exactly the samples (test_images/ may also hold train.py's copies): all ok, all right."""
    samples = tmp_path / "samples"
    samples.mkdir()
    for name in listed():
        (samples / name).symlink_to(FOLDER / name)
    result = run_script("infer.py", "--input", samples, "--output", tmp_path / "out", cwd=ROOT)  # default model
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "out" / "predictions.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["image"] for r in rows] == sorted(listed())
    wrong = [(r["image"], r["defect_probability"]) for r in rows
             if r["status"] != "ok" or int(r["label"]) != dataset.binary_label(dataset.class_from_filename(r["image"]))]
    assert not wrong, f"misclassified samples: {wrong}"
    assert all((tmp_path / "out" / r["gradcam"]).stat().st_size > 1000 for r in rows)
    assert (tmp_path / "out" / "index.html").is_file()
