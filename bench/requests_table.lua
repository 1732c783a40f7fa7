-- The request counter's growth table (bench/requests_bench.lua's cases) as
-- Markdown rows, for bench/run.lua and bench/requests_run.lua.
--
-- syntax: lines = requests_table(results)

-- Rows: key counts, and those timed busy too (7 requests in each of the
-- three windows besides).
local ROWS = { { 100, " keys" }, { 1000, " keys" }, { 10000, " keys" },
               { 100000, " keys" }, { 10000, " busy keys" },
               { 100000, " busy keys" } }


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
    for _, row in ipairs(ROWS) do
        local n, what = row[1], row[2]
        local suffix = ", " .. n .. what
        local label = what == " keys" and tostring(n) or n .. " busy"
        lines[#lines + 1] = string.format(
            "| %-6s | %9.3f | %12.3f | %9.3f | %12.3f | %9.3f | %12.3f "
            .. "| %12.0f |", label,
            ms("stats ms" .. suffix), ms("prometheus ms" .. suffix),
            ms("stats to write ms" .. suffix),
            ms("prometheus to write ms" .. suffix),
            ms("stats in steps ms" .. suffix),
            ms("prometheus in steps ms" .. suffix),
            ms("engine bytes per key, " .. n .. " keys"))
    end
    return table.concat(lines, "\n")
end
