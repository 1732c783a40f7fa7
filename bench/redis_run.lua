-- make bench, third part: the Redis backends inside one nginx worker
-- against a real redis-server on loopback, each beside one INCRBY per
-- call in the same run. Printed, and appended to bench/RESULTS.md.

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"
local redis_server = require "helpers.redis"

local CONF = assert(nginx.read_file("bench/redis_bench.conf"))

local redis = redis_server.start()
local ok, err = pcall(function()
    local srv = nginx.start({
        workers = 1,
        http = CONF,
        log_level = "warn",
        vars = { redis_port = redis.port },
        lua_path = nginx.root .. "/lua/?.lua;" .. nginx.root .. "/bench/?.lua",
    })
    local text
    for _ = 1, 1200 do         -- 120 s at most
        text = nginx.read_file(srv.dir .. "/result.0")
        if text and text:find("done\n", 1, true) then
            break
        end
        nginx.sleep(0.1)
    end
    local log = srv:error_log()
    srv:cleanup()
    if not (text and text:find("done\n", 1, true)) then
        error("the Redis benchmark did not finish: " .. (log or ""))
    end

    local r = {}
    for case, value in text:gmatch("([^\t\n]+)\t([%d.]+)\n") do
        r[case] = tonumber(value)
    end

    local out = {}
    local function say(fmt, ...)
        local line = string.format(fmt, ...)
        io.write(line, "\n")
        out[#out + 1] = line
    end
    say("")
    say("## Redis backends: one worker, redis-server on loopback")
    say("")
    say("Best of 3 rounds; each beside one INCRBY per call through")
    say("lua-resty-redis in the same run.")
    say("")
    say("| case | ours | one INCRBY per call | ratio |")
    say("| --- | ---: | ---: | ---: |")
    say("| strict inc, us per call (a script) | %.1f | %.1f | %.2fx |",
        r["strict inc us"], r["INCRBY per call us"],
        r["strict inc us"] / r["INCRBY per call us"])
    say("| lax inc, per request | %.1f ns | %.1f us | %.0fx cheaper |",
        r["lax inc ns"], r["INCRBY per call us"],
        r["INCRBY per call us"] * 1000 / r["lax inc ns"])
    say("| flush of 10,000 dirty keys, deltas/s | %.0f | %.0f | %.1fx |",
        r["lax flush deltas/s"], r["INCRBY per delta deltas/s"],
        r["lax flush deltas/s"] / r["INCRBY per delta deltas/s"])
    say("| lax inc in the shared engine (a dict given), per request | "
        .. "%.1f ns | %.1f us | %.0fx cheaper |",
        r["engine lax inc ns"], r["INCRBY per call us"],
        r["INCRBY per call us"] * 1000 / r["engine lax inc ns"])
    say("| flush of 10,000 dirty keys in the shared engine, deltas/s | "
        .. "%.0f | %.0f | %.1fx |",
        r["engine lax flush deltas/s"], r["INCRBY per delta deltas/s"],
        r["engine lax flush deltas/s"] / r["INCRBY per delta deltas/s"])
    say("")
    say("The flush of 10,000 keys took %.1f ms (one script per 1,000 keys); "
        .. "in the shared engine %.1f ms (one per 256).",
        r["flush of 10000 keys ms"], r["engine flush of 10000 keys ms"])

    local results = io.open("bench/RESULTS.md", "a")
    if results then
        results:write(table.concat(out, "\n"), "\n")
        results:close()
    end
end)
redis:cleanup()
if not ok then
    error(err, 0)
end
