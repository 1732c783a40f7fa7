-- Runs inside the one nginx worker of bench/counter_prom_run.lua: the keys
-- of a resty.counter counter (10,000 and 100,000, synced into the dict)
-- rendered in the Prometheus text format, each way timed from a timer,
-- best of ROUNDS:
--
-- * engine: c:prometheus(), the engine's rendering (one FFI call);
-- * engine, first call: the same, the worker's first, which also lists
--   the dict's keys once (get_keys(0)) for any counted before the engine;
-- * render engine / render lua: a registry's whole m:render() with only
--   that counter, its keys rendered by the engine, and by the Lua code
--   (get_keys(0), sort, c:get per key), as before.

local counter = require "resty.counter"
local metrics = require "resty.counter.metrics"

local _M = {}

local ROUNDS = 5
local KEYS = { 10000, 100000 }

local clock = require "clock"
local now = clock.now


local function best_of(fn)
    return clock.best(ROUNDS, fn)
end


function _M.run(dir)
    local out = assert(io.open(dir .. "/result.0", "w"))
    for _, keys in ipairs(KEYS) do
        local c = assert(counter.new("bench_prom_" .. keys, 3600))
        for i = 1, keys do
            assert(c:incr("/path/" .. i, i))
        end
        assert(c:sync())
        assert(c:self_metrics().refused == 0, "the engine was full")

        local start = now()
        local text = assert(c:prometheus())
        local first = now() - start
        local _, lines = text:gsub("\n", "")
        assert(lines == keys, "keys rendered: " .. lines)

        local engine = best_of(function() assert(c:prometheus()) end)
        local m = assert(metrics.new("metrics", { name = "n" .. keys }))
        m:add(c)
        local by_engine = m:render()
        local render_engine = best_of(function() m:render() end)
        metrics._engine_keys = false
        local by_lua = m:render()
        local render_lua = best_of(function() m:render() end)
        metrics._engine_keys = true
        assert(by_engine == by_lua, "the two renderings differ")

        local suffix = " ms, " .. keys .. " keys\t"
        out:write("engine", suffix, engine * 1e3, "\n")
        out:write("engine first call", suffix, first * 1e3, "\n")
        out:write("render engine", suffix, render_engine * 1e3, "\n")
        out:write("render lua", suffix, render_lua * 1e3, "\n")
    end
    out:write("done\n")
    out:close()
end


return _M
