-- The request counter's growth alone (the part of make bench that times
-- stats() and prometheus() of 100 to 100,000 keys, bench/requests_bench.lua)
-- in a one-worker nginx, printed as bench/run.lua's table.
--
--   luajit bench/requests_run.lua

package.path = "spec/?.lua;bench/?.lua;" .. package.path
local harness = require "harness"

local CONF = harness.conf([[
lua_shared_dict bench_stats_0_100 2m;
lua_shared_dict bench_stats_0_1000 12m;
lua_shared_dict bench_stats_0_10000 110m;
lua_shared_dict bench_stats_0_100000 1100m;
]], [[
        local out = assert(io.open("${dir}/result.0", "w"))
        require("requests_bench").growth({
            report = function(case, value)
                out:write(case, "\t", value, "\n")
            end,
            now = require("clock").now,
        }, 0)
        out:write("done\n")
        out:close()]])

local results = harness.run(CONF, 1, 600)
print(require("requests_table")(results))
