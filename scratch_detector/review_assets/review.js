
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
    if (isWrong(r)) { tr.className = "wrong"; }
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
    return tr;
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
    if (!viewer.open) { lastFocus = document.activeElement; viewer.showModal(); }
  }
  function closeViewer() {
    if (viewer.open) { viewer.close(); }
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
    var tr = event.target.closest("tr");
    if (tr) { show(Number(tr.dataset.pos)); }
  });
  tbody.addEventListener("keydown", function (event) {
    var tr = event.target.closest("tr");
    if (tr && (event.key === "Enter" || event.key === " ")) { event.preventDefault(); show(Number(tr.dataset.pos)); }
  });
  viewer.addEventListener("keydown", function (event) {
    if (event.key === "Escape") { event.preventDefault(); closeViewer(); }
    else if (event.key === "ArrowRight") { show(current + 1); }
    else if (event.key === "ArrowLeft") { show(current - 1); }
  });
  viewer.addEventListener("click", function (event) { if (event.target === viewer) { closeViewer(); } });
  viewer.addEventListener("close", function () { if (lastFocus) { lastFocus.focus(); } });
  document.getElementById("viewer-prev").addEventListener("click", function () { show(current - 1); });
  document.getElementById("viewer-next").addEventListener("click", function () { show(current + 1); });
  document.getElementById("viewer-close").addEventListener("click", closeViewer);

  sortSelect.value = state.sort;
  rebuild();
  document.body.dataset.ready = "true";
})();
