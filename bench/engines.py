"""infer.py's two engines on N images: the local engine against Ray (--engine ray, a local instance on this
machine), wall time, images/s and peak memory of the whole process tree; and a local run killed with SIGKILL
half-way, then finished by the same command.

    python bench/engines.py                          # N = 3000: local, ray, kill -9 at half + rerun
    python bench/engines.py --sizes 30000 --no-kill  # memory at 30000 (takes a while: run it once)
    python bench/engines.py --sizes 300 --engines local --no-kill   # quick check
    python bench/engines.py --sizes --driver 200000  # the driver's serial work only, per image (no model)

Inputs: NEU images repeated as symlinks in a temp folder (as bench/infer_speed.py); outputs in temp folders,
deleted after each run. Memory: the Ray engine is several processes (driver, GCS, raylet, agents, one worker
per actor), so the bench samples the process tree every 0.5 s from /proc: the sum of RSS (counts the shared
object store and libraries once per process: an upper bound) and the sum of PSS (proportional set size:
shared pages split between the processes that map them, the honest total); the peak of each over the run.
For the local engine the child's own ru_maxrss (wait4) is printed too.

--driver N times what the driver does alone, whatever the number of workers, on N synthetic entries: the
listing (walk, sort, overlay names: storage.py), journal.record (JSON line, fsync'd in batches), and the final
merge (journal.assemble -> predictions.csv, detections.csv, the review page). These bound a cluster's rate.
"""
from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (ROOT, bench_parser, check, default_data_dir, load_average, machine_lines, markdown_table,
                    neu_images, run_child, tree)

sys.path.insert(0, str(ROOT))
from scratch_detector.storage import lines_on_disk  # noqa: E402  (standard library only: this process stays light)
from infer_speed import build_inputs


def run_infer(inputs: Path, output: Path, engine: str, log: Path, extra=()) -> dict:
    command = [sys.executable, "infer.py", "--input", str(inputs), "--output", str(output), *extra]
    if engine == "ray":
        command += ["--engine", "ray"]
    run = run_child(command, log, sample_every=0.5)
    check(run, f"infer.py ({engine})")
    tree_memory = run.sampled
    return dict(wall_s=run.wall_s, own_rss_mib=run.peak_rss_mib, tree_rss_mib=tree_memory.peak_rss / 1024,
                tree_pss_mib=tree_memory.peak_pss / 1024, processes=tree_memory.peak_processes)


def check_outputs(output: Path, n: int) -> None:
    with open(output / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    overlays = sum(1 for _ in (output / "gradcam").rglob("*_gradcam.*"))
    if len(rows) != n or overlays != n or any(r["status"] != "ok" for r in rows):
        sys.exit(f"incomplete: {len(rows)} CSV rows, {overlays} overlays for {n} images")


def kill_at(inputs: Path, output: Path, engine: str, fraction: float, n: int, log: Path) -> tuple[float, int]:
    """Start a run, SIGKILL it once `fraction` of the images are in its journal -> (seconds, lines then)."""
    command = [sys.executable, "infer.py", "--input", str(inputs), "--output", str(output)]
    if engine == "ray":
        command += ["--engine", "ray"]
    with open(log, "w") as handle:
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
        everything = set()
        while (lines := lines_on_disk(output)) < fraction * n:
            if child.poll() is not None:
                sys.exit(f"the run ended before the kill; see {log}")
            everything.update(tree(child.pid))
            time.sleep(0.05)
        everything.update(tree(child.pid))
        child.send_signal(signal.SIGKILL)
        child.wait()
        seconds = time.perf_counter() - start
    time.sleep(3)
    for pid in everything - {child.pid}:  # a Ray instance's lingering agents: only this run's processes
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return seconds, lines


def driver_parts(n: int, work: Path) -> list[list]:
    """Rates of the driver's serial steps on n synthetic images (empty files: no model, no overlay)."""
    from scratch_detector.inference import list_images
    from scratch_detector.review import PageWriter
    from scratch_detector.settings import CSV_COLUMNS, DETECTION_COLUMNS
    from scratch_detector.storage import RunJournal

    root, out = work / "driver_in", work / "driver_out"
    for camera in range(10):
        (root / f"cam{camera}").mkdir(parents=True)
    for i in range(n):
        (root / f"cam{i % 10}" / f"frame_{i:08d}.png").touch()
    out.mkdir()
    rows = []
    started = time.perf_counter()
    listing = list_images(root, out)
    rows.append(["listing (walk, sort, name)", time.perf_counter() - started])
    key = {"bench": True}
    with RunJournal.open(out, key, log=lambda message: None) as journal:
        started = time.perf_counter()
        for i, (relpath, overlay) in enumerate(listing):
            p = (i * 7919 % 10000) / 10000
            journal.record(relpath, files=[], predictions=[[relpath, "defect" if p >= 0.5 else "non-defect",
                                                            int(p >= 0.5), f"{p:.4f}", overlay, "ok", 1,
                                                            "0,0,200,200"]],
                           detections=[[relpath, 0, 0, 200, 200, f"{p:.4f}"]] if p >= 0.5 else [])
        journal.flush()
        rows.append(["journal.record (+ fsync per 256)", time.perf_counter() - started])
        started = time.perf_counter()
        page = PageWriter(out / "index.html", {"model": "bench"}, scratch=out)
        journal.assemble(listing.keys(), lambda key, tables: [page.add(dict(zip(CSV_COLUMNS, row)))
                                                             for row in tables["predictions"]],
                         predictions=(out / "predictions.csv", CSV_COLUMNS),
                         detections=(out / "detections.csv", DETECTION_COLUMNS))
        page.write()
        rows.append(["final merge (CSVs + page)", time.perf_counter() - started])
        journal.finish()
    shutil.rmtree(root)
    shutil.rmtree(out)
    return [[step, n, f"{seconds:.1f}", f"{n / seconds:,.0f}", f"{seconds / n * 1e6:.0f}"] for step, seconds in rows]


def parse_args(argv=None):
    p = bench_parser(__doc__, model=False)
    p.add_argument("--sizes", type=int, nargs="*", default=[3000], help="numbers of images (default: 3000)")
    p.add_argument("--driver", type=int, default=0, help="also time the driver's serial steps on this many entries")
    p.add_argument("--engines", nargs="+", choices=["local", "ray"], default=["local", "ray"])
    p.add_argument("--no-kill", action="store_true", help="skip the kill -9 + rerun measurement")
    p.add_argument("--kill-engines", nargs="+", choices=["local", "ray"], default=["local"],
                   help="engines to kill at --kill-at and rerun (default: local)")
    p.add_argument("--kill-at", type=float, default=0.5, help="fraction recorded before the kill (default: 0.5)")
    p.add_argument("--work", help="folder for the temp inputs and outputs (default: the system temp folder)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sources = neu_images(default_data_dir(args.data_dir)) if args.sizes else []
    machine = machine_lines()
    print("\n".join(machine), flush=True)
    results, kills, parts = [], [], []
    with tempfile.TemporaryDirectory(prefix="engines_", dir=args.work) as tmp:
        work = Path(tmp)
        for n in args.sizes:
            inputs = work / f"images_{n}"
            build_inputs(sources, n, inputs)
            clean = {}
            for engine in args.engines:
                output = work / f"out_{engine}_{n}"
                run = run_infer(inputs, output, engine, work / f"{engine}_{n}.log")
                check_outputs(output, n)
                clean[engine] = (output / "predictions.csv").read_bytes()
                results.append(dict(n=n, engine=engine, **run))
                print(f"N={n} {engine}: {run['wall_s']:.1f}s = {n / run['wall_s']:.1f} img/s; peak tree RSS "
                      f"{run['tree_rss_mib']:.0f} MiB, PSS {run['tree_pss_mib']:.0f} MiB "
                      f"({run['processes']} processes); own ru_maxrss {run['own_rss_mib']:.0f} MiB", flush=True)
                if engine != "local" and "local" in clean:
                    same = clean[engine] == clean["local"]
                    print(f"  predictions.csv {'byte-identical to' if same else 'DIFFERS from'} the local engine's")
                shutil.rmtree(output)
            if not args.no_kill:
                for engine in args.kill_engines:
                    output = work / f"killed_{engine}_{n}"
                    seconds, lines = kill_at(inputs, output, engine, args.kill_at, n, work / f"kill_{engine}_{n}.log")
                    rerun = run_infer(inputs, output, engine, work / f"rerun_{engine}_{n}.log")
                    check_outputs(output, n)
                    first = next((r for r in results if r["n"] == n and r["engine"] == engine), None)
                    same = clean.get(engine) == (output / "predictions.csv").read_bytes()
                    kills.append(dict(n=n, engine=engine, killed_after=seconds, recorded=lines,
                                      rerun=rerun["wall_s"], clean=first["wall_s"] if first else float("nan"),
                                      same=same))
                    print(f"N={n} {engine}: killed after {seconds:.1f}s with {lines} recorded; the rerun took "
                          f"{rerun['wall_s']:.1f}s; predictions.csv {'identical to' if same else 'DIFFERS from'} "
                          f"the clean run's", flush=True)
                    shutil.rmtree(output)
            shutil.rmtree(inputs)
        parts = driver_parts(args.driver, work) if args.driver else []
    print("\n## infer.py engines\n")
    print("\n".join(f"- {line}" for line in machine))
    print(f"- load average at the end: {load_average()}\n")
    if results:
        print(markdown_table(["N", "engine", "wall s", "img/s", "peak RSS, tree (MiB)", "peak PSS, tree (MiB)",
                              "processes", "driver ru_maxrss (MiB)"],
                             [[r["n"], r["engine"], f"{r['wall_s']:.1f}", f"{r['n'] / r['wall_s']:.1f}",
                               f"{r['tree_rss_mib']:.0f}", f"{r['tree_pss_mib']:.0f}", r["processes"],
                               f"{r['own_rss_mib']:.0f}"] for r in results]))
    if parts:
        print()
        print(markdown_table(["driver step", "entries", "seconds", "per second", "us each"], parts))
    if kills:
        print()
        print(markdown_table(["N", "engine", "killed after s", "recorded then", "rerun s", "clean run s",
                              "rerun / clean", "CSV identical"],
                             [[k["n"], k["engine"], f"{k['killed_after']:.1f}", k["recorded"], f"{k['rerun']:.1f}",
                               f"{k['clean']:.1f}", f"{k['rerun'] / k['clean']:.2f}", k["same"]] for k in kills]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
