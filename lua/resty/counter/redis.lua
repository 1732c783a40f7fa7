-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- The Redis connection shared by the counters and limiters that keep their
-- numbers in Redis (or anything speaking its protocol: Dragonfly, Redis
-- Cluster with one hash tag per counter). It uses lua-resty-redis over
-- cosockets (`resty.redis` in OpenResty, `nginx.redis` on Debian), never
-- blocking I/O, and adds what every caller needs: one place for the
-- options, connection pooling, AUTH and SELECT on fresh connections only,
-- scripts run by EVALSHA and loaded once (resent only on NOSCRIPT, the one
-- reply that proves nothing ran), and integers written exactly.
--
-- Redis Cluster needs no option: the configured address is a seed. The
-- first MOVED reply turns routing on; from then on each command goes to
-- the node the worker has learned for its key's slot, and MOVED (the slot
-- has a new owner: remembered) and ASK (a slot in migration: ASKING, then
-- that one command) are followed. Both are error replies sent instead of
-- running the command, so following them never runs anything twice.


local bit = require "bit"
local check = require "resty.counter.check"
local ngx = ngx
local ngx_sha1_bin = ngx.sha1_bin
local band = bit.band
local bxor = bit.bxor
local lshift = bit.lshift
local rshift = bit.rshift
local error = error
local ipairs = ipairs
local pcall = pcall
local rawget = rawget
local require = require
local setmetatable = setmetatable
local tostring = tostring
local type = type
local fmt = string.format
local byte = string.byte
local find = string.find
local concat = table.concat
local tonumber = tonumber


local MAX_SAFE = 2 ^ 53 - 1

-- Redirections followed for one command. A slot being moved takes two
-- (MOVED to the old owner, ASK to the new one); more means the cluster is
-- reconfiguring faster than we can follow, and the caller gets an error.
local MAX_REDIRECTS = 5


-- lua-resty-redis under either name.
local function load_driver()
    for _, name in ipairs({ "resty.redis", "nginx.redis" }) do
        local ok, driver = pcall(require, name)
        if ok and type(driver) == "table" then
            return driver, name
        end
    end
    return nil
end


local driver, driver_name = load_driver()


local _M = {
    _VERSION = "0.1.0",
    driver_name = driver_name,
}
local mt = { __index = _M }


local bad = check.bad


-- syntax: s = redis.integer(n)
--
-- The exact decimal text of an integer: a Lua number within +-(2^53 - 1),
-- an int64 cdata, or a decimal string. LuaJIT would print 1e14 as
-- "1e+14", which Redis refuses as "not an integer". Nil for anything else.
local function integer(n)
    local t = type(n)
    if t == "number" then
        if n % 1 == 0 and n >= -MAX_SAFE and n <= MAX_SAFE then
            return fmt("%d", n)
        end
        return nil
    end

    if t == "cdata" then
        return (tostring(n):match("^(%-?%d+)U?LL$"))
    end

    if t == "string" and n:find("^%-?%d+$") and #n <= 20 then
        return n
    end
    return nil
end
_M.integer = integer


-- CRC16-CCITT (XMODEM), the hash of Redis Cluster's key slots.
local CRC16 = {}
for i = 0, 255 do
    local crc = lshift(i, 8)
    for _ = 1, 8 do
        if band(crc, 0x8000) ~= 0 then
            crc = bxor(lshift(crc, 1), 0x1021)
        else
            crc = lshift(crc, 1)
        end
    end
    CRC16[i] = band(crc, 0xffff)
end


local function crc16(s, from, to)
    local crc = 0
    for i = from, to do
        crc = bxor(band(lshift(crc, 8), 0xffff),
                   CRC16[bxor(rshift(crc, 8), byte(s, i))])
    end
    return crc
end


-- syntax: slot = redis.key_slot(key)
--
-- The cluster slot (0 to 16383) of a key: the CRC16 of its hash tag (the
-- text between the first "{" and the next "}", when not empty), else of
-- the whole key.
local function key_slot(key)
    local from, to = 1, #key
    local open = find(key, "{", 1, true)
    if open then
        local close = find(key, "}", open + 1, true)
        if close and close > open + 1 then
            from, to = open + 1, close - 1
        end
    end
    return band(crc16(key, from, to), 16383)
end
_M.key_slot = key_slot


-- syntax: key_prefix = redis.key_prefix(opts, name, level)
--
-- The start of every key of the counter or limiter `name`:
-- "<opts.prefix>{<name>}:" (prefix "rc:" by default). The braces make the
-- name the hash tag, so all of one counter's keys share a cluster slot
-- and each script touches one node; braces in the prefix would move the
-- tag, so they are refused.
function _M.key_prefix(opts, name, level)
    local prefix = opts.prefix or "rc:"
    if type(prefix) ~= "string" or find(prefix, "[{}]") then
        check.expected("opts.prefix", 'a string without "{" or "}" (the '
                       .. "name is the hash tag)", prefix, level + 1)
    end
    return prefix .. "{" .. name .. "}:"
end


-- What each worker has learned of the clusters it talks to, per seed
-- (pool name): whether routing is on, and the node serving each slot
-- learned from MOVED replies. Shared by every client of the same seed, so
-- a counter created later does not pay the redirection again.
local routes_by_seed = {}


-- The name of the connection pool for an address (host and port, or a
-- socket path) of this client: see new() for what sets pools apart.
local function pool_name(self, host, port)
    return concat({ "resty.counter", host, port, self.db, self.session }, ":")
end


-- The options of redis.new.
local OPTIONS = {
    host = true, port = true, path = true, password = true,
    username = true, db = true, connect_timeout = true, send_timeout = true,
    read_timeout = true, pool_size = true, keepalive = true, ssl = true,
    ssl_verify = true, server_name = true,
}


-- syntax: client = redis.new(opts, level?)
--
-- opts: host (default "127.0.0.1": an IP address, or a name resolved by
-- nginx's `resolver` directive, which must then be set) and port (6379),
-- or path (a Unix socket); password, and username for a Redis 6+ ACL user
-- (else AUTH with the password alone: the default user); db (0);
-- connect_timeout, send_timeout, read_timeout
-- (seconds, default 0.1 each: a request is never held longer waiting for
-- Redis); pool_size (default 32) and keepalive (idle seconds, default 60);
-- ssl (TLS, default false) with ssl_verify (default true: the certificate
-- must chain to nginx's lua_ssl_trusted_certificate and name the server)
-- and server_name (SNI and the name verified; default the host).
-- Raises on a bad or unknown option, and when no lua-resty-redis is
-- installed, blaming the caller; `level` as error() would count it from
-- the function that calls redis.new (1, the default: that function), and
-- `name` what the caller calls `opts` (default "opts"; the counters say
-- "opts.redis").
function _M.new(opts, level, name)
    -- From here on, counted from this function.
    level = (level or 1) + 1
    name = name or "opts"
    if type(opts) ~= "table" then
        check.expected(name, "table", opts, level)
    end
    check.options(opts, OPTIONS, name, level)

    if not driver then
        error("lua-resty-redis not found: install OpenResty's resty.redis "
              .. "or Debian's lua-nginx-redis (nginx.redis)", level)
    end

    local seconds, whole, text, flag = check.seconds, check.integer,
                                       check.text, check.flag
    local p = name .. "."
    local self = {
        host = text(opts.host, p .. "host", level, "127.0.0.1"),
        port = whole(opts.port, p .. "port", 1, 65535, level, 6379),
        path = text(opts.path, p .. "path", level, false),
        password = text(opts.password, p .. "password", level, false),
        username = text(opts.username, p .. "username", level, false),
        db = whole(opts.db, p .. "db", 0, 65535, level, 0),
        connect_timeout = seconds(opts.connect_timeout, p .. "connect_timeout",
                                  level, 0.1),
        send_timeout = seconds(opts.send_timeout, p .. "send_timeout", level,
                               0.1),
        read_timeout = seconds(opts.read_timeout, p .. "read_timeout", level,
                               0.1),
        pool_size = whole(opts.pool_size, p .. "pool_size", 1, 100000, level,
                          32),
        keepalive = seconds(opts.keepalive, p .. "keepalive", level, 60),
        ssl = flag(opts.ssl, p .. "ssl", level, false),
        ssl_verify = flag(opts.ssl_verify, p .. "ssl_verify", level, true),
        server_name = text(opts.server_name, p .. "server_name", level,
                           false),
    }
    if self.username and not self.password then
        bad(p .. "username", "needs " .. p .. "password", level)
    end
    if self.path and self.path:sub(1, 5) ~= "unix:" then
        self.path = "unix:" .. self.path
    end

    -- The pool is per address, database, credentials and TLS settings: a
    -- connection made for one never serves another (nor one verified for
    -- one name, or not at all, a client that wants another).
    local tls = self.ssl and concat({ "tls", self.server_name or "",
                                      tostring(self.ssl_verify) }, ":")
    self.session = concat({
        self.password and ngx.md5((self.username or "") .. "\0"
                                  .. self.password) or "",
        tls or "" }, ":")
    self.pool = pool_name(self, self.path or self.host, self.port)

    local routes = routes_by_seed[self.pool]
    if not routes then
        routes = { on = false, slots = {}, nodes = {} }
        routes_by_seed[self.pool] = routes
    end
    self.routes = routes
    return setmetatable(self, mt)
end


-- The node at host:port of the seed's cluster (its own pool: a connection
-- to one node never serves another).
local function node_at(self, host, port)
    local address = host .. ":" .. port
    local node = self.routes.nodes[address]
    if not node then
        node = {
            host = host,
            port = port,
            address = address,
            pool = pool_name(self, host, port),
        }
        self.routes.nodes[address] = node
    end
    return node
end


-- A connection from the pool (or a new one, authenticated and on the
-- right database) to a cluster node, or to the configured address when
-- node is nil; or nil and an error.
local function connect(self, node)
    -- ngx.socket.tcp raises in the phases without cosockets.
    local ok, red, err = pcall(driver.new, driver)
    if not ok then
        return nil, "cannot create a redis client here: " .. tostring(red)
    end
    if not red then
        return nil, "cannot create a redis client: " .. tostring(err)
    end

    -- lua-resty-redis before 0.28 has no set_timeouts (and an unknown
    -- method would be sent to Redis as a command): look before calling.
    if rawget(driver, "set_timeouts") then
        red:set_timeouts(self.connect_timeout * 1000,
                         self.send_timeout * 1000,
                         self.read_timeout * 1000)
    else
        red:set_timeout(self.connect_timeout * 1000)
    end

    local options = { pool = node and node.pool or self.pool,
                      pool_size = self.pool_size }
    if node then
        ok, err = red:connect(node.host, node.port, options)
    elseif self.path then
        ok, err = red:connect(self.path, options)
    else
        ok, err = red:connect(self.host, self.port, options)
    end
    local address = node and node.address
                    or self.path or (self.host .. ":" .. self.port)
    if not ok then
        err = tostring(err)
        if find(err, "no resolver defined", 1, true) then
            -- nginx resolves names with its own resolver, never through
            -- /etc/hosts: without the directive no name can be reached.
            err = err .. " (a host name needs nginx's resolver directive, "
                  .. "e.g. \"resolver 127.0.0.53;\" in the http block, "
                  .. "or give an IP address)"
        end
        return nil, "redis connect to " .. address .. " failed: " .. err
    end

    if not rawget(driver, "set_timeouts") then
        -- one timeout for everything: the longest of send and read
        red:set_timeout(1000 * (self.read_timeout > self.send_timeout
                                and self.read_timeout or self.send_timeout))
    end

    if red:get_reused_times() == 0 then
        if self.ssl then
            -- On the cosocket itself, which lua-resty-redis keeps in
            -- `_sock` in every version: its own `ssl` connect option
            -- only exists from 0.28 on. A pooled connection keeps its
            -- TLS session, so only fresh ones shake hands.
            local sock = rawget(red, "_sock")
            local session
            -- pcall: when the handshake completes without waiting (loopback
            -- can be that fast) and the certificate is then refused,
            -- lua-resty-core up to 0.1.25 raises "assertion failed!"
            -- instead of returning the reason (which nginx logs).
            ok, session, err = pcall(sock.sslhandshake, sock, nil,
                                     self.server_name
                                     or (node and node.host)
                                     or (not self.path and self.host)
                                     or nil, self.ssl_verify)
            if not ok then
                session, err = nil, "certificate refused (the reason is "
                                    .. "in nginx's error log)"
            end
            if not session then
                red:close()
                return nil, "redis TLS handshake with " .. address
                            .. " failed: " .. tostring(err)
            end
        end
        if self.password then
            if self.username then
                ok, err = red:auth(self.username, self.password)
            else
                ok, err = red:auth(self.password)
            end
            if not ok then
                red:close()
                return nil, "redis AUTH failed: " .. tostring(err)
            end
        end
        if self.db ~= 0 then
            ok, err = red:select(self.db)
            if not ok then
                red:close()
                return nil, "redis SELECT " .. self.db .. " failed: "
                            .. tostring(err)
            end
        end
    end
    return red
end


-- Back to the pool after a complete exchange (a reply, error replies
-- included: lua-resty-redis returns false for those); closed after a
-- socket error, since a timed-out reply may still arrive and the next user
-- of the connection would read it.
local function release(self, red, res)
    if res ~= nil then
        red:set_keepalive(self.keepalive * 1000, self.pool_size)
    else
        red:close()
    end
end


-- syntax: script = redis.script(source)
--
-- A Lua script for EVALSHA: its source and SHA1, computed once.
function _M.script(source)
    local sha = ngx_sha1_bin(source)
    local hex = {}
    for i = 1, #sha do
        hex[i] = fmt("%02x", byte(sha, i))
    end
    return { source = source, sha = concat(hex) }
end


local function is_noscript(err)
    return type(err) == "string" and err:find("^NOSCRIPT") ~= nil
end


-- "MOVED 3999 127.0.0.1:6381" or "ASK 3999 127.0.0.1:6381": the kind,
-- slot, host ("" when the node does not know its own address: then it is
-- the one we asked) and port; nil for any other error.
local function redirection(err)
    if type(err) ~= "string" then
        return nil
    end
    local kind, slot, host, port = err:match("^(%u+) (%d+) (%S*):(%d+)$")
    if kind ~= "MOVED" and kind ~= "ASK" then
        return nil
    end
    return kind, tonumber(slot), host, tonumber(port)
end


-- Runs send(red, asking, ...) on the node serving `key` (the configured
-- address while no cluster has been seen, or when key is nil), following
-- MOVED and ASK. send returns what lua-resty-redis returns: the reply, or
-- false and an error reply, or nil and a socket error.
local function request(self, key, send, ...)
    local routes = self.routes
    local node, slot
    if routes.on and type(key) == "string" then
        slot = key_slot(key)
        node = routes.slots[slot]
    end

    local asking = false
    for _ = 0, MAX_REDIRECTS do
        local red, err = connect(self, node)
        if not red then
            if slot and node and routes.slots[slot] == node then
                -- The node may be gone (a failover): ask the seed again
                -- next time, which will tell the slot's new owner.
                routes.slots[slot] = nil
            end
            return nil, err
        end

        local res = true
        if asking then
            -- Lets the next command touch a slot being imported.
            res, err = red:asking()
        end
        if res then
            res, err = send(red, asking, ...)
        end
        release(self, red, res)
        if res then
            return res
        end

        local kind, moved_slot, host, port = redirection(err)
        if not kind then
            return nil, err
        end
        if host == "" then
            host = node and node.host or self.host
        end
        node = node_at(self, host, port)
        asking = kind == "ASK"
        if not asking then
            routes.on = true
            routes.slots[moved_slot] = node
        end
    end
    return nil, "redis: more than " .. MAX_REDIRECTS .. " cluster "
                .. "redirections for one command (the cluster is "
                .. "reconfiguring)"
end


local function send_script(red, asking, script, nkeys, ...)
    local res, err = red:evalsha(script.sha, nkeys, ...)
    if not res and is_noscript(err) then
        if asking then
            res, err = red:asking()
            if not res then
                return res, err
            end
        end
        res, err = red:eval(script.source, nkeys, ...)
    end
    return res, err
end


local function send_command(red, _, name, ...)
    return red[name](red, ...)
end


-- syntax: res, err = client:eval(script, nkeys, ...)
--
-- context: where cosockets work (rewrite, access, content, timers, ...)
--
-- Runs a script made by redis.script() with EVALSHA; on NOSCRIPT (the
-- server has not seen it, e.g. after a restart) sends it with EVAL, which
-- also loads it. Nothing else is ever resent: after a timeout the script
-- may or may not have run, and the caller must know which (see the batch
-- ids of the lax counters). Returns the reply, or nil and an error; a
-- Redis error reply (e.g. "ERR value is not an integer") comes back as
-- nil, err too. A nil reply is ngx.null, as lua-resty-redis gives it.
-- On a cluster it runs on the node of its first key's slot: every key of
-- one call must share that slot (one hash tag).
function _M.eval(self, script, nkeys, ...)
    check.self(self, mt, "client", "eval", 2)
    local res, err = request(self, nkeys > 0 and (...) or nil, send_script,
                             script, nkeys, ...)
    if not res then
        return nil, err
    end
    return res
end


-- syntax: res, err = client:command(name, key, ...)
--
-- One command, for tests and cold paths (e.g. GET, MGET, DEL). The same
-- connection handling as eval(); on a cluster it runs on the node of its
-- first argument's slot, the key of GET, MGET, DEL and the like.
function _M.command(self, name, ...)
    check.self(self, mt, "client", "command", 2)
    local res, err = request(self, (...), send_command, name, ...)
    if not res then
        return nil, err
    end
    return res
end


-- syntax: res, err = client:command_at(key, name, ...)
--
-- One command on the node serving key's slot, for commands that name no
-- key but are about one slot's keys (SCAN for a counter's hash tag).
function _M.command_at(self, key, name, ...)
    check.self(self, mt, "client", "command_at", 2)
    local res, err = request(self, key, send_command, name, ...)
    if not res then
        return nil, err
    end
    return res
end


return _M
