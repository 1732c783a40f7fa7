-- The request counter's scrape costs in a one-worker nginx: how long
-- stats() and prometheus() of 10,000 and 100,000 keys take from a timer,
-- and the longest the worker stalled meanwhile (best and worst of 3).
--
--   luajit bench/scrape_run.lua

package.path = "spec/?.lua;bench/?.lua;" .. package.path
local harness = require "harness"

local CONF = harness.timer_conf([[
lua_shared_dict bench_stats_0_10000 110m;
lua_shared_dict bench_stats_0_100000 1100m;
]], [[require("scrape_bench").run("${dir}")]])

local results = harness.run(CONF, 1, 300)
local cases = {}
for case in pairs(results) do
    cases[#cases + 1] = case
end
table.sort(cases)
for _, case in ipairs(cases) do
    io.write(string.format("| %-40s | %10.1f |\n", case, results[case]))
end
