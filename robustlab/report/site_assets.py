"""The leaderboard site's stylesheet and script, embedded in every page (no CDN, no server: pages
work when opened from the file system).

The script is plain JavaScript with no dependencies:

- every ``table.sortable`` sorts by a column when its header is clicked (again: reverse). A cell's
  ``data-v`` attribute is its sort value (numbers compare as numbers); empty values sort last either
  way. The header gets ``aria-sort`` ("ascending" / "descending").
- ``#search`` filters the rows of every ``table.filterable`` by text (case-insensitive, every word must
  appear in the row), ``#group-filter`` shows one ``section.group`` (by ``data-group``),
  ``#ranked-only`` hides rows without ``data-ranked="1"``. ``#shown`` says how many rows are shown.
"""

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #1d1d1f;
       max-width: 1280px; margin: 0 auto; padding: 20px 24px; font-size: 14px; line-height: 1.4; }
h1 { font-size: 24px; margin-bottom: 4px; word-break: break-all; } h2 { font-size: 18px; margin-top: 28px; }
a { color: #0b57d0; } .muted { color: #666; font-size: 13px; }
.controls { display: flex; gap: 14px; flex-wrap: wrap; align-items: center; position: sticky; top: 0;
            background: #fff; padding: 8px 0; border-bottom: 1px solid #e3e3e8; z-index: 2; }
.controls input[type=search] { width: 320px; padding: 5px 8px; font-size: 14px; }
.wrap { overflow-x: auto; }
table { border-collapse: collapse; margin: 8px 0 16px 0; }
th, td { border: 1px solid #d5d5dc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f7; }
table.sortable th { cursor: pointer; user-select: none; white-space: nowrap; }
table.sortable th[aria-sort=ascending]::after { content: " ▲"; font-size: 10px; }
table.sortable th[aria-sort=descending]::after { content: " ▼"; font-size: 10px; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.note { color: #8e0000; font-size: 12px; max-width: 360px; }
td.mark { color: #7a5200; font-size: 12px; max-width: 360px; }
td.attacks { font-size: 12px; max-width: 260px; word-break: break-word; }
tr.unranked td { background: #fafafa; color: #555; }
tr.top td { background: #f1faf2; }
code { font-family: SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
table.kv th { width: 200px; }
svg.plot { border: 1px solid #e3e3e8; background: #fff; margin: 6px 12px 6px 0; }
svg.plot text { font-family: inherit; font-size: 11px; fill: #333; }
.plots { display: flex; flex-wrap: wrap; }
footer { margin-top: 36px; color: #777; font-size: 12px; border-top: 1px solid #e3e3e8; padding-top: 8px; }
"""

SCRIPT = r"""
(function () {
  "use strict";
  function sortValue(cell) {
    var v = cell.getAttribute("data-v");
    if (v === null) v = cell.textContent.trim();
    if (v === "") return null;
    var n = Number(v);
    return isNaN(n) ? v.toLowerCase() : n;
  }
  function compare(a, b) {
    if (a === null) return b === null ? 0 : 1;
    if (b === null) return -1;
    if (typeof a === "number" && typeof b === "number") return a - b;
    return String(a) < String(b) ? -1 : String(a) > String(b) ? 1 : 0;
  }
  function sortTable(table, col, descending) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var keyed = rows.map(function (r, i) { return [sortValue(r.cells[col]), i, r]; });
    keyed.sort(function (x, y) {
      if (x[0] === null || y[0] === null) return compare(x[0], y[0]) || x[1] - y[1];
      var c = compare(x[0], y[0]);
      return (descending ? -c : c) || x[1] - y[1];
    });
    var frag = document.createDocumentFragment();
    keyed.forEach(function (k) { frag.appendChild(k[2]); });
    body.appendChild(frag);
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
      if (i === col) th.setAttribute("aria-sort", descending ? "descending" : "ascending");
      else th.removeAttribute("aria-sort");
    });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
      th.addEventListener("click", function () {
        var now = th.getAttribute("aria-sort");
        var first = th.getAttribute("data-first") || "ascending";
        sortTable(table, i, now ? now === "ascending" : first === "descending");
      });
    });
  });
  var search = document.getElementById("search");
  var group = document.getElementById("group-filter");
  var ranked = document.getElementById("ranked-only");
  var shown = document.getElementById("shown");
  function apply() {
    var words = search ? search.value.toLowerCase().split(/\s+/).filter(Boolean) : [];
    var which = group ? group.value : "";
    var onlyRanked = ranked ? ranked.checked : false;
    var total = 0, visible = 0;
    Array.prototype.forEach.call(document.querySelectorAll("section.group"), function (s) {
      s.style.display = !which || s.getAttribute("data-group") === which ? "" : "none";
    });
    Array.prototype.forEach.call(document.querySelectorAll("table.filterable"), function (table) {
      var section = table.closest("section.group");
      var hidden = section && section.style.display === "none";
      Array.prototype.forEach.call(table.tBodies[0].rows, function (r) {
        total += 1;
        var text = r.getAttribute("data-text");
        if (text === null) { text = r.textContent.toLowerCase(); r.setAttribute("data-text", text); }
        var ok = !hidden && words.every(function (w) { return text.indexOf(w) >= 0; }) &&
                 (!onlyRanked || r.getAttribute("data-ranked") === "1");
        r.style.display = ok ? "" : "none";
        if (ok) visible += 1;
      });
    });
    if (shown) shown.textContent = visible + " of " + total + " rows shown";
  }
  [search, group, ranked].forEach(function (el) {
    if (el) { el.addEventListener("input", apply); el.addEventListener("change", apply); }
  });
  // On load nothing is filtered yet (unless the browser restored the inputs): only count the rows.
  if ((search && search.value) || (group && group.value) || (ranked && ranked.checked)) apply();
  else if (shown) {
    var n = document.querySelectorAll("table.filterable tbody tr").length;
    shown.textContent = n + " of " + n + " rows shown";
  }
})();
"""
