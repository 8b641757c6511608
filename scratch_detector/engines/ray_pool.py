"""The Ray engine (infer.py --engine ray): the same run on a Ray Data actor pool, on this machine or a Ray cluster.

    python infer.py --engine ray --input DIR --output OUT                       # Ray started here, for this run
    python infer.py --engine ray --ray-address auto --input /shared/in --output /shared/out   # on a cluster node
    python infer.py --engine ray --ray-address ray://head:10001 ...             # from outside (Ray Client)

One implementation, two engines. inference.run_inference lists the inputs, opens the run journal and hands
this module the images still to do, with the run's settings (settings.RunSettings), as it hands them to the
local engine; here:

    work list   the pending (relpath, overlay name) records, as JSON lines in shard files OUT/.ray-work/*.txt
    read        ray.data.read_text(shards) -> one row per image, cut into blocks of --batch-size rows
    map         map_batches(InferActor, actor pool): each actor loads the checkpoint once (its bytes come
                through the object store, checked against the digest in the run's key), and runs
                pipeline.run_files on its batch: decode (tiling large frames itself, so a frame never spans
                two actors), predict, CAM, aggregate, write the overlay into OUT, return the rows
    driver      iterates the results in order (iter_batches) and records each image in the journal, as the
                local engine's writer thread does; the run then assembles the CSVs and the page from it.

The outputs are the local engine's: the same rows (p(defect) to 4 decimals from the same model on the same
pixels; batches mix units differently, so a value may differ in float rounding), the same overlay files,
the same error rows. Killed, it resumes like the local engine (and either engine can finish the other's run).

On a cluster, --input and --output must be the same shared path on every node (NFS, CephFS, Lustre, or an
object store mounted as a filesystem, e.g. mountpoint-s3 / s3fs): actors read the images and write the
overlays there, and the driver writes the journal and the CSVs. Every node needs the same Python packages
(requirements.txt and requirements-ray.txt); the code is shipped by Ray (runtime_env working_dir).

Actor sizing (actor_sizing): Ray schedules on logical CPUs, and a pool that reserves all of them leaves none
for Ray Data's read tasks, which then wait forever (e.g. 2 actors x 1 CPU on a 2-CPU instance). So:

    actors          one per CPU of the cluster (node CPUs // threads each, summed), or --ray-actors
    read_cpus       what a read task asks: R = min(1, C_min / 2), C_min the smallest node's CPU count
    cpus_per_actor  min(threads x (C_min - R) / C_min, (total CPUs - R x nodes) / actors)

The actors then reserve at most the total less R per node, so some node always has R free for a read task
(were every node short of R, less than R x nodes would be free), while each actor still runs `threads` torch
threads (1: several single-thread model copies beat one multi-thread copy for this small network, as
engines/local.ModelStreams). On 2 CPUs: 2 actors x 0.5 CPU, reads 1 CPU. tests/test_ray_engine.py runs that
instance under a time limit, so a deadlock fails the test instead of hanging.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from ..runtime import UserError
from ..settings import RunSettings
from ..storage import Listing, RunJournal

ROOT = Path(__file__).resolve().parents[2]  # the project: shipped to a cluster, or on the actors' path
WORK_DIR = ".ray-work"
SHARD_LINES = 10_000       # images per work-list file (one read task each)
THREADS_PER_ACTOR = 1
# shipped to the cluster with the code (runtime_env working_dir): the code only
SHIP_EXCLUDES = [".git", ".venv", ".venv-ci", "venv", "__pycache__", "*.pth", "outputs", "test_images", "data",
                 "tests", "bench", ".pytest_cache", "*.tmp"]


@dataclass(frozen=True)
class Sizing:
    actors: int
    cpus_per_actor: float
    read_cpus: float
    threads: int

    def describe(self) -> str:
        return (f"{self.actors} actor{'s' if self.actors > 1 else ''} x {self.threads} thread(s), "
                f"{self.cpus_per_actor:.3g} CPU each; read tasks {self.read_cpus:.3g} CPU")


def actor_sizing(node_cpus: list[float], threads: int = THREADS_PER_ACTOR, actors: int = 0) -> Sizing:
    """The actor pool for nodes with these CPU counts (module docstring)."""
    node_cpus = [c for c in node_cpus if c > 0]
    if not node_cpus:
        raise UserError("the Ray cluster has no CPUs to run actors on")
    smallest, total = min(node_cpus), sum(node_cpus)
    read = min(1.0, smallest / 2)
    count = actors or max(1, sum(max(1, int(c // threads)) for c in node_cpus))
    per = min(threads * (smallest - read) / smallest, (total - read * len(node_cpus)) / count)
    return Sizing(count, max(1e-4, math.floor(per * 1e4) / 1e4), read, threads)  # rounded down: never over


class InferActor:
    """One model copy per actor process, set up once; called by Ray Data on a batch of work-list rows
    (pyarrow table, column text: JSON [relpath, overlay name]) -> table with one JSON item per image."""

    def __init__(self, model_bytes: bytes, settings: RunSettings, threads: int, driver_node: str | None):
        import torch

        from ..model import fold_batchnorm, load_checkpoint
        from ..pipeline import BatchPredictor

        if hashlib.sha256(model_bytes).hexdigest() != settings.model_digest:
            raise RuntimeError("the checkpoint bytes the actor got do not match the run's digest")
        torch.set_num_threads(threads)
        with tempfile.NamedTemporaryFile(suffix=".pth") as handle:  # load_checkpoint reads a file
            handle.write(model_bytes)
            handle.flush()
            model, meta = load_checkpoint(handle.name)
        fold_batchnorm(model)
        self.predictor = BatchPredictor(model, meta["normalization"], settings.cam, settings.cam_layer,
                                        torch.device("cpu"), meta.get("familiarity"))
        self.settings = settings
        # overlays written on another machine than the driver's must be on disk before the driver records
        # them (its journal syncs only its own filesystem view)
        import ray
        self.sync = ray.get_runtime_context().get_node_id() != driver_node

    def __call__(self, batch):
        import pyarrow as pa

        from ..pipeline import run_files
        from ..storage import make_durable

        records = [json.loads(line) for line in batch.column("text").to_pylist()]
        root, output = self.settings.input, self.settings.output
        items = list(run_files(((root / relpath, relpath, overlay) for relpath, overlay in records), self.predictor,
                               self.settings))
        if self.sync:
            make_durable([output / name for item in items for name in item.files])
        return pa.table({"item": [json.dumps([i.relpath, i.files, i.predictions, i.detections, i.units],
                                             ensure_ascii=True, separators=(",", ":")) for i in items]})


def connect(settings: RunSettings) -> bool:
    """ray.init: a new local instance (-> True: ours to shut down) or the cluster at --ray-address."""
    try:
        import ray
    except ImportError:
        raise UserError("--engine ray needs Ray: pip install -r requirements-ray.txt") from None
    quiet = dict(logging_level=logging.ERROR, log_to_driver=False, configure_logging=True)
    if settings.ray_address:
        env = {"working_dir": str(ROOT), "excludes": SHIP_EXCLUDES}
        try:
            ray.init(address=settings.ray_address, runtime_env=env, **quiet)
        except (ConnectionError, ValueError, RuntimeError) as error:
            raise UserError(f"cannot connect to the Ray cluster at {settings.ray_address}: "
                            f"{' '.join(str(error).split())[:300]}") from None
        return False
    # this machine's code is importable as it is: no upload, just the path
    path = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    ray.init(address="local", num_cpus=settings.ray_cpus or None, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}}, **quiet)
    return True


def node_cpus() -> list[float]:
    import ray
    return [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")]


def driver_node() -> str | None:
    """The driver's node id; None (every actor then syncs its own files) where there is none (Ray Client)."""
    import ray
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 -- any failure means: not known
        return None


def write_work_list(todo: Listing, folder: Path) -> list[str]:
    """The pending records as shard files of SHARD_LINES JSON lines (ASCII: any file name survives)."""
    shutil.rmtree(folder, ignore_errors=True)  # a killed run's
    folder.mkdir(parents=True)
    shards, handle, count = [], None, 0
    try:
        for line in todo.records.lines():
            if count % SHARD_LINES == 0:
                if handle:
                    handle.close()
                shards.append(str(folder / f"work-{len(shards):06d}.txt"))
                handle = open(shards[-1], "wb")
            handle.write(line + b"\n")
            count += 1
    finally:
        if handle:
            handle.close()
    return shards


def run(todo: Listing, settings: RunSettings, journal: RunJournal, header: str) -> int:
    """Run `todo` on Ray, recording each image in `journal`. Prints `header` with how it runs. Returns the
    model inputs it ran."""
    if not len(todo):  # everything was done by an earlier run: no need to start Ray
        print(f"{header}; nothing left to do", flush=True)
        return 0
    model_bytes = Path(settings.model).read_bytes()  # shipped to the actors, which check it against the digest
    if hashlib.sha256(model_bytes).hexdigest() != settings.model_digest:
        raise UserError(f"{settings.model} changed since this run started: run the same command again")
    started_here = connect(settings)
    import ray
    import ray.data

    output = settings.output
    work = output.resolve() / WORK_DIR
    try:
        sizing = actor_sizing(node_cpus(), actors=settings.ray_actors)
        where = f"Ray at {settings.ray_address}" if settings.ray_address else "Ray on this machine"
        print(f"{header}; {where}: {sizing.describe()}", flush=True)
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # the journal wants roughly input order
        context.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        resolved = replace(settings, input=settings.input.resolve(), output=output.resolve(),  # as actors see them
                           network=None)
        shards = write_work_list(todo, work)
        batch_size = settings.batch_size
        dataset = (ray.data.read_text(shards, num_cpus=sizing.read_cpus)
                   .repartition(target_num_rows_per_block=batch_size)
                   .map_batches(InferActor, batch_size=batch_size, batch_format="pyarrow",
                                compute=ray.data.ActorPoolStrategy(size=sizing.actors),
                                num_cpus=sizing.cpus_per_actor,
                                fn_constructor_args=(model_bytes, resolved, sizing.threads, driver_node())))
        units = 0
        with tqdm(total=len(todo), unit="img", desc="infer (ray)", file=sys.stdout) as bar:
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                for line in batch.column("item").to_pylist():
                    relpath, files, predictions, detections, item_units = json.loads(line)
                    journal.record(relpath, files=files, predictions=predictions, detections=detections)
                    units += item_units
                    bar.update(1)
        return units
    except UserError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:  # a Ray failure: what was recorded is kept; the rerun goes on from there
        if type(error).__module__.startswith("ray"):
            raise UserError(f"the Ray run failed ({type(error).__name__}: "
                            f"{' '.join(str(error).split())[:400]}); what was done is recorded in "
                            f"{output}: run the same command again to go on") from None
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if started_here:
            ray.shutdown()
