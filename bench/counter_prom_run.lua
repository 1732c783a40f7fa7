-- resty.counter's keys in the Prometheus text format, in a one-worker
-- nginx: the engine's rendering against the Lua one, 10,000 and 100,000
-- keys (bench/counter_prom_bench.lua). make bench prints its table in
-- bench/RESULTS.md; alone:
--
--   luajit bench/counter_prom_run.lua

package.path = "spec/?.lua;bench/?.lua;" .. package.path
local harness = require "harness"

local CONF = harness.conf([[
lua_shared_dict metrics 1m;
lua_shared_dict bench_prom_10000 8m;
lua_shared_dict bench_prom_100000 64m;
]], 'require("counter_prom_bench").run("${dir}")')


-- The table of the results, as lines; each value the one worker's.
local function table_lines()
    local r = harness.run(CONF, 1, 300)
    local lines = {
        "## resty.counter's keys in the Prometheus text format, ms",
        "",
        "One worker, from a timer, best of 5. `engine`: c:prometheus(), "
            .. "rendered in Rust",
        "from the engine's records; `first call`: a worker's first, which "
            .. "also lists the",
        "dict's keys once (get_keys(0)) for keys counted before the engine. "
            .. "`render`: a",
        "registry's whole m:render() with that counter, its keys rendered "
            .. "by the engine",
        "and, as before, in Lua (get_keys(0), sort, c:get per key); `x`: "
            .. "lua / engine.",
        "The target: 10 ms at 10,000 keys, 100 ms at 100,000. Alone: "
            .. "`luajit bench/counter_prom_run.lua`.",
        "",
        string.format("| %-8s | %8s | %10s | %13s | %11s | %6s |", "keys",
                      "engine", "first call", "render engine", "render lua",
                      "x"),
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    }
    for _, keys in ipairs({ 10000, 100000 }) do
        local function ms(case)
            return r[case .. " ms, " .. keys .. " keys"]
        end
        lines[#lines + 1] = string.format(
            "| %-8d | %8.2f | %10.2f | %13.2f | %11.2f | %5.1fx |", keys,
            ms("engine"), ms("engine first call"), ms("render engine"),
            ms("render lua"), ms("render lua") / ms("render engine"))
    end
    return lines
end


if ... == "counter_prom_run" then
    return { table_lines = table_lines }
end
io.write(table.concat(table_lines(), "\n"), "\n")
