-- The Redis backends' costs, inside an nginx worker, each beside what a
-- user would otherwise do (one INCRBY per request through lua-resty-redis)
-- in the same run: strict inc's round trip, lax inc's per-request cost,
-- and how many deltas per second a lax flush of 10,000 dirty keys moves.

local lax = require "resty.counter.lax"
local redis = require "resty.counter.redis"
local strict = require "resty.counter.strict"
local clock_best = require("clock").best

local _M = {}

local ROUNDS = 3


local function now()
    ngx.update_time()
    return ngx.now()
end


local function best(fn)
    return clock_best(ROUNDS, fn, now)
end


function _M.run(dir, port)
    local out = assert(io.open(dir .. "/result.0", "w"))
    local function report(case, value)
        out:write(case, "\t", string.format("%.3f", value), "\n")
        out:flush()
    end

    local backend = { port = port, read_timeout = 2 }
    local client = redis.new(backend)
    local s = assert(strict.new(nil, { name = "b", redis = backend }))
    local x = assert(lax.new(nil, { name = "b", redis = backend,
                                    allowed_lag = 3600 }))
    local n = 2000

    -- round trips: strict inc (a script) and a plain INCRBY
    local incrby = best(function()
        for i = 1, n do
            assert(client:command("incrby", "plain:" .. i % 8, 1))
        end
    end)
    local strict_inc = best(function()
        for i = 1, n do
            assert(s:inc("k" .. i % 8))
        end
    end)
    report("INCRBY per call us", incrby * 1e6 / n)
    report("strict inc us", strict_inc * 1e6 / n)

    -- per request: lax inc (no network) against an INCRBY each; and a
    -- flush of 10,000 dirty keys, one delta each. `x` counts in the
    -- worker, `e` in the shared engine of the dict "bench".
    local e = assert(lax.new("bench", { name = "e", redis = backend,
                                        allowed_lag = 3600 }))
    local flush
    for _, case in ipairs({ { x, "" }, { e, "engine " } }) do
        local c, label = case[1], case[2]
        local m = 1000000
        local keys = {}
        for i = 1, 8 do
            keys[i] = "k" .. i
        end
        local lax_inc = best(function()
            for _ = 1, m / 8 do
                for j = 1, 8 do
                    c:inc(keys[j])
                end
            end
        end)
        assert(c:flush())
        report(label .. "lax inc ns", lax_inc * 1e9 / m)

        local dirty = 10000
        flush = math.huge
        for _ = 1, ROUNDS do
            for i = 1, dirty do
                c:inc("d" .. i)
            end
            -- only the flush is timed: the incs above cost ns each
            local start = now()
            assert(c:flush())
            flush = math.min(flush, now() - start)
        end
        report(label .. "flush of 10000 keys ms", flush * 1e3)
        report(label .. "lax flush deltas/s", dirty / flush)
    end
    local plain = best(function()
        for i = 1, 10000 do
            assert(client:command("incrby", "plain:d" .. i, 1))
        end
    end)
    report("INCRBY per delta deltas/s", 10000 / plain)

    out:write("done\n")
    out:close()
end


return _M
