-- resty.counter.requests and the resty.greencheek.request.counter drop-in,
-- inside a real nginx worker (run by spec/run-in-nginx.lua). Time comes
-- from an injected clock, so windows roll over on demand.
--
-- Requests live in the shared engine of the dict, which no spec can empty:
-- every spec that reads all keys takes a dict of its own (engine()).

local requests = require "resty.counter.requests"
local request_counter = require "resty.greencheek.request.counter"
local json = require "dkjson"
local race = require "helpers.race"

-- Specs that send requests to this nginx (see spec/helpers/it_http.lua).
local it_http = require("helpers.it_http")(it, pending)

-- A window start (a multiple of 60), so that tests can count in seconds.
local T0 = 1537724100


local function fresh(name)
    local dict = ngx.shared[name]
    dict:flush_all()
    dict:flush_expired()
    return dict
end


local function raised(fn, ...)
    local ok, err = pcall(fn, ...)
    assert(not ok, "expected an error")
    return err
end


-- The dicts of spec/nginx/unit.conf for these specs (requests_1 to
-- requests_24, 256k each: some 14 keys of 3 windows).
local dicts_used = 0


-- An engine on a dict no other spec has used, whose clock reads
-- `clock.now`; and the dict's name.
local function engine(opts)
    dicts_used = dicts_used + 1
    assert(dicts_used <= 26, "add request dicts to spec/nginx/unit.conf")
    local name = "requests_" .. dicts_used
    fresh(name)
    local clock = { now = T0 }
    opts = opts or {}
    opts.clock = function() return clock.now end
    local r = assert(requests.new(name, opts))
    return r, clock, name
end


local function stats(r)
    local text = assert(r:stats())
    local decoded = json.decode(text)
    assert(decoded, "not JSON: " .. text)
    return decoded, text
end


-- The nearest-rank percentile of a sorted list.
local function exact_percentile(sorted, q)
    return sorted[math.max(1, math.ceil(q * #sorted))]
end


describe("resty.counter.requests", function()

    describe("new()", function()
        it("returns nil and an error for an unknown dict", function()
            local r, err = requests.new("no_such_dict")
            assert.is_nil(r)
            assert.equal('shared dict "no_such_dict" not found', err)
        end)

        it("raises on bad options, naming them", function()
            assert.matches('bad "shdict_name" argument: string expected, '
                           .. 'got nil', raised(requests.new, nil))
            assert.matches('bad "opts" argument: table expected',
                           raised(requests.new, "requests", 5))
            assert.matches('bad "opts.window" argument: a whole number of '
                           .. 'seconds >= 1 expected, got 1.5 %(a number%)',
                           raised(requests.new, "requests", { window = 1.5 }))
            assert.matches('bad "opts.previous" argument',
                           raised(requests.new, "requests",
                                  { previous = -1 }))
            assert.matches('bad "opts.max_keys" argument',
                           raised(requests.new, "requests", { max_keys = 0 }))
            assert.matches('bad "opts.flush_interval" argument',
                           raised(requests.new, "requests",
                                  { flush_interval = 0 }))
            assert.matches('bad "opts.clock" argument: function expected, got 1 %(a number%)',
                           raised(requests.new, "requests", { clock = 1 }))
            assert.matches('bad "key" argument: empty string',
                           raised(requests.new, "requests",
                                  { overflow_key = "" }))
        end)
    end)

    describe("stats()", function()
        it("has greencheek's JSON shape, field by field", function()
            local r, clock, dict_name = engine()
            clock.now = T0 + 5
            r:record_with_all("login", "0.010")
            r:record_with_all("login", 0.030)
            r:record("all", "0.002")
            clock.now = T0 + 15
            local doc = stats(r)

            local info = doc.shared_dict_info
            assert.equal(ngx.shared[dict_name]:capacity(), info.capacity)
            assert.is_number(info.free_space)
            assert.is_true(info.free_space < info.capacity)

            local login = doc.stats.login
            assert.same({ "current", "prev1", "prev2" }, (function()
                local names = {}
                for name in pairs(login) do
                    names[#names + 1] = name
                end
                table.sort(names)
                return names
            end)())

            local current = login.current
            assert.equal(2, current.requests)
            assert.near(20, current.latency_ms, 1e-9)
            assert.equal(T0, current.startofminute_epoch)
            assert.equal(T0 + 15, current.epoch)
            assert.equal(2, current.rate)
            assert.near(10, current.p50, 10 * 0.05)
            assert.near(30, current.p90, 30 * 0.05)
            assert.near(30, current.p99, 30 * 0.05)
            assert.equal(30, current.max)

            for _, name in ipairs({ "prev1", "prev2" }) do
                local period = login[name]
                assert.equal(0, period.requests)
                assert.equal(0, period.latency_ms)
                assert.is_nil(period.rate)
                assert.is_nil(period.epoch)
            end
            assert.equal(T0 - 60, login.prev1.startofminute_epoch)
            assert.equal(T0 - 120, login.prev2.startofminute_epoch)

            assert.equal(3, doc.stats.all.current.requests)
            assert.near(14, doc.stats.all.current.latency_ms, 1e-9)
            local key_info = doc.key_info
            assert.is_true(key_info.engine_used_bytes > 0)
            assert.is_true(key_info.engine_used_bytes
                           < key_info.engine_bytes)
            assert.equal(r.handle.bytes, key_info.engine_bytes)
            key_info.engine_used_bytes, key_info.engine_bytes = nil, nil
            -- The admission past max_keys: nothing refused yet.
            assert.same({ refused_requests = 0, refused_keys = 0,
                          admitted_keys = 0, evicted_keys = 0, errors = {} },
                        {
                            refused_requests = key_info.refused_requests,
                            refused_keys = key_info.refused_keys,
                            admitted_keys = key_info.admitted_keys,
                            evicted_keys = key_info.evicted_keys,
                            errors = key_info.errors,
                        })
            key_info.refused_requests, key_info.refused_keys = nil, nil
            key_info.admitted_keys, key_info.evicted_keys = nil, nil
            key_info.errors = nil
            assert.same({ tracked = 1, max_keys = 1000,
                          overflow_key = "_overflow" }, key_info)
        end)

        it("rolls windows over and applies the rate formula", function()
            local r, clock = engine()
            for _ = 1, 40 do
                r:record("k", 0.001)
            end
            clock.now = T0 + 60 + 12
            for _ = 1, 3 do
                r:record("k", 0.001)
            end
            local doc = stats(r)
            local k = doc.stats.k
            assert.equal(3, k.current.requests)
            assert.equal(T0 + 60, k.current.startofminute_epoch)
            assert.equal(40, k.prev1.requests)
            assert.equal(0, k.prev2.requests)
            -- prev1 * ((60 - elapsed) / 60) + current
            assert.near(40 * (48 / 60) + 3, k.current.rate, 1e-9)

            clock.now = T0 + 120 + 30
            k = stats(r).stats.k
            assert.equal(0, k.current.requests)
            assert.equal(3, k.prev1.requests)
            assert.equal(40, k.prev2.requests)
            assert.near(3 * 0.5, k.current.rate, 1e-9)

            clock.now = T0 + 180
            k = stats(r).stats.k
            assert.equal(0, k.prev1.requests)
            assert.equal(3, k.prev2.requests)

            clock.now = T0 + 240
            k = stats(r).stats.k
            assert.equal(0, k.prev2.requests)
        end)

        it("counts a late request in the window it started in", function()
            local r, clock = engine()
            clock.now = T0 + 59.9
            r:record("k", 0.5)
            clock.now = T0 + 61
            r:record("k", 0.5)
            local k = stats(r).stats.k
            assert.equal(1, k.current.requests)
            assert.equal(1, k.prev1.requests)
        end)

        it("keeps the windows configured, of the length configured",
           function()
            local r, clock = engine({ window = 10, previous = 4 })
            for i = 0, 5 do
                clock.now = T0 + i * 10
                for _ = 1, i + 1 do
                    r:record("k", 0.001)
                end
            end
            local k = stats(r).stats.k
            assert.equal(6, k.current.requests)
            for age = 1, 4 do
                assert.equal(6 - age, k["prev" .. age].requests)
                assert.equal(T0 + (5 - age) * 10,
                             k["prev" .. age].startofminute_epoch)
            end
            assert.is_nil(k.prev5)
        end)

        it("gives each percentile within 5% of the exact value", function()
            local r = engine()
            local values = {}
            local seed = 12345
            for i = 1, 5000 do
                seed = (seed * 1103515245 + 12345) % 2147483648
                local u = seed / 2147483648
                -- seconds: mostly fast, a tail, a few very slow
                local v
                if i % 100 < 90 then
                    v = 0.001 + u * 0.02
                elseif i % 100 < 99 then
                    v = 0.05 + u * 0.4
                else
                    v = 1 + u * 20
                end
                values[#values + 1] = v * 1000
                r:record("trace", v)
            end
            table.sort(values)
            local current = stats(r).stats.trace.current
            for name, q in pairs({ p50 = 0.5, p90 = 0.9, p99 = 0.99 }) do
                local exact = exact_percentile(values, q)
                local err = math.abs(current[name] - exact) / exact
                assert.is_true(err < 0.05, name .. ": " .. current[name]
                               .. " vs exact " .. exact)
            end
            assert.near(values[#values], current.max, 1e-9)
        end)

        it("escapes every key in the JSON", function()
            local r = engine()
            local keys = { 'quo"te', "back\\slash", "new\nline", "pipe|key",
                           "</script>", "tab\t", "\1ctl", "é ü 漢" }
            for _, key in ipairs(keys) do
                r:record(key, 0.001)
            end
            local doc, text = stats(r)
            for _, key in ipairs(keys) do
                assert.is_table(doc.stats[key], key .. " in " .. text)
                assert.equal(1, doc.stats[key].current.requests)
            end
        end)

        it("reads only request keys, not the rest of the dict or engine",
           function()
            local r, _, dict_name = engine()
            ngx.shared[dict_name]:set("someone else's key", 1)
            -- A resty.counter key in the same engine is not a request key.
            require("resty.counter").new(dict_name):incr("counted")
            r:record("k", 0.001)
            local doc = stats(r)
            assert.same({ "k" }, (function()
                local names = {}
                for name in pairs(doc.stats) do
                    names[#names + 1] = name
                end
                return names
            end)())
        end)
    end)

    describe("single_stats()", function()
        it("puts one key's windows directly under stats", function()
            local r = engine()
            r:record("one", 0.002)
            r:record("two", 0.002)
            local doc = json.decode(assert(r:single_stats("one")))
            assert.equal(1, doc.stats.current.requests)
            assert.is_table(doc.stats.prev1)
            assert.is_table(doc.shared_dict_info)

            doc = json.decode(assert(r:single_stats("never seen")))
            assert.equal(0, doc.stats.current.requests)
            assert.matches('bad "key" argument: string expected, got nil',
                           raised(r.single_stats, r, nil))
        end)
    end)

    describe("bad input", function()
        it("raises a clear error for bad keys, blaming the caller",
           function()
            local r = engine()
            local cached = r:self_metrics().cached
            local cases = {
                { nil, 'bad "key" argument: string expected, got nil' },
                { "", 'bad "key" argument: empty string' },
                { 5, 'bad "key" argument: string expected, got 5 (a number)' },
                { {}, 'bad "key" argument: string expected, got a table' },
                { string.rep("k", 65536), 'bad "key" argument: 65536 bytes, '
                                         .. 'longer than 65535' },
                { "\255\254", 'bad "key" argument: not valid UTF-8' },
            }
            for _, case in ipairs(cases) do
                local err = raised(function() r:record(case[1], 0.1) end)
                assert.matches("requests_spec.lua:%d+: "
                               .. case[2]:gsub("%p", "%%%0"), err)
            end
            assert.equal(cached, r:self_metrics().cached)
        end)

        it("raises a clear error for bad latencies", function()
            local r = engine()
            local cached = r:self_metrics().cached
            local cases = {
                { nil, 'bad "latency" argument: number expected, got nil' },
                { -0.001, 'bad "latency" argument: -0.001 is negative' },
                { 0 / 0, 'bad "latency" argument: nan is not a finite '
                         .. 'number' },
                { 1 / 0, 'inf is not a finite number' },
                { "abc", 'bad "latency" argument: "abc" is not a number' },
                { "-1", 'bad "latency" argument: -1 is negative' },
                { {}, 'bad "latency" argument: number expected, got a table' },
            }
            for _, case in ipairs(cases) do
                local err = raised(r.record, r, "k", case[1])
                assert.matches(case[2]:gsub("%p", "%%%0"), err)
            end
            -- and nothing was recorded
            assert.equal(cached, r:self_metrics().cached)
            assert.is_true(r:record("k", "0.012"))
            assert.is_true(r:record("k", 0))
            assert.equal(2, stats(r).stats.k.current.requests)
        end)
    end)

    describe("the key cap", function()
        it("records new keys beyond max_keys under the overflow key",
           function()
            local r = engine({ max_keys = 3 })
            for i = 1, 10 do
                r:record_with_all("key" .. i, 0.001)
                r:record_with_all("key" .. i, 0.001)
            end
            local doc = stats(r)
            local names = {}
            for name in pairs(doc.stats) do
                names[#names + 1] = name
            end
            table.sort(names)
            assert.same({ "_overflow", "all", "key1", "key2", "key3" }, names)
            assert.equal(2, doc.stats.key1.current.requests)
            assert.equal(14, doc.stats._overflow.current.requests)
            assert.equal(20, doc.stats.all.current.requests)
            assert.equal(3, doc.key_info.tracked)
            assert.is_true(r:self_metrics().overflowed > 0)

            -- Registered keys keep counting; new ones keep overflowing.
            r:record("key2", 0.001)
            r:record("key11", 0.001)
            doc = stats(r)
            assert.equal(3, doc.stats.key2.current.requests)
            assert.equal(15, doc.stats._overflow.current.requests)
            assert.is_nil(doc.stats.key11)
        end)

        it("bounds what a flood of new keys makes", function()
            local r = engine({ max_keys = 5 })
            local before = r:self_metrics().cached
            for i = 1, 1000 do
                r:record("flood" .. i, 0.001)
            end
            -- 5 keys and the overflow key, in this worker's cache and in
            -- the engine
            local m = r:self_metrics()
            assert.equal(before + 6, m.cached)
            assert.equal(995, m.overflowed)
            local doc = stats(r)
            assert.equal(995, doc.stats._overflow.current.requests)
            assert.equal(5, doc.key_info.tracked)
        end)
    end)

    describe("idle keys", function()
        -- The keys of a report, sorted.
        local function keys_of(doc)
            local names = {}
            for name in pairs(doc.stats) do
                names[#names + 1] = name
            end
            table.sort(names)
            return names
        end


        -- Series of the Prometheus text whose line has `pattern`.
        local function lines_with(text, pattern)
            local found = {}
            for line in text:gmatch("[^\n]+") do
                if line:find(pattern, 1, true) then
                    found[#found + 1] = line
                end
            end
            return found
        end


        it("are removed after idle_timeout, and a new key takes the place",
           function()
            local r, clock, name = engine({ max_keys = 2,
                                            idle_timeout = 120 })
            clock.now = T0 + 5
            for _ = 1, 3 do
                r:record_with_all("a", 0.010)
            end
            r:record("b", 0.010)
            r:record("c", 0.010)    -- past max_keys: the overflow key
            clock.now = T0 + 100
            r:record("b", 0.010)

            -- a's last request was in the window ending at T0 + 60: idle
            -- from T0 + 180; b's window ends at T0 + 120.
            clock.now = T0 + 179
            assert.same({ "_overflow", "a", "all", "b" }, keys_of(stats(r)))
            clock.now = T0 + 185
            local doc = stats(r)
            assert.same({ "_overflow", "all", "b" }, keys_of(doc))
            assert.equal(1, doc.key_info.tracked)
            local text = assert(r:prometheus())
            assert.same({}, lines_with(text, 'key="a"'))
            assert.same({ 'resty_requests_tracked_keys{dict="' .. name
                          .. '"} 1' },
                        lines_with(text, "resty_requests_tracked_keys{"))
            assert.equal(1, #lines_with(text,
                                        "resty_requests_engine_used_bytes{"))

            -- The place a held is free: c gets a key of its own.
            r:record("c", 0.010)
            doc = stats(r)
            assert.same({ "_overflow", "all", "b", "c" }, keys_of(doc))
            assert.equal(1, doc.stats.c.current.requests)
            assert.equal(2, doc.key_info.tracked)
        end)

        it("count from 0 when recorded again after their removal",
           function()
            local r, clock = engine({ idle_timeout = 60 })
            clock.now = T0 + 5
            for _ = 1, 5 do
                r:record("again", 0.010)
            end
            clock.now = T0 + 125
            assert.is_nil(stats(r).stats.again)
            -- This worker kept the removed record's cells: the epoch tells
            -- it to look the key up again.
            r:record("again", 0.010)
            local doc = stats(r)
            assert.equal(1, doc.stats.again.current.requests)
            assert.equal(0, doc.stats.again.prev2.requests)
            local text = assert(r:prometheus())
            assert.same({ 'resty_requests_total{dict="' .. r.dict_name
                          .. '",key="again"} 1' },
                        lines_with(text, 'resty_requests_total{dict="'
                                         .. r.dict_name .. '",key="again"}'))
        end)

        it("are removed with custom buckets too", function()
            -- A record's width depends on how many buckets it counts.
            local r, clock = engine({ idle_timeout = 60,
                                      buckets = { 0.1, 1 } })
            clock.now = T0 + 5
            r:record("custom", 0.010)
            assert.equal(1, stats(r).stats.custom.current.requests)
            clock.now = T0 + 125
            assert.is_nil(stats(r).stats.custom)
        end)

        it("stay without idle_timeout (the default)", function()
            local r, clock = engine()
            clock.now = T0 + 5
            r:record("kept", 0.010)
            clock.now = T0 + 86400 * 365
            assert.equal(1, stats(r).key_info.tracked)
            assert.truthy(assert(r:prometheus()):find('key="kept"', 1, true))
        end)

        it("refuses a bad idle_timeout", function()
            for _, bad in ipairs({ -1, 1 / 0, "60", true }) do
                for _, new in ipairs({ requests.new,
                                       request_counter.configure }) do
                    local err = raised(new, "requests_1",
                                       { idle_timeout = bad })
                    assert.matches('bad "opts.idle_timeout"', err, 1, true)
                    assert.matches("0 (never) or a positive finite number",
                                   err, 1, true)
                end
            end
        end)

        it_http("are removed while the other worker keeps their cells",
                function()
            -- Worker 1 records a key and keeps its cells; this worker's
            -- scrape removes it; worker 1 records it again: it counts from
            -- 0 in a record of its own, never in the removed one.
            local function record_in_worker_1(now)
                for _ = 1, 200 do
                    local body = assert(race.get("/requests/idle?key=k&now="
                                                 .. now))
                    -- The response whole: headers, then the body.
                    if body:find("\r\n\r\nrecorded\n", 1, true) then
                        return
                    end
                end
                error("worker 1 never took a request")
            end

            local clock = { now = T0 + 5 }
            local r = assert(requests.new("requests_idle", {
                idle_timeout = 60, clock = function() return clock.now end,
            }))
            record_in_worker_1(T0 + 5)
            record_in_worker_1(T0 + 6)
            assert.equal(2, stats(r).stats.k.current.requests)
            clock.now = T0 + 125
            assert.is_nil(stats(r).stats.k)
            record_in_worker_1(T0 + 125)
            local doc = stats(r)
            assert.equal(1, doc.stats.k.current.requests)
            assert.equal(0, doc.stats.k.prev2.requests)
            assert.equal(1, doc.key_info.tracked)
        end)
    end)

    describe("the shared engine", function()
        it("needs no flush: flush() and flush_all() return true", function()
            local r = engine()
            r:record("k", 0.001)
            assert.equal(1, stats(r).stats.k.current.requests)
            assert.is_true(r:flush())
            assert.is_true(requests.flush_all())
            assert.equal(0, r:self_metrics().pending)
            assert.equal(1, stats(r).stats.k.current.requests)
        end)

        it("counts the records of several engines (as of workers) as one",
           function()
            local r1, clock, dict_name = engine()
            local r2 = assert(requests.new(dict_name, {
                clock = function() return clock.now end }))
            for _ = 1, 7 do
                r1:record("k", 0.010)
            end
            for _ = 1, 5 do
                r2:record("k", 0.100)
            end
            for _, r in ipairs({ r1, r2 }) do
                local k = stats(r).stats.k.current
                assert.equal(12, k.requests)
                assert.near((7 * 10 + 5 * 100) / 12, k.latency_ms, 1e-9)
                assert.equal(100, k.max)
            end
        end)

        it("counts a request whose window's slot moved on in the total",
           function()
            local r, clock = engine({ previous = 1 })
            clock.now = T0 + 120
            r:record("k", 0.001)
            -- Two windows back: the slot of T0 + 120's window.
            clock.now = T0
            r:record("k", 0.001)
            assert.equal(1, r:self_metrics().total_only)
            clock.now = T0 + 120
            local doc = stats(r)
            assert.equal(1, doc.stats.k.current.requests)
            local text = assert(r:prometheus())
            assert.matches('resty_requests_total{dict="[^"]+",'
                           .. 'key="k"} 2', text)
        end)

        it("refuses a previous that differs from the key's record's",
           function()
            local r, clock, dict_name = engine()
            r:record("k", 0.001)
            local other = assert(requests.new(dict_name, { previous = 3,
                clock = function() return clock.now end }))
            local ok, err = other:record("k", 0.001)
            assert.is_nil(ok)
            assert.equal('request key "k" has a record of another shape: '
                         .. 'every request counter of a dict must have the '
                         .. 'same "previous"', err)
        end)

        it("in a full engine, records new keys under the overflow key",
           function()
            fresh("requests_small")
            local r = assert(requests.new("requests_small"))
            for i = 1, 500 do
                assert.is_true(r:record("key" .. i, 0.001))
            end
            local m = r:self_metrics()
            assert.is_true(m.refused > 0, "a 64k dict's engine is full")
            local doc = json.decode(assert(r:stats()))
            local sum = 0
            for _, key in pairs(doc.stats) do
                sum = sum + key.current.requests
            end
            assert.equal(500, sum)
            assert.equal(m.refused, doc.stats._overflow.current.requests)
        end)

        it("in an engine too small for histograms, shows no percentiles",
           function()
            -- requests_small's engine (32k) holds fewer than 8 records
            -- with histograms: its records have none.
            local r = assert(requests.new("requests_small"))
            local text = assert(r:single_stats("key1"))
            local current = json.decode(text).stats.current
            assert.equal(1, current.requests)
            assert.equal(1, current.max)
            assert.matches('"p50":null,"p90":null,"p99":null', text, 1,
                           true)
            -- and a dict of 256k has them
            local big = engine()
            big:record("k", 0.001)
            current = stats(big).stats.k.current
            assert.near(1, current.p50, 0.05)
        end)

        it_http("a read right after a request in another worker includes it",
                function()
            local k = "http-" .. ngx.now()
            local seen, sent = {}, 0
            -- Until both workers have recorded (the kernel picks one per
            -- connection), then a few more.
            for _ = 1, 400 do
                local body = assert(race.get("/requests/record?key=" .. k))
                sent = sent + 1
                seen[body:match("worker (%d)")] = true
                local doc = json.decode(assert(request_counter.single_stats(
                    "requests_http", k)))
                local windows = doc.stats.current.requests
                                + doc.stats.prev1.requests
                assert.equal(sent, windows)
                if seen["0"] and seen["1"] and sent >= 20 then
                    break
                end
            end
            assert.is_true(seen["0"] and seen["1"], "both workers recorded")
        end)
    end)

    describe("a scrape of many keys", function()
        -- More keys than one step reads or renders (500).
        local KEYS = 2500
        local r

        setup(function()
            fresh("requests_steps")
            r = assert(requests.new("requests_steps", {
                previous = 0, max_keys = KEYS,
                clock = function() return T0 end,
            }))
            for i = 1, KEYS do
                assert(r:record("/k/" .. i, i / 1e4))
            end
        end)

        it("lets the worker run other timers between its steps", function()
            for _, method in ipairs({ "stats", "prometheus" }) do
                -- A zero-delay timer runs once the event loop turns, which
                -- a scrape in one blocking walk never lets it do.
                local ran = false
                assert(ngx.timer.at(0, function() ran = true end))
                local text = assert(r[method](r))
                assert.is_true(ran, method)
                assert.is_true(#text > KEYS * 100)
            end
        end)

        -- Pieces of about 32 KB (requests.lua's WRITE_BYTES): a piece ends
        -- after the key that reaches them (a key's text here is under 2 KB
        -- in any one of Prometheus' sections), or with its step's keys.
        local PIECE = 32 * 1024

        it("hands write() the same text a step at a time", function()
            for _, method in ipairs({ "stats", "prometheus" }) do
                local whole = assert(r[method](r))
                local pieces, longest = {}, 0
                assert.is_true(r[method](r, function(piece)
                    pieces[#pieces + 1] = piece
                    longest = math.max(longest, #piece)
                    return true
                end))
                -- A piece per 500 keys or more, none over a piece's size.
                assert.is_true(#pieces >= 5, method .. ": " .. #pieces)
                assert.is_true(longest < PIECE + 2048, method .. ": "
                               .. longest)
                assert.equal(whole, table.concat(pieces))
            end
            local decoded = json.decode((r:stats()))
            local keys = 0
            for key, windows in pairs(decoded.stats) do
                keys = keys + 1
                local i = tonumber(key:match("^/k/(%d+)$"))
                assert.equal(1, windows.current.requests)
                assert.near(i / 10, windows.current.max, 1e-9)
            end
            assert.equal(KEYS, keys)
        end)

        it("hands write() pieces of about 32 KB in one call where the "
           .. "phase cannot yield", function()
            -- As in log_by_lua*: the timer phase taken off the table of
            -- phases that can yield, for the call.
            local yieldable = require("resty.counter.check").yieldable
            for _, method in ipairs({ "stats", "prometheus" }) do
                local whole = assert(r[method](r))
                local pieces, longest, shortest = {}, 0, math.huge
                local ran = false
                assert(ngx.timer.at(0, function() ran = true end))
                local was = yieldable.timer
                yieldable.timer = nil
                local ok, res, err = pcall(r[method], r, function(piece)
                    if #pieces > 0 then
                        -- The piece before this one: not the last.
                        shortest = math.min(shortest, #pieces[#pieces])
                    end
                    pieces[#pieces + 1] = piece
                    longest = math.max(longest, #piece)
                    return true
                end)
                yieldable.timer = was
                assert(ok, res)
                assert.is_true(res, err)
                -- No pause: the event loop never turned.
                assert.is_false(ran, method)
                assert.equal(whole, table.concat(pieces))
                -- 2,500 keys (1 MB of JSON, 3.5 MB of Prometheus text) in
                -- pieces of 32 KB and a key, the last one shorter: as few
                -- as there can be, whatever the section.
                assert.is_true(shortest >= PIECE, method .. ": " .. shortest)
                assert.is_true(longest < PIECE + 2048, method .. ": "
                               .. longest)
                assert.is_true(#pieces <= math.ceil(#whole / PIECE),
                               method .. ": " .. #pieces)
            end
        end)

        it("stops when write() fails, with write's error", function()
            for _, method in ipairs({ "stats", "prometheus" }) do
                local calls = 0
                local ok, err = r[method](r, function()
                    calls = calls + 1
                    return nil, "client gone"
                end)
                assert.is_nil(ok)
                assert.equal("client gone", err)
                assert.equal(1, calls)
            end
        end)

        it("raises for a write that is not a function", function()
            assert.matches('bad "write" argument: function expected, got 1 '
                           .. '%(a number%)', raised(r.stats, r, 1))
            assert.matches('bad "write" argument: function expected, got '
                           .. '"x" %(a string%)', raised(r.prometheus, r, "x"))
        end)
    end)

    describe("prometheus()", function()
        -- Parses the text format back: { [name{labels}] = value }, and the
        -- TYPE of each family.
        local function parse(text)
            local samples, types = {}, {}
            for line in text:gmatch("[^\n]+") do
                local family, kind = line:match("^# TYPE (%S+) (%S+)$")
                if family then
                    types[family] = kind
                elseif not line:match("^# HELP %S+ .+$") then
                    local series, value = line:match("^(.-%}) (%S+)$")
                    assert(series, "not a sample line: " .. line)
                    samples[series] = tonumber(value)
                end
            end
            return samples, types
        end

        it_http("never counts more at an edge than in all, while other "
                .. "workers record", function()
            local k = "consistent-" .. ngx.now()
            local r = assert(requests.new("requests_http"))
            local scrapes = 0

            -- Every bucket of `k` at most the next one and at most the
            -- count; +Inf the count.
            local function check(text)
                local samples = parse(text)
                local labels = '{dict="requests_http",key="' .. k .. '"'
                local count = samples["resty_request_latency_seconds_count"
                                      .. labels .. "}"]
                if not count then
                    return
                end
                local last = 0
                for _, le in ipairs({ "0.005", "0.01", "0.025", "0.05", "0.1",
                                      "0.25", "0.5", "1", "2.5", "5", "10" }) do
                    local below = samples["resty_request_latency_seconds_"
                                          .. 'bucket' .. labels .. ',le="'
                                          .. le .. '"}']
                    assert.is_true(below >= last and below <= count,
                                   le .. ": " .. below .. " of " .. count)
                    last = below
                end
                assert.equal(count, samples["resty_request_latency_"
                                            .. "seconds_bucket" .. labels
                                            .. ',le="+Inf"}'])
                scrapes = scrapes + 1
            end

            -- Two bursts of requests in flight at all times (worker 0,
            -- where this spec runs, skips them), scraped meanwhile.
            local running, recorded = 0, 0
            local function burst()
                running = running + 1
                local body = race.get("/requests/burst?n=200000&key=" .. k)
                running = running - 1
                if body and body:find("recorded", 1, true) then
                    recorded = recorded + 1
                end
            end
            local deadline = ngx.now() + 5
            while scrapes < 20000 and ngx.now() < deadline do
                while running < 2 do
                    ngx.thread.spawn(burst)
                end
                -- Many reads between sleeps (the light threads run then):
                -- a torn read is a matter of nanoseconds.
                for _ = 1, 100 do
                    check(assert(r:prometheus()))
                end
                ngx.sleep(0.001)
            end
            while running > 0 do
                ngx.sleep(0.01)
            end
            assert.is_true(recorded > 0, "worker 1 recorded")
            -- 20,000 unless the machine is slow: some thousands at least.
            assert.is_true(scrapes >= 2000, "scrapes: " .. scrapes)
        end)

        it("renders counters, a histogram and a rate, labels escaped",
           function()
            local r, _, dict_name = engine()
            local key = 'a"b\\c\nd'
            for _, s in ipairs({ 0.003, 0.003, 0.02, 0.7, 30 }) do
                r:record(key, s)
            end
            local samples, types = parse(assert(r:prometheus()))
            assert.equal("counter", types.resty_requests_total)
            assert.equal("histogram", types.resty_request_latency_seconds)
            assert.equal("gauge", types.resty_requests_window_rate)

            local labels = 'dict="' .. dict_name .. '",key="a\\"b\\\\c\\nd"'
            local function sample(name, extra)
                return samples[name .. "{" .. labels .. (extra or "") .. "}"]
            end
            assert.equal(5, sample("resty_requests_total"))
            local bucket = "resty_request_latency_seconds_bucket"
            assert.equal(2, sample(bucket, ',le="0.005"'))
            assert.equal(3, sample(bucket, ',le="0.025"'))
            assert.equal(4, sample(bucket, ',le="1"'))
            assert.equal(4, sample(bucket, ',le="10"'))
            assert.equal(5, sample(bucket, ',le="+Inf"'))
            assert.equal(5, sample("resty_request_latency_seconds_count"))
            assert.near(30.726, sample("resty_request_latency_seconds_sum"),
                        1e-6)
            assert.equal(5, sample("resty_requests_window_rate", ',window="60"'))
        end)

        it("counts at the buckets given, a request on an edge in it",
           function()
            local r, _, dict_name = engine({ buckets = { 0.1, 0.3, 2 } })
            -- As $request_time gives them; 0.3 exactly, and the next
            -- double above it.
            for _, s in ipairs({ "0.100", "0.3", 0.3, 0.30000000000000004,
                                 "2.000", 7 }) do
                r:record("k", s)
            end
            local text = assert(r:prometheus())
            local samples = parse(text)
            local labels = '{dict="' .. dict_name .. '",key="k"'
            local bucket = "resty_request_latency_seconds_bucket" .. labels
            assert.equal(1, samples[bucket .. ',le="0.1"}'])
            assert.equal(3, samples[bucket .. ',le="0.3"}'])
            assert.equal(5, samples[bucket .. ',le="2"}'])
            assert.equal(6, samples[bucket .. ',le="+Inf"}'])
            -- Those three and +Inf only: none of the default edges.
            local _, buckets = text:gsub("_bucket{", "")
            assert.equal(4, buckets)
            assert.is_nil(text:find('le="0.005"', 1, true))
        end)

        it("wants the same buckets of every request counter of a dict",
           function()
            local _, _, dict_name = engine({ buckets = { 0.1, 0.3, 2 } })
            local same = requests.new(dict_name, { buckets = { 0.1, 0.3, 2 } })
            assert.is_table(same)
            local want = 'the dict "' .. dict_name .. '" has request '
                         .. 'counters with other buckets: every request '
                         .. 'counter of a dict must have the same "buckets"'
            for _, other in ipairs({ { 0.1, 0.3, 3 }, { 0.1, 0.3 },
                                     { 0.1, 0.3, 2, 4 } }) do
                local r, err = requests.new(dict_name, { buckets = other })
                assert.is_nil(r)
                assert.equal(want, err)
            end
            -- The defaults are buckets too.
            local r, err = requests.new(dict_name)
            assert.is_nil(r)
            assert.equal(want, err)
            -- And the greencheek drop-in says the same.
            local ok, drop_err = request_counter.configure(dict_name)
            assert.is_nil(ok)
            assert.equal(want, drop_err)
        end)

        it("raises on bad buckets, quoting the value", function()
            local function bad(buckets)
                return raised(requests.new, "requests", { buckets = buckets })
            end
            local list = "a list of 1 to 32 increasing numbers of seconds"
            assert.matches('bad "opts.buckets" argument: ' .. list
                           .. ' expected, got "0.1" %(a string%)', bad("0.1"))
            assert.matches('bad "opts.buckets" argument: ' .. list
                           .. ' expected, got a table of 0', bad({}))
            local many = {}
            for i = 1, 33 do
                many[i] = i
            end
            assert.matches('bad "opts.buckets" argument: ' .. list
                           .. ' expected, got a table of 33', bad(many))
            assert.matches('bad "opts.buckets" argument: ' .. list
                           .. ' expected, got a table with the key "le"',
                           bad({ 0.1, le = 1 }))
            assert.matches('bad "opts.buckets%[2%]" argument: a number of '
                           .. 'seconds above 0, at most 1e9 expected, got '
                           .. '"1" %(a string%)', bad({ 0.5, "1" }))
            assert.matches('bad "opts.buckets%[1%]" argument: a number of '
                           .. 'seconds above 0, at most 1e9 expected, got '
                           .. '0 %(a number%)', bad({ 0 }))
            assert.matches('bad "opts.buckets%[1%]" argument: .* got nan',
                           bad({ 0 / 0 }))
            assert.matches('bad "opts.buckets%[1%]" argument: .* got inf',
                           bad({ 1 / 0 }))
            assert.matches('bad "opts.buckets%[3%]" argument: a number above '
                           .. 'opts.buckets%[2%] %(0.5 %(a number%)%) '
                           .. 'expected, got 0.5 %(a number%)',
                           bad({ 0.1, 0.5, 0.5 }))
            assert.matches('bad "opts.buckets%[2%]" argument',
                           raised(request_counter.configure, "greencheek",
                                  { buckets = { 2, 1 } }))
        end)
    end)
end)


describe("the request hot path", function()
    it("compiles in the JIT without a trace abort", function()
        local r = engine()
        local aborts, compiled = require("helpers.jit").aborts_in(function()
            for _ = 1, 50000 do
                r:record_with_all("hot", "0.012")
                r:record("other", 0.5)
            end
        end)
        assert.same({}, aborts)
        assert.is_true(compiled > 0, "the loop was compiled")
        local doc = stats(r)
        assert.equal(50000, doc.stats.hot.current.requests)
        assert.equal(50000, doc.stats.all.current.requests)
        assert.equal(50000, doc.stats.other.current.requests)
    end)
end)


describe("resty.greencheek.request.counter", function()
    local clock = { now = T0 }

    setup(function()
        fresh("greencheek")
        assert(request_counter.configure("greencheek", {
            clock = function() return clock.now end,
        }))
    end)

    it("refuses to configure a dict already in use", function()
        local ok, err = request_counter.configure("greencheek", {})
        assert.is_nil(ok)
        assert.matches("already in use", err)
    end)

    it("counts each call under the keys the original does", function()
        clock.now = T0 + 10
        request_counter.record_generic_request("greencheek", "0.001")
        request_counter.record_request("greencheek", "login", "0.002")
        request_counter.record_request("greencheek", "login", "0.004")
        request_counter.record_specific_request("greencheek", "topic", 0.1)
        assert(request_counter.flush("greencheek"))

        local doc = json.decode(assert(request_counter.stats("greencheek")))
        assert.equal(3, doc.stats.all.current.requests)
        assert.equal(2, doc.stats.login.current.requests)
        assert.near(3, doc.stats.login.current.latency_ms, 1e-9)
        assert.equal(1, doc.stats.topic.current.requests)

        local single = json.decode(assert(request_counter.single_stats(
            "greencheek", "all")))
        assert.equal(3, single.stats.current.requests)
        assert.equal(T0, single.stats.current.startofminute_epoch)
        assert.is_table(single.stats.prev2)

        local text = assert(request_counter.prometheus("greencheek"))
        assert.matches('resty_requests_total{dict="greencheek",'
                       .. 'key="login"} 2', text, 1, true)
    end)

    it("returns nil and an error for an unknown dict", function()
        local ok, err = request_counter.record_request("nope", "k", 0.1)
        assert.is_nil(ok)
        assert.equal('shared dict "nope" not found', err)
        ok, err = request_counter.stats("nope")
        assert.is_nil(ok)
        assert.equal('shared dict "nope" not found', err)
    end)

    it("raises for misuse, blaming the caller", function()
        assert.matches('requests_spec.lua:%d+: bad "dict_name" argument',
                       raised(function()
                           request_counter.record_request(nil, "k", 1)
                       end))
        assert.matches('requests_spec.lua:%d+: bad "latency" argument',
                       raised(function()
                           request_counter.record_request("greencheek", "k",
                                                          "x")
                       end))
        assert.matches('requests_spec.lua:%d+: bad "key" argument',
                       raised(function()
                           request_counter.record_specific_request(
                               "greencheek", "", 1)
                       end))
        assert.matches('requests_spec.lua:%d+: bad "key" argument',
                       raised(function()
                           request_counter.record_request("greencheek",
                                                          "\255", 1)
                       end))
    end)
end)
