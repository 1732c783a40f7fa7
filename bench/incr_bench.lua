-- Runs inside every nginx worker of bench/run.lua: the hot-path costs and
-- the sync cost, each case started at once in all workers (a barrier in
-- the shared dict), so that 2 workers contend as they would in production.

local counter = require "resty.counter"

local _M = {}

local now = require("clock").now

local N = 10000000
local N_DICT = 1000000
local ROUNDS = 5
local KEYS8 = { "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8" }


-- Every worker waits here until all have arrived (60 s at most).
local function barrier(dict, name, workers)
    dict:incr("barrier:" .. name, 1, 0)
    for _ = 1, 60000 do
        if dict:get("barrier:" .. name) >= workers then
            return
        end
        ngx.sleep(0.001)
    end
    error("barrier " .. name .. " timed out")
end


-- Each loop walks its keys in an inner loop: a modulo per call would cost
-- more than the increments being measured.
local function lua_table(n, keys)
    local t = {}
    for _, k in ipairs(keys) do
        t[k] = 0
    end
    local nkeys = #keys
    for _ = 1, n / nkeys do
        for j = 1, nkeys do
            local k = keys[j]
            t[k] = t[k] + 1
        end
    end
    return t
end


-- The predecessors' algorithm (Kong's lua-resty-counter, knyar's
-- prometheus): a per-worker table of increments, flushed by a timer.
local buffered = {}
local buffered_mt = { __index = buffered }
function buffered.incr(self, key, step)
    step = step or 1
    local v = self.increments[key]
    self.increments[key] = (v or 0) + step
end

local function lua_buffered(n, keys)
    local c = setmetatable({ increments = {} }, buffered_mt)
    local nkeys = #keys
    for _ = 1, n / nkeys do
        for j = 1, nkeys do
            c:incr(keys[j])
        end
    end
    return c
end


-- Two loops, not one with a step argument: each needs its own trace, as a
-- call site in production has (one shared loop measured 17 ns for step 3).
local function ours(n, keys, c)
    local nkeys = #keys
    for _ = 1, n / nkeys do
        for j = 1, nkeys do
            c:incr(keys[j])
        end
    end
end


local function ours_step(n, keys, c)
    local nkeys = #keys
    for _ = 1, n / nkeys do
        for j = 1, nkeys do
            c:incr(keys[j], 3)
        end
    end
end


local function shdict(n, keys, dict)
    local nkeys = #keys
    for _ = 1, n / nkeys do
        for j = 1, nkeys do
            dict:incr(keys[j], 1, 0)
        end
    end
end


-- This worker's resident memory, in bytes.
local function rss()
    local f = io.open("/proc/self/status")
    local text = f and f:read("*a") or ""
    if f then
        f:close()
    end
    return (tonumber(text:match("VmRSS:%s+(%d+)")) or 0) * 1024
end
_M.rss = rss


-- Starts counting JIT trace aborts in the library's own files; the
-- function it returns stops and gives the count.
local function count_aborts()
    local aborts = 0
    local function on_trace(what, _, func, pc)
        if what == "abort" then
            -- ours only: lua-resty-core's own files are also resty/...
            local src = require("jit.util").funcinfo(func, pc).source or ""
            if src:find("/resty/counter", 1, true)
               or src:find("/resty/greencheek/", 1, true)
            then
                aborts = aborts + 1
            end
        end
    end
    jit.attach(on_trace, "trace")
    return function()
        jit.attach(on_trace)
        return aborts
    end
end


local function timed(fn, n, ...)
    local start = now()
    fn(n, ...)
    return (now() - start) * 1e9 / n
end


-- Every worker waits here until all have arrived, then until one instant
-- agreed in the dict (a few ms ahead, spinning on the clock), so that all
-- start within microseconds of each other: the polling of `barrier` lets
-- them go up to a millisecond apart, as long as a sync of 1,000 keys. The
-- instant, for timing from it.
local function barrier_at(dict, name, workers)
    barrier(dict, name, workers)
    dict:add("start:" .. name, now() + 0.005)
    local start = dict:get("start:" .. name)
    while now() < start do  -- luacheck: ignore 542
    end
    return start
end


-- How long until the last worker is done: each writes when it was, and
-- waits until all have.
local function last_done(dict, name, workers, id, start, done)
    dict:set("done:" .. name .. ":" .. id, done - start)
    barrier(dict, "done " .. name, workers)
    local took = 0
    for i = 0, workers - 1 do
        took = math.max(took, dict:get("done:" .. name .. ":" .. i))
    end
    return took
end


-- Sync cost: D dirty keys per worker, each with a delta of 5; the keys
-- already exist in the dict (steady state). Each round starts every
-- worker at one instant; a case's time is until the dict holds every
-- worker's counts (the last worker done), against Kong's algorithm from
-- the same instant: dict:incr of each pending delta from a Lua table, each
-- worker its own. `sync call ms`: how long this worker's sync() took (with
-- 2 workers, one sync copies both workers' keys while the other waits for
-- it). Best of `rounds` (5).
local function sync_cost(dict, c, id, workers, report, rounds)
    for _, dirty in ipairs({ 100, 1000, 10000, 100000 }) do
        local keys = {}
        for i = 1, dirty do
            keys[i] = "sync-" .. id .. "-" .. i
        end
        local best, best_plain, best_call = math.huge, math.huge, math.huge
        local dict_before = dict:capacity() - dict:free_space()
        for round = 0, rounds or 5 do
            collectgarbage()
            local rss_before = rss()
            for i = 1, dirty do
                c:incr(keys[i], 5)
            end
            if round == 0 then
                -- pending state per key: the slot, the key maps (RSS is
                -- coarse: memory freed by earlier cases is reused first)
                report("worker bytes per pending key, " .. dirty .. " keys",
                       (rss() - rss_before) / dirty)
            end
            local name = "sync " .. dirty .. " " .. round
            local start = barrier_at(dict, name, workers)
            -- Round 0 makes the dict's keys, one worker's sync for all:
            -- 200,000 new keys may take longer than another's sync by hand
            -- waits for it on this busy machine (an error).
            if round > 0 or id == 0 then
                assert(c:sync())
            end
            local done = now()
            local took = last_done(dict, name, workers, id, start, done)
            -- The baseline: the same deltas from a plain Lua table.
            local pending = {}
            for i = 1, dirty do
                pending[keys[i]] = 5
            end
            name = "plain " .. dirty .. " " .. round
            local start_plain = barrier_at(dict, name, workers)
            for key, delta in pairs(pending) do
                dict:incr(key, delta, 0)
            end
            local took_plain = last_done(dict, name, workers, id, start_plain,
                                         now())
            if round > 0 then      -- round 0 creates the keys
                best = math.min(best, took)
                best_plain = math.min(best_plain, took_plain)
                best_call = math.min(best_call, done - start)
            end
            if round == 0 then
                report("dict bytes per key, " .. dirty .. " keys",
                       (dict:capacity() - dict:free_space() - dict_before)
                       / dirty)
            end
        end
        report("sync ms, " .. dirty .. " keys", best * 1e3)
        report("sync call ms, " .. dirty .. " keys", best_call * 1e3)
        report("plain flush ms, " .. dirty .. " keys", best_plain * 1e3)
    end
end


-- The sync part alone (bench/sync_run.lua), best of `rounds`.
function _M.run_sync(dir, id, workers, rounds)
    local out = assert(io.open(dir .. "/result." .. id, "w"))
    local function report(case, value)
        out:write(case, "\t", string.format("%.3f", value), "\n")
        out:flush()
    end
    local c = assert(counter.new("bench"))
    sync_cost(ngx.shared.bench, c, id, workers, report, rounds)
    out:write("done\n")
    out:close()
end


function _M.run(dir, id, workers)
    local dict = ngx.shared.bench
    local out = assert(io.open(dir .. "/result." .. id, "w"))
    local function report(case, value)
        out:write(case, "\t", string.format("%.3f", value), "\n")
        out:flush()
    end

    local stop_counting = count_aborts()

    local c = assert(counter.new("bench"))
    for _, set in ipairs({ { "1 key", { "k1" } }, { "8 keys", KEYS8 } }) do
        local label, keys = set[1], set[2]
        -- Warm up every loop once so that each is measured compiled.
        lua_table(N / 10, keys)
        lua_buffered(N / 10, keys)
        ours(N / 10, keys, c)
        ours_step(N / 10, keys, c)
        c:sync()

        -- Rounds interleave the cases, so that a noisy moment on this
        -- shared machine hits all of them alike; each keeps its best round.
        local best = {}
        local function measure(case, fn, n, ...)
            barrier(dict, case .. " " .. label .. " " .. best.round, workers)
            local ns = timed(fn, n, ...)
            if not best[case] or ns < best[case] then
                best[case] = ns
            end
        end
        for round = 1, ROUNDS do
            best.round = round
            measure("lua table", lua_table, N, keys)
            measure("lua buffered", lua_buffered, N, keys)
            measure("ours", ours, N, keys, c)
            measure("ours step 3", ours_step, N, keys, c)
            c:sync()
            measure("shdict", shdict, N_DICT, keys, dict)
        end
        for _, case in ipairs({ "lua table", "lua buffered", "ours",
                                "ours step 3", "shdict" }) do
            report(case .. ", " .. label, best[case])
        end
    end

    local aborts = stop_counting()

    sync_cost(dict, c, id, workers, report)

    require("requests_bench").run({
        report = report,
        barrier = function(name) barrier(dict, name, workers) end,
        timed = timed,
        now = now,
        rss = rss,
        count_aborts = count_aborts,
    }, id, function(n) aborts = aborts + n end)
    report("trace aborts", aborts)

    out:write("done\n")
    out:close()
end

return _M
