"""--max-memory: parsing, the batch size and stream count it picks, and the run header that reports them; and
training's release of freed memory."""
from __future__ import annotations

import csv
import ctypes
import os
import re
import sys

import pytest

import infer
from conftest import run_script, save_image
from scratch_detector.memory import cgroup_headroom_mib, fit_memory, meminfo_mib, memory_estimate, parse_memory
from scratch_detector.runtime import release_free_memory

ENV = {**os.environ, "OMP_NUM_THREADS": "2"}  # two threads: the local engine's choice of two streams applies


@pytest.mark.parametrize("text, mib", [("1.5G", 1536), ("1500M", 1500), ("1500MiB", 1500), ("2GB", 2048),
                                       ("1500", 1500), ("0.5t", 512 * 1024), ("auto", None), ("AUTO", None)])
def test_parse_memory(text, mib):
    assert parse_memory(text) == mib


@pytest.mark.parametrize("text", ["", "lots", "1.5X", "-1G", "512k", "1 G B"])
def test_bad_memory_size_is_a_usage_error(text, capsys):
    with pytest.raises(SystemExit):
        infer.parse_args(["--max-memory", text])
    assert "--max-memory" in capsys.readouterr().err


def test_defaults_leave_batch_and_streams_to_the_fit():
    args = infer.parse_args([])
    assert (args.batch_size, args.streams, args.max_memory) == (0, 0, None)
    assert infer.parse_args(["--max-memory", "1.5G"]).max_memory == 1536


def fit(budget, batch=0, streams=0, layer="features.2", device="cpu", available=None, headroom=None):
    return fit_memory(budget, batch, streams, 200, layer, device, 2, base_mib=700, available_mib=available,
                      headroom_mib=headroom)


def test_a_smaller_budget_gets_less_work_in_flight():
    chosen = [fit(budget) for budget in (100_000, 1000, 900)]
    in_flight = [c.streams * c.batch_size for c in chosen]
    assert in_flight == sorted(in_flight, reverse=True) and in_flight[0] == 8 and in_flight[-1] < 4
    assert all(c.estimate_mib <= c.budget_mib for c in chosen)
    assert (chosen[0].streams, chosen[0].batch_size) == (2, 4)  # more memory does not make batches larger
    assert chosen[0].estimate_mib == memory_estimate(700, 2, 4, 200, "features.2")


def test_what_the_user_gave_is_kept():
    assert fit(1000, batch=16).batch_size == 16
    assert fit(1000, streams=2).streams == 2
    assert (fit(100_000, batch=4, streams=1).batch_size, fit(100_000, batch=4, streams=1).streams) == (4, 1)


def test_too_small_a_budget_takes_the_smallest_and_says_so():
    chosen = fit(10)
    assert (chosen.streams, chosen.batch_size) == (1, 1)
    assert "does not fit" in chosen.describe()


def test_auto_budget_is_a_share_of_available_memory_and_gpus_are_not_fitted():
    small, large = fit(None, available=1200), fit(None, available=100_000)
    assert small.streams * small.batch_size < large.streams * large.batch_size == 8
    assert "auto" in small.describe()
    gpu = fit(10, device="cuda")
    assert (gpu.streams, gpu.batch_size, gpu.budget_mib) == (1, 16, None)


def test_a_container_limit_caps_the_auto_budget():
    """Inside a container /proc/meminfo shows the host: 100 GB available, but the group allows 400 MiB more."""
    host_only, contained = fit(None, available=100_000), fit(None, available=100_000, headroom=400)
    assert contained.budget_mib == 700 + 400 < host_only.budget_mib
    assert contained.streams * contained.batch_size < host_only.streams * host_only.batch_size
    assert "cgroup" in contained.describe() and contained.estimate_mib <= contained.budget_mib
    assert fit(None, available=1000, headroom=100_000).budget_mib == fit(None, available=1000).budget_mib


MiB = 1024 * 1024


def fake_cgroups(tmp_path, version, levels):
    """A cgroup mount under tmp_path with this process in a group two levels down; levels: leaf first, each
    (limit text, usage in bytes) or None (no limit files)."""
    mount = tmp_path / "cgroup"
    leaf = mount / "outer" / "inner"
    limit_name, usage_name = (("memory.limit_in_bytes", "memory.usage_in_bytes") if version == 1
                              else ("memory.max", "memory.current"))
    for folder, level in zip([leaf, leaf.parent, mount], levels):
        folder.mkdir(parents=True, exist_ok=True)
        if level is not None:
            (folder / limit_name).write_text(level[0] + "\n")
            (folder / usage_name).write_text(f"{level[1]}\n")
    membership = tmp_path / "cgroup_membership"
    mountinfo = tmp_path / "mountinfo"
    if version == 1:
        membership.write_text("5:cpu,cpuacct:/\n4:memory:/outer/inner\n0::/\n")
        mountinfo.write_text(f"31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
                             f"35 31 0:32 / {mount} rw,relatime - cgroup cgroup rw,memory\n")
    else:
        membership.write_text("0::/outer/inner\n")
        mountinfo.write_text(f"30 23 0:27 / {mount} rw - cgroup2 cgroup2 rw,nsdelegate\n")
    return str(membership), str(mountinfo)


@pytest.mark.parametrize("version, unlimited", [(1, "9223372036854771712"), (2, "max")])
def test_cgroup_headroom_is_the_tightest_limit_over_the_group_and_its_parents(tmp_path, version, unlimited):
    files = fake_cgroups(tmp_path, version, [(unlimited, 300 * MiB), (str(1500 * MiB), 900 * MiB),
                                             (str(4000 * MiB), 1000 * MiB)])
    assert cgroup_headroom_mib(*files) == 600
    files = fake_cgroups(tmp_path / "free", version, [(unlimited, 300 * MiB), None, (unlimited, 0)])
    assert cgroup_headroom_mib(*files) is None
    files = fake_cgroups(tmp_path / "full", version, [(str(100 * MiB), 150 * MiB), None, None])
    assert cgroup_headroom_mib(*files) == 0


def test_no_cgroup_files_mean_no_limit(tmp_path):
    assert cgroup_headroom_mib(str(tmp_path / "missing"), str(tmp_path / "missing")) is None


def test_cheaper_explanations_fit_more():
    assert memory_estimate(700, 2, 16, 200, None) < memory_estimate(700, 2, 16, 200, "features.8") \
        < memory_estimate(700, 2, 16, 200, "features.1")
    assert memory_estimate(700, 2, 16, 100, "features.2") < memory_estimate(700, 2, 16, 200, "features.2")


def test_header_shows_the_chosen_batch_and_streams(tmp_path, tiny_checkpoint):
    images = tmp_path / "in"
    for i in range(5):
        save_image(images / f"img_{i}.png", "scratch" if i % 2 else "plain", seed=i)
    tight = run_script("infer.py", "--model", tiny_checkpoint, "--input", images, "--output", tmp_path / "tight",
                       "--max-memory", "1M", cwd=tmp_path, env=ENV, timeout=300)
    assert tight.returncode == 0, tight.stderr
    assert re.search(r"1 model stream x 2 thread\(s\), batch 1\b", tight.stdout), tight.stdout
    assert "memory budget 1 MiB (--max-memory)" in tight.stdout and "does not fit" in tight.stdout
    roomy = run_script("infer.py", "--model", tiny_checkpoint, "--input", images, "--output", tmp_path / "roomy",
                       "--max-memory", "100G", "--batch-size", "16", cwd=tmp_path, env=ENV, timeout=300)
    assert roomy.returncode == 0, roomy.stderr
    assert re.search(r"2 model streams x 1 thread\(s\), batch 16\b", roomy.stdout), roomy.stdout
    assert "memory budget 102400 MiB (--max-memory)" in roomy.stdout
    rows = {}
    for name in ("tight", "roomy"):
        with open(tmp_path / name / "predictions.csv", newline="") as handle:
            rows[name] = list(csv.DictReader(handle))
    assert [r["image"] for r in rows["tight"]] == [r["image"] for r in rows["roomy"]] and len(rows["tight"]) == 5
    for a, b in zip(rows["tight"], rows["roomy"]):  # the batch size changes nothing but the float rounding
        assert float(a["defect_probability"]) == pytest.approx(float(b["defect_probability"]), abs=1e-4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux's")
def test_release_free_memory_gives_freed_heap_pages_back():
    """train.py calls it after each epoch: blocks freed below the top of glibc's heap stay resident until
    malloc_trim returns them."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 * 1024) for _ in range(3000)]  # 190 MiB in blocks under the mmap threshold
    for block in blocks:
        ctypes.memset(block, 1, 64 * 1024)
    for block in blocks[:-1]:  # the last one stays: the heap cannot simply shrink from its top
        libc.free(block)
    still_resident = meminfo_mib("VmRSS", "/proc/self/status")
    assert release_free_memory()
    assert meminfo_mib("VmRSS", "/proc/self/status") < still_resident - 100
    libc.free(blocks[-1])
