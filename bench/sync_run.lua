-- resty.counter's sync against Kong's flush, alone (the same table as in
-- make bench's bench/RESULTS.md, without the rest): 1 worker, then 2.
--
--   luajit bench/sync_run.lua            (best of 5 rounds)
--   SYNC_ROUNDS=15 luajit bench/sync_run.lua

package.path = "spec/?.lua;bench/?.lua;" .. package.path
local harness = require "harness"

local _M = {}


-- Writes the sync table of `one` and `two` (the workers' means of 1 and 2
-- worker runs, best of `rounds` each) with `say`.
function _M.table(one, two, say, rounds)
    say("## resty.counter sync: N dirty keys per worker, delta 5 each, keys "
        .. "already in the dict")
    say("")
    say("Best of %d rounds, ms from one instant at which every worker starts "
        .. "until the", rounds or 5)
    say("dict holds every worker's counts (the last worker done). `plain "
        .. "flush`: Kong's")
    say("algorithm from the same instant, each worker dict:incr of its own "
        .. "deltas from")
    say("a Lua table. `x`: sync / plain flush. `2w call`: one worker's "
        .. "sync() call with")
    say("2 workers (one sync copies both workers' keys; the other waits "
        .. "for it).")
    say("`worker B/key`: the worker's RSS growth per pending key, coarse "
        .. "(memory freed by")
    say("earlier cases is reused first): the 100,000-key row is the "
        .. "telling one.")
    say("`dict B/key`: dict pages in use per key.")
    say("")
    say("| %-10s | %8s | %7s | %8s | %5s | %8s | %8s | %5s | %8s | %8s "
        .. "| %8s |", "dirty keys", "1 worker", "ns/key", "plain", "x",
        "2 workers", "plain", "x", "2w call", "worker B/key", "dict B/key")
    say("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        .. "| ---: | ---: |")
    for _, n in ipairs({ 100, 1000, 10000, 100000 }) do
        local suffix = ", " .. n .. " keys"
        local sync1, plain1 = one["sync ms" .. suffix],
                              one["plain flush ms" .. suffix]
        local sync2, plain2 = two["sync ms" .. suffix],
                              two["plain flush ms" .. suffix]
        say("| %-10d | %8.3f | %7.1f | %8.3f | %5.2f | %9.3f | %8.3f | %5.2f "
            .. "| %8.3f | %12.0f | %10.0f |", n, sync1, sync1 * 1e6 / n,
            plain1, sync1 / plain1, sync2, plain2, sync2 / plain2,
            two["sync call ms" .. suffix],
            one["worker bytes per pending key" .. suffix],
            one["dict bytes per key" .. suffix])
    end
end


local CONF = harness.conf("lua_shared_dict bench 64m;\n",
    'require("incr_bench").run_sync("${dir}", ngx.worker.id(), ${workers}, '
    .. (tonumber(os.getenv("SYNC_ROUNDS")) or 5) .. ')')


if ... ~= "sync_run" then
    local one = harness.run(CONF, 1, 300)
    local two = harness.run(CONF, 2, 300)
    _M.table(one, two, function(fmt, ...)
        io.write(select("#", ...) > 0 and fmt:format(...) or fmt, "\n")
    end, tonumber(os.getenv("SYNC_ROUNDS")))
end

return _M
