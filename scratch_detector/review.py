"""The review page: one self-contained HTML file listing every image with its verdict and overlay thumbnail.

    infer.py    -> outputs/index.html   (beside predictions.csv; thumbnails are gradcam/*_gradcam.jpg)
    evaluate.py -> outputs/review.html  (beside report.pdf; wrong verdicts marked against the true label)

Open it straight from disk (file://): no server, no network, no CDN. The CSS and JS (review_assets/) are
inlined when the page is written, the images stay files beside the page (referenced by percent-encoded
relative paths, never embedded), and the rows travel as one JSON blob that the script turns into table rows
a chunk at a time, so a long list opens at once.

A page is streamed (PageWriter): rows go to a temp file as they come, and only counts stay in memory, so a run
over millions of images writes its page in constant memory. A browser cannot open millions of rows, though:
beyond PAGE_MAX_ROWS images the page lists every error and then the images with the highest p(defect), up to
PAGE_MAX_ROWS in all, and says so in its summary; the counts are over all images, and predictions.csv has
every row.

File names come from users, so nothing from the data is ever parsed as markup: the summary is HTML-escaped
here, the JSON blob has <, >, & and U+2028/2029 escaped (a name holding </script> cannot end the element),
the script builds the table with textContent only, and a Content-Security-Policy lets no script run but
the page's own (by hash) and lets the page fetch nothing but images.

Corrections (infer.py's page; not on a page whose rows carry the true label, as evaluate.py's do): each row
gets "scratch" / "not a scratch" buttons, the labels a person gives are kept in the browser's localStorage
under a key that names the run (PageWriter.labels_key), and the page builds labels.csv (image,label) in the
browser and downloads it through a blob: URL. The CSP needs no change for that: it restricts what the page
loads, and a download is a navigation, which no directive it sets governs.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import html
import json
import math
import tempfile
from pathlib import Path
from urllib.parse import quote

from .runtime import UserError, atomic_write, printable

CHUNK_ROWS = 200  # table rows built at a time; more as the user scrolls towards the end
PAGE_MAX_ROWS = 100_000  # rows a page lists at most: what a browser still opens
P_BINS = 10_000  # p(defect) histogram bins: the CSV's 4 decimals
SUMMARY_LABELS = {"image_size": "image size", "initialisation": "initialisation"}

# The page's style and script: real files, inlined into every page (the page stays one file that opens offline).
ASSETS = Path(__file__).resolve().parent / "review_assets"
CSS = (ASSETS / "review.css").read_text(encoding="utf-8")
JS = (ASSETS / "review.js").read_text(encoding="utf-8")


def _probability(value) -> float | None:
    try:
        p = float(value)
    except (TypeError, ValueError):
        return None
    return round(p, 6) if math.isfinite(p) else None


def overlay_url(relative_path: str) -> str:
    """An overlay's path relative to the page -> the URL to put in src: each segment percent-encoded, so a
    name with # ? % space or non-ASCII still loads (and never becomes a query or fragment)."""
    return quote(printable(relative_path), safe="/") if relative_path else ""


def script_json(value) -> str:
    """JSON that is safe inside a <script> element: <, >, & and the JS line separators become \\u escapes
    (inside JSON strings, the only place they can occur), so no file name can close the element."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char in "<>&\u2028\u2029":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


FAMILIAR = {"yes": True, "no": False}


def page_rows(rows) -> list[list]:
    """Row dicts (image, prediction, defect_probability, gradcam, status, optional truth, optional familiar
    'yes'/'no') -> compact lists."""
    compact = []
    for row in rows:
        truth = row.get("truth")
        compact.append([printable(row.get("image", "")), printable(row.get("prediction") or ""),
                        _probability(row.get("defect_probability")), overlay_url(row.get("gradcam") or ""),
                        printable(row.get("status") or "ok"), None if truth in (None, "") else printable(truth),
                        FAMILIAR.get(row.get("familiar"))])
    return compact


def counts(compact: list[list], has_truth: bool) -> dict[str, int]:
    """Images, and per filter: defect, non-defect, error (an overlay that failed still has its verdict, so
    it counts under its verdict too), wrong (a verdict that is not the true label)."""
    result = {"all": len(compact),
              "defect": sum(r[1] == "defect" for r in compact),
              "non-defect": sum(r[1] == "non-defect" for r in compact),
              "error": sum(r[4] != "ok" for r in compact)}
    if has_truth:
        result["wrong"] = sum(r[5] is not None and r[1] != "" and r[1] != r[5] for r in compact)
    if any(r[6] is not None for r in compact):
        result["unfamiliar"] = sum(r[6] is False for r in compact)
    return result


def model_summary(model_path, meta: dict, threshold: float, **more) -> dict:
    """The summary lines every page shows about the model; `more` adds lines (underscores read as spaces)."""
    return {"model": str(model_path), "image_size": f"{meta.get('image_size')} px",
            "initialisation": meta.get("pretrained") or "unknown",
            "model_trained": meta.get("date") or "unknown",
            "threshold": f"defect if p(defect) >= {float(threshold):.4f}",
            "familiarity": familiarity_line(meta), **more}


def familiarity_line(meta: dict) -> str:
    """What 'unfamiliar' means for this model, or why it cannot say."""
    stats = meta.get("familiarity")
    if stats is None:
        return ("not available: this model was trained without familiarity statistics, so no image is marked "
                "familiar or unfamiliar (retrain with python train.py to get them)")
    return (f"unfamiliar if the distance of its features to the training images' exceeds {float(stats['cutoff']):.2f}"
            f" (what {float(stats['quantile']):.1%} of validation images stay under); "
            "an unfamiliar image keeps its verdict, but it should not be trusted")


COUNT_LABELS = {"all": "images", "defect": "defect", "non-defect": "non-defect", "error": "errors", "wrong": "wrong",
                "unfamiliar": "unfamiliar"}
FILTER_LABELS = {"all": "All", "defect": "Defect", "non-defect": "Non-defect", "error": "Error", "wrong": "Wrong",
                 "unfamiliar": "Unfamiliar"}


def render_page(rows, summary: dict, title: str = "Scratch detector: review", corrections: bool | None = None) -> str:
    """The whole page as one string (see write_review_page)."""
    writer = PageWriter(None, summary, title, corrections=corrections)
    for row in rows:
        writer.add(row)
    parts = []
    writer.render(parts.append)
    return "".join(parts)


class PageWriter:
    """The review page of any number of rows in constant memory: add() each row (the dicts write_review_page
    takes), then write(). Rows are kept in a temp file in `scratch` as compact JSON lines, with the counts
    and a histogram of p(defect) in memory; beyond max_rows rows, write() lists the errors first, then the
    highest p(defect), max_rows in all (see the module docstring)."""

    def __init__(self, path: str | Path | None, summary: dict, title: str = "Scratch detector: review",
                 max_rows: int = PAGE_MAX_ROWS, scratch: str | Path | None = None, corrections: bool | None = None):
        """corrections: the label buttons and labels.csv; None: on unless rows carry the true label."""
        self.path, self.summary, self.title, self.max_rows = path, dict(summary), title, max_rows
        self.corrections = corrections
        self.rows_digest = hashlib.sha256()  # of every row's name and p(defect): see labels_key
        self.spool = tempfile.TemporaryFile(dir=scratch)
        self.numbers = dict.fromkeys(["all", "defect", "non-defect", "error", "wrong", "unfamiliar"], 0)
        self.has_truth = self.has_familiarity = False
        self.histogram = [0] * (P_BINS + 1)  # rows without an error, by p(defect)

    def add(self, row: dict) -> None:
        [compact] = page_rows([row])
        self.spool.write(script_json(compact).encode("utf-8") + b"\n")
        self.rows_digest.update(script_json(compact[0:3:2]).encode("utf-8") + b"\n")
        self.numbers["all"] += 1
        self.numbers["defect"] += compact[1] == "defect"
        self.numbers["non-defect"] += compact[1] == "non-defect"
        self.has_truth = self.has_truth or compact[5] is not None
        self.numbers["wrong"] += compact[5] is not None and compact[1] != "" and compact[1] != compact[5]
        self.has_familiarity = self.has_familiarity or compact[6] is not None
        self.numbers["unfamiliar"] += compact[6] is False
        if compact[4] != "ok":
            self.numbers["error"] += 1
        elif compact[2] is not None:
            self.histogram[_bin(compact[2])] += 1

    def labels_key(self) -> str:
        """The localStorage key of this run's labels. The run is what the summary names (its input folder, or
        evaluate's data and split, and the model file) and what it found: every image's name and p(defect).
        The results count because a folder's contents change (today's frames under yesterday's names must not
        inherit yesterday's labels) and a retrained model under the same path gives other p; the date does not,
        so a page written again for the same results (a resumed or repeated run) finds its labels."""
        run = [self.title] + [printable(self.summary.get(key, "")) for key in ("input", "data", "split", "model")]
        digest = hashlib.sha256(script_json(run).encode("utf-8") + self.rows_digest.digest())
        return "scratch-detector.labels." + digest.hexdigest()[:32]

    def _selection(self):
        """-> a test of (compact row, its place among the rows of its p bin) for the rows to list, and
        how many that lists; None when every row is listed."""
        errors = self.numbers["error"]
        if self.numbers["all"] <= self.max_rows:
            return None, self.numbers["all"]
        room = self.max_rows - min(errors, self.max_rows)
        cut, above = P_BINS + 1, 0  # every row in a bin over `cut`, and the first `room - above` in it
        while cut > 0 and above + self.histogram[cut - 1] <= room:
            cut -= 1
            above += self.histogram[cut]
        partial = cut - 1 if cut > 0 else None
        taken = {"error": 0, "partial": 0}

        def keep(row) -> bool:
            if row[4] != "ok":
                taken["error"] += 1
                return taken["error"] <= self.max_rows
            if row[2] is None:
                return False
            b = _bin(row[2])
            if b >= cut:
                return True
            if b == partial and taken["partial"] < room - above:
                taken["partial"] += 1
                return True
            return False
        return keep, min(errors, self.max_rows) + room

    def render(self, emit) -> None:
        """emit(text) the page, in pieces."""
        keep, listed = self._selection()
        numbers = dict(self.numbers)
        if not self.has_truth:
            del numbers["wrong"]
        if not self.has_familiarity:
            del numbers["unfamiliar"]
        summary = dict(self.summary)
        summary.setdefault("page_written", datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
        if keep is not None:
            summary["listed"] = (f"{listed:,} of {numbers['all']:,} images: every error, then the highest "
                                 f"p(defect) (a page lists at most {self.max_rows:,}; predictions.csv has all)")
        corrections = not self.has_truth if self.corrections is None else self.corrections
        head, tail = _page_frame(numbers, summary, self.title, self.has_truth, corrections)
        emit(head)
        emit('{"rows":[')
        self.spool.flush()
        self.spool.seek(0)
        first = True
        for line in self.spool:
            if keep is not None and not keep(json.loads(line)):
                continue
            emit(("" if first else ",") + line.decode("utf-8").rstrip("\n"))
            first = False
        labels = script_json({"key": self.labels_key()}) if corrections else "null"
        emit(f'],"has_truth":{"true" if self.has_truth else "false"},"chunk":{CHUNK_ROWS},"labels":{labels}}}')
        emit(tail)

    def write(self) -> Path:
        """Write the page to its path atomically and return the path."""
        path = Path(self.path)
        try:
            with atomic_write(path, "w", encoding="utf-8", newline="\n") as handle:
                self.render(handle.write)
        except OSError as error:
            raise UserError(f"cannot write {path}: {error.strerror or error}") from None
        finally:
            self.spool.close()
        return path


def _bin(p: float) -> int:
    return min(P_BINS, max(0, int(p * P_BINS + 0.5)))


def _page_frame(numbers: dict, summary: dict, title: str, has_truth: bool, corrections: bool = False
                ) -> tuple[str, str]:
    """The page before and after its JSON rows."""
    esc = lambda value: html.escape(printable(value), quote=True)  # noqa: E731
    count_boxes = "".join(f'<div class="count {key}"><b>{number}</b><span>{COUNT_LABELS[key]}</span></div>'
                          for key, number in numbers.items())
    meta_lines = "".join(f"<dt>{esc(SUMMARY_LABELS.get(key, key.replace('_', ' ')))}</dt><dd>{esc(value)}</dd>"
                         for key, value in summary.items())
    filter_buttons = "".join(
        f'<button type="button" data-filter="{key}" aria-pressed="{str(key == "all").lower()}">'
        f'{FILTER_LABELS[key]}<span class="n">{number}</span></button>' for key, number in numbers.items())
    truth_header = "<th>Truth</th>" if has_truth else ""
    label_header = '<th id="label-head">Your label</th>' if corrections else ""
    label_help = ("""<p>Label: click <b>scratch</b> or <b>not a scratch</b> on a row, or press
<kbd>s</kbd> (scratch), <kbd>n</kbd> (not a scratch), <kbd>u</kbd> (remove the label) on the selected row or in
the full overlay; <kbd>&uarr;</kbd> <kbd>&darr;</kbd> move between rows. Labels stay in this browser;
Download labels.csv saves them.</p>"""
                  if corrections else "")
    label_bar = ("""<div id="labels" role="group" aria-label="Your labels">
<span id="labelled" aria-live="polite">0 labelled</span>
<button type="button" id="download-labels" disabled>Download labels.csv</button>
<button type="button" id="clear-labels" disabled>Clear labels</button>
<span id="clear-confirm" hidden>Clear all <span id="clear-count"></span> labels?
<button type="button" id="clear-yes">Clear</button> <button type="button" id="clear-no">Keep</button></span>
<span id="labels-note" role="status"></span>
</div>
""" if corrections else "")
    csp = ("default-src 'none'; img-src 'self' file: data: blob:; "
           f"style-src {_csp_hash(CSS)}; script-src {_csp_hash(JS)}; base-uri 'none'; form-action 'none'")
    head = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{CSS}</style>
</head>
<body>
<header><h1>{esc(title)}</h1><p>Click a row for the full overlay (arrow keys: previous / next, Escape: close).
Overlay: the image | the heatmap of where the model sees a scratch.</p>{label_help}</header>
<section id="summary" aria-label="Summary">
<div class="counts">{count_boxes}</div>
<dl class="meta">{meta_lines}</dl>
</section>
<nav id="controls" aria-label="Filter and sort">
<div class="filters" role="group" aria-label="Show">{filter_buttons}</div>
<label>Sort <select id="sort">
<option value="p-desc">p(defect), high to low</option>
<option value="p-asc">p(defect), low to high</option>
<option value="name-asc">name, A to Z</option>
<option value="name-desc">name, Z to A</option>
</select></label>
<input id="search" type="search" placeholder="Find in names" aria-label="Find in names">
<span id="shown" aria-live="polite"></span>
{label_bar}</nav>
<main>
<table id="results">
<thead><tr><th>Overlay</th><th><button type="button" data-sort="name-asc name-desc">Image</button></th>
<th>Prediction</th><th><button type="button" data-sort="p-desc p-asc">p(defect)</button></th>{truth_header}
<th>Status</th>{label_header}</tr></thead>
<tbody id="rows"></tbody>
</table>
<div id="more" hidden><button type="button" id="more-button">Show more</button></div>
<noscript><p>This page needs JavaScript to list the images; the same results are in the CSV beside it.</p></noscript>
</main>
<dialog id="viewer" aria-label="Overlay">
<figure><img id="viewer-img" alt=""><span id="viewer-none" class="none" hidden>no overlay for this image</span></figure>
<div class="viewer-bar"><span id="viewer-caption" class="caption"></span><span id="viewer-label"></span>
<button type="button" id="viewer-prev" aria-label="Previous">&larr;</button>
<button type="button" id="viewer-next" aria-label="Next">&rarr;</button>
<button type="button" id="viewer-close" aria-label="Close">Close</button></div>
</dialog>
<script type="application/json" id="review-data">"""
    tail = f"""</script>
<script>{JS}</script>
</body>
</html>
"""
    return head, tail


def write_review_page(path: str | Path, rows, summary: dict, title: str = "Scratch detector: review",
                      corrections: bool | None = None) -> Path:
    """Write the review page to `path` atomically and return the path.

    rows: dicts with image, prediction ('defect' / 'non-defect' / '' for unreadable files),
    defect_probability (number, numeric string or ''), gradcam (the overlay's path relative to the page's
    folder, '' for none), status ('ok' or 'error: ...') and optionally truth (the true label: rows whose
    prediction differs are marked wrong and get their own filter). summary: label -> value lines for the
    top of the page (model_summary() gives the model's); the counts and the date are added here.
    corrections: the label buttons and labels.csv (None: unless the rows carry the true label).
    """
    writer = PageWriter(path, summary, title, scratch=Path(path).parent if Path(path).parent.is_dir() else None,
                        corrections=corrections)
    for row in rows:
        writer.add(row)
    return writer.write()
