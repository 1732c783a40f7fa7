-- Runs inside the one nginx worker of bench/scrape_run.lua: stats() and
-- prometheus() of 10,000 and 100,000 request keys, returning the text or
-- handing it to a write function a step at a time, each timed from a timer
-- (a phase that can yield), best of 3, with the longest stall of the worker
-- meanwhile (worst of 3): the largest gap seen by another timer that only
-- sleeps 1 ms at a time.

local requests = require "resty.counter.requests"

local _M = {}

local ROUNDS = 3
local KEYS = { 10000, 100000 }

local now = require("clock").now


-- The longest the worker did not run a ticking timer, until stop() says.
local function stall_watch()
    local state = { max = 0, running = true }
    assert(ngx.timer.at(0, function()
        local last = now()
        while state.running do
            ngx.sleep(0.001)
            local t = now()
            state.max = math.max(state.max, t - last - 0.001)
            last = t
        end
    end))
    ngx.sleep(0.01)
    state.max = 0
    return function()
        -- Let it see the last gap first.
        ngx.sleep(0.005)
        state.running = false
        local max = state.max
        ngx.sleep(0.005)
        return max
    end
end


function _M.run(dir)
    local out = assert(io.open(dir .. "/result.0", "w"))
    for _, keys in ipairs(KEYS) do
        local name = "bench_stats_0_" .. keys
        local r = assert(requests.new(name, { max_keys = keys }))
        for i = 1, keys do
            r:record("/path/" .. i, 0.012)
        end
        assert(r:self_metrics().refused == 0, "the engine was full")
        for _, method in ipairs({ "stats", "prometheus" }) do
            -- The text as one string, then handed to write() in steps.
            for _, form in ipairs({ "", " to write" }) do
                local best, stall = math.huge, 0
                for _ = 1, ROUNDS do
                    local bytes = 0
                    local write
                    if form ~= "" then
                        write = function(piece)
                            bytes = bytes + #piece
                            return true
                        end
                    end
                    local stop = stall_watch()
                    local start = now()
                    local text = assert(r[method](r, write))
                    local took = now() - start
                    local stalled = stop()
                    bytes = write and bytes or #text
                    assert(bytes > keys * 100)
                    best = math.min(best, took)
                    stall = math.max(stall, stalled)
                end
                out:write(method, form, " ms, ", keys, " keys\t",
                          best * 1e3, "\n")
                out:write(method, form, " longest stall ms, ", keys,
                          " keys\t", stall * 1e3, "\n")
            end
        end
    end
    out:write("done\n")
    out:close()
end


return _M
