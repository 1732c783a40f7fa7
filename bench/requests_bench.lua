-- The request counter's costs, run by bench/incr_bench.lua in every worker:
-- record_request() against a straightforward per-request shared-dict
-- implementation (what a plain Lua module such as greencheek's original
-- does), and the cost of stats() and of prometheus() as keys grow, with the
-- engine's bytes per key.

local engine = require "resty.counter.engine"
local request_counter = require "resty.greencheek.request.counter"
local requests = require "resty.counter.requests"

local _M = {}

local N = 1000000
-- The request counts whose stats() and prometheus() are timed.
local GROWTH_KEYS = { 100, 1000, 10000, 100000 }
local ROUNDS = 5
local KEYS8 = { "/a", "/b", "/c", "/d", "/e", "/f", "/g", "/h" }


-- The baseline: per request, for the key and for "all", the shared-dict
-- increments of requests and of latency in the current minute's keys.
local function plain_record(dict, key, latency)
    local minute = math.floor(ngx.now() / 60)
    local ms = tonumber(latency) * 1000
    local prefix = key .. "|" .. minute
    dict:incr(prefix .. "|n", 1, 0, 180)
    dict:incr(prefix .. "|ms", ms, 0, 180)
    prefix = "all|" .. minute
    dict:incr(prefix .. "|n", 1, 0, 180)
    dict:incr(prefix .. "|ms", ms, 0, 180)
end


local function plain(n, keys, dict)
    local nkeys = #keys
    for _ = 1, n / nkeys do
        for j = 1, nkeys do
            plain_record(dict, keys[j], "0.012")
        end
    end
end


local function ours(n, keys)
    local nkeys = #keys
    for _ = 1, n / nkeys do
        for j = 1, nkeys do
            request_counter.record_request("bench_requests", keys[j], "0.012")
        end
    end
end


-- The phases where a scrape goes in steps (check.yieldable, the table
-- requests.lua reads at each call): the growth is timed both as one call
-- (as in log_by_lua*, which cannot yield: the timer phase taken off this
-- table for the call) and in steps with their pauses (from this timer).
local yieldable = require("resty.counter.check").yieldable


local function one_call(f, ...)
    local was = yieldable.timer
    yieldable.timer = nil
    local ok, res, err = pcall(f, ...)
    yieldable.timer = was
    assert(ok, res)
    return res, err
end


-- Each method timed `ROUNDS` times (best): as one call, then as one call
-- handing its text to a write function (a piece at a time), then in steps;
-- each after a full garbage collection, so that none pays for the
-- garbage of the one before (the 150 MB string of 100,000 keys' text).
local function time_scrapes(ctx, r, keys, what)
    local bytes = 0
    local function write(piece)
        bytes = bytes + #piece
        return true
    end
    for _, method in ipairs({ "stats", "prometheus" }) do
        local best, written, stepped = math.huge, math.huge, math.huge
        for _ = 1, ROUNDS do
            collectgarbage()
            local start = ctx.now()
            local text = assert(one_call(r[method], r))
            best = math.min(best, ctx.now() - start)
            assert(#text > keys * 100)
            text = nil -- luacheck: ignore 311
            collectgarbage()
            bytes = 0
            start = ctx.now()
            assert(one_call(r[method], r, write))
            written = math.min(written, ctx.now() - start)
            assert(bytes > keys * 100)
            collectgarbage()
            start = ctx.now()
            text = assert(r[method](r))
            stepped = math.min(stepped, ctx.now() - start)
            assert(#text > keys * 100)
        end
        local suffix = " ms, " .. keys .. what
        ctx.report(method .. suffix, best * 1e3)
        ctx.report(method .. " to write" .. suffix, written * 1e3)
        ctx.report(method .. " in steps" .. suffix, stepped * 1e3)
    end
end


-- The key counts timed again busy: 7 more requests of spread latencies
-- (seconds) in each of the three windows, the histograms' buckets filled
-- in 7 of their 25 cache lines (as `SCRAPE_BUSY=1` in src/ffi_engine.rs's
-- scrape_timing), so that percentiles read them.
local BUSY_KEYS = { [10000] = true, [100000] = true }
local BUSY_LATENCIES = { 0.0011, 0.004, 0.012, 0.03, 0.09, 0.25, 0.8 }
local WINDOW = 60


local function make_busy(r, keys, clock)
    local now = clock.now
    for age = 2, 0, -1 do
        clock.now = now - age * WINDOW
        for i = 1, keys do
            local key = "/path/" .. i
            local spread = 1 + (i % 13) / 13
            for j = 1, #BUSY_LATENCIES do
                r:record(key, BUSY_LATENCIES[j] * spread)
            end
        end
    end
    clock.now = now
end


-- syntax: requests_bench.growth(ctx, id)
--
-- K keys with one request each, then reported; for BUSY_KEYS, then busy
-- (see make_busy) and reported again ("busy keys"). Each worker uses its
-- own dict (a key with its three windows takes about 4.9 KB of the
-- engine, which is half the dict: 1g for 100,000 keys). The counter's
-- clock stands still at the start: the busy windows are the three before
-- and at it.
function _M.growth(ctx, id)
    for _, keys in ipairs(GROWTH_KEYS) do
        local name = "bench_stats_" .. id .. "_" .. keys
        local clock = { now = ngx.now() }
        local r = assert(requests.new(name, {
            max_keys = keys,
            clock = function() return clock.now end,
        }))
        for i = 1, keys do
            r:record("/path/" .. i, 0.012)
        end
        assert(r:self_metrics().refused == 0, "the engine was full")
        time_scrapes(ctx, r, keys, " keys")
        local used = engine.stats(assert(engine.attach(name)))
        ctx.report("engine bytes per key, " .. keys .. " keys",
                   used.used_bytes / used.keys)
        if BUSY_KEYS[keys] then
            make_busy(r, keys, clock)
            assert(r:self_metrics().total_only == 0, "not in the windows")
            time_scrapes(ctx, r, keys, " busy keys")
        end
    end
end


-- ctx: report(case, value), barrier(name), timed(fn, n, ...), now(),
-- rss(), count_aborts(); add_aborts(n) adds to the trace abort count.
function _M.run(ctx, id, add_aborts)
    local dict = ngx.shared.bench_plain
    assert(request_counter.configure("bench_requests"))

    local stop_counting = ctx.count_aborts()
    plain(N / 10, KEYS8, dict)
    ours(N / 10, KEYS8)
    local best = {}
    for round = 1, ROUNDS do
        ctx.barrier("record plain " .. round)
        local ns = ctx.timed(plain, N / 10, KEYS8, dict)
        best.plain = math.min(best.plain or math.huge, ns)
        ctx.barrier("record ours " .. round)
        ns = ctx.timed(ours, N, KEYS8)
        best.ours = math.min(best.ours or math.huge, ns)
    end
    add_aborts(stop_counting())
    ctx.report("record_request plain, 8 keys", best.plain)
    ctx.report("record_request ours, 8 keys", best.ours)

    _M.growth(ctx, id)
end




return _M
