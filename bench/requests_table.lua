-- The request counter's growth table (bench/requests_bench.lua's cases) as
-- Markdown rows, for bench/run.lua and bench/requests_run.lua.
--
-- syntax: lines = requests_table(results)

local KEYS = { 100, 1000, 10000, 100000 }


return function(results)
    local lines = {
        string.format("| %-6s | %9s | %12s | %9s | %12s | %9s | %12s "
                      .. "| %12s |", "keys", "stats()", "prometheus()",
                      "to write", "to write", "in steps", "in steps",
                      "engine B/key"),
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    }
    -- A column of a run without it (a run before the column was added).
    local function ms(case)
        return results[case] or 0 / 0
    end
    for _, n in ipairs(KEYS) do
        local suffix = ", " .. n .. " keys"
        lines[#lines + 1] = string.format(
            "| %-6d | %9.3f | %12.3f | %9.3f | %12.3f | %9.3f | %12.3f "
            .. "| %12.0f |", n,
            ms("stats ms" .. suffix), ms("prometheus ms" .. suffix),
            ms("stats to write ms" .. suffix),
            ms("prometheus to write ms" .. suffix),
            ms("stats in steps ms" .. suffix),
            ms("prometheus in steps ms" .. suffix),
            ms("engine bytes per key" .. suffix))
    end
    return table.concat(lines, "\n")
end
