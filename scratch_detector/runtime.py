"""Process plumbing shared by the scripts: one-line errors, signals, atomic files, the output-folder check.
Standard library only: the core modules (dataset.py) import it too."""
from __future__ import annotations

import csv
import ctypes
import os
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """Something the user can fix (a path, a flag, a file); printed as one line, exit code 2."""


def run_main(main, skip_teardown: bool = False) -> None:
    """Run a script's main(): user-facing errors become one stderr line and exit 2, Ctrl-C exits 130.

    skip_teardown (for a script's `__main__` only, never in-process): once main() has returned, every file
    it wrote is closed and renamed into place, so exit without Python's teardown, whose garbage collection
    over torch's modules is slow (bench/profile_parts.py measures it).
    """
    exit_on_sigterm()
    try:
        code = main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was left behind", file=sys.stderr)
        code = 130
    if skip_teardown:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    sys.exit(code or 0)


def release_free_memory() -> bool:
    """Give the memory that malloc holds but no longer uses back to the system (glibc's malloc_trim): a training
    step with the heatmap loss allocates and frees far more than a plain one, and glibc would otherwise keep
    the freed pages resident, so that the process grows epoch after epoch. train.py calls it once an epoch:
    after every heatmap-loss step it cost time (the pages are faulted in again). False where there is no glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def exit_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt so `finally` blocks remove temp files, as for Ctrl-C."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


@contextmanager
def interrupts_deferred():
    """Ctrl-C or SIGTERM inside this block takes effect at its end, as KeyboardInterrupt: the cleanup that
    finishes the file being written and removes temp files runs to the end even if the user presses twice.
    Only the main thread can set signal handlers; elsewhere this changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {signum: signal.signal(signum, lambda number, frame: received.append(number))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise KeyboardInterrupt


def printable(text) -> str:
    """Any value as text that encodes as UTF-8: a file name that is not valid UTF-8 (surrogate-escaped by
    Python) becomes \\udce4 instead of a crash, as in predictions.csv."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def ensure_writable_dir(folder: str | Path, what: str) -> Path:
    """Create `folder` if needed and prove we can write there, before any slow work starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UserError(f"cannot write to {what} {folder}: {error.strerror or error}") from None
    return folder


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", fsync: bool = True, **kwargs):
    """Open a temp file beside `path`; rename it over `path` only when the block finishes without error.
    fsync=True also survives a power cut; worth it for the model and the CSV, not for every overlay."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **kwargs) as handle:
            yield handle
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_csv(path: str | Path, header: list[str], rows) -> None:
    """UTF-8; a file name that is not valid UTF-8 is written as \\udce4 escapes rather than failing the run."""
    try:
        with atomic_write(path, newline="", encoding="utf-8", errors="backslashreplace") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
    except OSError as error:  # disk full, or the name is taken by a folder: the old file is still intact
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
