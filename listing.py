"""The input listing of a run, on disk: every image's relative path and overlay name, in path order, in
memory that does not grow with the number of images.

    listing = list_inputs(root, skip, scratch, "jpg")   # walk, sort, name: (relpath, overlay) records
    for relpath, overlay in listing: ...                 # as often as needed, in relpath order
    todo = listing.subset(keys)                          # the records of some keys (sorted), on disk too

A run over 10^7 images would hold ~1 GB of path strings in a sorted list, and as much again in a dict of
overlay names. Here the records go through SortedRecords, an external sort: CHUNK records at a time are
sorted in memory and spilled to an anonymous temp file (no name: it vanishes when the process ends, kill -9
included), then merged. What is held at once: CHUNK records, and while naming, one folder's paths (see
overlay names below); os.walk itself holds one folder's names at a time.

Records are lists of str written as one JSON line each (ASCII: a file name that is not valid UTF-8,
surrogate-escaped by Python, or one holding a newline, reads back as the same str). They sort as Python
sorts the lists: the relative paths in plain str order, as journal.RunJournal needs its keys.

Overlay names: infer.overlay_names over all paths at once, computed one folder at a time. Two overlay names
can only clash (same name, or the same up to letter case) when their images' folders are the same up to
letter case, so the paths are sorted by (folder in lower case, path) and each such group is named alone:
the same names as one call over everything (tests/test_resume.py checks it), in memory for the largest
group only. Keep the folders of an archive under ~10^6 files each (filesystems want that anyway).
"""
from __future__ import annotations

import heapq
import itertools
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

CHUNK = 10_000      # records sorted in memory at a time (~2 MB of short paths)
FAN_IN = 64         # chunk files merged at once; more are merged in rounds first
READ_BLOCK = 1 << 16  # bytes a reader holds: FAN_IN of them at once in a merge


def _line(record) -> bytes:
    return json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


class RecordFile:
    """Lines written once, then read any number of times, also by several readers at once (os.pread: no
    shared file position). An anonymous temp file in `folder`."""

    def __init__(self, folder: str | Path | None):
        self.folder = folder
        self._file = tempfile.TemporaryFile(dir=folder)
        self._size = 0
        self.count = 0

    def write_lines(self, lines: Iterable[bytes]) -> None:
        buffer = []
        for line in lines:
            buffer.append(line)
            self.count += 1
            if len(buffer) >= 4096:
                self._write(b"".join(buffer))
                buffer.clear()
        if buffer:
            self._write(b"".join(buffer))

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._size += len(data)

    def lines(self) -> Iterator[bytes]:
        self._file.flush()
        fd, offset, rest = self._file.fileno(), 0, b""
        while offset < self._size:
            block = os.pread(fd, min(READ_BLOCK, self._size - offset), offset)
            if not block:
                break
            offset += len(block)
            *complete, rest = (rest + block).split(b"\n")
            yield from complete
        if rest:
            yield rest

    def __iter__(self) -> Iterator[list]:
        for line in self.lines():
            yield json.loads(line)

    def close(self) -> None:
        self._file.close()


class SortedRecords:
    """add() records (lists of str) in any order; sort() once; then iterate them sorted, as often as needed."""

    def __init__(self, folder: str | Path | None, chunk: int | None = None):
        self.folder, self.chunk = folder, chunk or CHUNK
        self._pending: list = []
        self._runs: list[RecordFile] = []
        self.result: RecordFile | None = None

    def add(self, record: list) -> None:
        self._pending.append(record)
        if len(self._pending) >= self.chunk:
            self._spill()

    def extend(self, records: Iterable[list]) -> SortedRecords:
        for record in records:
            self.add(record)
        return self

    def _spill(self) -> None:
        self._pending.sort()
        run = RecordFile(self.folder)
        run.write_lines(map(_line, self._pending))
        self._runs.append(run)
        self._pending = []

    def sort(self) -> RecordFile:
        """Merge everything into one sorted RecordFile (also when it all fitted in memory: what stays in
        memory for the rest of a run must not grow with the number of records)."""
        if self._pending or not self._runs:
            self._spill()
        while len(self._runs) > 1:
            group, self._runs = self._runs[:FAN_IN], self._runs[FAN_IN:]
            merged = RecordFile(self.folder)
            merged.write_lines(line for _, line in heapq.merge(*(_keyed(run) for run in group)))
            for run in group:
                run.close()
            self._runs.append(merged)
        self.result = self._runs[0]
        return self.result


def _keyed(run: RecordFile) -> Iterator[tuple[list, bytes]]:
    for line in run.lines():
        yield json.loads(line), line + b"\n"


class Listing:
    """(relpath, overlay name) records in relpath order, on disk."""

    def __init__(self, records: RecordFile):
        self.records = records

    def __len__(self) -> int:
        return self.records.count

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for relpath, overlay in self.records:
            yield relpath, overlay

    def keys(self) -> Iterator[str]:
        for relpath, _ in self:
            yield relpath

    def cursor(self) -> Callable[[str], str]:
        """name(key) for keys asked in increasing order (as RunJournal.pending asks for expected files)."""
        records = iter(self)
        current = next(records, None)

        def name(key: str) -> str:
            nonlocal current
            while current is not None and current[0] < key:
                current = next(records, None)
            if current is None or current[0] != key:
                raise KeyError(key)
            return current[1]
        return name

    def subset(self, keys: Iterable[str]) -> Listing:
        """The records of `keys` (sorted, each in this listing), as a new Listing."""
        chosen = RecordFile(self.records.folder)
        records = iter(self.records.lines())

        def matching():
            for key in keys:
                for line in records:
                    relpath = json.loads(line)[0]
                    if relpath == key:
                        yield line + b"\n"
                        break
                    if relpath > key:
                        raise KeyError(key)
                else:
                    raise KeyError(key)
        chosen.write_lines(matching())
        return Listing(chosen)

    def close(self) -> None:
        self.records.close()


def walk_images(folder: Path, is_image: Callable[[str], bool], skip: Path | None = None) -> Iterator[str]:
    """Relative paths (posix) of the image files under `folder`, in no particular order. Hidden folders and
    files are left out, as is `skip` (our own overlay folder when --output lies inside --input), and anything
    that is not a regular file (a FIFO named x.jpg would block the reader)."""
    skip = skip.resolve() if skip is not None else None
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and (Path(root) / d).resolve() != skip]
        prefix = Path(root).relative_to(folder).as_posix()
        prefix = "" if prefix == "." else prefix + "/"
        for name in files:
            if is_image(name) and not name.startswith(".") and os.path.isfile(os.path.join(root, name)):
                yield prefix + name


def name_group(relpath: str, printable: Callable[[str], str]) -> str:
    """Overlays of images whose folders differ only in letter case may clash: the same group."""
    return printable(relpath.rpartition("/")[0]).lower()


def list_inputs(folder: Path, skip: Path | None, scratch: str | Path | None, is_image: Callable[[str], bool],
                overlay_names: Callable[[list[str]], dict[str, str]], printable: Callable[[str], str]) -> Listing:
    """Walk `folder`, name every overlay, and return the sorted listing (temp files in `scratch`)."""
    by_group = SortedRecords(scratch).extend([name_group(r, printable), r]
                                             for r in walk_images(folder, is_image, skip)).sort()
    by_path = SortedRecords(scratch)
    for _, group in itertools.groupby(by_group, key=lambda record: record[0]):
        for relpath, name in overlay_names([relpath for _, relpath in group]).items():
            by_path.add([relpath, name])
    by_group.close()
    return Listing(by_path.sort())
