-- resty.counter.metrics inside a real nginx worker (spec/run-in-nginx.lua):
-- what one rendering holds, its text format, and the node's sums of the
-- workers' own figures.

local metrics = require "resty.counter.metrics"
local counter = require "resty.counter"
local requests = require "resty.counter.requests"
local strict = require "resty.counter.strict"
local lax = require "resty.counter.lax"
local limit = require "resty.counter.limit"
local race = require "helpers.race"
local json = require "dkjson"

-- Specs that send requests to this nginx (see spec/helpers/it_http.lua).
local it_http = require("helpers.it_http")(it, pending)


local function raised(fn, ...)
    local ok, err = pcall(fn, ...)
    assert(not ok, "expected an error")
    return err
end


-- A registry of a name no other spec uses (nothing removes one).
local registries_made = 0
local function registry(opts)
    registries_made = registries_made + 1
    opts = opts or {}
    opts.name = "spec" .. registries_made
    return assert(metrics.new("metrics", opts))
end


-- The text format read back, checking its shape as it goes: a family's
-- HELP then TYPE once, before its samples; no series twice; every value a
-- number. Returns { [series] = value }, { [family] = type } and
-- { [family] = help }.
local function parse(text)
    assert.equal("\n", text:sub(-1))
    local samples, types, helps = {}, {}, {}
    local current
    for line in text:gmatch("([^\n]*)\n") do
        local name, help = line:match("^# HELP (%S+) (.+)$")
        if name then
            assert.is_nil(helps[name], "HELP twice: " .. name)
            helps[name] = help
        else
            local family, kind = line:match("^# TYPE (%S+) (%S+)$")
            if family then
                assert.is_nil(types[family], "TYPE twice: " .. family)
                assert.is_not_nil(helps[family], "TYPE before HELP")
                types[family] = kind
                current = family
            else
                local series, value = line:match("^(%S-[}%w]) (%S+)$")
                if not series then
                    -- label values may hold spaces
                    series, value = line:match("^(.-}) (%S+)$")
                end
                assert(series, "not a sample line: " .. line)
                assert(series:sub(1, #current) == current,
                       series .. " outside its family " .. current)
                assert.is_nil(samples[series], "series twice: " .. series)
                samples[series] = assert(tonumber(value), line)
            end
        end
    end
    return samples, types, helps
end


describe("resty.counter.metrics", function()
    describe("new()", function()
        it("raises on bad arguments and unknown options", function()
            local cases = {
                { { nil }, 'bad "shdict_name" argument: string expected, '
                           .. "got nil" },
                { { "metrics", 5 }, 'bad "opts" argument: table expected' },
                { { "metrics", { intervall = 1 } },
                  'bad "opts" argument: unknown option "intervall" (did you '
                  .. 'mean "interval"?)' },
                { { "metrics", { interval = 0 } },
                  'bad "opts.interval" argument: a positive finite number '
                  .. "of seconds expected, got 0 (a number)" },
                { { "metrics", { name = "a|b" } }, 'bad "opts.name"' },
            }
            for _, case in ipairs(cases) do
                assert.matches(case[2], raised(metrics.new, unpack(case[1])),
                               1, true)
            end
            assert.matches("metrics_spec.lua:%d+:",
                           raised(function() metrics.new("metrics", 1) end))
        end)

        it("returns nil and an error for an unknown dict and a name taken",
           function()
            local m, err = metrics.new("no_such_dict")
            assert.is_nil(m)
            assert.equal('shared dict "no_such_dict" not found', err)

            local first = registry()
            m, err = metrics.new("metrics", { name = first.name })
            assert.is_nil(m)
            assert.equal('dict "metrics" already has a registry named "'
                         .. first.name .. '" in this worker', err)
        end)
    end)

    describe("add()", function()
        it("raises on what is not an object of the library", function()
            local m = registry()
            assert.matches('bad "obj" argument: a counter, request counter, '
                           .. "strict or lax counter or limiter of "
                           .. "resty.counter expected, got a table",
                           raised(m.add, m, {}), 1, true)
            assert.matches('bad "obj" argument', raised(m.add, m, "counters"))
            assert.matches("use m:add(...), not m.add(...)",
                           raised(m.add, "x", {}), 1, true)
            local c = assert(counter.new("metrics_counts"))
            m:add(c)
            assert.matches('bad "obj" argument: an object not added before',
                           raised(m.add, m, c), 1, true)
        end)

        it("raises on bad metric options, naming them", function()
            local c = assert(counter.new("metrics_counts"))
            local cases = {
                { { nmae = "x_total" }, 'unknown option "nmae" (did you mean '
                                        .. '"name"?)' },
                { { name = "9lives_total" }, 'bad "opts.name" argument: a '
                  .. "metric name ([a-zA-Z_:][a-zA-Z0-9_:]*) expected, got "
                  .. '"9lives_total" (a string)' },
                { { name = "hits" }, 'bad "opts.name" argument: a counter\'s '
                  .. 'name, ending in "_total" expected, got "hits"' },
                { { name = "resty_requests_total" }, "not one of the "
                  .. "library's own metrics" },
                { { type = "histogram" }, 'bad "opts.type" argument: '
                  .. '"counter" or "gauge" expected, got "histogram"' },
                { { type = "gauge" }, 'bad "opts.name" argument: a metric '
                  .. "name (there is no default for a gauge) expected" },
                { { labels = {} }, 'bad "opts.labels" argument: a '
                  .. "non-empty list of label names expected" },
                { { labels = { "ok", "__bad" } }, 'bad "opts.labels[2]" '
                  .. "argument: a label name" },
                { { labels = { "a", "a" } }, 'bad "opts.labels[2]" argument:'
                  .. " a label name not given twice" },
                { { labels = "a" }, 'bad "opts.labels" argument: a list of '
                  .. "label names or a function expected" },
                { { separator = ":" }, 'bad "opts.separator" argument' },
                { { labels = { "a" }, separator = "" },
                  'bad "opts.separator" argument: a non-empty string' },
            }
            for _, case in ipairs(cases) do
                local m = registry()
                assert.matches(case[2], raised(m.add, m, c, case[1]), 1, true)
            end

            local m = registry()
            m:add(c, { name = "hits_total" })
            local other = assert(counter.new("counters"))
            assert.matches('bad "opts.type" argument: "counter", as metric '
                           .. '"hits_total" has',
                           raised(m.add, m, other, { name = "hits_total",
                                                     type = "gauge" }),
                           1, true)
            local lim = assert(limit.new("limit", { limit = 1, window = 1 }))
            assert.matches('unknown option "name"',
                           raised(m.add, m, lim, { name = "x" }), 1, true)
        end)
    end)

    describe("render()", function()
        it("renders a counter's keys under the default name, escaped",
           function()
            local c = assert(counter.new("metrics_counts", 0.1))
            local hostile = 'q"b\\s\nn'
            local bytes = "bin\255\128"
            assert(c:incr("plain", 3))
            assert(c:incr(hostile, 2))
            assert(c:incr(bytes))
            assert(c:incr("half", 0.5))
            assert(c:sync())
            local m = registry()
            m:add(c)
            local samples, types, helps = parse(m:render())
            assert.equal("counter", types.resty_counts_total)
            assert.equal("Counts of resty.counter, by dict and key.",
                         helps.resty_counts_total)
            local function series(key)
                return 'resty_counts_total{dict="metrics_counts",key="'
                       .. key .. '"}'
            end
            assert.equal(3, samples[series("plain")])
            assert.equal(2, samples[series('q\\"b\\\\s\\nn')])
            assert.equal(1, samples[series("bin\\\\xff\\\\x80")])
            assert.equal(0.5, samples[series("half")])
            -- the counter's own figures and its engine's
            assert.is_true(samples['resty_counts_syncs_total'
                                   .. '{dict="metrics_counts"}'] >= 1)
            assert.equal(0, samples['resty_counts_pending_keys'
                                    .. '{dict="metrics_counts"}'])
            assert.is_true(samples['resty_engine_keys'
                                   .. '{dict="metrics_counts"}'] >= 4)
            assert.equal("gauge", types.resty_engine_max_keys)
            assert.equal("counter", types.resty_engine_refused_keys_total)
        end)

        it("maps key parts to labels, summing keys that map alike",
           function()
            local c = assert(counter.new("metrics_counts", 0.1))
            assert(c:incr("GET/200", 5))
            assert(c:incr("POST/500/extra", 2))
            assert(c:incr("PUT", 1))
            assert(c:sync())

            local m = registry()
            m:add(c, { name = "http_requests_total", help = "By route.",
                       labels = { "method", "status" }, separator = "/" })
            local samples, types, helps = parse(m:render())
            assert.equal("counter", types.http_requests_total)
            assert.equal("By route.", helps.http_requests_total)
            assert.equal(5, samples['http_requests_total{method="GET",'
                                    .. 'status="200"}'])
            -- the last label takes the rest; a missing part is left out
            assert.equal(2, samples['http_requests_total{method="POST",'
                                    .. 'status="500/extra"}'])
            assert.equal(1, samples['http_requests_total{method="PUT"}'])

            m = registry()
            m:add(c, { name = "by_method", type = "gauge",
                       labels = function(key)
                           local method = key:match("^(%u+)/")
                           return method and { method = method }
                       end })
            samples, types = parse(m:render())
            assert.equal("gauge", types.by_method)
            assert.equal(5, samples['by_method{method="GET"}'])
            assert.equal(2, samples['by_method{method="POST"}'])
            -- PUT has no "/": the function left it out; keys of other specs
            -- too
            local n = 0
            for series in pairs(samples) do
                if series:find("^by_method") then
                    n = n + 1
                end
            end
            assert.equal(2, n)

            m = registry()
            m:add(c, { name = "broken_total",
                       labels = function() return { ["bad-name"] = "x" } end })
            assert.matches('bad "opts.labels" argument: a function returning '
                           .. "label names", raised(m.render, m), 1, true)
        end)

        it("merges two request counters' families, once each", function()
            local t = 1537724100
            local function clock() return t end
            local r1 = assert(requests.new("metrics_requests_1",
                                           { clock = clock }))
            local r2 = assert(requests.new("metrics_requests_2",
                                           { clock = clock }))
            for _ = 1, 3 do
                r1:record("/a", 0.002)
            end
            r2:record("/b", 0.2)
            local m = registry()
            m:add(r1)
            m:add(r2)
            local samples, types = parse(m:render())
            assert.equal("counter", types.resty_requests_total)
            assert.equal("histogram", types.resty_request_latency_seconds)
            assert.equal(3, samples['resty_requests_total'
                                    .. '{dict="metrics_requests_1",'
                                    .. 'key="/a"}'])
            assert.equal(1, samples['resty_requests_total'
                                    .. '{dict="metrics_requests_2",'
                                    .. 'key="/b"}'])
            assert.equal(1, samples['resty_request_latency_seconds_bucket'
                                    .. '{dict="metrics_requests_2",key="/b",'
                                    .. 'le="0.25"}'])
            assert.equal(0, samples['resty_requests_overflowed_total'
                                    .. '{dict="metrics_requests_1"}'])
            assert.equal("gauge", types.resty_requests_cached_keys)
        end)

        it("renders strict and lax values and a limiter's settings",
           function()
            local s = assert(strict.new("strict", { name = "metrics_s" }))
            assert(s:clear())
            assert(s:inc("a", 7))
            assert(s:set("big", "9007199254740993"))
            local l = assert(lax.new("lax", { name = "metrics_l" }))
            assert(l:clear())
            assert(l:inc("b", 4))
            assert(l:flush())
            local lim = assert(limit.new("limit", { limit = 10, window = 60,
                                                    name = "metrics_lim",
                                                    algorithm = "sliding" }))
            local m = registry()
            m:add(s)
            m:add(l)
            m:add(lim)
            local text = m:render()
            local samples, types = parse(text)
            assert.equal("gauge", types.resty_strict_value)
            assert.equal(7, samples['resty_strict_value{dict="strict",'
                                    .. 'key="a",name="metrics_s"}'])
            -- beyond 2^53, the exact digits
            assert.matches('\nresty_strict_value{dict="strict",key="big",'
                           .. 'name="metrics_s"} 9007199254740993\n', text,
                           1, true)
            assert.equal(4, samples['resty_lax_value{dict="lax",key="b",'
                                    .. 'name="metrics_l"}'])
            assert.equal(0, samples['resty_lax_dropped_total{dict="lax",'
                                    .. 'name="metrics_l"}'])
            assert.equal(0, samples['resty_strict_lock_waits_total'
                                    .. '{dict="strict",name="metrics_s"}'])
            assert.is_number(samples['resty_strict_removed_keys_total'
                                     .. '{dict="strict",name="metrics_s"}'])
            local labels = '{algorithm="sliding",limiter="metrics_lim"}'
            assert.equal(10, samples["resty_limit_max_events" .. labels])
            assert.equal(60, samples["resty_limit_window_seconds" .. labels])
            assert.equal(0, samples['resty_limit_failed_open_total'
                                    .. '{limiter="metrics_lim"}'])
        end)

        it("renders a limiter's decisions: allowed, near, rejected, shadow",
           function()
            local function clock()
                return 6000.5
            end
            local enforcing = assert(limit.new("limit", {
                limit = 10, window = 60, name = "metrics_decide",
                clock = clock }))
            local shadow = assert(limit.new("limit", {
                limit = 10, window = 60, name = "metrics_shadow",
                clock = clock, shadow = true, near_limit_ratio = 0.5 }))
            local m = registry()
            m:add(enforcing)
            m:add(shadow)
            for _ = 1, 13 do
                enforcing:incoming("k", true)
                shadow:incoming("k", true)
            end
            -- dry runs are not decisions
            enforcing:incoming("k", false)
            shadow:incoming("k", false)
            local samples = parse(m:render())
            local function decisions(name)
                local labels = '{limiter="' .. name .. '"}'
                return {
                    samples["resty_limit_allowed_total" .. labels],
                    samples["resty_limit_near_limit_total" .. labels],
                    samples["resty_limit_rejected_total" .. labels],
                    samples["resty_limit_shadow_rejected_total" .. labels],
                }
            end
            -- near: a window at 8, 9, 10 of 10 (ratio 0.8); 5 to 10 (0.5)
            assert.same({ 10, 3, 3, 0 }, decisions("metrics_decide"))
            assert.same({ 10, 6, 0, 3 }, decisions("metrics_shadow"))
        end)

        it("adds a worker's new figures to the node's sums, never less",
           function()
            local c = assert(counter.new("metrics_counts"))
            local m = registry({ interval = 3600 })
            m:add(c)
            local function syncs()
                local samples = parse(m:render())
                return samples['resty_counts_syncs_total'
                               .. '{dict="metrics_counts"}']
            end
            local before = syncs()
            for _ = 1, 5 do
                assert(c:sync())
            end
            assert.equal(before + 5, syncs())
            assert.equal(before + 5, syncs())
            assert.is_true(metrics.publish_all())
        end)
    end)

    it("formats numbers exactly", function()
        local text = metrics._number_text
        assert.equal("9007199254740991", text(2 ^ 53 - 1))
        assert.equal("0.1", text(0.1))
        assert.equal("+Inf", text(1 / 0))
        assert.equal("NaN", text(0 / 0))
        assert.equal(2 ^ 60, tonumber(text(2 ^ 60)))
    end)

    it_http("sums every worker's figures, whichever worker renders",
            function()
        local seen, sent = {}, 0
        -- Syncs by hand until both workers have made some (the kernel
        -- picks one per connection).
        for _ = 1, 400 do
            local body = assert(race.get("/metrics/sync"))
            sent = sent + 1
            seen[body:match("worker (%d)")] = true
            if seen["0"] and seen["1"] and sent >= 20 then
                break
            end
        end
        assert.is_true(seen["0"] and seen["1"], "both workers synced")

        -- Each worker publishes every 0.1 s: within 5 s a rendering says
        -- `sent`; from then on every one does, by either worker.
        local series = 'resty_counts_syncs_total{dict="metrics_http"}'
        local function render()
            local body = assert(race.get("/metrics/render"))
            local worker, text = body:match("\r\n\r\nworker (%d)\n(.*)$")
            return worker, parse(text)[series]
        end
        local got
        for _ = 1, 100 do
            _, got = render()
            if got == sent then
                break
            end
            ngx.sleep(0.05)
        end
        assert.equal(sent, got)
        local rendered_by = {}
        for _ = 1, 200 do
            local worker
            worker, got = render()
            assert.equal(sent, got)
            rendered_by[worker] = true
            if rendered_by["0"] and rendered_by["1"] then
                break
            end
        end
        assert.is_true(rendered_by["0"] and rendered_by["1"],
                       "both workers rendered the sum")
    end)

    describe("json()", function()
        it("gives every object's figures as JSON, keys escaped", function()
            local c = assert(counter.new("metrics_counts", 0.1))
            local hostile = '<img src=x onerror=alert(1)>"\\\n\1&\226\128\168'
            local bytes = "bin\255<"
            assert(c:incr(hostile, 2))
            assert(c:incr(bytes, 3))
            assert(c:incr("big", 2 ^ 53 - 1))
            assert(c:sync())
            local s = assert(strict.new("strict", { name = "metrics_js" }))
            assert(s:clear())
            assert(s:set("huge", "9007199254740993"))
            local lim = assert(limit.new("limit", {
                limit = 2, window = 60, name = "metrics_json",
                clock = function() return 6000.5 end }))
            for _ = 1, 3 do
                lim:incoming("k", true)
            end
            local r = assert(requests.new("metrics_requests_1"))
            assert(r:record(hostile, 0.01))
            local m = registry()
            m:add(c)
            m:add(s)
            m:add(lim)
            m:add(r)

            local text = m:json()
            -- no markup and no raw line end in the text, whatever the keys
            assert.is_nil(text:find("[<>&]"))
            assert.is_nil(text:find("\226\128\168", 1, true))
            local doc = assert(json.decode(text))
            assert.is_true(math.abs(doc.time - ngx.now()) < 5)
            local keys = {}
            for _, kv in ipairs(doc.counters[1].keys) do
                keys[kv.key] = kv.value
            end
            assert.equal("metrics_counts", doc.counters[1].dict)
            assert.equal("resty_counts_total", doc.counters[1].metric)
            assert.equal(2, keys[hostile])
            assert.equal(3, keys["bin\\xff<"])
            assert.matches('"value":9007199254740991}', text, 1, true)
            assert.same({ { key = "huge", value = "9007199254740993" } },
                        doc.values[1].keys)
            assert.same({ kind = "strict", dict = "strict",
                          name = "metrics_js" },
                        { kind = doc.values[1].kind, dict = doc.values[1].dict,
                          name = doc.values[1].name })
            local l = doc.limits[1]
            assert.same({ "metrics_json", "fixed", 2, 60, false, 2, 1, 1, 0 },
                        { l.limiter, l.algorithm, l.limit, l.window,
                          l.shadow, l.allowed, l.near_limit, l.rejected,
                          l.shadow_rejected })
            assert.equal("metrics_requests_1", doc.requests[1].dict)
            assert.equal(1, doc.requests[1].stats.stats[hostile].current
                                                                .requests)
            local figures = {}
            for _, f in ipairs(doc.figures) do
                figures[f.name .. json.encode(f.labels)] = f.value
            end
            assert.is_true(figures['resty_counts_syncs_total'
                                   .. '{"dict":"metrics_counts"}'] >= 1)
            assert.equal(1, figures['resty_limit_rejected_total'
                                    .. '{"limiter":"metrics_json"}'])
            assert.matches("m:json", raised(m.json), 1, true)
        end)
    end)

    describe("status_page()", function()
        it("is one page whose settings are escaped", function()
            local m = registry()
            local html = m:status_page({ json_url = '/s.json?a=1&b="x"',
                                         refresh = 2.5,
                                         title = "<b>node 1</b>" })
            assert.matches('data-json-url="/s.json?a=1&amp;b=&quot;x&quot;" '
                           .. 'data-refresh="2.5"', html, 1, true)
            assert.matches("<title>&lt;b&gt;node 1&lt;/b&gt;</title>", html,
                           1, true)
            assert.is_nil(html:find("innerHTML", 1, true))
            -- nothing to load: no src, no href, no url()
            assert.is_nil(html:find("src=", 1, true))
            assert.is_nil(html:find("href", 1, true))
            assert.is_nil(html:find("url(", 1, true))
            assert.matches('data-json-url="status.json" data-refresh="5"',
                           m:status_page(), 1, true)
            assert.matches('unknown option "refrsh"',
                           raised(m.status_page, m, { refrsh = 1 }), 1, true)
            assert.matches('bad "opts.refresh" argument',
                           raised(m.status_page, m, { refresh = 0 }), 1, true)
            assert.matches('bad "opts.json_url" argument',
                           raised(m.status_page, m, { json_url = 1 }), 1,
                           true)
        end)
    end)
end)
