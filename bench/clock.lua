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


return { now = now }
