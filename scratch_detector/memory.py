"""How much work a local inference run keeps in flight: batch size and model streams fitted to a memory budget
(infer.py --max-memory), from a measured model of its peak resident memory. The run header prints the choice.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import dataset

# Memory (`python bench/memory.py`, bench/README.md "Inference memory"): a run's peak is its import-and-load
# resident memory, plus a little that does not depend on the batch, plus a share per image in flight (model
# streams x batch size). With a CAM most of it is the activations kept for the backward pass, which scale with
# the input's area and grow below features.2 (larger maps). The figures are rounded up from the measurements.
MEMORY_SHARE = 0.5                # --max-memory auto: this share of the machine's available memory
MEMORY_FIXED_MIB = 150            # queues, pending overlays, a decoded frame, and a margin
MEMORY_PER_STREAM_MIB = 20        # each model copy past the first
MEMORY_PER_IMAGE_MIB = {"cam": 35, "cam-low": 55, "no-cam": 11}  # per image in flight, at 200 px
LOW_CAM_LAYERS = ("features.0", "features.1")
# On a CPU a batch of 4 runs as fast per image as one of 16 for a quarter of the memory; a GPU wants 16.
CPU_BATCH_SIZES = (4, 2, 1)       # tried largest first
GPU_BATCH_SIZE = 16


def default_streams(device_type: str, threads: int) -> int:
    """Model streams when none is asked for: two on a CPU with two or more threads, else one
    (engines/local.py's ModelStreams says why)."""
    return 2 if device_type == "cpu" and threads >= 2 else 1


def parse_memory(text: str) -> int | None:
    """'1.5G', '1500M', '1500MiB', '2GB' (binary units) -> MiB; 'auto' -> None. ValueError otherwise."""
    if text.strip().lower() == "auto":
        return None
    found = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not found:
        raise ValueError(f"not a memory size: {text!r} (e.g. 1.5G, 1500M or auto)")
    number, unit = float(found[1]), found[2] or "m"
    mib = number * {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 ** 2}[unit]
    if mib < 1:
        raise ValueError(f"memory size too small: {text!r}")
    return int(mib)


def meminfo_mib(field_name: str, path: str = "/proc/meminfo") -> int | None:
    """A field of a /proc file in kB (/proc/meminfo's MemAvailable, /proc/self/status's VmHWM) in MiB; None where
    there is no such file (not Linux)."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


UNLIMITED_BYTES = 1 << 60          # cgroup v1 writes "no limit" as a number near 2**63


def _memory_cgroup_dirs(cgroup_file: str, mountinfo_file: str) -> list[Path]:
    """The folders of this process's memory cgroup and of its ancestors up to the mount, leaf first (cgroup v1's
    memory controller, else v2's unified tree, whose line in /proc/self/cgroup names no controller); [] where
    neither is mounted."""
    try:
        memberships = [parts for line in open(cgroup_file) if len(parts := line.rstrip("\n").split(":", 2)) == 3]
        mounts = [fields for line in open(mountinfo_file) if "-" in (fields := line.split())]
    except OSError:
        return []
    for controller, fs_type in (("memory", "cgroup"), ("", "cgroup2")):
        path = next((p for _, controllers, p in memberships if controller in controllers.split(",")), None)
        if path is None:
            continue
        for fields in mounts:
            kind, super_options = fields[fields.index("-") + 1], fields[-1].split(",")
            if kind == fs_type and (not controller or controller in super_options):
                root, mount_point = fields[3], Path(fields[4])
                inner = path[len(root):] if path.startswith(root) else path
                leaf = mount_point / inner.lstrip("/")
                return [leaf, *[p for p in leaf.parents if p.is_relative_to(mount_point)]]
    return []


def cgroup_headroom_mib(cgroup_file: str = "/proc/self/cgroup",
                        mountinfo_file: str = "/proc/self/mountinfo") -> int | None:
    """What this process's memory cgroups still allow (the limit less what is charged, the tightest over the
    group and its ancestors), in MiB; None where no limit is set. Inside a container /proc/meminfo shows the
    host's memory, not the container's limit."""
    tightest = None
    for folder in _memory_cgroup_dirs(cgroup_file, mountinfo_file):
        for limit_name, usage_name in (("memory.limit_in_bytes", "memory.usage_in_bytes"),
                                       ("memory.max", "memory.current")):
            try:
                limit_text = (folder / limit_name).read_text().strip()
                usage = int((folder / usage_name).read_text())
            except (OSError, ValueError):
                continue
            if limit_text == "max" or not limit_text.isdigit() or int(limit_text) >= UNLIMITED_BYTES:
                continue
            headroom = max(0, int(limit_text) - usage) // (1024 * 1024)
            tightest = headroom if tightest is None else min(tightest, headroom)
    return tightest


def resident_mib() -> int:
    """This process's peak resident memory so far, in MiB (0 where /proc is missing): loading the checkpoint
    peaks above what stays resident after it, and that peak is the floor of the run's."""
    return meminfo_mib("VmHWM", "/proc/self/status") or 0


@dataclass(frozen=True)
class MemoryFit:
    streams: int
    batch_size: int
    estimate_mib: int                 # the run's expected peak resident memory
    budget_mib: int | None            # None: not fitted (a GPU, or no /proc/meminfo)
    note: str                         # where the budget came from, for the run header
    base_mib: int = 0                 # the process after imports and model load

    def describe(self) -> str:
        if self.budget_mib is None:
            return f"memory: {self.note}"
        fits = "" if self.estimate_mib <= self.budget_mib else " (does not fit even at the smallest; may swap)"
        return (f"memory budget {self.budget_mib} MiB ({self.note}), estimated peak {self.estimate_mib} MiB "
                f"({self.base_mib} MiB of it imports and model){fits}")


def memory_estimate(base_mib: int, streams: int, batch_size: int, image_size: int, cam_layer: str | None) -> int:
    """Expected peak RSS in MiB of a local run: base_mib (the process after imports and model load) plus the
    work. cam_layer None: no CAM."""
    kind = "no-cam" if cam_layer is None else "cam-low" if cam_layer in LOW_CAM_LAYERS else "cam"
    per_image = MEMORY_PER_IMAGE_MIB[kind] * (image_size / dataset.NATIVE_SIZE) ** 2
    return int(base_mib + MEMORY_FIXED_MIB + MEMORY_PER_STREAM_MIB * (streams - 1) + per_image * streams * batch_size)


def fit_memory(max_memory: int | None, batch_size: int, streams: int, image_size: int, cam_layer: str | None,
               device_type: str, threads: int, base_mib: int | None = None, available_mib: int | None = None,
               headroom_mib: int | None = None) -> MemoryFit:
    """The largest work in flight (streams x batch) whose estimated peak fits the budget: --max-memory, else
    MEMORY_SHARE of the available memory, and never more than a memory cgroup (a container's limit) still allows:
    that limit is this process's own, so all of its headroom counts. A batch size or stream count the user gave
    (non-zero) is kept; the rest is chosen, never above CPU_BATCH_SIZES[0] (more memory would not buy speed). When
    nothing fits, the smallest is taken. available_mib and headroom_mib are read from /proc/meminfo and the
    cgroup when available_mib is not given. A GPU's memory is not estimated: one stream of GPU_BATCH_SIZE."""
    default = default_streams(device_type, threads)
    if device_type != "cpu":
        return MemoryFit(streams or default, batch_size or GPU_BATCH_SIZE, 0, None,
                         f"not fitted on {device_type}")
    base = resident_mib() if base_mib is None else base_mib
    note = "--max-memory"
    if max_memory is None:
        available, headroom = available_mib, headroom_mib
        if available_mib is None:
            available, headroom = meminfo_mib("MemAvailable"), cgroup_headroom_mib()
        if available is None:
            return MemoryFit(streams or default, batch_size or CPU_BATCH_SIZES[0], 0, None,
                             "not fitted: available memory unknown")
        # the process already holds `base`: it counts as part of what was available
        max_memory = int(MEMORY_SHARE * (available + base))
        note = f"auto: {MEMORY_SHARE:.0%} of {available + base} MiB available"
        if headroom is not None and headroom + base < max_memory:
            max_memory = headroom + base
            note = f"auto: the memory cgroup's limit allows {headroom} MiB more"
    stream_choices = [streams] if streams else list(range(default, 0, -1))
    batch_choices = [batch_size] if batch_size else list(CPU_BATCH_SIZES)
    # most images in flight first; at equal counts more streams (they run faster on a small CPU)
    candidates = sorted(((s, b) for s in stream_choices for b in batch_choices),
                        key=lambda sb: (-sb[0] * sb[1], -sb[0]))
    estimates = [(s, b, memory_estimate(base, s, b, image_size, cam_layer)) for s, b in candidates]
    s, b, estimate = next((e for e in estimates if e[2] <= max_memory), estimates[-1])
    return MemoryFit(s, b, estimate, max_memory, note, base)
