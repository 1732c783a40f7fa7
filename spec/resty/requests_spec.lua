-- resty.counter.requests and the resty.greencheek.request.counter drop-in,
-- inside a real nginx worker (run by spec/run-in-nginx.lua). Time comes
-- from an injected clock, so windows roll over on demand.

local requests = require "resty.counter.requests"
local request_counter = require "resty.greencheek.request.counter"
local json = require "dkjson"

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


-- An engine on a fresh "requests" dict, whose clock reads `clock.now`.
local function engine(opts)
    fresh("requests")
    local clock = { now = T0 }
    opts = opts or {}
    opts.clock = function() return clock.now end
    opts.flush_interval = opts.flush_interval or 3600
    local r = assert(requests.new("requests", opts))
    return r, clock
end


local function stats(r)
    assert(r:flush())
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
            local r, clock = engine()
            clock.now = T0 + 5
            r:record_with_all("login", "0.010")
            r:record_with_all("login", 0.030)
            r:record("all", "0.002")
            clock.now = T0 + 15
            local doc = stats(r)

            local info = doc.shared_dict_info
            assert.equal(ngx.shared.requests:capacity(), info.capacity)
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
            assert.same({ tracked = 1, max_keys = 1000,
                          overflow_key = "_overflow" }, doc.key_info)
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

        it("reads only registered keys, not the rest of the dict", function()
            local r = engine()
            ngx.shared.requests:set("someone else's key", 1)
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
            assert(r:flush())
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
            assert.equal(0, r:self_metrics().pending)
        end)

        it("raises a clear error for bad latencies", function()
            local r = engine()
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
            assert.equal(0, r:self_metrics().pending)
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

        it("bounds what a worker holds before its first flush", function()
            local r = engine({ max_keys = 5 })
            for i = 1, 1000 do
                r:record("flood" .. i, 0.001)
            end
            -- 5 keys plus the overflow key
            assert.equal(6, r:self_metrics().pending)
            local doc = stats(r)
            assert.equal(995, doc.stats._overflow.current.requests)
        end)
    end)

    describe("flush()", function()
        it("keeps records pending while another flush holds the lock",
           function()
            local r = engine({ lock_timeout = 0.05 })
            r:record("k", 0.001)
            local dict = ngx.shared.requests
            assert(dict:add("rc:lock", "someone", 10))
            local ok, err = r:flush()
            assert.is_nil(ok)
            assert.equal("timeout waiting for another worker's flush", err)
            assert.equal(1, r:self_metrics().pending)
            r:record("k", 0.001)
            dict:delete("rc:lock")
            assert.equal(2, stats(r).stats.k.current.requests)
            assert.equal(0, r:self_metrics().pending)
        end)

        it("takes over at once the lock of a worker that died flushing",
           function()
            local r = engine({ lock_timeout = 0.3 })
            local dict = ngx.shared.requests
            -- pid 1 exists: its lock is waited for, then given up on
            r:record("k", 0.001)
            assert(dict:add("rc:lock", "1:flushing", 10))
            local ok, err = r:flush()
            assert.is_nil(ok)
            assert.equal("timeout waiting for another worker's flush", err)
            dict:delete("rc:lock")

            -- a shell that has exited: its pid names no process now
            local p = io.popen("sh -c 'echo $$'")
            local dead = tonumber(p:read("*l"))
            p:close()
            assert(dict:add("rc:lock", dead .. ":flushing", 10))
            ngx.update_time()
            local start = ngx.now()
            assert(r:flush())
            ngx.update_time()
            assert.is_true(ngx.now() - start < 0.1)
            assert.is_nil(dict:get("rc:lock"))          -- and released
            assert.equal(1, stats(r).stats.k.current.requests)
        end)

        it("in a full dict, evicts nothing and keeps records pending",
           function()
            local dict = fresh("tiny")
            -- Fill the dict with one value as large as it takes.
            local size = 16384
            while not dict:safe_set("filler", string.rep("x", size)) do
                size = size - 256
            end
            -- and the small slots that are left
            local small = 0
            while dict:safe_set("small" .. small, "x") do
                small = small + 1
            end
            local r = assert(requests.new("tiny", { flush_interval = 3600 }))
            for i = 1, 5 do
                r:record("key" .. i, 0.001)
            end
            local ok, err = r:flush()
            assert.is_nil(ok)
            -- (Even the lock entry may find no room.)
            assert.matches("no memory", err, 1, true)
            local m = r:self_metrics()
            assert.is_true(m.pending > 0)
            assert.is_true(m.failed > 0)
            assert.equal(size, #dict:get("filler"))

            -- Room again: every pending record is written, none lost.
            dict:delete("filler")
            for i = 0, small - 1 do
                dict:delete("small" .. i)
            end
            assert(r:flush())
            assert.equal(0, r:self_metrics().pending)
            local doc = json.decode(assert(r:stats()))
            for i = 1, 5 do
                assert.equal(1, doc.stats["key" .. i].current.requests)
            end
        end)

        it("flush_all() flushes every engine of the worker", function()
            local r = engine()
            r:record("k", 0.001)
            assert.equal(1, r:self_metrics().pending)
            -- (Its result also covers engines of other tests, on other
            -- dicts: only this one's records are checked.)
            requests.flush_all()
            assert.equal(0, r:self_metrics().pending)
        end)

        it("sets a TTL on window records and none on totals", function()
            local r, clock = engine()
            clock.now = T0 + 30
            r:record("k", 0.001)
            assert(r:flush())
            local dict = ngx.shared.requests
            local ttl = dict:ttl("rc:w:" .. (T0 / 60) .. ":k")
            -- shown until 2 windows old, plus one of margin
            assert.near((T0 + 4 * 60) - (T0 + 30), ttl, 1)
            assert.equal(0, dict:ttl("rc:t:k"))
        end)

        it("replaces a record that is not one, and counts it", function()
            local r = engine()
            local dict = ngx.shared.requests
            r:record("k", 0.001)
            assert(r:flush())
            dict:set("rc:t:k", "garbage")
            r:record("k", 0.001)
            assert(r:flush())
            assert.equal(1, r:self_metrics().corrupt)
            assert.equal(2, stats(r).stats.k.current.requests)
        end)

        it("merges the records of several engines (as of workers)",
           function()
            local r1, clock = engine()
            local r2 = assert(requests.new("requests", {
                clock = function() return clock.now end,
                flush_interval = 3600 }))
            for _ = 1, 7 do
                r1:record("k", 0.010)
            end
            for _ = 1, 5 do
                r2:record("k", 0.100)
            end
            assert(r2:flush())
            local k = stats(r1).stats.k.current
            assert.equal(12, k.requests)
            assert.near((7 * 10 + 5 * 100) / 12, k.latency_ms, 1e-9)
            assert.equal(100, k.max)
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

        it("renders counters, a histogram and a rate, labels escaped",
           function()
            local r = engine()
            local key = 'a"b\\c\nd'
            for _, s in ipairs({ 0.003, 0.003, 0.02, 0.7, 30 }) do
                r:record(key, s)
            end
            assert(r:flush())
            local samples, types = parse(assert(r:prometheus()))
            assert.equal("counter", types.request_counter_requests_total)
            assert.equal("histogram", types.request_counter_latency_seconds)
            assert.equal("gauge", types.request_counter_rate)

            local labels = 'dict="requests",key="a\\"b\\\\c\\nd"'
            local function sample(name, extra)
                return samples[name .. "{" .. labels .. (extra or "") .. "}"]
            end
            assert.equal(5, sample("request_counter_requests_total"))
            local bucket = "request_counter_latency_seconds_bucket"
            assert.equal(2, sample(bucket, ',le="0.005"'))
            assert.equal(3, sample(bucket, ',le="0.025"'))
            assert.equal(4, sample(bucket, ',le="1"'))
            assert.equal(4, sample(bucket, ',le="10"'))
            assert.equal(5, sample(bucket, ',le="+Inf"'))
            assert.equal(5, sample("request_counter_latency_seconds_count"))
            assert.near(30.726, sample("request_counter_latency_seconds_sum"),
                        1e-6)
            assert.equal(5, sample("request_counter_rate", ',window="60"'))
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
            flush_interval = 3600,
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
        assert.matches('request_counter_requests_total{dict="greencheek",'
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
