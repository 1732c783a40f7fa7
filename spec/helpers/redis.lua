-- Starts a real redis-server on loopback (a free port, and a Unix socket
-- in its own directory) for specs, and stops it by its PID. Every wait is
-- bounded.

local nginx = require "helpers.nginx"

local _M = {}

local server = {}
server.__index = server


-- A CA and a server certificate it signs (for "localhost" and
-- 127.0.0.1), in dir, valid for two days.
local function make_certificates(dir)
    local f = assert(io.open(dir .. "/san.ext", "w"))
    f:write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    f:close()
    local quiet = " >/dev/null 2>&1"
    assert(nginx.sh("cd " .. dir .. " && openssl req -x509 -newkey rsa:2048 "
                    .. "-nodes -days 2 -subj /CN=spec-ca -keyout ca.key "
                    .. "-out ca.crt" .. quiet
                    .. " && openssl req -newkey rsa:2048 -nodes "
                    .. "-subj /CN=localhost -keyout redis.key -out redis.csr"
                    .. quiet
                    .. " && openssl x509 -req -in redis.csr -CA ca.crt "
                    .. "-CAkey ca.key -CAcreateserial -days 2 "
                    .. "-extfile san.ext -out redis.crt" .. quiet),
           "openssl could not make the test certificates")
end


-- opts: password (requirepass), port (default: a free one), tls (also a
-- TLS port, self.tls_port, with a certificate for "localhost" and
-- 127.0.0.1 signed by a CA made for the purpose, self.ca), and extra
-- redis.conf lines.
function _M.start(opts)
    opts = opts or {}
    local dir = nginx.read("mktemp -d /tmp/resty-counter-redis.XXXXXX")
                :gsub("%s+$", "")
    assert(nginx.sh("chmod 0777 " .. dir))
    local self = setmetatable({
        dir = dir,
        port = opts.port or nginx.free_port(),
        socket = dir .. "/redis.sock",
        password = opts.password,
    }, server)

    local conf = {
        "bind 127.0.0.1",
        "port " .. self.port,
        -- workers run as nobody when nginx's master is root
        "unixsocket " .. self.socket,
        "unixsocketperm 777",
        "dir " .. dir,
        "pidfile " .. dir .. "/redis.pid",
        "logfile " .. dir .. "/redis.log",
        "daemonize yes",
        "save \"\"",
        "appendonly no",
    }
    if opts.password then
        conf[#conf + 1] = "requirepass " .. opts.password
    end
    if opts.tls then
        self.tls_port = nginx.free_port()
        self.ca = dir .. "/ca.crt"
        make_certificates(dir)
        for _, line in ipairs({ "tls-port " .. self.tls_port,
                                "tls-cert-file " .. dir .. "/redis.crt",
                                "tls-key-file " .. dir .. "/redis.key",
                                "tls-ca-cert-file " .. self.ca,
                                "tls-auth-clients no" }) do
            conf[#conf + 1] = line
        end
    end
    for _, line in ipairs(opts.conf or {}) do
        conf[#conf + 1] = line
    end
    local f = assert(io.open(dir .. "/redis.conf", "w"))
    f:write(table.concat(conf, "\n"), "\n")
    f:close()

    self:start_again()
    return self
end


-- (Re)starts the server on the same port and socket, and waits (5 s at
-- most) until it answers.
function server:start_again()
    assert(nginx.sh("redis-server " .. self.dir .. "/redis.conf"),
           "redis-server did not start")
    for _ = 1, 50 do
        if self:cli("PING"):find("PONG", 1, true) then
            self.pid = tonumber(nginx.read_file(self.dir .. "/redis.pid"))
            return
        end
        nginx.sleep(0.1)
    end
    error("redis-server does not answer: "
          .. (nginx.read_file(self.dir .. "/redis.log") or ""))
end


-- redis-cli with the password, if any, and `args` (its words, already
-- quoted for the shell); the output as text.
local function redis_cli(password, args, seconds)
    local auth = password and (" -a " .. password .. " --no-auth-warning")
                 or ""
    return nginx.read("timeout " .. (seconds or 5) .. " redis-cli" .. auth
                      .. " " .. args .. " 2>&1")
end


-- One command (its words, quoted for the shell) to the server on a
-- loopback port; the reply as text.
local function cli_at(password, port, command)
    return redis_cli(password, "-h 127.0.0.1 -p " .. port .. " " .. command)
end


-- One redis-cli command (its words, already quoted for the shell); the
-- reply as text.
function server:cli(command)
    return cli_at(self.password, self.port, command)
end


-- GET: the value as a number, nil for a missing key.
function server:get(key)
    return tonumber(self:cli("GET '" .. key .. "'"):match("^%-?%d+"))
end


-- SIGSTOP / SIGCONT: the server keeps its connections but answers nothing
-- (a hung server, from the clients' side).
function server:freeze()
    assert(nginx.sh("kill -STOP " .. self.pid))
end


function server:thaw()
    assert(nginx.sh("kill -CONT " .. self.pid))
end


-- CLIENT PAUSE ... ALL: the server holds every client's commands for
-- `seconds`, and drops those of a client that closes its connection
-- meanwhile (a timed-out request that never runs, as in a failover).
function server:pause(seconds)
    local out = self:cli("CLIENT PAUSE " .. math.floor(seconds * 1000)
                         .. " ALL")
    assert(out:find("OK", 1, true), "CLIENT PAUSE: " .. out)
end


-- Asks the server to stop (SIGTERM; it takes a second or two to exit).
function server:terminate()
    if self.pid then
        nginx.sh("kill -CONT " .. self.pid .. " 2>/dev/null")
        nginx.sh("kill " .. self.pid .. " 2>/dev/null")
    end
end


-- Stops the server (SIGTERM, then SIGKILL), waiting 5 s at most.
function server:stop()
    if not self.pid then
        return
    end
    self:terminate()
    for _ = 1, 50 do
        if not nginx.sh("kill -0 " .. self.pid .. " 2>/dev/null") then
            self.pid = nil
            return
        end
        nginx.sleep(0.1)
    end
    nginx.sh("kill -9 " .. self.pid .. " 2>/dev/null")
    self.pid = nil
end


function server:cleanup()
    self:stop()
    if os.getenv("KEEP_SPEC_DIRS") ~= "1" then
        nginx.sh("rm -rf " .. self.dir)
    end
end


-- syntax: got = redis_server.settle(redis, prefix, expected)
--
-- The values of `prefix .. key` for each key of `expected` (key -> count),
-- polled until they equal it (10 s at most); `redis` is a server or a
-- cluster (anything with get(key)).
function _M.settle(redis, prefix, expected)
    local got
    for _ = 1, 100 do
        got = {}
        local same = true
        for key, n in pairs(expected) do
            got[key] = redis:get(prefix .. key)
            if got[key] ~= n then
                same = false
            end
        end
        if same then
            break
        end
        nginx.sleep(0.1)
    end
    return got
end


-- A DNS server on loopback for Redis hosts given by name: dnsmasq on a
-- free port, answering "localhost" with 127.0.0.1 (nginx's resolver does
-- not read /etc/hosts) and refusing the rest: no upstream server, so it
-- never sends a query anywhere. `running` is false when dnsmasq is not
-- installed; `port` is then still one where nothing answers. Stopped by
-- its PID like a Redis server.
function _M.start_dns()
    local dir = nginx.read("mktemp -d /tmp/resty-counter-dns.XXXXXX")
                :gsub("%s+$", "")
    local self = setmetatable({ dir = dir, port = nginx.free_port(),
                                running = false }, server)
    if not nginx.sh("command -v dnsmasq >/dev/null 2>&1") then
        return self
    end

    assert(nginx.sh("dnsmasq --port=" .. self.port
                    .. " --listen-address=127.0.0.1 --bind-interfaces"
                    .. " --no-resolv --no-hosts --no-poll"
                    .. " --host-record=localhost,127.0.0.1"
                    .. " --user=nobody --group=nogroup"
                    .. " --pid-file=" .. dir .. "/dnsmasq.pid"
                    .. " --log-facility=" .. dir .. "/dnsmasq.log"),
           "dnsmasq did not start")
    for _ = 1, 50 do
        self.pid = tonumber(nginx.read_file(dir .. "/dnsmasq.pid") or "")
        if self.pid then
            self.running = true
            return self
        end
        nginx.sleep(0.1)
    end
    error("dnsmasq wrote no pid: "
          .. (nginx.read_file(dir .. "/dnsmasq.log") or ""))
end


-- A Redis Cluster of real servers on loopback, and the moves a cluster
-- makes (a slot migrating from one node to another), driven through
-- redis-cli. Usable from the host and from inside an nginx worker (where
-- it blocks the worker: fine for specs).
local cluster = {}
cluster.__index = cluster


-- The cluster whose masters listen on `ports` (already running), and
-- `replicas[i]` the port of master i's replica, if any.
function _M.cluster(ports, password, replicas)
    return setmetatable({ ports = ports, password = password,
                          replicas = replicas or {} }, cluster)
end


-- Starts `count` (3) masters, each with a replica when opts.replicas,
-- joins them and waits (10 s at most) until every node says the cluster
-- is ok. opts: count, replicas, password, conf (extra redis.conf lines for
-- every node). self.ports are the masters, self.replicas[i] the port of
-- master i's replica.
function _M.start_cluster(opts)
    opts = opts or {}
    local servers, ports, addresses = {}, {}, {}
    local nodes = (opts.count or 3) * (opts.replicas and 2 or 1)
    for i = 1, nodes do
        servers[i] = _M.start({
            password = opts.password,
            port = nginx.free_port(10000),
            conf = { "cluster-enabled yes",
                     "cluster-config-file nodes.conf",
                     "cluster-node-timeout 5000",
                     -- replicas sync at once (the default waits 5 s),
                     -- and a master stops without waiting for them
                     "repl-diskless-sync-delay 0",
                     "shutdown-timeout 0",
                     -- nodes ask each other for the password too
                     opts.password and ("masterauth " .. opts.password)
                     or "",
                     unpack(opts.conf or {}) },
        })
        ports[i] = servers[i].port
        addresses[i] = "127.0.0.1:" .. ports[i]
    end

    local self = _M.cluster(ports, opts.password)
    self.servers = servers
    local out = redis_cli(opts.password, "--cluster create "
                                         .. table.concat(addresses, " ")
                                         .. " --cluster-replicas "
                                         .. (opts.replicas and 1 or 0)
                                         .. " --cluster-yes", 30)
    if not out:find("All 16384 slots covered", 1, true) then
        self:cleanup()
        error("redis-cli --cluster create failed: " .. out)
    end
    if opts.replicas then
        -- Which node redis-cli made a replica, and of which master.
        local masters, replica_of = {}, {}
        for _, port in ipairs(ports) do
            local role = cli_at(opts.password, port, "ROLE")
            local master = tonumber(role:match("^slave\n[%d.]+\n(%d+)"))
            if master then
                replica_of[master] = port
            else
                masters[#masters + 1] = port
            end
        end
        self.ports = masters
        for i, port in ipairs(masters) do
            self.replicas[i] = replica_of[port]
        end
    end
    self:wait_ok()
    self:wait_replicas()
    return self
end


-- Waits (10 s at most) until every node reports cluster_state:ok.
function cluster:wait_ok()
    for _ = 1, 100 do
        local ok = true
        for i = 1, #self.ports do
            if not self:cli(i, "CLUSTER INFO"):find("cluster_state:ok", 1,
                                                    true) then
                ok = false
            end
        end
        if ok then
            return
        end
        nginx.sleep(0.1)
    end
    error("the redis cluster is not ok after 10 s")
end


-- Waits (10 s at most) until every master knows every replica as one
-- (gossip: a failover needs their votes) and every replica has synced.
function cluster:wait_replicas()
    for i = 1, #self.ports do
        local seen
        for _ = 1, 100 do
            seen = select(2, self:cli(i, "CLUSTER NODES"):gsub(" slave ", ""))
            if seen == #self.replicas then
                break
            end
            nginx.sleep(0.1)
        end
        assert(seen == #self.replicas, "master " .. i .. " knows " .. seen
                                       .. " replicas")
    end
    for _, port in ipairs(self.replicas) do
        local synced
        for _ = 1, 100 do
            synced = cli_at(self.password, port, "INFO replication")
                     :find("master_link_status:up", 1, true)
            if synced then
                break
            end
            nginx.sleep(0.1)
        end
        assert(synced, "the replica on port " .. port .. " did not sync")
    end
end


-- One redis-cli command on node i (its words, quoted for the shell); the
-- reply as text.
function cluster:cli(i, command)
    return cli_at(self.password, self.ports[i], command)
end


-- GET through the cluster (redis-cli follows redirections): the value as
-- a number, nil for a missing key.
function cluster:get(key)
    local out = redis_cli(self.password, "-c -h 127.0.0.1 -p "
                                         .. self.ports[1] .. " GET '" .. key
                                         .. "'")
    return tonumber(out:match("^%-?%d+"))
end


function cluster:id(i)
    return (self:cli(i, "CLUSTER MYID"):match("%x+"))
end


-- The index of the node that serves a slot (CLUSTER NODES: the ninth
-- field on is the node's slots, "a-b" ranges or single slots).
function cluster:owner(slot)
    for line in self:cli(1, "CLUSTER NODES"):gmatch("[^\n]+") do
        local fields = {}
        for field in line:gmatch("%S+") do
            fields[#fields + 1] = field
        end
        local port = tonumber((fields[2] or ""):match(":(%d+)"))
        for k = 9, #fields do
            local from, to = fields[k]:match("^(%d+)%-(%d+)$")
            from = tonumber(from or fields[k]:match("^%d+$"))
            to = tonumber(to) or from
            if from and slot >= from and slot <= to then
                for i, p in ipairs(self.ports) do
                    if p == port then
                        return i
                    end
                end
            end
        end
    end
    error("no node serves slot " .. slot)
end


-- The first half of a slot's move: the target imports it and the owner
-- migrates it. Keys still at the owner are served there; others get ASK.
function cluster:begin_move(slot, to)
    local from = self:owner(slot)
    assert(from ~= to, "the slot is already there")
    assert(self:cli(to, "CLUSTER SETSLOT " .. slot .. " IMPORTING "
                        .. self:id(from)):find("OK", 1, true))
    assert(self:cli(from, "CLUSTER SETSLOT " .. slot .. " MIGRATING "
                          .. self:id(to)):find("OK", 1, true))
    self.moving = { slot = slot, from = from, to = to }
end


-- The second half: every key of the slot goes over (MIGRATE), then every
-- node learns the new owner. Old clients get MOVED from then on.
function cluster:finish_move()
    local m = assert(self.moving, "no move begun")
    for _ = 1, 1000 do
        local keys = {}
        local out = self:cli(m.from, "CLUSTER GETKEYSINSLOT " .. m.slot
                                     .. " 100")
        for key in out:gmatch("[^\n]+") do
            keys[#keys + 1] = "'" .. key .. "'"
        end
        if #keys == 0 then
            break
        end
        local auth = self.password and (" AUTH " .. self.password) or ""
        local reply = self:cli(m.from, "MIGRATE 127.0.0.1 "
                                       .. self.ports[m.to] .. " '' 0 5000"
                                       .. auth .. " KEYS "
                                       .. table.concat(keys, " "))
        assert(reply:find("OK", 1, true), "MIGRATE: " .. reply)
    end
    local target = self:id(m.to)
    for _, i in ipairs({ m.to, m.from }) do
        assert(self:cli(i, "CLUSTER SETSLOT " .. m.slot .. " NODE "
                           .. target):find("OK", 1, true))
    end
    for i = 1, #self.ports do
        if i ~= m.to and i ~= m.from then
            assert(self:cli(i, "CLUSTER SETSLOT " .. m.slot .. " NODE "
                               .. target):find("OK", 1, true))
        end
    end
    self.moving = nil
end


-- The server (from start_cluster) listening on a port.
function cluster:server_on(port)
    for _, srv in ipairs(self.servers or {}) do
        if srv.port == port then
            return srv
        end
    end
    error("no server of this cluster started here listens on " .. port)
end


-- Stops master i (its cluster configuration and data stay on disk) and
-- waits until its process is gone.
function cluster:stop_node(i)
    self:server_on(self.ports[i]):stop()
end


-- Starts a stopped master i again, on its configuration, and waits (10 s
-- at most) until the cluster is ok.
function cluster:start_node(i)
    self:server_on(self.ports[i]):start_again()
    self:wait_ok()
end


-- A manual failover of master i (CLUSTER FAILOVER on its replica, which
-- waits until the replica has every write): the replica becomes master i
-- and the old master its replica. Waits (10 s at most) for the switch.
function cluster:failover(i)
    local replica = assert(self.replicas[i], "master " .. i .. " has none")
    local out = cli_at(self.password, replica, "CLUSTER FAILOVER")
    assert(out:find("OK", 1, true), "CLUSTER FAILOVER: " .. out)
    for _ = 1, 100 do
        local role = cli_at(self.password, replica, "ROLE")
        if role:find("^master") then
            self.replicas[i], self.ports[i] = self.ports[i], replica
            self:wait_ok()
            self:wait_replicas()
            return
        end
        nginx.sleep(0.1)
    end
    error("the replica of master " .. i .. " did not take over")
end


function cluster:move(slot, to)
    self:begin_move(slot, to)
    self:finish_move()
end


function cluster:cleanup()
    -- All at once: each takes a second or two to exit.
    for _, srv in ipairs(self.servers or {}) do
        srv:terminate()
    end
    for _, srv in ipairs(self.servers or {}) do
        srv:cleanup()
    end
end


return _M
