"""The review page (review.py): escaping, and the real page in a real headless Chromium, with its labels
(corrections kept in localStorage, downloaded as labels.csv).

The browser tests need /usr/bin/chromium (Debian package `chromium`; .ci/run installs it) and the `playwright`
package (requirements-dev.txt), which only drives that browser: `playwright install` is never needed. Where
either is missing the browser tests skip, with the reason as a warning; with CI set (CI=true) they fail.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import random
import re
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import run_script, save_image, unavailable

from scratch_detector import review

HOSTILE = "<script>alert(1)</script>.png"  # the '/' makes it a folder '<script>alert(1)<' and a file 'script>.png'
ODD_NAMES = [HOSTILE, "<img src=x onerror=alert(2)>.png", "a \"b\" & 'c' #1 ?x 100%.png", "line\u2028sep\u2029.png"]
# functions, not expressions: Playwright evaluates an expression string with eval, which the page's CSP forbids
ALL_THUMBNAILS_LOADED = "() => [...document.querySelectorAll('#rows img')].every(i => i.complete && i.naturalWidth > 0)"
VIEWER_IMAGE_LOADED = "() => (i => i.complete && i.naturalWidth > 0)(document.getElementById('viewer-img'))"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--no-first-run", "--disable-sync"]


class PageParser(HTMLParser):
    """Every element's tag and attributes, and the text of each <script> and <dd>, as a browser would parse."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.scripts, self.dds, self._open = [], [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in ("script", "dd"):
            self._open = [tag, dict(attrs), ""]

    def handle_data(self, data):
        if self._open:
            self._open[2] += data

    def handle_endtag(self, tag):
        if self._open and tag == self._open[0]:
            (self.scripts if tag == "script" else self.dds).append((self._open[1], self._open[2]))
            self._open = None


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    return parser


def hostile_rows():
    rows = [{"image": name, "prediction": "defect", "label": 1, "defect_probability": "0.9", "status": "ok",
             "gradcam": f"gradcam/{name.rsplit('.', 1)[0]}_gradcam.jpg", "truth": "non-defect"} for name in ODD_NAMES]
    rows.append({"image": "bad</script><script>alert(3)</script>.jpg", "prediction": "", "label": "",
                 "defect_probability": "", "gradcam": "", "status": "error: <b>unreadable</b> & \"odd\""})
    return rows


# ---------------------------------------------------------------------------------------------------------
# Unit tests: what the page's HTML and JSON say, parsed without a browser
# ---------------------------------------------------------------------------------------------------------
def test_hostile_names_stay_data():
    rows = hostile_rows()
    page = review.render_page(rows, review.model_summary("m</script><script>alert(4)</script>.pth",
                                                         {"image_size": 64, "pretrained": "none"}, 0.5))
    parsed = parse(page)
    scripts = [(attrs, text) for attrs, text in parsed.scripts]
    assert [attrs.get("type") for attrs, _ in scripts] == ["application/json", None]  # no third script
    elements = [attrs for tag, attrs in parsed.tags if tag in ("img", "svg", "iframe")]
    assert elements == [{"id": "viewer-img", "alt": ""}]  # only the page's own viewer image
    assert not [attrs for _, attrs in parsed.tags if any(key.startswith("on") for key in attrs)]
    blob = json.loads(scripts[0][1])
    assert [r[0] for r in blob["rows"]] == [r["image"] for r in rows]
    assert blob["rows"][-1][4] == rows[-1]["status"]
    raw = scripts[0][1]
    assert not re.search(r"[<>&\u2028\u2029]", raw)  # all of them \u-escaped
    assert "m</script><script>alert(4)</script>.pth" in [text for _, text in parsed.dds]  # summary: text again


def test_overlay_urls_are_percent_encoded_relative_paths():
    assert review.overlay_url("gradcam/a \"b\" & 'c' #1 ?x 100%_gradcam.jpg") == \
        "gradcam/a%20%22b%22%20%26%20%27c%27%20%231%20%3Fx%20100%25_gradcam.jpg"
    assert review.overlay_url("gradcam/<script>alert(1)</script>_gradcam.jpg") == \
        "gradcam/%3Cscript%3Ealert%281%29%3C/script%3E_gradcam.jpg"
    assert review.overlay_url("gradcam/stahl_\u00e4_gradcam.jpg") == "gradcam/stahl_%C3%A4_gradcam.jpg"
    assert review.overlay_url("gradcam/\udce4_gradcam.jpg") == "gradcam/%5Cudce4_gradcam.jpg"  # as infer names it
    assert review.overlay_url("") == ""


def test_counts_wrong_and_filters():
    rows = hostile_rows()
    rows.append({"image": "right.png", "prediction": "non-defect", "defect_probability": 0.1, "gradcam": "",
                 "status": "ok", "truth": "non-defect"})
    compact = review.page_rows(rows)
    assert review.counts(compact, True) == {"all": 6, "defect": 4, "non-defect": 1, "error": 1, "wrong": 4}
    buttons = [attrs["data-filter"] for tag, attrs in parse(review.render_page(rows, {})).tags
               if tag == "button" and "data-filter" in attrs]
    assert buttons == ["all", "defect", "non-defect", "error", "wrong"]
    without_truth = [{k: v for k, v in r.items() if k != "truth"} for r in rows]
    assert "wrong" not in review.counts(review.page_rows(without_truth), False)
    assert review.page_rows([{"image": "x", "defect_probability": float("nan")}])[0][2] is None


def test_content_security_policy_allows_exactly_the_inline_code():
    page = review.render_page(hostile_rows(), {})
    policy = next(attrs["content"] for tag, attrs in parse(page).tags
                  if tag == "meta" and attrs.get("http-equiv") == "Content-Security-Policy")
    for source, directive in ((review.JS, "script-src"), (review.CSS, "style-src")):
        digest = base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()
        assert f"{directive} 'sha256-{digest}'" in policy
    assert "default-src 'none'" in policy and "http" not in policy


def label_json(page: str):
    return json.loads(next(text for attrs, text in parse(page).scripts if attrs.get("id") == "review-data"))["labels"]


def test_labels_key_names_the_run_and_controls_only_where_labels_make_sense():
    rows = [{"image": f"coil_{i}.png", "prediction": "defect", "defect_probability": i / 10, "gradcam": "",
             "status": "ok"} for i in range(5)]
    summary = {"input": "/line3/today", "model": "model_binary.pth", "page_written": "monday"}

    def key(rows=rows, **changes):
        writer = review.PageWriter(None, {**summary, **changes})
        for row in rows:
            writer.add(row)
        return writer.labels_key()
    same = key()
    assert same == key(page_written="tuesday") and re.fullmatch(r"scratch-detector\.labels\.[0-9a-f]{32}", same)
    assert key(input="/line3/yesterday") != same and key(model="other.pth") != same
    assert key(rows[:4]) != same  # one image fewer
    assert key([{**r, "image": "x.png"} if i == 2 else r for i, r in enumerate(rows)]) != same  # same name, other image
    assert key([{**r, "defect_probability": 0.25} if i == 2 else r for i, r in enumerate(rows)]) != same  # other p

    infer_page = review.render_page(rows, summary)
    assert label_json(infer_page) == {"key": same}
    ids = {attrs.get("id") for _, attrs in parse(infer_page).tags}
    assert {"labels", "download-labels", "clear-labels", "label-head"} <= ids
    for page in (review.render_page(hostile_rows(), summary),  # rows with the truth: evaluate.py's page
                 review.render_page(rows, summary, corrections=False)):
        assert label_json(page) is None
        assert not {"labels", "download-labels", "label-head"} & {attrs.get("id") for _, attrs in parse(page).tags}


def test_page_is_written_atomically(tmp_path):
    target = tmp_path / "index.html"
    target.write_text("old")
    assert review.write_review_page(target, hostile_rows(), {}) == target
    assert target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["index.html"]  # no temp file left


# ---------------------------------------------------------------------------------------------------------
# Browser tests: headless Chromium (Debian package) driven by Playwright
# ---------------------------------------------------------------------------------------------------------
def browser_unavailable(reason: str):
    unavailable("review page browser tests", reason, warn=True)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        browser_unavailable(f"playwright not importable ({error}); pip install -r requirements-dev.txt")
    executable = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not executable or not Path(executable).is_file():
        browser_unavailable("no chromium found (apt-get install chromium, or set CHROMIUM=/path/to/chromium)")
    manager = sync_playwright().start()
    try:
        chromium = manager.chromium.launch(executable_path=executable, headless=True, args=LAUNCH_ARGS)
    except Exception as error:
        manager.stop()
        browser_unavailable(f"{executable} did not launch: {' '.join(str(error).split())[:300]}")
    yield chromium
    chromium.close()
    manager.stop()


@pytest.fixture
def page(browser):
    """A fresh page that records every JS dialog (alert/confirm/prompt) and script error."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.dialogs, tab.errors = [], []
    tab.on("dialog", lambda dialog: (tab.dialogs.append(dialog.message), dialog.dismiss()))
    tab.on("pageerror", lambda error: tab.errors.append(str(error)))
    yield tab
    context.close()


@pytest.fixture(scope="module")
def infer_run(tmp_path_factory, tiny_checkpoint):
    """infer.py on a few synthetic images with hostile names and one unreadable file -> (output, csv rows)."""
    base = tmp_path_factory.mktemp("review_infer")
    images = base / "images"
    save_image(images / "plain.png", seed=1)
    save_image(images / "scratch_2.png", "scratch", seed=2)
    for seed, name in enumerate(ODD_NAMES, 3):
        save_image(images / name, "scratch" if seed % 2 else "plain", seed=seed)
    (images / "broken.jpg").write_bytes(b"this is not a JPEG")
    output = base / "out"
    result = run_script("infer.py", "--input", images, "--output", output, "--model", tiny_checkpoint)
    assert result.returncode == 0, result.stderr
    assert f"review page: {output / 'index.html'}" in result.stdout
    with open(output / "predictions.csv", newline="", encoding="utf-8") as handle:
        return output, list(csv.DictReader(handle))


def texts(page, selector: str) -> list[str]:
    return page.locator(selector).all_text_contents()


def p_values(page) -> list[float | None]:
    return [None if t == "\u2013" else float(t) for t in texts(page, "#rows td.p")]


def assert_sorted(values, descending: bool):
    numbers = [v for v in values if v is not None]
    assert numbers == sorted(numbers, reverse=descending)
    assert values == numbers + [None] * (len(values) - len(numbers))  # no verdict: always last


def test_infer_page_in_chromium(page, infer_run, tmp_path):
    output, csv_rows = infer_run
    page.goto((output / "index.html").as_uri())
    page.wait_for_selector("body[data-ready]", timeout=30_000)

    assert page.locator("#rows tr").count() == len(csv_rows) == 7
    assert sorted(texts(page, "#rows td.name")) == sorted(r["image"] for r in csv_rows)
    assert page.locator("#rows td.name", has_text=HOSTILE).count() == 1  # shown as text ...
    assert page.evaluate("document.scripts.length") == 2  # ... and no element made from any name
    assert page.locator("img[src='x'], #rows b, #rows script").count() == 0
    counts = dict(zip(texts(page, ".count span"), texts(page, ".count b")))
    errors = [r for r in csv_rows if r["status"] != "ok"]
    assert counts == {"images": "7", "defect": str(sum(r["prediction"] == "defect" for r in csv_rows)),
                      "non-defect": str(sum(r["prediction"] == "non-defect" for r in csv_rows)),
                      "errors": str(len(errors))}
    assert [r["image"] for r in errors] == ["broken.jpg"]
    page.wait_for_function(ALL_THUMBNAILS_LOADED, timeout=30_000)  # every thumbnail loads, names with # ? % & included
    assert page.locator("#rows img").count() == len(csv_rows) - len(errors)
    assert all(page.locator("#rows img").evaluate_all("imgs => imgs.map(i => i.loading === 'lazy')"))

    page.click("button[data-filter=error]")
    assert texts(page, "#rows td.name") == ["broken.jpg"]
    assert all(t.startswith("error: ") for t in texts(page, "#rows td.status"))
    page.click("button[data-filter=all]")
    assert page.locator("#rows tr").count() == len(csv_rows)

    page.select_option("#sort", "p-asc")
    ascending = p_values(page)
    assert_sorted(ascending, descending=False)
    page.select_option("#sort", "p-desc")
    assert_sorted(p_values(page), descending=True)
    assert ascending.count(None) == len(errors)
    expected = {r["image"]: float(r["defect_probability"]) for r in csv_rows if r["defect_probability"]}
    assert {n: p for n, p in zip(texts(page, "#rows td.name"), p_values(page)) if p is not None} == expected

    page.screenshot(path=str(tmp_path / "review.png"), full_page=True)
    for name in [r["image"] for r in csv_rows if r["gradcam"]]:  # the viewer shows each full overlay
        page.locator("#rows tr", has=page.locator("td.name", has_text=name)).click()
        page.wait_for_function("() => document.getElementById('viewer').open", timeout=5_000)
        page.wait_for_function(VIEWER_IMAGE_LOADED, timeout=10_000)
        assert name in page.locator("#viewer-caption").text_content()
        if name == HOSTILE:
            page.screenshot(path=str(tmp_path / "review_viewer.png"))
        page.keyboard.press("Escape")
        page.wait_for_function("() => !document.getElementById('viewer').open", timeout=5_000)
    page.locator("#rows tr", has=page.locator("td.name", has_text="broken.jpg")).click()
    assert page.locator("#viewer-none").is_visible() and not page.locator("#viewer-img").is_visible()
    page.keyboard.press("Escape")

    assert page.dialogs == [] and page.errors == []
    for shot in ("review.png", "review_viewer.png"):
        data = (tmp_path / shot).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 20_000, shot


def test_ten_thousand_rows_open_quickly(page, tmp_path):
    rng = random.Random(0)
    rows = []
    for i in range(10_000):
        name = f"line{i % 7}/coil_{i:05d}.png" if i % 500 else f"{ODD_NAMES[i // 500 % len(ODD_NAMES)]}{i}.png"
        if i % 997 == 0:
            rows.append({"image": name, "prediction": "", "defect_probability": "", "gradcam": "",
                         "status": "error: OSError: unreadable"})
            continue
        p = rng.random()
        rows.append({"image": name, "prediction": "defect" if p >= 0.5 else "non-defect",
                     "defect_probability": f"{p:.4f}", "gradcam": f"gradcam/{name[:-4]}_gradcam.jpg", "status": "ok"})
    path = review.write_review_page(tmp_path / "index.html", rows, {"model": "synthetic"})

    started = time.perf_counter()
    page.goto(path.as_uri(), timeout=60_000)
    page.wait_for_selector("body[data-ready]", timeout=60_000)
    page.wait_for_selector("#rows tr", timeout=60_000)
    seconds = time.perf_counter() - started
    print(f"10,000-row page: first rows in {seconds:.2f}s")  # information only: a loaded CI box is slow

    listed = page.locator("#rows tr").count()
    assert review.CHUNK_ROWS <= listed < len(rows)  # built in chunks, not all at once
    assert "10,000 images" in page.locator("#shown").text_content()
    probabilities = sorted((float(r["defect_probability"]) for r in rows if r["defect_probability"]), reverse=True)
    assert p_values(page)[:50] == probabilities[:50]
    page.mouse.wheel(0, 200_000)  # scrolling to the end lists the next chunk
    page.wait_for_function(f"() => document.querySelectorAll('#rows tr').length > {listed}", timeout=30_000)

    page.select_option("#sort", "p-asc")
    assert p_values(page)[:50] == probabilities[::-1][:50]
    page.click("button[data-filter=error]")
    assert page.locator("#rows tr").count() == sum(r["status"] != "ok" for r in rows) == 11
    assert page.dialogs == [] and page.errors == []


def test_evaluate_review_page(page, tmp_path, tiny_checkpoint):
    """evaluate.py writes review.html with an overlay per image (eval_overlays/) and marks wrong verdicts."""
    data = tmp_path / "neu"
    for i in range(2):
        save_image(data / f"Sc_{i}.png", "scratch", seed=i)
        save_image(data / f"Cr_{i}.png", seed=10 + i)
    stale = tmp_path / "out" / "eval_overlays" / "gone_gradcam.jpg"
    save_image(stale)
    result = run_script("evaluate.py", "--data-dir", data, "--split", "all", "--model", tiny_checkpoint, "--no-sweep",
                        "--output", tmp_path / "out", "--batch-size", "8")
    assert result.returncode == 0, result.stderr
    output = tmp_path / "out"
    metrics = json.loads((output / "metrics.json").read_text())
    assert sorted(p.name for p in (output / "eval_overlays").iterdir()) == \
        ["Cr_0_gradcam.jpg", "Cr_1_gradcam.jpg", "Sc_0_gradcam.jpg", "Sc_1_gradcam.jpg"]  # the stale one removed

    page.goto((output / "review.html").as_uri())
    page.wait_for_selector("body[data-ready]", timeout=30_000)
    assert page.locator("#rows tr").count() == 4
    page.wait_for_function(ALL_THUMBNAILS_LOADED, timeout=30_000)
    assert page.locator("#rows img").count() == 4
    page.click("button[data-filter=wrong]")
    assert sorted(texts(page, "#rows td.name")) == sorted(metrics["misclassified"])
    assert page.locator("#rows tr.wrong").count() == len(metrics["misclassified"])
    assert page.locator("#labels, #rows td.label, #rows button[data-label]").count() == 0  # the truth is known here
    assert page.dialogs == [] and page.errors == []


def test_unfamiliar_badge_count_and_filter_in_chromium(page, tmp_path, familiar_checkpoint):
    """A checkpoint with familiarity statistics: the far-away image gets the badge, the count and the filter."""
    from PIL import Image

    from test_familiarity import far_away_image

    images = tmp_path / "images"
    for seed in (80, 81):
        save_image(images / f"steel_{seed}.png", size=64, seed=seed)
    Image.fromarray(far_away_image()).save(images / "far.png")
    output = tmp_path / "out"
    result = run_script("infer.py", "--input", images, "--output", output, "--model", familiar_checkpoint)
    assert result.returncode == 0, result.stderr
    page.goto((output / "index.html").as_uri())
    page.wait_for_selector("body[data-ready]", timeout=30_000)
    counts = dict(zip(texts(page, ".count span"), texts(page, ".count b")))
    assert counts["unfamiliar"] == "1" and counts["images"] == "3"
    badged = page.locator("#rows tr", has=page.locator(".badge.unfamiliar"))
    assert badged.count() == 1 and "far.png" in badged.locator("td.name").text_content()
    page.click("button[data-filter=unfamiliar]")
    assert texts(page, "#rows td.name") == ["far.png"]
    assert "unfamiliar if" in page.locator("body").text_content()  # the summary says what it means
    assert page.dialogs == [] and page.errors == []


# ---------------------------------------------------------------------------------------------------------
# Labels: a person's corrections on infer.py's page, kept in localStorage, downloaded as labels.csv
# ---------------------------------------------------------------------------------------------------------
# a comma, quotes, spaces, # ? %, non-ASCII, a newline, </script> (its '/' makes a folder 'sub dir/x<')
LABEL_NAMES = [HOSTILE, "a \"b\" & 'c' #1 ?x 100%.png", 'comma, "quoted".png', "stahl_\u00e4\u00f6\u00fc_\u50b7.png",
               "new\nline.png", "sub dir/x</script>y.png", "plain.png"]
OTHER = {"defect": "non-defect", "non-defect": "defect"}
LABEL_STATE = """trs => trs.map(tr => [tr.querySelector('td.name').textContent,
    [...tr.querySelectorAll('button[aria-pressed="true"]')].map(b => b.dataset.label).join(),
    [...tr.querySelectorAll('button.preselected')].map(b => b.dataset.label).join(),
    ['confirmed', 'corrected'].filter(c => tr.classList.contains(c)).join(),
    (tr.querySelector('.label-mark') || {textContent: ''}).textContent])"""


@pytest.fixture(scope="module")
def label_run(tmp_path_factory, decisive_checkpoint):
    """infer.py on images named as LABEL_NAMES and one unreadable file -> (input, output, {image: csv row})."""
    base = tmp_path_factory.mktemp("review_labels")
    images, output = base / "images", base / "out"
    for seed, name in enumerate(LABEL_NAMES):
        save_image(images / name, "scratch" if seed % 2 else "plain", seed=seed)
    (images / "broken.jpg").write_bytes(b"this is not a JPEG")
    result = run_script("infer.py", "--input", images, "--output", output, "--model", decisive_checkpoint)
    assert result.returncode == 0, result.stderr
    with open(output / "predictions.csv", newline="", encoding="utf-8") as handle:
        rows = {row["image"]: row for row in csv.DictReader(handle)}
    assert sorted(rows) == sorted(LABEL_NAMES + ["broken.jpg"])  # `image` is the path relative to --input
    return images, output, rows


def open_page(page, path: Path):
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready]", timeout=30_000)


def row_of(page, name: str):
    names = texts(page, "#rows td.name")
    assert names.count(name) == 1, (name, names)
    return page.locator("#rows tr").nth(names.index(name))


def label_state(page) -> dict[str, tuple]:
    """image -> (the person's label, the preselected label, 'confirmed' / 'corrected' / '', the row's mark)."""
    return {name: tuple(rest) for name, *rest in page.locator("#rows tr").evaluate_all(LABEL_STATE)}


def wait_for_labelled(page, text: str):
    """Wait until the label bar reads `text`. The browser stores a label asynchronously: a page that loads
    before the write lands gets it moments later through its storage event, so one immediate read can race."""
    page.wait_for_function("text => document.getElementById('labelled').textContent === text", arg=text,
                           timeout=10_000)


def download_labels(page, folder: Path) -> tuple[bytes, list[list[str]]]:
    """Click the download button; -> the file's bytes and its rows as Python's csv module reads them."""
    with page.expect_download(timeout=10_000) as info:
        page.click("#download-labels")
    download = info.value
    assert download.suggested_filename == "labels.csv"
    target = folder / "labels.csv"
    download.save_as(target)
    with open(target, newline="", encoding="utf-8") as handle:
        return target.read_bytes(), list(csv.reader(handle))


def test_labels_persist_and_download_in_chromium(page, label_run, tmp_path):
    images, output, predictions = label_run
    open_page(page, output / "index.html")
    header = page.locator("header").text_content()
    assert "press s (scratch), n (not a scratch), u (remove the label)" in " ".join(header.split())
    unlabelled = label_state(page)
    assert unlabelled == {name: ("", row["prediction"], "", "") if row["prediction"] else ("", "", "", "")
                          for name, row in predictions.items()}  # the model's verdict preselected, nothing labelled
    assert row_of(page, "broken.jpg").locator("button").count() == 0  # nothing to label on an unreadable file
    assert page.locator("#download-labels").is_disabled()

    corrected, confirmed = 'comma, "quoted".png', "stahl_\u00e4\u00f6\u00fc_\u50b7.png"
    wanted = {corrected: OTHER[predictions[corrected]["prediction"]], confirmed: predictions[confirmed]["prediction"]}
    for name, label in wanted.items():
        row_of(page, name).locator(f"button[data-label={label}]").click()
    assert not page.evaluate("() => document.getElementById('viewer').open")  # a label click is not a row click
    labelled = label_state(page)
    assert labelled == {**unlabelled, corrected: (wanted[corrected], "", "corrected", "\u270e corrected"),
                        confirmed: (wanted[confirmed], "", "confirmed", "\u2713 confirmed")}
    assert page.locator("#labelled").text_content() == "2 labelled (1 confirmed, 1 corrected)"

    other = page.context.new_page()  # the same run open in a second tab: it shows the labels, and follows changes
    open_page(other, output / "index.html")
    wait_for_labelled(other, "2 labelled (1 confirmed, 1 corrected)")
    assert label_state(other) == labelled
    row_of(page, corrected).locator("button[aria-pressed=true]").click()
    wait_for_labelled(other, "1 labelled (1 confirmed, 0 corrected)")
    row_of(page, corrected).locator(f"button[data-label={wanted[corrected]}]").click()
    wait_for_labelled(other, "2 labelled (1 confirmed, 1 corrected)")
    assert label_state(other) == labelled
    other.close()

    page.reload()
    page.wait_for_selector("body[data-ready]", timeout=30_000)
    wait_for_labelled(page, "2 labelled (1 confirmed, 1 corrected)")  # kept in the browser
    assert label_state(page) == labelled
    page.click(f"button[data-filter={predictions[corrected]['prediction']}]")  # a filter view shows them too
    assert label_state(page)[corrected] == labelled[corrected]
    page.click("button[data-filter=all]")

    raw, table = download_labels(page, tmp_path)
    assert table == [["image", "label"]] + [[name, wanted[name]] for name in predictions if name in wanted]
    assert all((images / name).is_file() for name, _ in table[1:])  # relative to --input
    assert not raw.startswith(b"\xef\xbb\xbf") and raw.endswith(b"\r\n") and raw.count(b"\r\n") == 3
    assert b'"comma, ""quoted"".png"' in raw  # RFC 4180: quoted, quotes doubled
    assert confirmed.encode("utf-8") in raw

    row_of(page, confirmed).locator("button[aria-pressed=true]").click()  # clicked again: the label is taken back
    assert label_state(page)[confirmed] == unlabelled[confirmed]
    assert download_labels(page, tmp_path)[1] == [["image", "label"], [corrected, wanted[corrected]]]

    page.click("#clear-labels")
    assert page.locator("#clear-confirm").is_visible()
    page.click("#clear-no")  # changed their mind: nothing lost
    assert page.locator("#labelled").text_content() == "1 labelled (0 confirmed, 1 corrected)"
    page.click("#clear-labels")
    page.click("#clear-yes")
    assert page.locator("#labelled").text_content() == "0 labelled" and label_state(page) == unlabelled
    page.reload()
    page.wait_for_selector("body[data-ready]", timeout=30_000)
    assert label_state(page) == unlabelled and page.locator("#download-labels").is_disabled()
    assert page.dialogs == [] and page.errors == []


def test_label_keys_in_chromium(page, label_run, tmp_path):
    """s / n / u on the selected row and in the full overlay; arrow keys move between rows meanwhile."""
    images, output, predictions = label_run
    open_page(page, output / "index.html")
    order = texts(page, "#rows td.name")
    assert order[-1] == "broken.jpg"  # no p(defect): last
    page.locator("#rows tr").first.focus()
    for key in ("s", "ArrowDown", "n", "ArrowDown", "s", "u"):  # rows 0 and 1 labelled, row 2 labelled and undone
        page.keyboard.press(key)
    assert page.evaluate("() => document.activeElement.dataset.pos") == "2"
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Enter")  # row 3 in the full overlay
    page.wait_for_function("() => document.getElementById('viewer').open", timeout=5_000)
    page.keyboard.press("n")
    assert page.locator("#viewer-label button[aria-pressed=true]").evaluate_all("bs => bs.map(b => b.dataset.label)") \
        == ["non-defect"]
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Shift+S")  # caps lock or shift: the same key
    page.keyboard.press("ArrowRight")
    page.click("#viewer-label button[data-label=defect]")  # row 5 by the viewer's button; the keys still work after
    page.keyboard.press("ArrowRight")
    page.keyboard.press("n")
    page.keyboard.press("ArrowRight")  # the unreadable file: no label to give
    assert not page.locator("#viewer-label").is_visible()
    page.keyboard.press("s")
    page.keyboard.press("Escape")
    page.wait_for_function("() => !document.getElementById('viewer').open", timeout=5_000)

    wanted = {order[0]: "defect", order[1]: "non-defect", order[3]: "non-defect", order[4]: "defect",
              order[5]: "defect", order[6]: "non-defect"}
    state = label_state(page)
    assert {name: state[name][0] for name in order if state[name][0]} == wanted
    assert all(state[name][2] == ("confirmed" if label == predictions[name]["prediction"] else "corrected")
               for name, label in wanted.items())
    _, table = download_labels(page, tmp_path)
    assert table == [["image", "label"]] + [[name, wanted[name]] for name in predictions if name in wanted]
    assert len({HOSTILE, "new\nline.png", "sub dir/x</script>y.png"} & {name for name, _ in table[1:]}) >= 2
    assert all((images / name).is_file() for name, _ in table[1:])
    assert page.dialogs == [] and page.errors == []


def test_labels_reach_later_rows_and_belong_to_their_run(page, tmp_path):
    """A label shows on rows built later (another sort, scrolled to) and in a search; it stays with its run: the
    page written again for the same results finds it, a page of other results (or another folder) does not."""
    rows = [{"image": f"coil_{i:03d}.png", "prediction": "defect" if i >= 225 else "non-defect",
             "defect_probability": i / 450, "gradcam": "", "status": "ok"} for i in range(450)]
    summary = {"input": "/line3/today", "model": "model_binary.pth"}
    path = tmp_path / "index.html"
    review.write_review_page(path, rows, summary)
    open_page(page, path)
    page.locator("#rows tr").first.focus()
    page.keyboard.press("n")  # coil_449: defect by the model, corrected
    assert label_state(page)["coil_449.png"][:3] == ("non-defect", "", "corrected")

    page.select_option("#sort", "p-asc")
    assert "coil_449.png" not in texts(page, "#rows td.name")  # not built yet
    for _ in range(10):  # the page also builds rows as it scrolls, so the button can move under a real click
        if not page.locator("#more-button").is_visible():
            break
        page.locator("#more-button").dispatch_event("click")
    assert page.locator("#rows tr").count() == 450
    assert label_state(page)["coil_449.png"][:3] == ("non-defect", "", "corrected")
    page.fill("#search", "coil_449")
    page.wait_for_function("() => document.querySelectorAll('#rows tr').length === 1", timeout=10_000)
    assert label_state(page)["coil_449.png"][:3] == ("non-defect", "", "corrected")

    def reopen(rows, **changes) -> str:
        review.write_review_page(path, rows, {**summary, **changes})
        page.reload()
        page.wait_for_selector("body[data-ready]", timeout=30_000)
        return page.locator("#labelled").text_content()
    assert reopen(rows, page_written="later") == "1 labelled (0 confirmed, 1 corrected)"  # the same run
    assert reopen([{**r, "defect_probability": 0.5} if i == 7 else r for i, r in enumerate(rows)]) == "0 labelled"
    assert reopen(rows, input="/line3/yesterday") == "0 labelled"
    assert reopen(rows) == "1 labelled (0 confirmed, 1 corrected)"  # still kept for its own run
    assert page.dialogs == [] and page.errors == []
