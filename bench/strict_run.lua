-- make bench, second part: strict inc and inc_if, lax inc and
-- limit:incoming (fixed and sliding), each beside ngx.shared.DICT:incr in
-- the same run, with 1 and then 2 workers on the same key.

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"

local CONF = assert(nginx.read_file("bench/strict_bench.conf"))
local CASES = { "shdict incr", "dict add+delete", "dict get+set", "strict inc",
                "strict inc_if", "lax inc", "limit fixed", "limit sliding" }


local function run(workers)
    local srv = nginx.start({
        workers = workers,
        http = CONF,
        log_level = "warn",
        lua_path = nginx.root .. "/lua/?.lua;" .. nginx.root .. "/bench/?.lua",
    })
    local results = {}
    for id = 0, workers - 1 do
        local text
        for _ = 1, 3000 do         -- 300 s at most
            text = nginx.read_file(srv.dir .. "/result." .. id)
            if text and text:find("done\n", 1, true) then
                break
            end
            nginx.sleep(0.1)
        end
        if not (text and text:find("done\n", 1, true)) then
            local log = srv:error_log()
            srv:cleanup()
            error("worker " .. id .. " did not finish: " .. (log or ""))
        end
        for case, value in text:gmatch("([^\t\n]+)\t([%d.]+)\n") do
            results[case] = results[case] or {}
            table.insert(results[case], tonumber(value))
        end
    end
    local errors = srv:errors()
    srv:cleanup()
    if #errors > 0 then
        error("errors in the benchmark's log:\n" .. table.concat(errors, "\n"))
    end
    local mean = {}
    for case, values in pairs(results) do
        local sum = 0
        for _, v in ipairs(values) do
            sum = sum + v
        end
        mean[case] = sum / #values
    end
    return mean
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
