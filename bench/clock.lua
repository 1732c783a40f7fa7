-- The benchmarks' clock inside nginx workers: CLOCK_MONOTONIC in seconds,
-- to the nanosecond (ngx.now() has milliseconds only).

local ffi = require "ffi"

ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]

local C = ffi.C
local tonumber = tonumber

local ts = ffi.new("bench_timespec")


-- syntax: seconds = clock.now()
local function now()
    C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
    return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end



-- syntax: seconds = clock.best(rounds, fn, clock_now?)
--
-- The shortest of `rounds` calls of fn(), timed with clock_now (default
-- clock.now).
local function best(rounds, fn, clock_now)
    clock_now = clock_now or now
    local b = math.huge
    for _ = 1, rounds do
        local start = clock_now()
        fn()
        b = math.min(b, clock_now() - start)
    end
    return b
end


return { now = now, best = best }
