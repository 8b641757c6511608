"""Helpers shared by the bench scripts: run a child process and measure it, describe the machine, print tables.

Every figure is taken on a whole child process (imports, model load and all), because that is what a user
waits for when they type `python train.py` or `python infer.py`.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ChildRun:
    wall_s: float        # from Popen to the child's exit
    peak_rss_mib: float  # the child's own high-water RSS (kernel ru_maxrss), not ours
    returncode: int
    log: Path            # its stdout + stderr
    sampled: TreeSampler | None = None  # its process tree's memory through the run, with sample_every > 0


def tree(pid: int) -> list[int]:
    """pid and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB; (0, 0) once it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, pss


class TreeSampler(threading.Thread):
    """Peak of the summed RSS and PSS of a process tree, sampled every `interval` s; timeline: (s since the
    start, summed RSS KiB) of every sample."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = 0
        self.peak_processes = 0
        self.timeline: list[tuple[float, int]] = []
        self.finished = threading.Event()

    def run(self):
        start = time.perf_counter()
        while not self.finished.is_set():
            pids = tree(self.pid)
            sizes = [memory_kib(pid) for pid in pids]
            self.timeline.append((time.perf_counter() - start, sum(r for r, _ in sizes)))
            self.peak_rss = max(self.peak_rss, sum(r for r, _ in sizes))
            self.peak_pss = max(self.peak_pss, sum(p for _, p in sizes))
            self.peak_processes = max(self.peak_processes, sum(1 for r, _ in sizes if r))
            self.finished.wait(self.interval)



def run_child(command: list[str], log: Path, env: dict | None = None, sample_every: float = 0.0) -> ChildRun:
    """Run `command` in the repo root, stdout+stderr to `log`; return wall time and the child's peak RSS, and
    with sample_every > 0 its RSS every that many seconds (does memory grow during the run, or only peak once?).

    os.wait4 gives the rusage of exactly this child. getrusage(RUSAGE_CHILDREN) would give the maximum over
    every child reaped so far, which is useless once we alternate two programs.
    """
    with open(log, "w") as handle:
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env)
        sampler = TreeSampler(child.pid, sample_every) if sample_every > 0 else None
        if sampler:
            sampler.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)
        except BaseException:  # Ctrl-C: do not leave the child running
            child.kill()
            child.wait()
            raise
        finally:
            if sampler:
                sampler.finished.set()
                sampler.join()
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    return ChildRun(wall, usage.ru_maxrss / 1024, child.returncode, log, sampler)  # ru_maxrss is KiB on Linux


def check(run: ChildRun, what: str) -> None:
    """Stop the benchmark with the end of the child's log when it failed: a timing of a crash is no timing."""
    if run.returncode != 0:
        tail = run.log.read_text(errors="replace").splitlines()[-20:]
        sys.exit(f"{what} failed (exit {run.returncode}); last lines of {run.log}:\n" + "\n".join(tail))


def bench_parser(doc: str, model: bool = True) -> argparse.ArgumentParser:
    """The opening every bench script shares: its docstring as --help, --data-dir, and --model where it scores a
    checkpoint (the training benches make their own)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if model:
        p.add_argument("--model", default=str(ROOT / "model_binary.pth"),
                       help="checkpoint (default: model_binary.pth in the repo)")
    p.add_argument("--data-dir", help="NEU data (default: $NEU_DATA_DIR, else ../shared/neu-det beside the repo)")
    return p


def kept_folds_parser(doc: str) -> argparse.ArgumentParser:
    """The benches that score the models bench/crossval.py --keep wrote, by random halvings of each held-out fold."""
    p = bench_parser(doc, model=False)
    p.add_argument("--folds", type=Path, required=True, help="the folder that bench/crossval.py --keep wrote")
    p.add_argument("--repeats", type=int, default=20, help="random halvings to average over (default: %(default)s)")
    return p


def kept_folds(folder: Path) -> list[Path]:
    """The fold checkpoints bench/crossval.py --keep wrote, in fold order; exits with a hint when there are none."""
    checkpoints = sorted(Path(folder).glob("fold*/model.pth"))
    if not checkpoints:
        raise SystemExit(f"error: no fold*/model.pth in {folder} (write them with bench/crossval.py --keep)")
    return checkpoints


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}  # as dataset.py, without importing torch here


def neu_images(data_dir: Path) -> list[Path]:
    """Every image file under data_dir, sorted."""
    found = [Path(root) / name for root, dirs, files in os.walk(data_dir) for name in files
             if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith(".")]
    if not found:
        sys.exit(f"error: no images under {data_dir}")
    return sorted(found)


def input_order(sources: list[Path], n: int) -> list[Path]:
    """The N inputs of the speed and memory benches: the images in one fixed shuffled order (classes mixed),
    repeated past their count. infer.py and the model-only rate see the same images in the same order."""
    order = list(sources)
    random.Random(0).shuffle(order)
    return [order[i % len(order)] for i in range(n)]


def default_data_dir(cli_value: str | None) -> Path:
    """--data-dir, else $NEU_DATA_DIR, else ../shared/neu-det beside the repo; absolute, must exist."""
    folder = Path(cli_value or os.environ.get("NEU_DATA_DIR") or ROOT.parent / "shared" / "neu-det")
    folder = folder.expanduser().resolve()
    if not folder.is_dir():
        sys.exit(f"error: NEU data folder not found: {folder} (use --data-dir or NEU_DATA_DIR)")
    return folder


def parse_with_script_args(parser, argv, owned: tuple[str, ...]):
    """parser's own arguments before a `--`, those for the script it runs after it (returned as
    args.script_args); the flags the bench sets itself (`owned`: its temp folders, its seeds) may not be
    passed through."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    clashes = [a for a in extra if a.split("=", 1)[0] in owned]
    if clashes:
        parser.error(f"{', '.join(clashes)}: the bench sets these itself (give --data-dir before the --)")
    args.script_args = extra
    return args


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_lines() -> list[str]:
    """CPU, cores, load, and torch as the children see it (asked of a child, so this process stays light;
    it also loads torch from disk once before anything is timed)."""
    probe = subprocess.run([sys.executable, "-c", "import torch, torchvision, cv2; "
                            "print(torch.__version__, torchvision.__version__, cv2.__version__, "
                            "torch.get_num_threads(), torch.cuda.is_available())"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    torch_v, vision_v, cv2_v, threads, cuda = probe
    usable = len(os.sched_getaffinity(0))
    return [f"CPU: {cpu_model()}, {os.cpu_count()} cores ({usable} usable by this process); "
            f"load average {load_average()}",
            f"Python {platform.python_version()}, torch {torch_v} ({threads} threads, CUDA available: {cuda}), "
            f"torchvision {vision_v}, OpenCV {cv2_v}"]


def load_average() -> str:
    """1, 5 and 15 minute load: above the core count, other work competed with the bench for the CPU."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def train_child(folder: Path, data_dir: Path, args: list[str]) -> tuple[Path, float]:
    """`python train.py ARGS` as a child process writing only into `folder` (checkpoint, reports, log; never the
    repository's model_binary.pth or test_images/); -> (checkpoint, wall seconds)."""
    folder.mkdir()
    checkpoint = folder / "model.pth"
    run = run_child([sys.executable, "train.py", "--data-dir", str(data_dir), "--output", str(checkpoint),
                     "--reports", str(folder / "reports"), "--test-images", "", *args], folder / "train.log")
    check(run, " ".join(["train.py", *args]))
    return checkpoint, run.wall_s


def training_bench_start(args, varied: str) -> tuple[Path, str, list[str]]:
    """What a bench that runs train.py prints first: the machine and the command (with what the bench varies);
    -> (data folder, the train.py command, the machine lines)."""
    command = " ".join(["python train.py", *args.script_args])
    machine = machine_lines()
    print("\n".join(machine) + f"\ncommand: {command} {varied}", flush=True)
    return default_data_dir(args.data_dir), command, machine
