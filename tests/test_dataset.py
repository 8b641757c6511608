"""Finding NEU images in the layouts people download, labels, the split, and the one preprocessing path."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
from scratch_detector import pipeline
from conftest import run_script, save_image, synthetic_image
from dataset import NEU_CLASSES, DataError

# (class, NEU-CLS file-name code); class i gets i + 1 images so that per-class counts are all different
CODES = [("crazing", "Cr"), ("inclusion", "In"), ("patches", "Pa"), ("pitted_surface", "PS"),
         ("rolled-in_scale", "RS"), ("scratches", "Sc")]


def expected_count_line(root, layout, counts):
    listed = ", ".join(f"{c} {counts[c]}" for c in NEU_CLASSES)
    return f"data: {root.resolve()} ({layout}): {sum(counts.values())} images: {listed}"


def classes_by_relpath(samples):
    return {s.relpath: s.neu_class for s in samples}


# ---------------------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("images, annotations", [("IMAGES", "ANNOTATIONS"), ("images", "Annotations")])
def test_neu_det_layout(tmp_path, capsys, images, annotations):
    expected = {}
    for i, (neu_class, _) in enumerate(CODES):
        for n in range(1, i + 2):
            save_image(tmp_path / images / f"{neu_class}_{n}.jpg", seed=10 * i + n, mode="RGB")
            expected[f"{images}/{neu_class}_{n}.jpg"] = neu_class
    (tmp_path / annotations).mkdir()
    (tmp_path / annotations / "crazing_1.xml").write_text("<annotation/>")
    (tmp_path / images / "readme.txt").write_text("not an image")

    samples, layout = dataset.find_samples(tmp_path)

    assert layout == "NEU-DET"
    assert classes_by_relpath(samples) == expected
    assert [s.relpath for s in samples] == sorted(expected)
    assert all(s.path == (tmp_path / s.relpath).resolve() and s.path.is_file() for s in samples)
    counts = {c: i + 1 for i, (c, _) in enumerate(CODES)}
    assert capsys.readouterr().out.strip() == expected_count_line(tmp_path, "NEU-DET", counts)


def test_neu_cls_flat_layout(tmp_path, capsys):
    expected = {}
    for i, (neu_class, code) in enumerate(CODES):
        for n in range(1, i + 2):
            save_image(tmp_path / f"{code}_{n}.bmp", seed=10 * i + n)
            expected[f"{code}_{n}.bmp"] = neu_class
    # NEU-DET style names in a flat folder, "crazing (3)" names and an upper-case extension work too
    save_image(tmp_path / "scratches_99.jpg", seed=99)
    expected["scratches_99.jpg"] = "scratches"
    save_image(tmp_path / "Cr_7.BMP", seed=98)
    expected["Cr_7.BMP"] = "crazing"
    save_image(tmp_path / "crazing (3).png", seed=97)
    expected["crazing (3).png"] = "crazing"

    samples, layout = dataset.find_samples(tmp_path)

    assert layout == "NEU-CLS"
    assert classes_by_relpath(samples) == expected
    counts = {c: i + 1 for i, (c, _) in enumerate(CODES)}
    counts["scratches"] += 1
    counts["crazing"] += 2
    assert capsys.readouterr().out.strip() == expected_count_line(tmp_path, "NEU-CLS", counts)


FOLDER_SPELLINGS = {
    "Scratches": "scratches", "scratches": "scratches", "Sc": "scratches", "scratch": "scratches",
    "rolled-in_scale": "rolled-in_scale", "Rolled": "rolled-in_scale", "RS": "rolled-in_scale",
    "Rolled-in Scale": "rolled-in_scale", "PS": "pitted_surface", "Pitted": "pitted_surface",
    "pitted_surface": "pitted_surface", "Crazing": "crazing", "cr": "crazing", "Inclusion": "inclusion",
    "In": "inclusion", "Patches": "patches", "pa": "patches",
}


@pytest.mark.parametrize("nested", [False, True])
def test_class_folder_layout_any_spelling(tmp_path, capsys, nested):
    expected = {}
    for i, (folder, neu_class) in enumerate(FOLDER_SPELLINGS.items()):
        parent = ("train", "valid", "test")[i % 3] if nested else f"set{i}"  # one folder per spelling
        for n in range(2):
            relpath = f"{parent}/{folder}/img_{i}_{n}.png"
            save_image(tmp_path / relpath, seed=100 * i + n)
            expected[relpath] = neu_class
    save_image(tmp_path / "train" / "unrelated" / "x_1.png")  # a folder that names no class: ignored

    samples, layout = dataset.find_samples(tmp_path)

    assert layout == "class folders"
    assert classes_by_relpath(samples) == expected
    counts = {c: 2 * sum(v == c for v in FOLDER_SPELLINGS.values()) for c in NEU_CLASSES}
    assert capsys.readouterr().out.strip() == expected_count_line(tmp_path, "class folders", counts)


def test_kaggle_neu_det_with_class_folders_inside_images(tmp_path):
    """Kaggle's NEU-DET: IMAGES/<class>/<class>_<n>.jpg beside ANNOTATIONS/; the class folders decide."""
    for i, (neu_class, _) in enumerate(CODES):
        save_image(tmp_path / "train" / "images" / neu_class / f"{neu_class}_1.jpg", seed=i)
        (tmp_path / "train" / "annotations").mkdir(parents=True, exist_ok=True)
    samples, layout = dataset.find_samples(tmp_path / "train", verbose=False)
    assert layout == "class folders"
    assert classes_by_relpath(samples) == {f"images/{c}/{c}_1.jpg": c for c, _ in CODES}


def test_macos_zip_leftovers_are_ignored(tmp_path):
    for i, (neu_class, code) in enumerate(CODES):
        save_image(tmp_path / f"{code}_1.bmp", seed=i)
        (tmp_path / f"._{code}_1.bmp").write_bytes(b"\x00\x05\x16\x07 resource fork")
        (tmp_path / "__MACOSX" / neu_class).mkdir(parents=True)
        (tmp_path / "__MACOSX" / neu_class / f"._{code}_1.bmp").write_bytes(b"\x00\x05\x16\x07")
    samples, layout = dataset.find_samples(tmp_path, verbose=False)
    assert layout == "NEU-CLS"
    assert sorted(s.relpath for s in samples) == sorted(f"{code}_1.bmp" for _, code in CODES)
    assert dataset.load_pixels(samples, 16, progress=False).shape == (6, 16, 16, 3)


# ---------------------------------------------------------------------------------------------------------
# Errors: one line, naming the path
# ---------------------------------------------------------------------------------------------------------
def assert_one_line_error(error: pytest.ExceptionInfo, *fragments: str):
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_nothing_matches(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    save_image(tmp_path / "holiday" / "beach_1.png")
    with pytest.raises(DataError) as error:
        dataset.find_samples(tmp_path)
    assert_one_line_error(error, str(tmp_path.resolve()), "no NEU images")


def test_missing_folder(tmp_path):
    with pytest.raises(DataError) as error:
        dataset.find_samples(tmp_path / "nowhere")
    assert_one_line_error(error, str(tmp_path / "nowhere"), "not found")


def test_missing_class(tmp_path):
    for neu_class, _ in CODES[:-1]:  # no scratches
        save_image(tmp_path / "IMAGES" / f"{neu_class}_1.jpg")
    (tmp_path / "ANNOTATIONS").mkdir()
    with pytest.raises(DataError) as error:
        dataset.find_samples(tmp_path)
    assert_one_line_error(error, "scratches", "missing", str(tmp_path.resolve()))
    samples, _ = dataset.find_samples(tmp_path, require_all_classes=False, verbose=False)
    assert len(samples) == 5


def test_folder_and_name_disagree(tmp_path):
    for folder, code in [("crazing", "Cr"), ("Scratches", "Sc")]:
        save_image(tmp_path / folder / f"{code}_1.bmp")
    bad = save_image(tmp_path / "Scratches" / "Cr_2.bmp")
    with pytest.raises(DataError) as error:
        dataset.find_samples(tmp_path, require_all_classes=False)
    assert_one_line_error(error, str(bad.resolve()), "scratches", "crazing")


def test_unparseable_name_in_flat_layout(tmp_path):
    for i, (_, code) in enumerate(CODES):
        save_image(tmp_path / f"{code}_1.bmp", seed=i)
    bad = save_image(tmp_path / "IMG_0042.bmp")
    with pytest.raises(DataError) as error:
        dataset.find_samples(tmp_path)
    assert_one_line_error(error, str(bad.resolve()))


def test_unreadable_image_is_a_data_error(tmp_path):
    for i, (_, code) in enumerate(CODES):
        save_image(tmp_path / f"{code}_1.bmp", seed=i)
    (tmp_path / "Sc_2.bmp").write_bytes(b"BM not really a bitmap")
    samples, _ = dataset.find_samples(tmp_path, verbose=False)
    with pytest.raises(DataError) as error:
        dataset.load_pixels(samples, 16, progress=False)
    assert_one_line_error(error, str((tmp_path / "Sc_2.bmp").resolve()))


def test_train_script_on_empty_data_dir(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_script("train.py", "--data-dir", empty, "--test-images", "", cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(empty.resolve()) in lines[0] and "no NEU images" in lines[0]
    assert not (tmp_path / "model_binary.pth").exists()


# ---------------------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------------------
def test_binary_labels():
    assert {c: dataset.binary_label(c) for c in NEU_CLASSES} == {
        "crazing": 0, "inclusion": 0, "patches": 0, "pitted_surface": 0, "rolled-in_scale": 0, "scratches": 1}
    assert dataset.BINARY_CLASSES[dataset.binary_label("scratches")] == "defect"
    for unknown in ("scratch", "Scratches", "rust", ""):
        with pytest.raises(ValueError):
            dataset.binary_label(unknown)
    sample = dataset.Sample(Path("x"), "x", "scratches")
    assert sample.label == 1
    assert dataset.labels_of([sample, dataset.Sample(Path("y"), "y", "patches")]).tolist() == [1, 0]


# ---------------------------------------------------------------------------------------------------------
# The split
# ---------------------------------------------------------------------------------------------------------
PER_CLASS = 40


@pytest.fixture(scope="module")
def split_data(tmp_path_factory):
    """40 distinct tiny files per class, plus byte-identical copies: 4 groups of 3 in each class."""
    root = tmp_path_factory.mktemp("split")
    duplicates = []
    for i, (neu_class, code) in enumerate(CODES):
        for n in range(1, PER_CLASS + 1):
            save_image(root / f"{code}_{n}.png", size=8, seed=1000 * i + n)
        for g in range(4):
            group = [f"{code}_{g + 1}.png"]
            for copy in (1, 2):
                name = f"{code}_{500 + 10 * g + copy}.png"
                shutil.copyfile(root / group[0], root / name)
                group.append(name)
            duplicates.append(group)
    samples, _ = dataset.find_samples(root, verbose=False)
    return samples, duplicates


def split_names(splits):
    return {name: [s.relpath for s in items] for name, items in splits.items()}


def test_split_is_stratified_and_complete(split_data):
    samples, _ = split_data
    splits = dataset.split_samples(samples, seed=0)
    names = split_names(splits)
    everything = [r for items in names.values() for r in items]
    assert sorted(everything) == sorted(s.relpath for s in samples)  # each sample exactly once
    for name, items in names.items():
        assert items == sorted(items)
    per_class = PER_CLASS + 8
    for neu_class, _ in CODES:
        got = {name: sum(s.neu_class == neu_class for s in items) for name, items in splits.items()}
        assert sum(got.values()) == per_class
        for name, fraction in zip(dataset.SPLITS, dataset.SPLIT_FRACTIONS):
            # a group of 3 duplicates can overshoot a share by 2
            assert abs(got[name] - fraction * per_class) <= 3, (neu_class, got)


def test_split_is_deterministic_and_seeded(split_data):
    samples, _ = split_data
    first = split_names(dataset.split_samples(samples, seed=0))
    shuffled = list(samples)
    np.random.default_rng(7).shuffle(shuffled)
    assert split_names(dataset.split_samples(shuffled, seed=0)) == first  # input order does not matter
    assert split_names(dataset.split_samples(samples, seed=0)) == first
    other = split_names(dataset.split_samples(samples, seed=1))
    assert other["test"] != first["test"]
    assert sorted(sum(other.values(), [])) == sorted(sum(first.values(), []))


def test_duplicates_share_a_split(split_data):
    samples, duplicates = split_data
    for seed in range(8):
        where = {s.relpath: name for name, items in dataset.split_samples(samples, seed).items() for s in items}
        for group in duplicates:
            assert len({where[r] for r in group}) == 1, (seed, group, [where[r] for r in group])
    # and the duplicates do not all end up in training: the grouping is real, not a side effect
    where = {s.relpath: name for name, items in dataset.split_samples(samples, 0).items() for s in items}
    assert {where[g[0]] for g in duplicates} != {"train"}


def test_duplicate_across_classes_is_a_data_error(tmp_path):
    for i, (_, code) in enumerate(CODES):
        save_image(tmp_path / f"{code}_1.png", size=8, seed=i)
    shutil.copyfile(tmp_path / "Cr_1.png", tmp_path / "Sc_2.png")
    samples, _ = dataset.find_samples(tmp_path, verbose=False)
    with pytest.raises(DataError) as error:
        dataset.split_samples(samples, 0)
    assert_one_line_error(error, "Sc_2.png", "Cr_1.png")


def test_split_on_real_neu(neu_dir):
    samples, layout = dataset.find_samples(neu_dir, verbose=False)
    assert layout == "NEU-DET"
    assert len(samples) == 1500
    assert {c: sum(s.neu_class == c for s in samples) for c in NEU_CLASSES} == {c: 250 for c in NEU_CLASSES}
    assert sum(s.label for s in samples) == 250
    splits = dataset.split_samples(samples, seed=0)
    names = split_names(splits)
    assert sum(len(v) for v in names.values()) == 1500
    sets = {k: set(v) for k, v in names.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    where = {r: name for name, items in names.items() for r in items}
    assert where["IMAGES/patches_101.jpg"] == where["IMAGES/patches_105.jpg"]
    for neu_class in NEU_CLASSES:
        got = [sum(s.neu_class == neu_class for s in splits[name]) for name in dataset.SPLITS]
        assert abs(got[1] - 37.5) <= 1.5 and abs(got[2] - 37.5) <= 1.5, (neu_class, got)


# ---------------------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------------------
def write_modes(folder, gray: np.ndarray) -> dict:
    """The same grey picture in many file modes; returns {name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    base = Image.fromarray(gray)
    paths = {}
    for mode in ("L", "RGB", "RGBA", "P"):
        paths[mode] = folder / f"{mode}.png"
        base.convert(mode).save(paths[mode])
    paths["I;16"] = folder / "sixteen.tif"
    Image.fromarray(gray.astype(np.uint16) * 257).save(paths["I;16"])
    paths["CMYK"] = folder / "cmyk.jpg"
    base.convert("CMYK").save(paths["CMYK"], quality=95)
    paths["JPEG"] = folder / "gray.jpg"
    base.save(paths["JPEG"], quality=95)
    paths["BMP"] = folder / "gray.bmp"
    base.save(paths["BMP"])
    return paths


def test_preprocess_any_mode(tmp_path):
    gray = synthetic_image("scratch", size=48, seed=3)
    paths = write_modes(tmp_path, gray)
    assert Image.open(paths["I;16"]).mode == "I;16" and Image.open(paths["CMYK"]).mode == "CMYK"
    assert Image.open(paths["P"]).mode == "P"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "non-writable NumPy array" warning
        out = {name: dataset.preprocess(path, 32, "per-image") for name, path in paths.items()}
    assert dataset.to_model_pixels(dataset.open_image(paths["L"], 32), 32).flags.writeable
    for name, tensor in out.items():
        assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32, name
        assert torch.isfinite(tensor).all(), name
        # the scratch column is brighter than the rest in every mode
        assert tensor[0, :, 10:12].mean() > tensor[0, :, 20:].mean() + 1.0, name
    # lossless encodings of the same grey values give exactly the same input
    for name in ("RGB", "RGBA", "I;16", "BMP"):
        assert torch.equal(out[name], out["L"]), name
    for name in ("CMYK", "JPEG", "P"):  # lossy, or palette-quantised: close
        assert (out[name] - out["L"]).abs().mean() < 0.1, name


def test_pixel_limit_is_an_error_everywhere(tmp_path, monkeypatch):
    """Pillow's decompression-bomb limit stops the image before it is decoded, in train and infer alike."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for i, (_, code) in enumerate(CODES):
        save_image(tmp_path / f"{code}_1.png", size=30, seed=i)   # 900 pixels: fine
    big = save_image(tmp_path / "Sc_2.png", size=40)               # 1600: over the limit, under twice it
    with pytest.raises((Image.DecompressionBombError, Image.DecompressionBombWarning)):
        dataset.open_image(big, 16)
    decoded = pipeline.decode(big, "Sc_2.png", 16, with_display=True)
    assert decoded.pixels is None and "DecompressionBomb" in decoded.error
    samples, _ = dataset.find_samples(tmp_path, verbose=False)
    with pytest.raises(DataError) as error:
        dataset.load_pixels(samples, 16, progress=False)
    assert_one_line_error(error, str(big.resolve()))
    assert dataset.open_image(tmp_path / "Cr_1.png", 16).size == (30, 30)
    # also when the warnings filter is not "error" (catch_warnings is process-wide: a thread can undo it)
    monkeypatch.setattr(warnings, "simplefilter", lambda *args, **kwargs: None)
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(Image.DecompressionBombError):
        dataset.open_image(big, 16)


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (8, 1))
    path = tmp_path / "ramp16.tif"
    Image.fromarray(ramp).save(path)
    pixels = np.asarray(dataset.open_image(path, 64))
    assert pixels.shape == (8, 64, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels[..., 0], np.round(ramp / 257).astype(np.uint8))
    assert pixels.min() == 0 and pixels.max() == 255
    assert len(np.unique(pixels)) > 60  # a clipping conversion would leave almost everything at 255


def test_transparent_and_palette_images(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 255
    rgba[:, :8, 3] = 0  # left half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    pixels = np.asarray(dataset.open_image(tmp_path / "alpha.png", 16))
    assert pixels.shape == (16, 16, 3)
    assert (pixels[:, 8:] == 200).all() and (pixels[:, :8] == 0).all()


@pytest.mark.parametrize("size", [(200, 100), (100, 200)])
def test_non_square_is_resized_whole_not_cropped(tmp_path, size):
    width, height = size
    image = np.full((height, width), 60, np.uint8)
    image[:, :4] = 250        # marks on the left and right borders of a wide image
    image[:, -4:] = 250
    image[:4, :] = 250        # and the top/bottom borders of a tall one
    image[-4:, :] = 250
    path = tmp_path / "wide.png"
    Image.fromarray(image).save(path)
    pixels = dataset.to_model_pixels(dataset.open_image(path, 32), 32)[..., 0]
    assert pixels.shape == (32, 32)
    for edge in (pixels[:, 0], pixels[:, -1], pixels[0, :], pixels[-1, :]):
        assert edge.min() > 150          # every border mark survives: nothing was cropped away
    assert pixels[8:24, 8:24].max() < 80  # and the inside stays dark


def model_inputs_three_ways(samples, size, normalization):
    """What train.py, infer.py and dataset.preprocess hand to the model, for the same files."""
    trained = dataset.normalize(dataset.load_pixels(samples, size, progress=False), normalization)
    decoded = [pipeline.decode(s.path, s.relpath, size, with_display=True) for s in samples]
    assert all(d.error is None for d in decoded), [d.error for d in decoded]
    inferred = dataset.normalize(np.stack([d.pixels for d in decoded]), normalization)
    without_display = np.stack([pipeline.decode(s.path, s.relpath, size, with_display=False).pixels for s in samples])
    preprocessed = torch.stack([dataset.preprocess(s.path, size, normalization) for s in samples])
    return trained, inferred, dataset.normalize(without_display, normalization), preprocessed


def assert_bitwise_equal(*tensors):
    first = tensors[0]
    for other in tensors[1:]:
        assert other.shape == first.shape and other.dtype == first.dtype
        assert torch.equal(other, first)


@pytest.mark.parametrize("normalization", dataset.NORMALIZATIONS)
@pytest.mark.parametrize("size", [64, 200])
def test_train_infer_and_preprocess_agree_exactly(tmp_path, size, normalization):
    paths = write_modes(tmp_path / "modes", synthetic_image("scratch", size=200, seed=5))
    wide = np.tile(synthetic_image(size=200, seed=6), (1, 3))[:, :450]
    Image.fromarray(wide).save(tmp_path / "wide.jpg")  # non-square, and a JPEG that is draft-decoded
    samples = [dataset.Sample(p, p.name, "scratches") for p in [*paths.values(), tmp_path / "wide.jpg"]]
    assert_bitwise_equal(*model_inputs_three_ways(samples, size, normalization))


def test_train_infer_and_preprocess_agree_on_real_neu(neu_dir):
    samples, _ = dataset.find_samples(neu_dir, verbose=False)
    picked = dataset.first_per_class(samples, 1)
    trained, *others = model_inputs_three_ways(picked, 64, "per-image")
    assert trained.shape == (6, 3, 64, 64)
    assert_bitwise_equal(trained, *others)
