-- Requests per second and latency over HTTP on loopback (wrk), for an
-- nginx that counts in log_by_lua against the same nginx without counting
-- (the limit) and against what users would otherwise write. Rounds
-- interleave the variants; each variant's median round is kept. One nginx
-- worker pinned to CPU 0 and wrk pinned to CPU 1, so that the two do not
-- take turns on one core (2-core machines).
--
-- Requests per second swing with the host's other tenants (a shared VM
-- here); the CPU time the worker spends per request, read from /proc, is
-- much steadier, so the overhead is computed from it.

local nginx = require "helpers.nginx"

local _M = {}

local CONF = assert(nginx.read_file("bench/http.conf"))

_M.VARIANTS = {
    { "no counting (the limit)", "" },
    { "empty log_by_lua", "log_by_lua_block { }" },
    { "log_by_lua reading ngx.var.uri only",
      "log_by_lua_block { local uri = ngx.var.uri }" },
    { "resty.counter incr (ours)",
      "log_by_lua_block { package.loaded.c:incr(ngx.var.uri) }" },
    { "request counter record_request (ours)",
      [[log_by_lua_block {
        require("resty.greencheek.request.counter").record_request(
            "request_stats", ngx.var.uri, ngx.var.request_time)
      }]] },
    { "lua table + timer (lua-resty-counter's algorithm)",
      "log_by_lua_block { package.loaded.buffered:incr(ngx.var.uri) }" },
    { "shdict:incr per request",
      "log_by_lua_block { ngx.shared.counters:incr(ngx.var.uri, 1, 0) }" },
    { "per-request shdict request counter",
      [[log_by_lua_block {
        require("baselines").plain_record(ngx.shared.request_stats,
                                          ngx.var.uri, ngx.var.request_time)
      }]] },
}


local function unit_us(value, unit)
    local n = tonumber(value)
    if unit == "ms" then
        return n * 1e3
    elseif unit == "s" then
        return n * 1e6
    end
    return n
end


local CLK_TCK = tonumber(nginx.read("getconf CLK_TCK")) or 100


-- utime + stime of a process, in seconds.
local function cpu_seconds(pid)
    local stat = nginx.read_file("/proc/" .. pid .. "/stat") or ""
    local fields = {}
    for field in (stat:match("%) (.*)") or ""):gmatch("%S+") do
        fields[#fields + 1] = field
    end
    -- after the command: state is field 3 of the file, utime 14, stime 15
    return ((tonumber(fields[12]) or 0) + (tonumber(fields[13]) or 0)) / CLK_TCK
end


-- One wrk run: rps, latency percentiles (us) and worker CPU us per
-- request.
local function measure(variant, seconds)
    local srv = nginx.start({
        workers = 1,
        main = "worker_cpu_affinity 01;",
        http = CONF,
        log_level = "warn",
        vars = { log = variant[2] },
        lua_path = nginx.root .. "/lua/?.lua;" .. nginx.root .. "/bench/?.lua",
    })
    local script = srv.dir .. "/paths.lua"
    local f = assert(io.open(script, "w"))
    f:write([[
local n = 0
request = function()
    n = n + 1
    return wrk.format(nil, "/p" .. (n % 8 + 1))
end
]])
    f:close()
    local wrk = "taskset -c 1 wrk -t1 -c16 "
    nginx.sh(wrk .. "-d1s -s " .. script .. " " .. srv:url("/")
             .. " > /dev/null 2>&1")           -- warm-up: the JIT, the pools
    local worker = nginx.read("pgrep -P " .. srv:pid()):match("%d+")
    local cpu_before = cpu_seconds(worker)
    local out = nginx.read(wrk .. "-d" .. seconds .. "s --latency -s "
                           .. script .. " " .. srv:url("/") .. " 2>&1")
    local cpu = cpu_seconds(worker) - cpu_before
    local errors = srv:errors()
    srv:cleanup()
    local result = { rps = tonumber(out:match("Requests/sec:%s+([%d.]+)")) }
    local requests = tonumber(out:match("(%d+) requests in"))
    result.cpu_us = requests and requests > 0 and cpu * 1e6 / requests
    for pct, value, unit in out:gmatch("\n%s+(%d+)%%%s+([%d.]+)(%a+)") do
        result["p" .. pct] = unit_us(value, unit)
    end
    assert(result.rps, "wrk gave no rate: " .. out)
    assert(#errors == 0, "errors in nginx: " .. tostring(errors[1]))
    return result
end


local function median(values)
    table.sort(values)
    return values[math.ceil(#values / 2)]
end


-- Returns rows { name, rps, p50, p90, p99, cpu_us, overhead % } in
-- VARIANTS order: each variant's round with the median CPU per request.
function _M.run(rounds, seconds)
    local runs = {}
    for _ = 1, rounds do
        for i, variant in ipairs(_M.VARIANTS) do
            runs[i] = runs[i] or {}
            table.insert(runs[i], measure(variant, seconds))
        end
    end
    local rows = {}
    for i, variant in ipairs(_M.VARIANTS) do
        -- the round with the median CPU per request, whole
        local costs = {}
        for _, r in ipairs(runs[i]) do
            costs[#costs + 1] = r.cpu_us
        end
        local mid = median(costs)
        local chosen
        for _, r in ipairs(runs[i]) do
            if r.cpu_us == mid then
                chosen = r
            end
        end
        rows[i] = { name = variant[1], rps = chosen.rps, p50 = chosen.p50,
                    p90 = chosen.p90, p99 = chosen.p99,
                    cpu_us = chosen.cpu_us }
    end
    for _, row in ipairs(rows) do
        row.overhead = (row.cpu_us / rows[1].cpu_us - 1) * 100
    end
    return rows
end


return _M
