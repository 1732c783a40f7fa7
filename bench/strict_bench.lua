-- Runs inside every nginx worker of bench/strict_run.lua: strict inc and
-- inc_if, lax inc and limit:incoming beside ngx.shared.DICT:incr, each
-- case started at once in all workers (a barrier in the shared dict) on
-- the same key, so that 2 workers contend as they would on a hot key.

local strict = require "resty.counter.strict"
local lax = require "resty.counter.lax"
local limit = require "resty.counter.limit"

local _M = {}

local now = require("clock").now

local ROUNDS = 5
-- Calls per case and round: the dict-bound cases cost 30 ns to 1 us; a
-- round of each lasts some 20 ms or more, so that 2 workers overlap.
local N = {
    ["shdict incr"] = 1000000,
    ["dict add+delete"] = 500000,
    ["dict get+set"] = 500000,
    ["strict inc"] = 2000000,
    ["strict inc_if"] = 2000000,
    ["lax inc"] = 5000000,
    ["limit fixed"] = 1000000,
    ["limit sliding"] = 1000000,
}
local CASES = { "shdict incr", "dict add+delete", "dict get+set", "strict inc",
                "strict inc_if", "lax inc", "limit fixed", "limit sliding" }


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


-- One loop per case: each call site gets its own trace, as in production.
local LOOPS = {
    ["shdict incr"] = function(n, dict)
        for _ = 1, n do
            dict:incr("k", 1, 0)
        end
    end,
    -- The parts of strict inc: its lock, and its read and write.
    ["dict add+delete"] = function(n, dict)
        for _ = 1, n do
            dict:safe_add("lock", true, 1)
            dict:delete("lock")
        end
    end,
    ["dict get+set"] = function(n, dict)
        for i = 1, n do
            local v = dict:get("value") or 0
            dict:safe_set("value", v + i % 2, 0, 0)
        end
    end,
    -- A failed call (nil, err) would be cheap: each must succeed.
    ["strict inc"] = function(n, c)
        for _ = 1, n do
            if not c:inc("k", 1) then
                error("strict inc failed")
            end
        end
    end,
    ["strict inc_if"] = function(n, c)
        for _ = 1, n do
            local new, old = c:inc_if("k", "lt", 1000000000000, 1)
            if not new or new == old then
                error("strict inc_if failed")
            end
        end
    end,
    ["lax inc"] = function(n, c)
        for _ = 1, n do
            c:inc("k", 1)
        end
    end,
    ["limit fixed"] = function(n, lim)
        for _ = 1, n do
            lim:incoming("k", true)
        end
    end,
    ["limit sliding"] = function(n, lim)
        for _ = 1, n do
            lim:incoming("k", true)
        end
    end,
}


function _M.run(dir, id, workers)
    local dict = ngx.shared.bench
    local out = assert(io.open(dir .. "/result." .. id, "w"))

    local s = assert(strict.new("bench", { name = "strict", timeout = 10 }))
    local l = assert(lax.new("bench", { name = "lax" }))
    -- A limit that is never reached: the allowed path, every call counted
    -- (on one node a limit is at most 2^32 - 1).
    local big = 2 ^ 32 - 1
    local fixed = assert(limit.new("bench", { limit = big, window = 3600,
                                              name = "fixed" }))
    local sliding = assert(limit.new("bench", { limit = big, window = 3600,
                                                name = "sliding",
                                                algorithm = "sliding" }))
    local args = {
        ["shdict incr"] = dict, ["dict add+delete"] = dict, ["dict get+set"] = dict,
        ["strict inc"] = s, ["strict inc_if"] = s,
        ["lax inc"] = l, ["limit fixed"] = fixed, ["limit sliding"] = sliding,
    }

    -- Warm-up: every loop compiled before it is measured.
    for _, case in ipairs(CASES) do
        LOOPS[case](N[case] / 10, args[case])
    end

    local best = {}
    for round = 1, ROUNDS do
        for _, case in ipairs(CASES) do
            barrier(dict, case .. " " .. round, workers)
            local start = now()
            LOOPS[case](N[case], args[case])
            local ns = (now() - start) * 1e9 / N[case]
            if not best[case] or ns < best[case] then
                best[case] = ns
            end
        end
        l:flush()
    end

    for _, case in ipairs(CASES) do
        out:write(case, "\t", string.format("%.3f", best[case]), "\n")
    end
    out:write("done\n")
    out:close()
end

return _M
