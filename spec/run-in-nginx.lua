-- Runs busted specs inside a real nginx worker.
--
--   luajit spec/run-in-nginx.lua [busted args...]   (default: spec/resty)
--
-- On the stack spec/helpers/nginx.lua finds (Debian's nginx, or an
-- OpenResty given by OPENRESTY_PREFIX or by `resty` on PATH):
--  * with OpenResty, through its `resty` first: every spec but those
--    tagged #http, which need spec/nginx/unit.conf's locations and two
--    workers (resty runs one process); then those in OpenResty's nginx;
--  * otherwise every spec in Debian's nginx, started on a free loopback
--    port with 2 workers, the specs run in worker 0 from a timer
--    (cosockets, ngx.sleep and shared dicts all work there).
-- busted's report is printed as it is written. A run fails at once when
-- a worker could not load its code or the process ended without a
-- result, and after WATCHDOG_SILENT seconds with no output or
-- WATCHDOG_TOTAL in all. Exits 0 when every spec passed.

-- The driving luajit's paths, before ours: busted and its modules for
-- OpenResty's LuaJIT, which does not search Debian's Lua folders.
local HOST_PATH, HOST_CPATH = package.path, package.cpath
package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"
local redis_server = require "helpers.redis"

local quote = nginx.quote

-- Watchdogs, from measured runs on 2 busy cores (see docs/tests.md): the
-- whole of spec/resty takes 6-10 s of busted time on either stack, and its
-- longest silence (one spec running) was 2-7 s; a worker that failed to
-- load is caught from its error log within 0.1 s instead. Margins of 6x
-- and more (12x on the whole).
local WATCHDOG_SILENT = 40
local WATCHDOG_TOTAL = 120

local DICTS = { "counters 1m", "other 1m", "tiny 12k", "requests 1m",
                "greencheek 1m", "strict 1m", "lax 1m", "limit 1m", "small 12k",
                "small_engine 32k", "strict_small 32k", "limit_small 32k",
                "strict_churn 32k", "strict_churn_full 32k",
                "limit_churn 32k", "limit_churn_full 32k",
                "requests_small 64k",
                "requests_http 1m", "requests_idle 256k", "metrics 1m",
                "metrics_counts 1m",
                "metrics_requests_1 256k", "metrics_requests_2 256k",
                "metrics_http 1m",
                -- spec/resty/requests_spec.lua's scrape of 2,500 keys, more
                -- than one step reads (unit.conf has it for the #http ones).
                "requests_steps 16m",
                -- spec/resty/lax_engine_spec.lua's.
                "lax_engine 1m", "lax_engine_small 32k",
                -- spec/resty/counter_prom_spec.lua's.
                "counter_prom 1m", "counter_prom_random 1m",
                "counter_prom_legacy 1m", "counter_prom_race 1m" }
-- spec/resty/requests_spec.lua's: a dict per spec (nothing empties an
-- engine).
for i = 1, 26 do
    DICTS[#DICTS + 1] = "requests_" .. i .. " 256k"
end

local args = { ... }
if #args == 0 then
    args = { "-o", "plainTerminal", "spec/resty" }
end


-- A real redis-server on loopback for the specs that talk to Redis; they
-- find it through these environment variables.
local REDIS_PASSWORD = "spec-password"
local redis = redis_server.start({ password = REDIS_PASSWORD, tls = true })
-- And a Redis Cluster of three masters, each with a replica (same
-- password), for the specs that follow its redirections and failovers.
local ok_cluster, cluster = pcall(redis_server.start_cluster,
                                  { password = REDIS_PASSWORD,
                                    replicas = true })
if not ok_cluster then
    redis:cleanup()
    error(cluster)
end
local ENV = {
    REDIS_PORT = redis.port,
    REDIS_SOCKET = redis.socket,
    REDIS_PASSWORD = REDIS_PASSWORD,
    REDIS_CLUSTER_PORTS = table.concat(cluster.ports, ","),
    REDIS_CLUSTER_REPLICAS = table.concat(cluster.replicas, ","),
    REDIS_TLS_PORT = redis.tls_port,
    -- redis_spec checks that the stack's own lua-resty-redis is the one
    -- in use: OpenResty's resty.redis, or Debian's nginx.redis.
    COUNTER_STACK = nginx.stack.name,
}
local ENV_NAMES = {}
for name in pairs(ENV) do
    ENV_NAMES[#ENV_NAMES + 1] = name
end
table.sort(ENV_NAMES)
-- The CA that signed the TLS port's certificate, for ssl_verify.
local TRUSTED = "lua_ssl_trusted_certificate " .. redis.ca .. ";"

-- A DNS server on loopback for the specs of Redis hosts given by name
-- (nginx's resolver never reads /etc/hosts): dnsmasq answering "localhost"
-- with 127.0.0.1 and nothing else, forwarding nowhere. Without dnsmasq
-- those specs are pending; the port is then one where nothing answers.
local dns = redis_server.start_dns()
ENV.DNS_SERVER = dns.running and "1" or ""
ENV_NAMES[#ENV_NAMES + 1] = "DNS_SERVER"


-- busted's command line with `extra` words, its spec paths under `root`
-- (the worker's cwd is not ours).
local function busted_args(root, extra)
    local words = {}
    for _, a in ipairs(args) do
        words[#words + 1] = a:match("^spec/") and root .. "/" .. a or a
    end
    for _, a in ipairs(extra) do
        words[#words + 1] = a
    end
    return words
end


-- Waits for `dir`/result, printing `dir`/busted.out as it grows. `failed`
-- is called every 0.1 s and returns why the run cannot finish, if so.
-- true when every spec passed; the run's busted.out.
local function follow(dir, failed)
    local shown, silent, longest, ticks = 0, 0, 0, 0
    local why
    while true do
        local out = nginx.read_file(dir .. "/busted.out") or ""
        if #out > shown then
            io.write(out:sub(shown + 1))
            io.flush()
            shown = #out
            longest = math.max(longest, silent)
            silent = 0
        end
        local result = nginx.read_file(dir .. "/result")
        if result and result ~= "" then
            io.write(string.format("(%.1f s, longest silence %.1f s)\n",
                                   ticks / 10, longest / 10))
            return result == "0", out
        end
        why = failed()
        if why then
            break
        end
        if silent >= WATCHDOG_SILENT * 10 then
            why = "no output from busted for " .. WATCHDOG_SILENT .. " s"
            break
        end
        if ticks >= WATCHDOG_TOTAL * 10 then
            why = "the specs did not finish within " .. WATCHDOG_TOTAL .. " s"
            break
        end
        nginx.sleep(0.1)
        silent, ticks = silent + 1, ticks + 1
    end
    io.write("\nthe spec run failed: ", why, "\n")
    return false, nginx.read_file(dir .. "/busted.out") or ""
end


-- Under OpenResty's resty-cli: one nginx process, ours, running
-- spec/helpers/resty_main.lua from a timer.
local function run_with_resty(extra)
    local dir = nginx.read("mktemp -d /tmp/resty-counter-resty.XXXXXX")
                :gsub("%s+$", "")
    local cmd, main = { nginx.ENV }, {}
    for _, name in ipairs(ENV_NAMES) do
        cmd[#cmd + 1] = name .. "=" .. quote(ENV[name])
        main[#main + 1] = "env " .. name .. ";"
    end
    -- OpenResty's LuaJIT searches its own lualib first, then busted's.
    cmd[#cmd + 1] = "LUA_PATH=" .. quote(";;" .. HOST_PATH)
    cmd[#cmd + 1] = "LUA_CPATH=" .. quote(";;" .. HOST_CPATH)
    local root = nginx.root
    for _, word in ipairs({
        "timeout", "-k", "5", WATCHDOG_TOTAL + 10, nginx.stack.resty,
        -- resty-cli writes a stream {} block unless told not to, and
        -- this nginx has no stream module.
        "--no-stream",
        "--main-conf", quote(table.concat(main, " ")),
        "--http-conf", quote(TRUSTED),
        -- A fault of nginx 1.29.2 with lua-nginx-module 0.10.29, not of
        -- this project: with lua_ssl_trusted_certificate and
        -- init_worker_by_lua* in http{} and no server{} (always so under
        -- resty), nginx segfaults in ngx_ssl_cache_fetch (a NULL
        -- old_cycle). A server that serves nothing avoids it.
        "--http-conf", quote("server { listen unix:" .. dir
                             .. "/placeholder.sock; }"),
        "-I", root .. "/lua", "-I", root .. "/spec",
        "-I", root .. "/target/lua" }) do
        cmd[#cmd + 1] = word
    end
    for _, dict in ipairs(DICTS) do
        cmd[#cmd + 1] = "--shdict " .. quote(dict)
    end
    cmd[#cmd + 1] = root .. "/spec/helpers/resty_main.lua"
    cmd[#cmd + 1] = dir
    for _, a in ipairs(busted_args(root, extra)) do
        cmd[#cmd + 1] = quote(a)
    end
    nginx.sh("(" .. table.concat(cmd, " ") .. " > " .. dir
             .. "/resty.log 2>&1; echo $? > " .. dir .. "/exit) &")

    local ok, out = follow(dir, function()
        local log = nginx.read_file(dir .. "/resty.log") or ""
        local why = nginx.load_failures(log)
        if why then
            return why
        end
        -- The result is written before resty exits: read it once more.
        if nginx.read_file(dir .. "/exit")
           and (nginx.read_file(dir .. "/result") or "") == "" then
            return "resty exited (" .. nginx.read_file(dir .. "/exit")
                   :gsub("%s+$", "") .. ") without a result:\n" .. log
        end
    end)
    nginx.sh("for _ in $(seq 100); do test -e " .. dir .. "/exit && break;"
             .. " sleep 0.1; done; rm -rf " .. dir)
    return ok, out
end


-- Our own nginx (the stack's) with 2 workers and spec/nginx/unit.conf.
local function run_with_nginx(extra)
    local conf = TRUSTED .. "\n"
                 .. assert(nginx.read_file(nginx.root
                                           .. "/spec/nginx/unit.conf"))
    local env = { BUSTED_ARGS = table.concat(busted_args("${root}", extra),
                                             " ") }
    local main = { "env BUSTED_ARGS;" }
    for _, name in ipairs(ENV_NAMES) do
        env[name] = ENV[name]
        main[#main + 1] = "env " .. name .. ";"
    end
    local srv = nginx.start({
        workers = 2,
        main = table.concat(main, " "),
        env = env,
        http = conf,
        vars = { dns_port = dns.port },
        lua_path = "${root}/lua/?.lua;${root}/spec/?.lua;;" .. HOST_PATH,
        lua_cpath = "${root}/target/lua/?.so;;" .. HOST_CPATH,
    })

    local ok, out = follow(srv.dir, function()
        local log = srv:error_log()
        local why = nginx.load_failures(log)
        if why then
            return why
        end
        for line in (log or ""):gmatch("[^\n]+") do
            if line:find("exited on signal") or line:find("panicked")
               or line:find("%[alert%]") or line:find("%[emerg%]")
            then
                return "nginx reported:\n" .. line
            end
        end
    end)
    local crashes = {}
    for _, line in ipairs(srv:errors()) do
        if line:find("exited on signal") or line:find("panicked")
           or line:find("alert")
        then
            crashes[#crashes + 1] = line
        end
    end
    srv:cleanup()
    if #crashes > 0 then
        io.write("nginx reported a crash:\n", table.concat(crashes, "\n"),
                 "\n")
        return false, out
    end
    return ok, out
end


-- busted's closing line: successes, failures, errors, pending. A run
-- without one counts as one failure.
local function tally(out, into)
    local s, f, e, p = out:match(
        "(%d+) successes? / (%d+) failures? / (%d+) errors? / (%d+) pending")
    if not s then
        f = 1
    end
    into.passed = into.passed + (tonumber(s) or 0)
    into.failed = into.failed + (tonumber(f) or 0) + (tonumber(e) or 0)
    into.pending = into.pending + (tonumber(p) or 0)
end


io.write("specs on ", nginx.stack.name, "'s nginx ", nginx.stack.version or "?",
         " (", nginx.stack.nginx, ")\n")
local totals = { passed = 0, failed = 0, pending = 0 }
local ok = true
local ran, err = pcall(function()
    local runs
    if nginx.stack.resty then
        runs = { { "resty-cli", run_with_resty, "--exclude-tags=http" },
                 { "nginx, 2 workers", run_with_nginx, "--tags=http" } }
    else
        runs = { { "nginx, 2 workers", run_with_nginx } }
    end
    for _, run in ipairs(runs) do
        io.write("-- through ", run[1], "\n")
        local passed, out = run[2]({ run[3] })
        tally(out, totals)
        ok = ok and passed
    end
end)
redis:cleanup()
cluster:cleanup()
dns:cleanup()
if not ran then
    error(err, 0)
end
io.write(string.format("specs: %d passed, %d failed, %d skipped\n",
                       totals.passed, totals.failed, totals.pending))
os.exit((ok and totals.failed == 0) and 0 or 1)
