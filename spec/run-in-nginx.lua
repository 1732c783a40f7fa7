-- Runs busted specs inside a real nginx worker.
--
--   luajit spec/run-in-nginx.lua [busted args...]   (default: spec/resty)
--
-- Through OpenResty's `resty` when it is on PATH; otherwise Debian's nginx
-- with the lua module, started on a free loopback port with 2 workers, the
-- specs run in worker 0 from a timer (cosockets, ngx.sleep and shared
-- dicts all work there). Exits 0 when every spec passed.

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"
local redis_server = require "helpers.redis"

local DICTS = { "counters 1m", "other 1m", "tiny 12k", "requests 1m",
                "greencheek 1m", "strict 1m", "lax 1m", "limit 1m", "small 12k",
                "small_engine 32k", "requests_small 64k",
                "requests_http 1m" }
-- spec/resty/requests_spec.lua's: a dict per spec (nothing empties an
-- engine).
for i = 1, 24 do
    DICTS[#DICTS + 1] = "requests_" .. i .. " 256k"
end

local args = { ... }
if #args == 0 then
    args = { "-o", "plainTerminal", "spec/resty" }
end
-- Paths relative to the repo: the worker's cwd is not ours.
for i, a in ipairs(args) do
    if a:match("^spec/") then
        args[i] = nginx.root .. "/" .. a
    end
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
local REDIS_ENV = {
    REDIS_PORT = redis.port,
    REDIS_SOCKET = redis.socket,
    REDIS_PASSWORD = REDIS_PASSWORD,
    REDIS_CLUSTER_PORTS = table.concat(cluster.ports, ","),
    REDIS_CLUSTER_REPLICAS = table.concat(cluster.replicas, ","),
    REDIS_TLS_PORT = redis.tls_port,
}
local ENV_NAMES = { "REDIS_PORT", "REDIS_SOCKET", "REDIS_PASSWORD",
                    "REDIS_CLUSTER_PORTS", "REDIS_CLUSTER_REPLICAS",
                    "REDIS_TLS_PORT" }
-- The CA that signed the TLS port's certificate, for ssl_verify.
local TRUSTED = "lua_ssl_trusted_certificate " .. redis.ca .. ";"

-- A DNS server on loopback for the specs of Redis hosts given by name
-- (nginx's resolver never reads /etc/hosts): dnsmasq answering "localhost"
-- with 127.0.0.1 and nothing else, forwarding nowhere. Without dnsmasq
-- those specs are pending; the port is then one where nothing answers.
local dns = redis_server.start_dns()
REDIS_ENV.DNS_SERVER = dns.running and "1" or ""
ENV_NAMES[#ENV_NAMES + 1] = "DNS_SERVER"


local function run_with_resty()
    local cmd, main = {}, {}
    for _, name in ipairs(ENV_NAMES) do
        cmd[#cmd + 1] = name .. "=" .. REDIS_ENV[name]
        main[#main + 1] = "env " .. name .. ";"
    end
    for _, word in ipairs({ "resty", "--main-conf",
                            "'" .. table.concat(main, " ") .. "'",
                            "--http-conf", "'" .. TRUSTED .. "'",
                            "-I", nginx.root .. "/lua",
                            "-I", nginx.root .. "/spec",
                            "-I", nginx.root .. "/target/lua" }) do
        cmd[#cmd + 1] = word
    end
    for _, dict in ipairs(DICTS) do
        cmd[#cmd + 1] = "--shdict '" .. dict .. "'"
    end
    cmd[#cmd + 1] = nginx.root .. "/spec/helpers/resty_main.lua"
    for _, a in ipairs(args) do
        cmd[#cmd + 1] = "'" .. a .. "'"
    end
    return nginx.sh(table.concat(cmd, " "))
end


local function run_with_nginx()
    local conf = TRUSTED .. "\n"
                 .. assert(nginx.read_file(nginx.root
                                           .. "/spec/nginx/unit.conf"))
    local env = { BUSTED_ARGS = table.concat(args, " ") }
    for k, v in pairs(REDIS_ENV) do
        env[k] = v
    end
    local main = { "env BUSTED_ARGS;" }
    for _, name in ipairs(ENV_NAMES) do
        main[#main + 1] = "env " .. name .. ";"
    end
    local srv = nginx.start({
        workers = 2,
        main = table.concat(main, " "),
        env = env,
        http = conf,
        vars = { dns_port = dns.port },
    })

    local result
    for _ = 1, 3000 do      -- 300 s at most
        result = nginx.read_file(srv.dir .. "/result")
        if result and result ~= "" then
            break
        end
        nginx.sleep(0.1)
    end

    io.write(nginx.read_file(srv.dir .. "/busted.out") or "(no busted output)\n")
    local crashes = {}
    for _, line in ipairs(srv:errors()) do
        if line:find("exited on signal") or line:find("panicked") or line:find("alert") then
            crashes[#crashes + 1] = line
        end
    end
    srv:cleanup()

    if not result then
        io.write("the specs did not finish within 300 s\n")
        return false
    end
    if #crashes > 0 then
        io.write("nginx reported a crash:\n", table.concat(crashes, "\n"), "\n")
        return false
    end
    return result == "0"
end


local has_resty = nginx.sh("command -v resty >/dev/null 2>&1")
local ok
local ran, err = pcall(function()
    if has_resty then
        ok = run_with_resty()
    else
        ok = run_with_nginx()
    end
end)
redis:cleanup()
cluster:cleanup()
dns:cleanup()
if not ran then
    error(err, 0)
end
os.exit(ok and 0 or 1)
