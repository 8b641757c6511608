"""NEU surface-defect data: finding images, labels, the split, and the one preprocessing function.

Everything that turns a file into model input lives here, so that train.py, infer.py and evaluate.py
cannot drift apart: they all call `open_image` + `to_model_pixels` + `normalize` (or `preprocess`, which
is those three in a row).
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from scratch_detector.runtime import UserError, write_csv

# ---------------------------------------------------------------------------------------------------------
# Classes and labels: the one place that maps NEU class names to the binary task.
# ---------------------------------------------------------------------------------------------------------
NEU_CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
NEU_CODES = {"cr": "crazing", "in": "inclusion", "pa": "patches", "ps": "pitted_surface",
             "rs": "rolled-in_scale", "sc": "scratches"}  # NEU-CLS file-name prefixes
DEFECT_CLASS = "scratches"
BINARY_CLASSES = ["non-defect", "defect"]  # index == label
# A non-defect image from a labels file (read_labels): its texture is not one of NEU's five, so it is a class of
# its own for the split's stratification and the familiarity statistics.
OTHER_CLASS = "other"
CLASSES = NEU_CLASSES + (OTHER_CLASS,)
# labels.csv's label column (case and spaces ignored) -> binary label; the review page writes the first two
LABEL_WORDS = {"defect": 1, "non-defect": 0, "1": 1, "0": 0, "scratch": 1, "not a scratch": 0}


def binary_label(neu_class: str) -> int:
    """Scratches are the defect we detect (1); the other five NEU textures, and OTHER_CLASS, are non-defect (0)."""
    if neu_class not in CLASSES:
        raise ValueError(f"unknown NEU class {neu_class!r}")
    return int(neu_class == DEFECT_CLASS)


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("per-image", "imagenet")  # how pixels become model input; the checkpoint records which
MIN_STD = 1.0  # grey levels: a flat image is standardised to zeros, not blown up to noise
NATIVE_SIZE = 200  # NEU's images are 200 x 200 pixels
DEFAULT_DATA_DIR = "data/NEU-DET"
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)  # train, val, test
SPLITS = ("train", "val", "test")


# open_image refuses images over Pillow's pixel limit itself (an error row, not a warning); a warnings
# filter set per call would not be thread-safe, and infer.py decodes in a reader thread.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class DataError(UserError):
    """A problem with the data folder, reported to the user as one line."""


# ---------------------------------------------------------------------------------------------------------
# Reading one image: any mode to 8-bit RGB, resized to the model size without cropping.
# ---------------------------------------------------------------------------------------------------------
def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def walk_images(folder: str | Path, skip: Path | None = None, recursive: bool = True) -> Iterator[str]:
    """Relative paths (posix) of the image files under `folder` (at any depth, or in `folder` itself only),
    in no particular order. Hidden folders and files are left out, as is `skip` (infer.py's own overlay folder
    when --output lies inside --input), and anything that is not a regular file (a FIFO named x.jpg would block
    the reader). The one way to list images: the NEU layouts, and inference's listing."""
    skip = skip.resolve() if skip is not None else None
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if recursive and not d.startswith(".") and (Path(root) / d).resolve() != skip]
        prefix = Path(root).relative_to(folder).as_posix()
        prefix = "" if prefix == "." else prefix + "/"
        for name in files:
            if is_image_file(name) and not name.startswith(".") and os.path.isfile(os.path.join(root, name)):
                yield prefix + name


_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _gray8(values: np.ndarray, mode: str, unit_floats: bool) -> np.ndarray:
    """Grey levels of a 16-bit, 32-bit or float image (float64) -> uint8, rescaled rather than clipped at 255:
    16/32-bit full range to 8-bit full range, floats in [0, 1] (unit_floats) to [0, 255], other floats as
    they are; NaN becomes 0."""
    if unit_floats:
        values = values * 255.0
    elif mode != "F":
        values = values / 257.0  # 16-bit full range -> 8-bit full range
    return np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)


def _check_pixel_limit(image: Image.Image) -> None:
    """Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) as an error, before any pixel is decoded."""
    if Image.MAX_IMAGE_PIXELS and image.width * image.height > Image.MAX_IMAGE_PIXELS:
        raise Image.DecompressionBombError(
            f"image of {image.width}x{image.height} pixels exceeds the limit of {Image.MAX_IMAGE_PIXELS} "
            f"pixels (Pillow's MAX_IMAGE_PIXELS: a decompression bomb, or a frame to split before inference)")


def _to_rgb8(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB. 16/32-bit and float images are rescaled, not clipped at 255."""
    if image.mode in _HIGH_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64)
        unit_floats = bool(image.mode == "F" and values.size and np.nanmax(values) <= 1.0)
        return Image.fromarray(_gray8(values, image.mode, unit_floats), mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def open_image(path: str | Path, image_size: int) -> Image.Image:
    """Decode an image file into 8-bit RGB.

    Large JPEGs are decoded at a reduced scale (never below `image_size`) so that a 6000x4000 photo
    never sits in memory at full size; Pillow's decompression-bomb limit is an error, not a warning.
    """
    with Image.open(path) as image:
        _check_pixel_limit(image)
        image.draft("RGB", (image_size, image_size))
        image = ImageOps.exif_transpose(image)
        image.load()
        return _to_rgb8(image)


# ---------------------------------------------------------------------------------------------------------
# Reading a large frame at native scale, for tiled inference (infer.py cuts it into NATIVE_SIZE tiles).
# ---------------------------------------------------------------------------------------------------------
_BAND_ROWS = 256  # rows converted at a time: a 16-bit frame is never held as float64 (8 bytes a pixel) whole


def oriented_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image as open_image and open_frame return it: EXIF orientations 5-8 swap the
    two. Reads the header only, except for a PNG, whose EXIF chunk may follow the pixels (so Pillow decodes
    it): call this for small images."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)  # ExifTags.Base.Orientation
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _gray8_in_bands(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float image -> 8-bit 'L' with _to_rgb8's scaling, a band of rows at a time."""
    width, height = image.size
    bands = [(top, min(height, top + _BAND_ROWS)) for top in range(0, height, _BAND_ROWS)]
    unit_floats = False
    if image.mode == "F":  # values in [0, 1] are scaled to [0, 255], as _to_rgb8 does
        peaks = [np.nanmax(band) for top, bottom in bands
                 if (band := np.asarray(image.crop((0, top, width, bottom)), dtype=np.float64)).size
                 and not np.isnan(band).all()]
        unit_floats = bool(peaks) and max(peaks) <= 1.0
    out = np.empty((height, width), np.uint8)
    for top, bottom in bands:
        out[top:bottom] = _gray8(np.asarray(image.crop((0, top, width, bottom)), dtype=np.float64), image.mode,
                                 unit_floats)
    return Image.fromarray(out, mode="L")


def _to_frame8(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 'L' for single-channel images (1 byte a pixel), else 'RGB' exactly as _to_rgb8.
    'L' tiles become the same model pixels as the 'RGB' image _to_rgb8 would give (its three channels equal)."""
    if image.mode in ("L", "RGB"):
        return image  # as decoded: convert() would copy it
    if image.mode == "1":
        return image.convert("L")
    if image.mode in _HIGH_DEPTH_MODES:
        return _gray8_in_bands(image)
    if image.mode == "LA":  # alpha over black, as _to_rgb8; the composite of a grey image is grey
        return _to_rgb8(image).getchannel(0)
    return _to_rgb8(image)


def open_frame(path: str | Path) -> Image.Image:
    """Decode an image at native resolution for tiling: 'L' (1 byte a pixel) when it has one channel, else
    'RGB' (Pillow keeps that at 4 bytes a pixel); EXIF orientation applied in place, without a copy.

    The limit is Pillow's decompression-bomb limit, Image.MAX_IMAGE_PIXELS (89,478,485 pixels by default,
    e.g. 20000 x 4473): a larger image is refused with DecompressionBombError before any pixel is decoded,
    so a frame costs at most that many pixels' bytes (1 grey, 4 colour), whatever its header claims.
    """
    with Image.open(path) as image:
        _check_pixel_limit(image)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return _to_frame8(image)


def tile_model_pixels(tile: np.ndarray, image_size: int) -> np.ndarray:
    """A tile cut from an open_frame image (T x T grey, or T x T x 3) -> uint8 S x S x 3 model pixels, resized
    exactly as to_model_pixels resizes a whole image (a grey tile's three channels are equal, as _to_rgb8's)."""
    pixels = to_model_pixels(Image.fromarray(tile), image_size)
    return np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels


def to_model_pixels(image: Image.Image, image_size: int) -> np.ndarray:
    """Resize the whole image to image_size x image_size (no crop: defects reach the border) -> uint8 HxWx3.
    A writable copy: torch warns about (and must not share) the read-only buffer np.asarray gives."""
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
    return np.array(image, dtype=np.uint8)


_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0


def normalize(pixels: np.ndarray | torch.Tensor, normalization: str) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in channels_last memory.

    'per-image': each image minus its own mean, divided by its own standard deviation (over all pixels and
    channels): a camera's gain and offset cancel exactly, so brightness and contrast of another line's
    lamp or sensor do not move the prediction. 'imagenet': the fixed ImageNet channel mean/std.
    """
    batch = torch.as_tensor(pixels).permute(0, 3, 1, 2).float()
    if normalization == "per-image":
        flat = batch.flatten(1)
        mean = flat.mean(1).view(-1, 1, 1, 1)
        std = flat.std(1, correction=0).clamp(min=MIN_STD).view(-1, 1, 1, 1)
        batch = (batch - mean) / std
    elif normalization == "imagenet":
        batch = (batch - _MEAN) / _STD
    else:
        raise ValueError(f"unknown normalization {normalization!r}; choose from {', '.join(NORMALIZATIONS)}")
    return batch.contiguous(memory_format=torch.channels_last)


def preprocess(path: str | Path, image_size: int, normalization: str) -> torch.Tensor:
    """The one preprocessing function: file -> normalised (3, S, S) tensor, as train/infer/evaluate see it."""
    return normalize(to_model_pixels(open_image(path, image_size), image_size)[None], normalization)[0]


# ---------------------------------------------------------------------------------------------------------
# Finding images in the layouts people download.
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    path: Path          # absolute path of the image file
    relpath: str        # path relative to the data folder, with "/" separators (the sample's name)
    neu_class: str

    @property
    def label(self) -> int:
        return binary_label(self.neu_class)


def _squash(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


def class_from_folder(name: str) -> str | None:
    """'Scratches', 'sc', 'Rolled', 'rolled-in_scale', 'PS' ... -> NEU class, or None if no single match."""
    key = _squash(name)
    if len(key) < 2:
        return None
    if key in NEU_CODES:
        return NEU_CODES[key]
    matches = [c for c in NEU_CLASSES if _squash(c).startswith(key) or key.startswith(_squash(c))]
    return matches[0] if len(matches) == 1 else None


def class_from_filename(name: str) -> str | None:
    """'scratches_12.jpg' (NEU-DET) or 'Sc_12.bmp' (NEU-CLS) -> NEU class; None if the name says nothing."""
    stem = Path(name).stem.lower()
    for neu_class in NEU_CLASSES:
        if re.fullmatch(re.escape(neu_class) + r"[_\- ]?\(?\d+\)?", stem):
            return neu_class
    m = re.fullmatch(r"([a-z]{2})[_\- ]?\(?\d+\)?", stem)
    return NEU_CODES.get(m.group(1)) if m else None


def _hidden(name: str) -> bool:
    """macOS zips carry __MACOSX/ and ._name.jpg resource forks: not images, whatever their extension."""
    return name.startswith(".") or name == "__MACOSX"


def _image_files(folder: Path) -> list[Path]:
    return sorted(folder / name for name in walk_images(folder, recursive=False))


def _samples_by_name(root: Path, files: list[Path]) -> list[Sample]:
    samples = []
    for path in files:
        neu_class = class_from_filename(path.name)
        if neu_class is None:
            raise DataError(f"cannot tell the NEU class of {path}: its name starts with no class name or code")
        samples.append(Sample(path, path.relative_to(root).as_posix(), neu_class))
    return samples


def _samples_by_folder(root: Path) -> list[Sample]:
    samples = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not _hidden(d)]
        folder = Path(folder)
        neu_class = class_from_folder(folder.name)
        if neu_class is None:
            continue
        for name in sorted(files):
            if not is_image_file(name) or _hidden(name):
                continue
            named = class_from_filename(name)
            path = folder / name
            if named is not None and named != neu_class:
                raise DataError(f"ambiguous class for {path}: folder says {neu_class}, file name says {named}")
            samples.append(Sample(path, path.relative_to(root).as_posix(), neu_class))
    return sorted(samples, key=lambda s: s.relpath)


def _child(folder: Path, name: str) -> Path | None:
    for child in folder.iterdir():
        if child.is_dir() and child.name.lower() == name:
            return child
    return None


def find_samples(data_dir: str | Path, require_all_classes: bool = True, verbose: bool = True
                 ) -> tuple[list[Sample], str]:
    """Find every NEU image under data_dir; returns (samples sorted by relpath, layout name).

    Layouts, detected in this order:
      NEU-DET  IMAGES/<class>_<n>.jpg (+ ANNOTATIONS/*.xml)
      NEU-CLS  one flat folder of <Cr|In|Pa|PS|RS|Sc>_<n>.bmp (or <class>_<n>.jpg)
      folders  one subfolder per class, any spelling, at any depth (e.g. under train/ valid/ test/)
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder not found: {root} (use --data-dir or NEU_DATA_DIR)")
    root = root.resolve()
    images_dir = _child(root, "images")
    # IMAGES/ may instead hold one folder per class (Kaggle's NEU-DET): then the folder rule below applies
    det_images = _image_files(images_dir) if images_dir and _child(root, "annotations") else []
    flat_images = _image_files(root)
    if det_images:
        layout, samples = "NEU-DET", _samples_by_name(root, det_images)
    elif flat_images:
        layout, samples = "NEU-CLS", _samples_by_name(root, flat_images)
    else:
        layout, samples = "class folders", _samples_by_folder(root)
    if not samples:
        raise DataError(f"no NEU images found under {root} (expected IMAGES/ + ANNOTATIONS/, "
                        f"a flat folder of Cr_/In_/Pa_/PS_/RS_/Sc_ images, or one folder per class)")
    counts = {c: sum(s.neu_class == c for s in samples) for c in NEU_CLASSES}
    missing = [c for c, n in counts.items() if n == 0]
    if missing and require_all_classes:
        raise DataError(f"class {', '.join(missing)} missing under {root} (layout {layout})")
    if verbose:
        listed = ", ".join(f"{c} {n}" for c, n in counts.items())
        print(f"data: {root} ({layout}): {len(samples)} images: {listed}")
    return samples, layout


def read_labels(labels_file: str | Path, data_dir: str | Path) -> list[Sample]:
    """A labelled list (the review page's labels.csv): header `image,label`, `image` relative to data_dir (the
    folder infer.py read), `label` one of LABEL_WORDS. A scratch becomes DEFECT_CLASS, anything else
    OTHER_CLASS. A missing image, an unknown label or an image listed twice is a DataError naming the line."""
    import csv

    labels_file, root = Path(labels_file).expanduser(), Path(data_dir).expanduser()
    if not labels_file.is_file():
        raise DataError(f"labels file not found: {labels_file}")
    if not root.is_dir():
        raise DataError(f"image folder not found: {root} (--data-dir: the folder the labels' paths are relative to)")
    root = root.resolve()
    samples, seen = [], {}
    with open(labels_file, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [h.strip().lower() for h in next(reader, [])]
        if header[:2] != ["image", "label"]:
            raise DataError(f"{labels_file} line 1: the header must be 'image,label', not {','.join(header)!r}")
        for row in reader:
            where = f"{labels_file} line {reader.line_num}"
            if not any(field.strip() for field in row):
                continue
            if len(row) < 2:
                raise DataError(f"{where}: needs an image and a label, got {row!r}")
            name, word = row[0], " ".join(row[1].split()).lower()
            if word not in LABEL_WORDS:
                raise DataError(f"{where}: label {row[1]!r} is none of {', '.join(repr(w) for w in LABEL_WORDS)}")
            path = (root / name).resolve()
            if not path.is_relative_to(root):
                raise DataError(f"{where}: {name!r} is outside {root}")
            if not path.is_file():
                raise DataError(f"{where}: image not found: {path} (paths are relative to {root}; pass "
                                f"--data-dir the folder that infer.py read)")
            if path in seen:
                raise DataError(f"{where}: {name!r} is already listed on line {seen[path]}")
            seen[path] = reader.line_num
            samples.append(Sample(path, path.relative_to(root).as_posix(),
                                  DEFECT_CLASS if LABEL_WORDS[word] else OTHER_CLASS))
    if not samples:
        raise DataError(f"{labels_file} lists no images")
    return sorted(samples, key=lambda s: s.relpath)


def first_per_class(samples: list[Sample], limit: int) -> list[Sample]:
    """The first `limit` samples (by name) of each class, for quick runs; limit 0 keeps everything."""
    if not limit:
        return samples
    return sorted((s for c in CLASSES for s in [x for x in samples if x.neu_class == c][:limit]),
                  key=lambda s: s.relpath)


def resolve_data_dir(cli_value: str | None, labels: str | Path | None = None) -> Path:
    """--data-dir, else (with a labels file) the labels file's folder, else $NEU_DATA_DIR, else data/NEU-DET."""
    if labels and not cli_value:
        return Path(labels).expanduser().parent
    return Path(cli_value or os.environ.get("NEU_DATA_DIR") or DEFAULT_DATA_DIR)


# ---------------------------------------------------------------------------------------------------------
# The split: stratified by NEU class, seeded, byte-identical files kept together.
# ---------------------------------------------------------------------------------------------------------
def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def split_samples(samples: list[Sample], seed: int, fractions=SPLIT_FRACTIONS) -> dict[str, list[Sample]]:
    """Stratified train/val/test split. Byte-identical files form one group and land in the same split,
    so a duplicate can never leak a test image into training. Depends only on file contents, names and seed."""
    groups: dict[str, list[Sample]] = {}
    for sample in sorted(samples, key=lambda s: s.relpath):
        group = groups.setdefault(file_digest(sample.path), [])
        if group and group[0].neu_class != sample.neu_class:
            raise DataError(f"{sample.path} is byte-identical to {group[0].path} but labelled "
                            f"{sample.neu_class}, not {group[0].neu_class}: remove one of them")
        group.append(sample)
    rng = np.random.default_rng(seed)
    result: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    for neu_class in CLASSES:
        class_groups = [g for g in groups.values() if g[0].neu_class == neu_class]
        order = rng.permutation(len(class_groups))
        total = sum(len(g) for g in class_groups)
        wanted_test = round(total * fractions[2])
        wanted_val = round(total * fractions[1])
        taken = {"test": 0, "val": 0}
        for index in order:
            group = class_groups[index]
            if taken["test"] < wanted_test:
                split = "test"
            elif taken["val"] < wanted_val:
                split = "val"
            else:
                split = "train"
            if split != "train":
                taken[split] += len(group)
            result[split].extend(group)
    return {name: sorted(items, key=lambda s: s.relpath) for name, items in result.items()}


def cross_validation_fold(splits: dict[str, list[Sample]], fold: int, folds: int, seed: int) -> dict[str, list[Sample]]:
    """The same test split; train + validation pooled and dealt into `folds` stratified folds, fold `fold`
    (0-based) becoming the validation split. Byte-identical files stay in one fold, as in split_samples."""
    if not 0 <= fold < folds or folds < 2:
        raise ValueError(f"fold must be in 0..{folds - 1} and folds >= 2, not {fold} of {folds}")
    groups: dict[str, list[Sample]] = {}
    for sample in sorted(splits["train"] + splits["val"], key=lambda s: s.relpath):
        groups.setdefault(file_digest(sample.path), []).append(sample)
    rng = np.random.default_rng([seed, folds])
    result: dict[str, list[Sample]] = {"train": [], "val": [], "test": list(splits["test"])}
    for neu_class in CLASSES:
        class_groups = [g for g in groups.values() if g[0].neu_class == neu_class]
        for position, index in enumerate(rng.permutation(len(class_groups))):
            result["val" if position % folds == fold else "train"].extend(class_groups[index])
    return {name: sorted(items, key=lambda s: s.relpath) for name, items in result.items()}


def recorded_splits(samples: list[Sample], record: dict) -> dict[str, list[Sample]]:
    """The splits a checkpoint recorded (its "split": seed, optional max_per_class and cross-validation fold),
    re-derived from the same samples; a DataError when the test split is not the recorded one (other data)."""
    samples = first_per_class(samples, int(record.get("max_per_class", 0)))
    seed = int(record.get("seed", 0))
    splits = split_samples(samples, seed)
    if record.get("cv_folds"):
        splits = cross_validation_fold(splits, int(record["cv_fold"]), int(record["cv_folds"]), seed)
    if record.get("test_digest") and split_digest(splits["test"]) != record["test_digest"]:
        raise DataError("the test split re-derived from these images differs from the one the model was trained "
                        "with (other data?)")
    return splits


def split_record(meta: dict, neu: bool = True) -> dict:
    """The split a checkpoint (its metadata) was trained with, for recorded_splits. A fine-tuned model (train.py
    --init) keeps its starting model's NEU split under "neu_split": neither model trained on that test split;
    neu=False asks for the split of the images it was trained on (a labels file's)."""
    if neu and meta.get("neu_split"):
        return meta["neu_split"]
    record = dict(meta.get("split") or {})
    record.setdefault("seed", meta.get("seed", 0))
    record.setdefault("max_per_class", int((meta.get("hyperparameters") or {}).get("max_per_class", 0)))
    return record


def split_digest(samples: list[Sample]) -> str:
    """A short fingerprint of a list of samples, so evaluate.py can check it re-derived the same split."""
    return hashlib.sha256("\n".join(s.relpath for s in samples).encode()).hexdigest()[:16]


def write_splits_csv(splits: dict[str, list[Sample]], path: Path) -> None:
    rows = sorted((s.relpath, s.neu_class, s.label, name) for name, items in splits.items() for s in items)
    write_csv(path, ["image", "neu_class", "label", "split"], rows)


# ---------------------------------------------------------------------------------------------------------
# Decode once, keep in memory.
# ---------------------------------------------------------------------------------------------------------
def load_pixels(samples: list[Sample], image_size: int, progress: bool = True) -> np.ndarray:
    """Decode every sample once into a uint8 (N, S, S, 3) array (N x S x S x 3 bytes).
    The progress bar goes to stdout like the scripts' other bars: stderr is kept for warnings and errors."""
    from tqdm import tqdm

    pixels = np.empty((len(samples), image_size, image_size, 3), dtype=np.uint8)
    bar = tqdm(samples, desc="decode", unit="img", disable=not progress, leave=False, file=sys.stdout)
    for i, sample in enumerate(bar):
        try:
            pixels[i] = to_model_pixels(open_image(sample.path, image_size), image_size)
        except Exception as error:  # Pillow raises many types for a damaged file; the user needs the path
            reason = " ".join(str(error).split()) or type(error).__name__
            raise DataError(f"cannot read {sample.path}: {reason}") from None
    return pixels


def labels_of(samples: list[Sample]) -> np.ndarray:
    return np.array([s.label for s in samples], dtype=np.int64)
