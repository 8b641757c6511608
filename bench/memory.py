"""Where the memory of `python infer.py` goes: its peak RSS under configurations that each take one part away,
against the import-and-load baseline (a child that imports what infer.py imports and loads the checkpoint).

    python bench/memory.py                               # 300 images, the default configurations, 2 rounds
    python bench/memory.py --images 3000 --rounds 1      # longer: more of a steady state
    python bench/memory.py --only defaults arena2 -- --tile off   # some configurations; args after -- to each
    python bench/memory.py --strip 20000x2000 --rounds 1 # one large frame instead (tiled: rates are tiles/s)
    python bench/memory.py --images 3000 --only defaults --limit 1500M   # each run under a hard memory limit

Every run is a whole child process: peak RSS is the kernel's high-water mark (wait4 ru_maxrss), images/s is
N / wall seconds (imports and model load included). Configurations alternate within a round, so a change in
machine load hits all of them. The N images are NEU images repeated as symlinks in a temp folder.

--limit runs each infer.py inside its own memory cgroup with that hard limit (the kernel reclaims page cache
and, past the limit, kills the process): cgroup v1's memory.limit_in_bytes, or v2's memory.max. It needs a
writable cgroup tree (root in a container, as here). `ulimit -v` cannot do it: torch's CUDA build maps more
address space than 1.5 GB at import, so `import torch` itself fails under it; and `systemd-run --scope` needs
systemd as PID 1.
"""
from __future__ import annotations

import contextlib
import os
import resource
import re
import shutil
import sys
import tempfile
from pathlib import Path

from common import (ROOT, bench_parser, check, default_data_dir, load_average, machine_lines, markdown_table, median,
                    neu_images, parse_with_script_args, run_child)
from infer_speed import build_inputs, rate_from_log, warm_up

sys.path.insert(0, str(ROOT))
from scratch_detector.memory import parse_memory  # noqa: E402

# name -> (infer.py arguments, extra environment, what it separates)
CONFIGS = {
    "defaults": ([], {}, "infer.py as it ships: batch and streams fitted to the memory"),
    "batch16": (["--batch-size", "16"], {}, "the previous default"),
    "no-cam16": (["--no-cam", "--batch-size", "16"], {}, "no CAM backward pass, no overlays"),
    "streams1-16": (["--streams", "1", "--batch-size", "16"], {}, "one model stream"),
    "batch8": (["--batch-size", "8"], {}, "half the images per batch"),
    "streams1-4": (["--streams", "1", "--batch-size", "4"], {}, "one stream of small batches"),
    "arena2-16": (["--batch-size", "16"], {"MALLOC_ARENA_MAX": "2"}, "at most 2 glibc malloc arenas"),
    "fit1G": (["--max-memory", "1G"], {}, "fitted to 1 GiB"),
}
def cpu_seconds_of_children() -> float:
    """User + system CPU seconds of every child reaped so far: the difference over one run is that run's CPU
    time, which another program on the machine changes less than the wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class MemoryLimit:
    """A fresh memory cgroup with a hard limit; wrap(command) starts a command inside it (the shell joins the
    group and execs the command, so the command's pid and rusage are the shell's)."""

    def __init__(self, mib: int):
        v1, v2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")
        if (v1 / "memory.limit_in_bytes").exists():
            self.group, files = v1 / f"scratch_bench_{os.getpid()}", ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
        elif (v2 / "cgroup.controllers").exists() and "memory" in (v2 / "cgroup.controllers").read_text():
            self.group, files = v2 / f"scratch_bench_{os.getpid()}", ["memory.max", "memory.swap.max"]
        else:
            sys.exit("error: --limit needs a cgroup memory controller under /sys/fs/cgroup")
        try:
            self.group.mkdir()
            for name in files:  # the swap limit (when there is one) must come after the memory limit in v1
                if (self.group / name).exists():
                    (self.group / name).write_text(str(mib * 2 ** 20) if "swap" not in name else "0")
        except OSError as error:
            sys.exit(f"error: --limit cannot make a memory cgroup ({error}); it needs root or a delegated cgroup")
        self.mib = mib
        self.kills_before = self._counters().get("oom_kill", 0)

    def wrap(self, command: list[str]) -> list[str]:
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.group), *command]

    def _counters(self) -> dict[str, int]:
        """The group's "name value" counter files: v1's memory.oom_control, v2's memory.events."""
        found = {}
        for name in ("memory.oom_control", "memory.events"):
            if (self.group / name).exists():
                found.update((key, int(value)) for key, value in
                             (line.split() for line in (self.group / name).read_text().splitlines()))
        return found

    def report(self) -> str:
        """The group's peak usage (page cache included), how often it hit the limit and how many processes the
        kernel killed for memory, since the last report (v1's failcnt stays 0 on an OOM kill here)."""
        read = {name: (self.group / name).read_text().strip() for name in
                ("memory.max_usage_in_bytes", "memory.failcnt", "memory.peak")
                if (self.group / name).exists()}
        counters = self._counters()
        peak = int(read.get("memory.max_usage_in_bytes") or read.get("memory.peak") or 0) / 2 ** 20
        hits = read.get("memory.failcnt") or counters.get("max", "?")
        kills = counters.get("oom_kill", 0) - self.kills_before
        self.kills_before = counters.get("oom_kill", 0)
        for name in ("memory.max_usage_in_bytes", "memory.failcnt"):  # v1: reset, so each run reports its own
            if name in read:
                (self.group / name).write_text("0")
        return (f"limit {self.mib} MiB: cgroup peak {peak:.0f} MiB (page cache included), limit hit {hits} times, "
                f"{kills} OOM kill(s)")

    def __enter__(self) -> "MemoryLimit":
        return self

    def __exit__(self, *exc) -> None:
        """Remove the group, also when a run failed (its processes have exited by then)."""
        self.group.rmdir()


BASELINE = ("import sys; sys.path.insert(0, '.'); import infer; "
            "from scratch_detector.model import fold_batchnorm, load_checkpoint; "
            "model, meta = load_checkpoint(sys.argv[1]); fold_batchnorm(model)")


def parse_args(argv=None):
    p = bench_parser(__doc__)
    p.add_argument("--images", type=int, default=300, help="input images (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all configurations (default: %(default)s)")
    p.add_argument("--only", nargs="+", choices=sorted(CONFIGS), help="these configurations only")
    p.add_argument("--strip", metavar="WxH", help="one frame this large (NEU images side by side) instead of --images")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="also run the defaults with this in the child's environment (repeatable)")
    p.add_argument("--limit", metavar="SIZE", help="run each infer.py under this hard memory limit (e.g. 1500M; "
                                                   "a memory cgroup, see above)")
    args = parse_with_script_args(p, argv, ("--input", "--output", "--model"))
    if args.images < 1 or args.rounds < 1 or any("=" not in e for e in args.env):
        p.error("--images and --rounds must be >= 1; --env NAME=VALUE")
    if args.strip and not re.fullmatch(r"\d+x\d+", args.strip):
        p.error("--strip WIDTHxHEIGHT, e.g. 20000x2000")
    if args.limit:
        try:
            args.limit = parse_memory(args.limit)
        except ValueError as error:
            p.error(str(error))
    return args


def build_strip(sources: list[Path], size: str, folder: Path) -> None:
    """One JPEG frame of NEU images side by side (seams and all: this measures memory and speed only)."""
    import numpy as np
    from PIL import Image
    width, height = map(int, size.split("x"))
    rng = np.random.default_rng(0)
    frame = np.zeros((height, width), np.uint8)
    for y in range(0, height, 200):
        for x in range(0, width, 200):
            tile = np.asarray(Image.open(sources[rng.integers(len(sources))]).convert("L").resize((200, 200)))
            frame[y:y + 200, x:x + 200] = tile[:height - y, :width - x]
    folder.mkdir()
    Image.fromarray(frame).save(folder / f"strip_{size}.jpg", quality=95)


def units_of(log: Path, images: int) -> int:
    """Model inputs (tiles + whole images) the run reports, else the image count."""
    found = re.search(r"(\d+) model inputs", log.read_text(errors="replace"))
    return int(found[1]) if found else images


def header_of(log: Path) -> str:
    """How the run ran, from its header: batch size and streams (empty for an older infer.py)."""
    text = log.read_text(errors="replace")
    streams = re.search(r"(\d+) model streams? x (\d+) thread", text)
    batch = re.search(r"batch (\d+)", text)
    return ", ".join(filter(None, [f"{streams[1]} x {streams[2]} thr" if streams else "",
                                   f"batch {batch[1]}" if batch else ""]))


def main(argv=None) -> int:
    args = parse_args(argv)
    model = Path(args.model).resolve()
    if not model.is_file():
        sys.exit(f"error: checkpoint not found: {model}")
    sources = neu_images(default_data_dir(args.data_dir))
    configs = {name: CONFIGS[name] for name in (args.only or CONFIGS)}
    for entry in args.env:
        configs[entry] = ([], dict([entry.split("=", 1)]), "environment")
    machine = machine_lines()
    print("\n".join(machine), flush=True)
    warm_up(sources)
    runs: dict[str, list[dict]] = {"baseline": [], **{name: [] for name in configs}}
    unit = "tiles" if args.strip else "images"
    with (tempfile.TemporaryDirectory(prefix="memory_bench_") as tmp,
          MemoryLimit(args.limit) if args.limit else contextlib.nullcontext() as limit):
        work = Path(tmp)
        inputs = work / "images"
        if args.strip:
            build_strip(sources, args.strip, inputs)
        else:
            build_inputs(sources, args.images, inputs)
        for round_ in range(1, args.rounds + 1):
            run = run_child([sys.executable, "-c", BASELINE, str(model)], work / "baseline.log")
            check(run, "the baseline")
            runs["baseline"].append(dict(rss=run.peak_rss_mib, rate=float("nan"), how=""))
            for name, (extra, env, _) in configs.items():
                output = work / "out"
                cpu_before = cpu_seconds_of_children()
                command = [sys.executable, "infer.py", "--input", str(inputs), "--output", str(output),
                           "--model", str(model), *extra, *args.script_args]
                run = run_child(limit.wrap(command) if limit else command,
                                work / f"{name}.log", env={**os.environ, **env}, sample_every=0.25)
                if limit:
                    print(f"round {round_} {name}: exit code {run.returncode}; {limit.report()}", flush=True)
                check(run, f"infer.py ({name})")
                units = units_of(run.log, args.images)
                cpu_ms = 1000 * (cpu_seconds_of_children() - cpu_before) / units
                own = re.findall(r"([\d.]+) inputs/s", run.log.read_text()) if args.strip else None
                runs[name].append(dict(rss=run.peak_rss_mib, rate=units / run.wall_s, cpu_ms=cpu_ms,
                                       own=float(own[-1]) if own else rate_from_log(run.log), how=header_of(run.log)))
                shutil.rmtree(output)
                print(f"round {round_} {name}: peak RSS {run.peak_rss_mib:.0f} MiB (sampled "
                      f"{run.sampled.peak_rss / 1024:.0f}), {units / run.wall_s:.1f} {unit}/s "
                      f"({runs[name][-1]['own']:.1f} after imports), {cpu_ms:.1f} CPU ms/{unit[:-1]} "
                      f"({runs[name][-1]['how']})", flush=True)

    base = median([r["rss"] for r in runs["baseline"]])
    rows = [["import + load (baseline)", "", f"{base:.0f}", "0", "-", "-", "-"]]
    for name, (extra, env, what) in configs.items():
        rss = median([r["rss"] for r in runs[name]])
        shown = " ".join([*(f"{k}={v}" for k, v in env.items()), *extra]) or "(defaults)"
        rows.append([f"`{shown}`: {what}", runs[name][0]["how"], f"{rss:.0f}", f"{rss - base:.0f}",
                     f"{median([r['rate'] for r in runs[name]]):.1f}",
                     f"{median([r['own'] for r in runs[name]]):.1f}",
                     f"{median([r['cpu_ms'] for r in runs[name]]):.1f}"])
    what = f"one {args.strip} frame of NEU images" if args.strip else f"{args.images} NEU images"
    print(f"\n## Inference memory: python infer.py on {what} (overlays on, unless --no-cam)\n")
    print("\n".join(f"- {line}" for line in machine))
    print(f"- load average at the end: {load_average()}; median of {args.rounds} round(s); peak RSS = the child's "
          f"ru_maxrss; {unit}/s = N / wall of the whole process; CPU ms = the child's user + system CPU time / N"
          + (f"; every run also with: {' '.join(args.script_args)}" if args.script_args else "") + "\n")
    print(markdown_table(["configuration", "streams, batch", "peak RSS MiB", "above baseline MiB", f"{unit}/s",
                          f"{unit}/s after imports", f"CPU ms/{unit[:-1]}"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
