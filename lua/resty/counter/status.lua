-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- The status page of resty.counter.metrics (m:status_page()): one HTML
-- document with its CSS and script inline, nothing else to load. The
-- script reads the registry's JSON (m:json()) every few seconds and builds
-- the tables from it with createElement and textContent only: keys are
-- chosen by whoever sends the requests, and are never parsed as markup.
-- The settings reach the script as attributes of <body>, escaped here; the
-- script itself is a constant. A Content-Security-Policy lets the page
-- load nothing and connect only to its own origin.


local gsub = string.gsub
local tostring = tostring


local _M = { _VERSION = "0.1.0" }


local HTML_ESCAPES = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;",
                       ['"'] = "&quot;", ["'"] = "&#39;" }


-- Text for an element or a quoted attribute value.
local function html_escape(text)
    return (gsub(text, "[&<>\"']", HTML_ESCAPES))
end
_M.html_escape = html_escape


local HEAD = [[
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; ]]
.. [[connect-src 'self'; style-src 'unsafe-inline'; ]]
.. [[script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'">
<title>]]

local STYLE = [[</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d232b;
       background: #f4f6f8; }
header { background: #1d3a5c; color: #fff; padding: 10px 20px;
         display: flex; gap: 24px; align-items: baseline;
         flex-wrap: wrap; }
header h1 { font-size: 18px; margin: 0; }
header span { opacity: .85; }
#error { color: #ffd0d0; font-weight: bold; }
main { padding: 4px 20px 20px; }
section { margin-top: 16px; }
h2 { font-size: 15px; margin: 0 0 6px; color: #1d3a5c; }
table { border-collapse: collapse; background: #fff;
        box-shadow: 0 1px 2px rgba(0,0,0,.12); min-width: 40%; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e3e7eb;
         text-align: left; vertical-align: top; }
th { background: #e8edf2; font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums;
         white-space: nowrap; }
td.key { font-family: ui-monospace, monospace; white-space: pre-wrap;
         word-break: break-all; max-width: 40em; }
td.bad { color: #a11; font-weight: 600; }
td.warn { color: #a60; font-weight: 600; }
p.none { color: #667; margin: 0; }
</style>
</head>
]]

-- The settings: data-json-url, data-refresh (seconds).
local BODY = [[
<body data-json-url="%s" data-refresh="%s">
<header><h1>%s</h1>
<span>updated <time id="updated">never</time></span>
<span>refreshes <b id="refreshes">0</b></span>
<span id="error"></span></header>
<main>
<section><h2>Requests (current window)</h2><div id="requests"></div></section>
<section><h2>Limits</h2><div id="limits"></div></section>
<section><h2>Counters</h2><div id="counters"></div></section>
<section><h2>Strict and lax values</h2><div id="values"></div></section>
<section><h2>Self-metrics (all workers)</h2><div id="figures"></div>
</section>
<section><h2>Periodic jobs (the worker that answered)</h2>
<div id="jobs"></div></section>
</main>
]]

local SCRIPT = [[
<script>
"use strict";
(function () {
    var body = document.body;
    var url = body.getAttribute("data-json-url");
    var every = Number(body.getAttribute("data-refresh")) * 1000;
    var refreshes = 0;

    function el(tag, text, cls) {
        var e = document.createElement(tag);
        if (text !== undefined && text !== null) {
            e.textContent = String(text);
        }
        if (cls) {
            e.className = cls;
        }
        return e;
    }

    // A cell of text: a key, a name.
    function text(value, cls) {
        return el("td", value, cls || "key");
    }

    // A cell of a number: two decimals unless an integer; the exact value
    // in data-value (and as a tooltip). A string (a value beyond 2^53) as
    // it is. `cls` marks a number above 0.
    function num(value, cls) {
        var td = el("td", null, "num" + (cls && value > 0 ? " " + cls : ""));
        if (typeof value === "number") {
            td.textContent = Number.isInteger(value) ? String(value)
                                                     : value.toFixed(2);
        } else if (typeof value === "string") {
            td.textContent = value;
        } else {
            td.textContent = "-";
            return td;
        }
        td.setAttribute("data-value", String(value));
        td.title = String(value);
        return td;
    }

    // Replaces the content of #id with a table, or a line when no rows.
    function table(id, headers, rows) {
        var box = document.getElementById(id);
        while (box.firstChild) {
            box.removeChild(box.firstChild);
        }
        if (rows.length === 0) {
            box.appendChild(el("p", "none", "none"));
            return;
        }
        var t = el("table");
        var head = el("tr");
        headers.forEach(function (h) { head.appendChild(el("th", h)); });
        t.appendChild(el("thead")).appendChild(head);
        var tbody = t.appendChild(el("tbody"));
        rows.forEach(function (cells) {
            var tr = el("tr");
            cells.forEach(function (cell) { tr.appendChild(cell); });
            tbody.appendChild(tr);
        });
        box.appendChild(t);
    }

    function sorted(object) {
        return Object.keys(object || {}).sort();
    }

    function requests(doc) {
        var rows = [];
        doc.requests.forEach(function (r) {
            if (r.error !== undefined) {
                rows.push([text(r.dict), text("(" + r.error + ")", "bad")]);
                return;
            }
            var stats = r.stats.stats || {};
            sorted(stats).forEach(function (key) {
                var w = stats[key].current || {};
                var p = stats[key].prev1 || {};
                rows.push([text(r.dict), text(key), num(w.requests),
                           num(w.rate), num(w.p50), num(w.p90), num(w.p99),
                           num(w.max), num(p.requests)]);
            });
        });
        table("requests", ["dict", "key", "requests", "rate", "p50 ms",
                           "p90 ms", "p99 ms", "max ms", "previous"], rows);
    }

    function limits(doc) {
        table("limits", ["limiter", "algorithm", "limit", "window s",
                         "mode", "allowed", "near limit", "rejected",
                         "shadow rejected", "failed open",
                         "failed closed"],
              doc.limits.map(function (l) {
                  return [text(l.limiter), text(l.algorithm),
                          num(l.limit), num(l.window),
                          text(l.shadow ? "shadow" : "enforcing"),
                          num(l.allowed), num(l.near_limit, "warn"),
                          num(l.rejected, "bad"),
                          num(l.shadow_rejected, "warn"),
                          num(l.failed_open), num(l.failed_closed)];
              }));
    }

    function keyed(id, headers, groups, prefix) {
        var rows = [];
        groups.forEach(function (g) {
            g.keys.forEach(function (kv) {
                rows.push(prefix(g).concat([text(kv.key), num(kv.value)]));
            });
        });
        table(id, headers, rows);
    }

    function figures(doc) {
        table("figures", ["metric", "labels", "value"],
              doc.figures.map(function (f) {
                  var labels = sorted(f.labels).map(function (name) {
                      return name + "=" + JSON.stringify(f.labels[name]);
                  });
                  var cell = text(f.name);
                  cell.title = f.help;
                  return [cell, text(labels.join(", ")), num(f.value)];
              }));
    }

    function jobs(doc) {
        table("jobs", ["job", "interval s", "runs", "failures", "overruns",
                       "deferred", "last run s", "last error"],
              (doc.jobs || []).map(function (j) {
                  return [text(j.job), num(j.interval), num(j.runs),
                          num(j.failures, "bad"), num(j.overruns, "warn"),
                          num(j.deferred, "warn"), num(j.last_duration),
                          text(j.last_error, "bad")];
              }));
    }

    function show(doc) {
        requests(doc);
        limits(doc);
        keyed("counters", ["dict", "key", "value"], doc.counters,
              function (c) { return [text(c.dict)]; });
        keyed("values", ["kind", "dict", "name", "key", "value"],
              doc.values, function (v) {
                  return [text(v.kind), text(v.dict), text(v.name)];
              });
        figures(doc);
        jobs(doc);
        var updated = document.getElementById("updated");
        updated.textContent = new Date(doc.time * 1000).toISOString();
        updated.setAttribute("data-time", String(doc.time));
        refreshes += 1;
        document.getElementById("refreshes").textContent = String(refreshes);
        document.getElementById("error").textContent = "";
    }

    function refresh() {
        fetch(url, { cache: "no-store", credentials: "same-origin" })
            .then(function (response) {
                if (!response.ok) {
                    throw new Error(url + ": HTTP " + response.status);
                }
                return response.json();
            })
            .then(show)
            .catch(function (err) {
                document.getElementById("error").textContent =
                    "cannot refresh: " + err.message;
            })
            .then(function () { setTimeout(refresh, every); });
    }

    refresh();
})();
</script>
</body>
</html>
]]


-- syntax: html = status.page(json_url, refresh, title)
--
-- The page, reading `json_url` every `refresh` seconds, headed `title`.
function _M.page(json_url, refresh, title)
    title = html_escape(title)
    return HEAD .. title .. STYLE
           .. BODY:format(html_escape(json_url), tostring(refresh), title)
           .. SCRIPT
end


return _M
