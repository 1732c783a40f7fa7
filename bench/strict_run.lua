-- make bench, second part: strict inc and inc_if, lax inc and
-- limit:incoming (fixed and sliding), each beside ngx.shared.DICT:incr in
-- the same run, with 1 and then 2 workers on the same key.

package.path = "spec/?.lua;bench/?.lua;" .. package.path
local nginx = require "helpers.nginx"
local harness = require "harness"

local CONF = assert(nginx.read_file("bench/strict_bench.conf"))
local CASES = { "shdict incr", "dict add+delete", "dict get+set", "strict inc",
                "strict inc_if", "lax inc", "limit fixed", "limit sliding" }


local function run(workers)
    return harness.run(CONF, workers, 300)
end


local one = run(1)
local two = run(2)

-- Printed, and appended to the bench/RESULTS.md that bench/run.lua wrote.
local out = {}
local function say(fmt, ...)
    local text = string.format(fmt, ...)
    io.write(text, "\n")
    out[#out + 1] = text
end

say("")
say("## Strict, lax and limit: ns per call inside nginx workers, one key")
say("")
say("2 workers: each, running at once on the same key; best of 5 rounds;")
say("x incr: the cost relative to ngx.shared.DICT:incr in the same run.")
say("")
say("| %-16s | %10s | %8s | %10s | %8s |", "case", "1 worker", "x incr", "2 workers",
    "x incr")
say("| --- | ---: | ---: | ---: | ---: |")
for _, case in ipairs(CASES) do
    say("| %-16s | %10.1f | %8.2f | %10.1f | %8.2f |", case,
        one[case], one[case] / one["shdict incr"],
        two[case], two[case] / two["shdict incr"])
end

local results = io.open("bench/RESULTS.md", "a")
if results then
    results:write(table.concat(out, "\n"), "\n")
    results:close()
end
