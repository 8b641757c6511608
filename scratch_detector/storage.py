"""The storage of an inference run: its input listing and its journal, both on disk, so that memory does not
grow with the number of images and a killed run is finished, not restarted, by running the same command again.

The input listing (Listing): every image's relative path and overlay name, in path order.

    listing = sorted_listing(relpaths, scratch, names)    # sort, name: (relpath, overlay) records
    for relpath, overlay in listing: ...                 # as often as needed, in relpath order
    todo = listing.subset(keys)                          # the records of some keys (sorted), on disk too

A sorted list of the path strings of a large archive, and a dict of its overlay names, would grow with the
archive. Here the records go through SortedRecords, an external sort: CHUNK records at a time are sorted in
memory and spilled to an anonymous temp file (no name: it vanishes when the process ends, kill -9 included),
then merged. What is held at once: CHUNK records, and while naming, one folder's paths (see overlay names
below); os.walk itself holds one folder's names at a time.

Records are lists of str written as one JSON line each (ASCII: a file name that is not valid UTF-8,
surrogate-escaped by Python, or one holding a newline, reads back as the same str). They sort as Python
sorts the lists: the relative paths in plain str order, as RunJournal needs its keys.

Overlay names: settings.overlay_names over all paths at once, computed one folder at a time. Two overlay
names can only clash (same name, or the same up to letter case) when their images' folders are the same up
to letter case, so the paths are sorted by (folder in lower case, path) and each such group is named alone:
the same names as one call over everything (tests/test_resume.py checks it), in memory for the largest
group only. Keep the folders of an archive small enough for the filesystem anyway.

The journal (RunJournal) lives in OUT/.journal/ (a dot folder: never mixed with the user's files, and
dataset.walk_images skips it):
    key.json            what makes the results valid (model digest, threshold, CAM, tiling, input folder)
    seg-00000001.log    result lines, append-only; each run writes new segments, never appends to old ones
    lock                flock'd while a run holds the journal, so two runs cannot share an output folder

A line is `<crc32 of JSON, 8 hex digits> <JSON>\\n`, JSON = [key, {table: rows}, files], ASCII-only (json's
ensure_ascii escapes any file name that is not valid UTF-8). A line torn by kill -9 or a power cut fails its
CRC and is ignored: that item is simply redone.

The driver (inference.run_inference, whichever engine does the work):

    run_key = settings.run_key()       # model digest, threshold, CAM, tiling, input folder ...
    with RunJournal.open(output, run_key, restart=settings.restart) as journal:
        todo = list(journal.pending(relpaths, expected_files=lambda r: [names[r]]))  # relpaths sorted
        ...  # per finished item, from any thread, AFTER its overlay is renamed into place (atomic_write):
        journal.record(relpath, files=[overlay], predictions=[row], detections=tile_rows)
        ...  # once every input has a record:
        journal.assemble(relpaths, predictions=(csv_path, CSV_COLUMNS), detections=(det_path, DET_COLUMNS))
        ...  # the review page etc., then:
        journal.finish()   # complete: the next run starts fresh

Rules for the driver:
  * record(key, files=...) only once every listed file (relative to OUT) is completely written and renamed
    into place. The journal puts those files on disk before it writes the line, so no line on disk can name
    a file that a power cut could still take back; pending() redoes an item whose file is gone or misnamed.
  * Record in roughly input order: lines up to WINDOW records out of order cost nothing; beyond that the
    journal starts a new segment (still correct; many segments are merged before reading).
  * An item that is never recorded (e.g. an overlay that could not be written for lack of disk space) is
    redone by the next run; assemble() refuses to write while an input has no record.
  * Keys are the input's relative paths, sorted as the listing sorts them (plain str order);
    rows hold str, int, float, bool or None, which read back as the same values.
  * pending() yields lazily: a driver may feed it straight to its reader instead of making a list.

Memory does not grow with the number of images: there is no set of done keys. pending() and assemble() walk
the sorted input keys and the segments' merged lines side by side, holding at most WINDOW lines per segment
(MAX_SEGMENTS segments at most); the writer holds one flush batch and WINDOW keys.
"""
from __future__ import annotations

import csv
import ctypes
import hashlib
import heapq
import itertools
import json
import os
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

from .runtime import UserError, atomic_write, interrupts_deferred, printable

try:
    import fcntl
except ImportError:  # Windows: no lock; one run per output folder is then up to the user
    fcntl = None
try:
    _syncfs = ctypes.CDLL(None, use_errno=True).syncfs if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _syncfs = None

# ---------------------------------------------------------------------------------------------------------
# The input listing
# ---------------------------------------------------------------------------------------------------------
CHUNK = 10_000      # records sorted in memory at a time
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


def name_group(relpath: str) -> str:
    """Overlays of images whose folders differ only in letter case may clash: the same group."""
    return printable(relpath.rpartition("/")[0]).lower()


def sorted_listing(relpaths: Iterable[str], scratch: str | Path | None,
                   overlay_names: Callable[[list[str]], dict[str, str]]) -> Listing:
    """Name every overlay of `relpaths` (in any order) and return the sorted listing (temp files in `scratch`)."""
    by_group = SortedRecords(scratch).extend([name_group(r), r] for r in relpaths).sort()
    by_path = SortedRecords(scratch)
    for _, group in itertools.groupby(by_group, key=lambda record: record[0]):
        for relpath, name in overlay_names([relpath for _, relpath in group]).items():
            by_path.add([relpath, name])
    by_group.close()
    return Listing(by_path.sort())


# ---------------------------------------------------------------------------------------------------------
# The journal
# ---------------------------------------------------------------------------------------------------------
JOURNAL_DIR = ".journal"
SEGMENT_GLOB = "seg-*.log"
WINDOW = 1024        # lines a reader sorts in memory per segment; the writer splits where that cannot suffice
MAX_SEGMENTS = 32    # beyond this, segments are merged first, so a reader holds few files and windows


def file_sha256(path: str | Path) -> str:
    """The checkpoint's identity for the run key: its bytes, not its name or date (read streaming)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def lines_on_disk(output_dir: str | Path) -> int:
    """Result lines in a run's journal segments now, read from outside the run (a bench or a test that kills
    it part way): the records flushed so far, a record written twice counting twice."""
    total = 0
    for segment in (Path(output_dir) / JOURNAL_DIR).glob(SEGMENT_GLOB):
        try:
            total += segment.read_bytes().count(b"\n")
        except OSError:  # merged away while we looked
            pass
    return total


class RunJournal:
    flush_every = 256     # records per durable batch; at most this many items (or flush_seconds) are redone
    flush_seconds = 2.0

    def __init__(self, output: Path, log: Callable[[str], None]):
        self.output, self.folder, self.log = output, output / JOURNAL_DIR, log
        self.skipped = 0      # inputs pending() found already done
        self.damaged = 0      # lines the last read ignored as torn or corrupt
        self._lock_fd: int | None = None
        self._fd: int | None = None   # the segment being written
        self._window: list[str] = []  # the writer's copy of a reader's window, to know when to split
        self._emitted: str | None = None
        self._buffer: list[tuple[str, bytes, list]] = []
        self._last_flush = time.monotonic()
        self._mutex = threading.Lock()

    @classmethod
    def open(cls, output_dir: str | Path, run_key: dict, restart: bool = False,
             log: Callable[[str], None] = print) -> RunJournal:
        """Resume the journal in output_dir when its key equals run_key; otherwise (or with restart) discard
        it with a one-line message and start empty. run_key values: anything JSON can hold."""
        journal = cls(Path(output_dir), log)
        journal.folder.mkdir(parents=True, exist_ok=True)
        journal._lock()
        try:
            journal._start(json.loads(json.dumps(run_key, sort_keys=True, default=str)), restart)
        except BaseException:
            journal.close()
            raise
        return journal

    def _lock(self) -> None:
        self._lock_fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock_fd)
                self._lock_fd = None
                raise UserError(f"another run is writing to {self.output} (its journal is locked)") from None

    def _start(self, key: dict, restart: bool) -> None:
        for stale in self.folder.glob(".*.tmp"):  # atomic_write's temp file of a killed run
            stale.unlink()
        key_path = self.folder / "key.json"
        try:
            stored = json.loads(key_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stored = None
        segments = self._segment_paths()
        if stored == key and not restart:
            if segments:
                self.log(f"resuming the unfinished run in {self.output} (--restart to start over)")
        else:
            if segments and restart:
                self.log(f"--restart: discarding the unfinished run in {self.output}")
            elif segments and isinstance(stored, dict):
                changed = sorted(k for k in stored.keys() | key.keys() if stored.get(k) != key.get(k))
                self.log(f"{', '.join(changed)} changed since the unfinished run in {self.output}: starting over")
            elif segments:
                self.log(f"the journal in {self.output} has no readable key: starting over")
            with interrupts_deferred():
                key_path.unlink(missing_ok=True)  # first: without a key, no segment is ever trusted
                _fsync(self.folder)
                for path in segments:
                    path.unlink()
                with atomic_write(key_path, encoding="utf-8") as handle:
                    json.dump(key, handle, sort_keys=True)
                _fsync(self.folder)
        self._compact()
        self._previous = self._segment_paths()  # what pending() reads; this run's own lines come after

    def pending(self, keys: Iterable[str], expected_files: Callable[[str], Iterable[str]] | None = None
                ) -> Iterator[str]:
        """The keys without a valid result from an earlier run, in order. keys: the current inputs, sorted.
        A record is redone when one of its files is missing (deleted, or its rename lost in a power cut) or,
        given expected_files(key) (the names this run would write), is not among them: inputs added or
        deleted since can change how overlays that share a name are told apart."""
        self.skipped = 0
        for key, record in self._walk(keys, self._previous):
            files = record[4] if record else ()
            if record is None or not all((self.output / name).is_file() for name in files) or (
                    expected_files is not None and not set(files) <= set(expected_files(key))):
                yield key
            else:
                self.skipped += 1
        if self.damaged:
            self.log(f"ignored {self.damaged} torn or damaged journal line(s): those images are redone")

    def record(self, key: str, files: Iterable[str] = (), **tables: list) -> None:
        """One finished input: its rows per table (e.g. predictions=[row], detections=rows) and the files it
        wrote. Call only after those files are complete and renamed into place. Thread-safe."""
        if not isinstance(key, str):
            raise TypeError(f"journal keys are relative paths (str), not {type(key).__name__}")
        files = list(files)
        line = _encode(key, tables, files)
        with self._mutex:
            if self._lock_fd is None:
                raise ValueError("record() on a closed journal")
            self._buffer.append((key, line, files))
            if len(self._buffer) >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_seconds:
                self._flush()

    def flush(self) -> None:
        """Make every record so far durable now (close() and assemble() do this too)."""
        with self._mutex:
            self._flush()

    def _flush(self) -> None:
        """The records' files (data and renames) go to disk first, then their lines are written and fsync'd:
        a line on disk never names a file that a power cut could still take back. Ctrl-C waits for the end."""
        if not self._buffer:
            return
        with interrupts_deferred():
            try:
                make_durable([self.output / name for _, _, files in self._buffer for name in files])
                for key, line, _ in self._buffer:
                    if self._fd is None or (self._emitted is not None and key < self._emitted):
                        self._new_segment()  # too far out of order for a reader's window
                    heapq.heappush(self._window, key)
                    if len(self._window) > WINDOW:
                        self._emitted = heapq.heappop(self._window)
                    _write_all(self._fd, line)
                os.fsync(self._fd)
            except OSError as error:
                self._end_segment(sync=False)  # a half-written line ends this segment; the next starts clean
                raise UserError(f"cannot write the run journal in {self.folder}: "
                                f"{error.strerror or error}") from None
            self._buffer.clear()
            self._last_flush = time.monotonic()

    def _new_segment(self) -> None:
        self._end_segment()
        number = max((int(p.name[4:-4]) for p in self._segment_paths()), default=0) + 1
        self._fd = os.open(self.folder / f"seg-{number:08d}.log", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        _fsync(self.folder)
        self._window, self._emitted = [], None

    def _end_segment(self, sync: bool = True) -> None:
        if self._fd is not None:
            try:
                if sync:
                    os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None

    def assemble(self, keys: Iterable[str], on_item: Callable[[str, dict], None] | None = None,
                 **tables: tuple[str | Path, list[str]]) -> int:
        """Write each table's CSV, table=(path, header), for exactly the inputs in keys (sorted; records of
        inputs deleted since are left out), rows in key order and within an item in recorded order: the
        bytes runtime.write_csv writes from all rows at once, streamed. Every file is written in full
        before any is renamed into place. on_item(key, tables) sees each item, e.g. for counts.
        Returns the number of inputs; raises RuntimeError, writing nothing, if an input has no record."""
        with self._mutex:
            self._flush()
            self._end_segment()
        self._compact()
        count, missing, first_missing = 0, 0, None
        try:
            with ExitStack() as stack:
                writers = {}
                for table, (path, header) in tables.items():  # as runtime.write_csv opens its file
                    handle = stack.enter_context(atomic_write(path, newline="", encoding="utf-8",
                                                              errors="backslashreplace"))
                    writers[table] = csv.writer(handle)
                    writers[table].writerow(header)
                for key, record in self._walk(keys, self._segment_paths()):
                    if record is None:
                        missing += 1
                        first_missing = first_missing or key
                        continue
                    for table, writer in writers.items():
                        writer.writerows(record[3].get(table, ()))
                    if on_item is not None:
                        on_item(key, record[3])
                    count += 1
                if missing:  # before any rename: the temp files are removed, the old CSVs stay
                    raise RuntimeError(f"{missing} input(s) have no result in the journal, "
                                       f"e.g. {first_missing!r}: finish the run before assembling")
                with interrupts_deferred():
                    stack.close()  # fsync and rename each file
        except OSError as error:  # disk full, or the name is taken by a folder: the old files are intact
            raise UserError(f"cannot write {error.filename or 'the results'}: {error.strerror or error}") from None
        return count

    def finish(self) -> None:
        """All outputs are written: delete the journal, so that the next run starts fresh."""
        with self._mutex:
            self._flush()
            self._end_segment(sync=False)
        (self.folder / "key.json").unlink(missing_ok=True)  # first: a crash midway leaves nothing trusted
        for path in self._segment_paths():
            path.unlink()
        (self.folder / "lock").unlink(missing_ok=True)
        self.close()
        try:
            self.folder.rmdir()
        except OSError:  # something not ours in there: leave it
            pass

    def close(self) -> None:
        """Flush and release the journal; a later open() of the same run resumes from here."""
        with self._mutex:
            try:
                if self._lock_fd is not None:
                    self._flush()
            finally:
                self._end_segment()
                if self._lock_fd is not None:
                    os.close(self._lock_fd)  # releases the flock
                    self._lock_fd = None

    def __enter__(self) -> RunJournal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # reading: segments merged in key order, the newest record of a key winning

    def _segment_paths(self) -> list[Path]:
        return sorted(self.folder.glob(SEGMENT_GLOB))

    def _read_segment(self, path: Path) -> Iterator[tuple]:
        """(key, segment number, line number, tables, files) of the valid lines, in key order: the writer
        began a new segment wherever a window of WINDOW lines could not restore that order."""
        number, window = int(path.name[4:-4]), []
        with open(path, "rb") as handle:
            for line_number, line in enumerate(handle):
                record = _decode(line)
                if record is None:
                    self.damaged += 1
                    continue
                heapq.heappush(window, (record[0], number, line_number, record[1], record[2]))
                if len(window) > WINDOW:
                    yield heapq.heappop(window)
        while window:
            yield heapq.heappop(window)

    def _records(self, segments: list[Path]) -> Iterator[tuple]:
        """The newest record of each recorded key, in key order."""
        self.damaged = 0
        newest = None
        for entry in heapq.merge(*(self._read_segment(path) for path in segments)):
            if newest is not None and entry[0] != newest[0]:
                if entry[0] < newest[0]:
                    raise RuntimeError(f"journal segment out of order at {entry[0]!r}: rerun with --restart")
                yield newest
            newest = entry
        if newest is not None:
            yield newest

    def _walk(self, keys: Iterable[str], segments: list[Path]) -> Iterator[tuple[str, tuple | None]]:
        """(key, its newest record or None) for each input key; records of keys not in `keys` are passed over."""
        records = self._records(segments)
        record = next(records, None)
        previous = None
        for key in keys:
            if previous is not None and key <= previous:
                raise ValueError(f"keys must be sorted and unique (as the listing sorts them): "
                                 f"{key!r} after {previous!r}")
            previous = key
            while record is not None and record[0] < key:
                record = next(records, None)
            yield key, (record if record is not None and record[0] == key else None)

    def _compact(self) -> None:
        """Merge each run of MAX_SEGMENTS segments into one (newest record per key), until few are left.
        The merge replaces the run's newest segment, so it keeps its precedence over later ones; a crash
        before the older ones are deleted leaves only duplicates that lose to it."""
        segments = self._segment_paths()
        while len(segments) > MAX_SEGMENTS:
            for start in range(0, len(segments), MAX_SEGMENTS):
                group = segments[start:start + MAX_SEGMENTS]
                if len(group) > 1:
                    with atomic_write(group[-1], "wb") as handle:
                        for key, _, _, tables, files in self._records(group):
                            handle.write(_encode(key, tables, files))
                    for path in group[:-1]:
                        path.unlink()
            _fsync(self.folder)
            segments = self._segment_paths()


def _encode(key: str, tables: dict, files: list) -> bytes:
    payload = json.dumps([key, tables, files], ensure_ascii=True, separators=(",", ":")).encode("ascii")
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def _decode(line: bytes) -> list | None:
    """[key, tables, files] from one line, or None for a torn or damaged one."""
    try:
        crc, payload = line.rstrip(b"\n").split(b" ", 1)
        if len(crc) == 8 and int(crc, 16) == zlib.crc32(payload):
            record = json.loads(payload)
            if (isinstance(record, list) and len(record) == 3 and isinstance(record[0], str)
                    and isinstance(record[1], dict) and isinstance(record[2], list)):
                return record
    except ValueError:  # no space, bad hex, bad JSON or UTF-8
        pass
    return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def make_durable(paths: list[Path]) -> None:
    """Put these files' data and names (their renames) on disk. Where Linux has syncfs, one call per
    filesystem: one journal commit, where an fsync per file costs a commit each. Elsewhere, fsync each file
    and folder."""
    folders = {path.parent for path in paths}
    if _syncfs is None:
        for path in [*paths, *folders]:
            _fsync(path)
        return
    filesystems = {}
    for folder in folders:
        try:
            filesystems.setdefault(os.stat(folder).st_dev, folder)
        except FileNotFoundError:
            pass
    for folder in filesystems.values():
        fd = os.open(folder, os.O_RDONLY)
        try:
            if _syncfs(fd) != 0:
                error = ctypes.get_errno()
                raise OSError(error, os.strerror(error), str(folder))
        finally:
            os.close(fd)


def _fsync(path: Path) -> None:
    """fsync a file or folder by name. One already gone is left to pending(), which redoes its item."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
