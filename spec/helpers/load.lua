-- Load from wrk on loopback, bounded in time, and the ground truth to
-- compare counts against: the access log of spec/scenario/counting.conf.

local nginx = require "helpers.nginx"

local _M = {}


-- Starts wrk in the background for `seconds` against `path`; with `keys`,
-- each request adds ?k=<1..keys>; with `close`, each request asks for its
-- connection to be closed (a new connection each, so the kernel picks the
-- worker each time); with `latency`, wrk reports its latency distribution;
-- with `nice`, wrk runs at that niceness (see raise_priority).
-- Returns a handle for wait().
function _M.start(srv, path, opts)
    opts = opts or {}
    local script = srv.dir .. "/wrk-" .. path:gsub("%W", "") .. ".lua"
    local f = assert(io.open(script, "w"))
    if opts.close then
        f:write('wrk.headers["Connection"] = "close"\n')
    end
    if opts.keys then
        f:write(string.format([[
local n = 0
request = function()
    n = n + 1
    return wrk.format(nil, "%s?k=" .. (n %% %d + 1))
end
]], path, opts.keys))
    end
    f:close()

    local out = script .. ".out"
    local pid_file = script .. ".pid"
    nginx.sh(string.format(
        "%swrk -t%d -c%d -d%ds --timeout 5s%s -s %s %s > %s 2>&1 & "
        .. "echo $! > %s",
        opts.nice and ("nice -n " .. opts.nice .. " ") or "",
        opts.threads or 2, opts.connections or 16, opts.seconds or 3,
        opts.latency and " --latency" or "", script,
        srv:url(path), out, pid_file))
    return { out = out, pid = tonumber(nginx.read_file(pid_file)),
             seconds = opts.seconds or 3 }
end


-- syntax: nice = load.raise_priority(srv)
--
-- Moves nginx's master and workers to niceness -10, when we are root (else
-- nothing changes), and returns the niceness for load.start's `nice`
-- (nil when not root): what a latency spec measures is then nginx and
-- wrk, not the other processes of a busy machine taking turns with them.
function _M.raise_priority(srv)
    if nginx.read("id -u"):match("%d+") ~= "0" then
        return nil
    end
    local pids = { srv:pid() }
    for _, pid in ipairs(srv:worker_pids()) do
        pids[#pids + 1] = pid
    end
    assert(nginx.sh("renice -n -10 -p " .. table.concat(pids, " ")
                    .. " >/dev/null"), "renice failed")
    return -10
end


-- Waits for wrk to finish (its duration plus 15 s at most); its report.
function _M.wait(run)
    for _ = 1, (run.seconds + 15) * 10 do
        if not nginx.sh("kill -0 " .. run.pid .. " 2>/dev/null") then
            break
        end
        nginx.sleep(0.1)
    end
    return nginx.read_file(run.out) or ""
end


-- wrk's p99 latency in ms, from its --latency report.
function _M.p99_ms(report)
    local value, unit = report:match("\n%s*99%%%s+([%d.]+)(%a+)")
    assert(value, "no p99 in wrk's report: " .. report)
    local scale = { us = 1e-3, ms = 1, s = 1e3 }
    return tonumber(value) * assert(scale[unit], unit)
end


-- How many requests wrk's report says it sent.
function _M.requests_done(report)
    return tonumber(report:match("(%d+) requests in")) or 0
end


-- Requests per URI, and the pids that served them, from the access log.
function _M.logged(srv)
    local per_uri, pids, total = {}, {}, 0
    local f = io.open(srv.dir .. "/access.log")
    if f then
        for line in f:lines() do
            local pid, uri = line:match("^(%d+) (%S+) %d+$")
            if uri then
                per_uri[uri] = (per_uri[uri] or 0) + 1
                pids[pid] = true
                total = total + 1
            end
        end
        f:close()
    end
    return per_uri, total, pids
end


-- Counts per URI as the running nginx's dict holds them, and their total.
function _M.counted(srv)
    local status, body = srv:get("/count")
    assert(status == 200, "GET /count failed: " .. tostring(status))
    local per_uri, total = {}, 0
    for key, value in body:gmatch("(/%S+) (%S+)") do
        per_uri[key] = tonumber(value)
        total = total + tonumber(value)
    end
    return per_uri, total
end


-- Polls until the dict's total reaches the access log's, `timeout` seconds
-- at most (syncs run every 0.1 s); both totals either way.
function _M.settle(srv, timeout)
    local logged, counted
    for _ = 1, (timeout or 10) * 10 do
        _, logged = _M.logged(srv)
        _, counted = _M.counted(srv)
        if counted >= logged then
            break
        end
        nginx.sleep(0.1)
    end
    return logged, counted
end


return _M
