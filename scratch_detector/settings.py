"""The settings of one inference run, and the names it gives its outputs.

RunSettings is built once, from the command line and the checkpoint (RunSettings.from_args), and passed as it
is to every engine; no engine reads the command line. Its run_key() is what makes a recorded result valid
(storage.RunJournal): a change to any of its parts starts the run over.

Output names: predictions.csv (CSV_COLUMNS) and detections.csv (DETECTION_COLUMNS), overlays in OVERLAY_DIR
(overlay_names), heatmaps in HEATMAP_DIR (heatmap_name).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import dataset

from .overlay import OVERLAY_FORMATS
from .runtime import printable

# The default explanation: on the validation split, the cheapest CAM with pointing game >= 0.95 and energy in
# box >= 0.65 (`python bench/cam_choice.py`; bench/README.md).
DEFAULT_CAM = "layercam"
DEFAULT_CAM_LAYER = "features.2"

# familiar: yes / no against the checkpoint's cut-off, empty for a checkpoint without statistics (familiarity.py);
# unfamiliarity: the score itself
CSV_COLUMNS = ["image", "prediction", "label", "defect_probability", "gradcam", "status", "tiles", "max_tile",
               "familiar", "unfamiliarity"]
# a run is flagged as a whole when more than this share of its images is unfamiliar
UNFAMILIAR_RUN_SHARE = 0.20
DETECTION_COLUMNS = ["image", "x", "y", "width", "height", "defect_probability"]
OVERLAY_DIR = "gradcam"
HEATMAP_DIR = "heatmaps"
OVERLAY_SUFFIXES = tuple(f"_gradcam.{file_format}" for file_format in OVERLAY_FORMATS)
FRAME_OVERLAY_SIDE = 2048    # a tiled image's whole overlay (both panels and the banner) fits this square


def overlay_names(relpaths: list[str], file_format: str = "jpg") -> dict[str, str]:
    """<relpath without extension>_gradcam.jpg; where two inputs share that (a.jpg, a.png), both keep their
    extension in the name (a_jpg_gradcam.jpg, a_png_gradcam.jpg). Any name still taken (a_jpg.png exists
    too, or it differs only in case, which macOS/Windows disks do not tell apart) gets _2, _3 ..., so no
    overlay ever overwrites another."""
    stems = Counter(r.rsplit(".", 1)[0] for r in relpaths)
    names, taken = {}, set()
    for r in sorted(relpaths):
        stem, ext = r.rsplit(".", 1)
        base = printable(stem if stems[stem] == 1 else f"{stem}_{ext}")
        name, n = f"{OVERLAY_DIR}/{base}_gradcam.{file_format}", 1
        while name.lower() in taken:
            n += 1
            name = f"{OVERLAY_DIR}/{base}_{n}_gradcam.{file_format}"
        taken.add(name.lower())
        names[r] = name
    return names


def heatmap_name(overlay_name: str) -> str:
    """gradcam/<x>_gradcam.jpg -> heatmaps/<x>_heatmap.npy (--save-heatmaps)."""
    return HEATMAP_DIR + overlay_name[len(OVERLAY_DIR):].rsplit("_gradcam.", 1)[0] + "_heatmap.npy"


@dataclass(frozen=True)
class Plan:
    """How files become units of model work (pipeline.decode_units)."""
    image_size: int                          # the model's input side (the checkpoint's image_size)
    tile: int | None = dataset.NATIVE_SIZE   # tile side in image pixels; None: never tile (--tile off)
    stride: int | None = None                # None: tiler.Tiler's default, a quarter overlap
    with_display: bool = True                # overlays wanted: keep an image to draw them on
    overlay_side: int = FRAME_OVERLAY_SIDE

    def is_large(self, width: int, height: int) -> bool:
        return self.tile is not None and (width > self.tile or height > self.tile)


@dataclass(frozen=True)
class RunSettings:
    """Everything an engine needs to know about a run, besides the images still to do and the journal."""
    input: Path                   # the input folder, as given
    output: Path
    model: str                    # the checkpoint's path, as given
    model_digest: str             # the checkpoint's SHA-256: the engines load exactly the model in the run key
    threshold: float              # --threshold, else the checkpoint's
    normalization: str            # the checkpoint's
    plan: Plan
    cam: str | None               # the CAM method; None with --no-cam
    cam_layer: str
    overlay_format: str
    save_heatmaps: bool           # --save-heatmaps, and there is a CAM to save
    batch_size: int               # chosen by fit_memory unless given
    streams: int                  # local engine: model copies side by side (chosen by fit_memory unless given)
    device: str                   # local engine: 'cpu' or 'cuda'
    restart: bool
    engine: str                   # 'local' or 'ray'
    ray_address: str | None = None
    ray_actors: int = 0
    ray_cpus: int = 0
    unfamiliar_cutoff: float | None = None   # the checkpoint's familiarity cut-off; None: it has no statistics
    # The checkpoint's network, loaded and BatchNorm-folded once in this process, before the run's journal is
    # opened (the local engine runs it); not a setting, so not compared, and never shipped: Ray's actors load
    # their own copies from the checkpoint's bytes.
    network: object = field(default=None, compare=False, repr=False)
    familiarity_stats: dict | None = field(default=None, compare=False, repr=False)  # with `network` only

    @classmethod
    def from_args(cls, args, meta: dict, model_digest: str, device: str, network=None) -> RunSettings:
        """From infer.py's parsed arguments and the checkpoint (its metadata, digest and loaded network);
        device: pick_device's choice."""
        cam = None if args.no_cam else args.cam
        return cls(input=Path(args.input), output=Path(args.output), model=args.model, model_digest=model_digest,
                   threshold=float(meta["threshold"] if args.threshold is None else args.threshold),
                   normalization=meta["normalization"],
                   plan=Plan(int(meta["image_size"]), None if args.tile == "off" else args.tile_size,
                             args.tile_stride, with_display=cam is not None, overlay_side=args.overlay_max_side),
                   cam=cam, cam_layer=args.cam_layer, overlay_format=args.overlay_format,
                   save_heatmaps=bool(args.save_heatmaps and cam is not None), batch_size=args.batch_size,
                   streams=args.streams, device=device, restart=args.restart, engine=args.engine,
                   ray_address=args.ray_address, ray_actors=args.ray_actors, ray_cpus=args.ray_cpus,
                   unfamiliar_cutoff=None if meta.get("familiarity") is None else float(meta["familiarity"]["cutoff"]),
                   network=network, familiarity_stats=None if network is None else meta.get("familiarity"))

    def run_key(self) -> dict:
        """What makes a recorded result valid (storage.RunJournal): a change to any of these starts the run over."""
        plan = self.plan
        return {"model": self.model_digest, "threshold": self.threshold, "image_size": plan.image_size,
                "normalization": self.normalization, "cam": self.cam,
                "cam_layer": self.cam_layer if self.cam else None, "overlay_format": self.overlay_format,
                "overlay_max_side": plan.overlay_side, "save_heatmaps": self.save_heatmaps,
                "tiling": None if plan.tile is None else {"tile": plan.tile, "stride": plan.stride},
                "input": str(self.input.resolve()), "columns": [CSV_COLUMNS, DETECTION_COLUMNS]}

    def describe(self) -> str:
        """The explanation, as the run's header and the review page's summary name it."""
        return "no CAM" if self.cam is None else f"{self.cam} on {self.cam_layer}"
