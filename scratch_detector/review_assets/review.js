
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("review-data").textContent);
  var rows = data.rows, hasTruth = data.has_truth, chunk = data.chunk;
  var NAME = 0, PRED = 1, P = 2, SRC = 3, STATUS = 4, TRUTH = 5, FAMILIAR = 6;
  var collator = new Intl.Collator(undefined, {numeric: true, sensitivity: "base"});
  var tests = {
    "all": function () { return true; },
    "defect": function (r) { return r[PRED] === "defect"; },
    "non-defect": function (r) { return r[PRED] === "non-defect"; },
    "error": function (r) { return r[STATUS] !== "ok"; },
    "wrong": function (r) { return isWrong(r); },
    "unfamiliar": function (r) { return r[FAMILIAR] === false; }
  };
  var state = {filter: "all", sort: "p-desc", query: ""};
  var view = [], rendered = 0, current = -1, lastFocus = null;
  var tbody = document.getElementById("rows"), more = document.getElementById("more");
  var shown = document.getElementById("shown"), sortSelect = document.getElementById("sort");
  var viewer = document.getElementById("viewer"), viewerImg = document.getElementById("viewer-img");
  var viewerNone = document.getElementById("viewer-none"), caption = document.getElementById("viewer-caption");

  // Corrections: a person's label per image name ("defect" / "non-defect"), kept in localStorage under the
  // run's key (review.py, PageWriter.labels_key: the input folder, the model and every name with its p).
  var labelling = data.labels !== null && data.labels !== undefined;
  var LABELS = {"defect": "scratch", "non-defect": "not a scratch"};
  var KEYS = {"s": "defect", "n": "non-defect", "u": null};
  var labels = new Map(), named = new Map(), storageNote = "", lastDownload = null;
  for (var k = 0; k < rows.length; k++) { named.set(rows[k][NAME], k); }

  function isWrong(r) { return hasTruth && r[TRUTH] !== null && r[PRED] !== "" && r[PRED] !== r[TRUTH]; }
  function byName(a, b) { return collator.compare(rows[a][NAME], rows[b][NAME]) || a - b; }
  function byP(direction) {
    return function (a, b) {
      var pa = rows[a][P], pb = rows[b][P];
      if (pa === null || pb === null) { return pa === pb ? byName(a, b) : (pa === null ? 1 : -1); }
      return direction * (pa - pb) || byName(a, b);
    };
  }
  var sorts = {"p-desc": byP(-1), "p-asc": byP(1), "name-asc": byName,
               "name-desc": function (a, b) { return byName(b, a); }};
  function formatP(p) { return p === null ? "\u2013" : p.toFixed(4); }
  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined) { node.textContent = text; }
    return node;
  }
  function noOverlay(text) { return el("span", "none", text); }

  function makeRow(index, position) {
    var r = rows[index], tr = el("tr");
    tr.tabIndex = 0;
    tr.dataset.pos = String(position);
    tr.dataset.index = String(index);
    if (isWrong(r)) { tr.classList.add("wrong"); }
    var thumb = el("td", "thumb");
    if (r[SRC]) {
      var img = el("img");
      img.loading = "lazy";
      img.decoding = "async";
      img.alt = "overlay of " + r[NAME];
      img.addEventListener("error", function () { img.replaceWith(noOverlay("overlay missing")); });
      img.src = r[SRC];
      thumb.appendChild(img);
    } else {
      thumb.appendChild(noOverlay("no overlay"));
    }
    tr.appendChild(thumb);
    var name = el("td", "name", r[NAME]);
    name.title = r[NAME];
    tr.appendChild(name);
    var pred = el("td", "prediction");
    if (r[PRED]) { pred.appendChild(el("span", "pred " + r[PRED], r[PRED])); }
    if (r[FAMILIAR] === false) {
      var badge = el("span", "badge unfamiliar", "unfamiliar");
      badge.title = "unlike the training images: do not trust this verdict";
      pred.appendChild(badge);
    }
    tr.appendChild(pred);
    tr.appendChild(el("td", "p", formatP(r[P])));
    if (hasTruth) {
      var truth = el("td", "truth", r[TRUTH] === null ? "" : r[TRUTH]);
      if (isWrong(r)) { truth.appendChild(el("span", "mark", "\u2717 wrong")); }
      tr.appendChild(truth);
    }
    tr.appendChild(el("td", r[STATUS] === "ok" ? "status" : "status error", r[STATUS]));
    if (labelling) {
      var cell = el("td", "label");
      if (r[PRED]) { cell.appendChild(labelButtons()); cell.appendChild(el("span", "label-mark")); }
      else { cell.appendChild(el("span", "none", "unreadable")); }
      tr.appendChild(cell);
      showLabel(tr, index);
    }
    return tr;
  }

  function labelButtons() {
    var group = el("span", "choices");
    group.setAttribute("role", "group");
    group.setAttribute("aria-label", "label");
    Object.keys(LABELS).forEach(function (value) {
      var button = el("button", "choice " + value, LABELS[value]);
      button.type = "button";
      button.dataset.label = value;
      group.appendChild(button);
    });
    return group;
  }
  // A label's look, in a row or the viewer: the model's verdict preselected (until a person decides), the
  // person's choice pressed, and the row marked confirmed (same as the model) or corrected (not).
  function showLabel(container, index) {
    var r = rows[index], label = labels.get(r[NAME]), state = "";
    if (label) { state = label === r[PRED] ? "confirmed" : "corrected"; }
    container.classList.toggle("confirmed", state === "confirmed");
    container.classList.toggle("corrected", state === "corrected");
    container.querySelectorAll("button[data-label]").forEach(function (button) {
      var value = button.dataset.label;
      button.setAttribute("aria-pressed", String(label === value));
      button.classList.toggle("preselected", !label && r[PRED] === value);
      button.title = (label === value ? "your label (click again to remove it)" :
                      r[PRED] === value ? "the model's verdict" : "");
    });
    var mark = container.querySelector(".label-mark");
    if (mark) {
      mark.textContent = state === "confirmed" ? "\u2713 confirmed" : state === "corrected" ? "\u270e corrected" : "";
    }
  }

  function updateShown() {
    var text = view.length.toLocaleString() + " of " + rows.length.toLocaleString() + " images";
    if (rendered < view.length) { text += " (" + rendered.toLocaleString() + " listed; scroll for more)"; }
    shown.textContent = text;
  }
  function renderMore() {
    var end = Math.min(rendered + chunk, view.length), fragment = document.createDocumentFragment();
    for (var i = rendered; i < end; i++) { fragment.appendChild(makeRow(view[i], i)); }
    tbody.appendChild(fragment);
    rendered = end;
    more.hidden = rendered >= view.length;
    updateShown();
  }
  function nearEnd() { return !more.hidden && more.getBoundingClientRect().top < window.innerHeight + 1200; }
  function fill() { if (nearEnd()) { renderMore(); window.requestAnimationFrame(fill); } }
  function rebuild() {
    var test = tests[state.filter], query = state.query.toLowerCase();
    view = [];
    for (var i = 0; i < rows.length; i++) {
      if (test(rows[i]) && (!query || rows[i][NAME].toLowerCase().indexOf(query) !== -1)) { view.push(i); }
    }
    view.sort(sorts[state.sort]);
    tbody.replaceChildren();
    rendered = 0;
    renderMore();
    window.requestAnimationFrame(fill);
  }

  function show(position) {
    if (position < 0 || position >= view.length) { return; }
    current = position;
    var r = rows[view[position]];
    viewerImg.hidden = !r[SRC];
    viewerNone.hidden = !!r[SRC];
    if (r[SRC]) { viewerImg.src = r[SRC]; viewerImg.alt = "overlay of " + r[NAME]; }
    else { viewerImg.removeAttribute("src"); }
    caption.replaceChildren(el("b", "", r[NAME]));
    var facts = [r[PRED] || "no verdict", "p(defect) " + formatP(r[P])];
    if (hasTruth && r[TRUTH] !== null) { facts.push("truth " + r[TRUTH] + (isWrong(r) ? " (wrong)" : "")); }
    if (r[FAMILIAR] === false) { facts.push("unfamiliar: do not trust this verdict"); }
    facts.push(r[STATUS]);
    caption.appendChild(document.createTextNode("  \u00b7  " + facts.join("  \u00b7  ")));
    caption.appendChild(document.createTextNode("  (" + (position + 1) + " of " + view.length + ")"));
    if (labelling) { showViewerLabel(); }
    if (!viewer.open) { lastFocus = document.activeElement; viewer.showModal(); }
  }
  function closeViewer() {
    if (viewer.open) { viewer.close(); }
  }

  // ---- labels: storage, counts, download -------------------------------------------------------------
  function loadLabels() {
    labels = new Map();
    var text = null;
    try { text = window.localStorage.getItem(data.labels.key); }
    catch (error) {
      storageNote = "labels are not kept in this browser (no storage for pages opened from disk): " +
                    "download them before closing";
    }
    if (!text) { return; }
    try {
      JSON.parse(text).forEach(function (pair) {  // [[name, label], ...]; names no longer on the page are dropped
        if (named.has(pair[0]) && rows[named.get(pair[0])][PRED] && LABELS.hasOwnProperty(pair[1])) {
          labels.set(pair[0], pair[1]);
        }
      });
    } catch (error) { labels = new Map(); }
  }
  function saveLabels() {
    try {
      if (labels.size) { window.localStorage.setItem(data.labels.key, JSON.stringify(Array.from(labels))); }
      else { window.localStorage.removeItem(data.labels.key); }
      storageNote = "";
    } catch (error) {
      storageNote = "could not save the labels in this browser (" + error.name + "): download them before closing";
    }
  }
  function updateLabelBar() {
    var corrected = 0;
    labels.forEach(function (label, name) { corrected += label !== rows[named.get(name)][PRED]; });
    document.getElementById("labelled").textContent = labels.size.toLocaleString() + " labelled" +
      (labels.size ? " (" + (labels.size - corrected).toLocaleString() + " confirmed, " +
                     corrected.toLocaleString() + " corrected)" : "");
    document.getElementById("download-labels").disabled = labels.size === 0;
    document.getElementById("clear-labels").disabled = labels.size === 0;
    document.getElementById("labels-note").textContent = storageNote;
  }
  function refreshLabels() {
    tbody.querySelectorAll("tr").forEach(function (tr) { showLabel(tr, Number(tr.dataset.index)); });
    if (viewer.open) { showViewerLabel(); }
    updateLabelBar();
  }
  // label: "defect", "non-defect", or null to remove the row's label
  function setLabel(index, label) {
    var r = rows[index];
    if (!r || !r[PRED]) { return; }
    if (label) { labels.set(r[NAME], label); } else { labels.delete(r[NAME]); }
    saveLabels();
    var tr = tbody.querySelector('tr[data-index="' + index + '"]');
    if (tr) { showLabel(tr, index); }
    if (viewer.open && view[current] === index) { showViewerLabel(); }
    updateLabelBar();
  }
  function toggleLabel(index, label) { setLabel(index, labels.get(rows[index][NAME]) === label ? null : label); }
  // the viewer's buttons are made once (remade, a focused one would take the keyboard focus with it)
  function showViewerLabel() {
    var box = document.getElementById("viewer-label"), index = view[current];
    if (!rows[index][PRED] && box.contains(document.activeElement)) { document.getElementById("viewer-next").focus(); }
    box.hidden = !rows[index][PRED];
    showLabel(box, index);
  }
  // RFC 4180: a field holding a comma, a quote, CR or LF is quoted, its quotes doubled; lines end in CRLF
  function csvField(text) { return /[",\r\n]/.test(text) ? "\"" + text.replace(/"/g, "\"\"") + "\"" : text; }
  function labelsCsv() {
    var lines = ["image,label"];
    rows.forEach(function (r) {  // page order: by path; only the rows a person labelled
      var label = labels.get(r[NAME]);
      if (label) { lines.push(csvField(r[NAME]) + "," + label); }
    });
    return lines.join("\r\n") + "\r\n";
  }
  function downloadLabels() {
    // a blob: URL on an <a download>: works from file:// with no server; the Blob is UTF-8 (no BOM)
    if (lastDownload) { URL.revokeObjectURL(lastDownload); }
    lastDownload = URL.createObjectURL(new Blob([labelsCsv()], {type: "text/csv;charset=utf-8"}));
    var link = el("a");
    link.href = lastDownload;
    link.download = "labels.csv";
    link.hidden = true;
    document.body.appendChild(link);
    link.click();
    link.remove();
  }
  function labelKey(event) {
    if (!labelling || event.ctrlKey || event.metaKey || event.altKey) { return undefined; }
    var key = event.key.length === 1 ? event.key.toLowerCase() : "";
    return KEYS.hasOwnProperty(key) ? KEYS[key] : undefined;
  }

  document.querySelectorAll(".filters button").forEach(function (button) {
    button.addEventListener("click", function () {
      state.filter = button.dataset.filter;
      document.querySelectorAll(".filters button").forEach(function (b) {
        b.setAttribute("aria-pressed", String(b === button));
      });
      rebuild();
    });
  });
  sortSelect.addEventListener("change", function () { state.sort = sortSelect.value; rebuild(); });
  document.querySelectorAll("th button[data-sort]").forEach(function (button) {
    button.addEventListener("click", function () {
      var options = button.dataset.sort.split(" ");
      state.sort = options[0] === state.sort ? options[1] : options[0];
      sortSelect.value = state.sort;
      rebuild();
    });
  });
  var search = document.getElementById("search"), timer = 0;
  search.addEventListener("input", function () {
    window.clearTimeout(timer);
    timer = window.setTimeout(function () { state.query = search.value; rebuild(); }, 150);
  });
  document.getElementById("more-button").addEventListener("click", renderMore);
  window.addEventListener("scroll", function () { if (nearEnd()) { renderMore(); } }, {passive: true});
  window.addEventListener("resize", function () { window.requestAnimationFrame(fill); });
  tbody.addEventListener("click", function (event) {
    var tr = event.target.closest("tr"), choice = event.target.closest("button[data-label]");
    if (tr && choice) { toggleLabel(Number(tr.dataset.index), choice.dataset.label); }
    else if (tr) { show(Number(tr.dataset.pos)); }
  });
  function focusRow(position) {
    while (position >= rendered && rendered < view.length) { renderMore(); }
    var tr = tbody.querySelector('tr[data-pos="' + position + '"]');
    if (tr) { tr.focus(); }
  }
  tbody.addEventListener("keydown", function (event) {
    var tr = event.target.closest("tr"), label = labelKey(event);
    if (!tr) { return; }
    if (label !== undefined) { event.preventDefault(); setLabel(Number(tr.dataset.index), label); }
    else if (event.target.closest("button")) { return; }  // Enter / Space on a label button press it
    else if (event.key === "Enter" || event.key === " ") { event.preventDefault(); show(Number(tr.dataset.pos)); }
    else if (event.key === "ArrowDown") { event.preventDefault(); focusRow(Number(tr.dataset.pos) + 1); }
    else if (event.key === "ArrowUp") { event.preventDefault(); focusRow(Number(tr.dataset.pos) - 1); }
  });
  viewer.addEventListener("keydown", function (event) {
    var label = labelKey(event);
    if (label !== undefined) { event.preventDefault(); setLabel(view[current], label); }
    else if (event.key === "Escape") { event.preventDefault(); closeViewer(); }
    else if (event.key === "ArrowRight") { show(current + 1); }
    else if (event.key === "ArrowLeft") { show(current - 1); }
  });
  viewer.addEventListener("click", function (event) { if (event.target === viewer) { closeViewer(); } });
  viewer.addEventListener("close", function () { if (lastFocus) { lastFocus.focus(); } });
  document.getElementById("viewer-prev").addEventListener("click", function () { show(current - 1); });
  document.getElementById("viewer-next").addEventListener("click", function () { show(current + 1); });
  document.getElementById("viewer-close").addEventListener("click", closeViewer);
  if (labelling) {
    document.getElementById("viewer-label").append(labelButtons(), el("span", "label-mark"));
    document.getElementById("viewer-label").addEventListener("click", function (event) {
      var choice = event.target.closest("button[data-label]");
      if (choice) { toggleLabel(view[current], choice.dataset.label); }
    });
    document.getElementById("download-labels").addEventListener("click", downloadLabels);
    var clearConfirm = document.getElementById("clear-confirm");
    document.getElementById("clear-labels").addEventListener("click", function () {
      document.getElementById("clear-count").textContent = labels.size.toLocaleString();
      clearConfirm.hidden = false;
      document.getElementById("clear-no").focus();
    });
    document.getElementById("clear-no").addEventListener("click", function () { clearConfirm.hidden = true; });
    document.getElementById("clear-yes").addEventListener("click", function () {
      clearConfirm.hidden = true;
      labels = new Map();
      saveLabels();
      refreshLabels();
    });
    window.addEventListener("storage", function (event) {  // the same run open in another tab
      if (event.key === data.labels.key || event.key === null) { loadLabels(); refreshLabels(); }
    });
    loadLabels();
    updateLabelBar();
  }

  sortSelect.value = state.sort;
  rebuild();
  document.body.dataset.ready = "true";
})();
