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


local ngx = ngx
local ngx_sha1_bin = ngx.sha1_bin
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
local concat = table.concat


local MAX_SAFE = 2 ^ 53 - 1


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


local function bad(name, why, level)
    error(fmt('bad "%s" argument: %s', name, why), level + 1)
end


local function seconds(opts, name, default, level)
    local v = opts[name]
    if v == nil then
        return default
    end
    if type(v) ~= "number" or not (v > 0 and v < 1 / 0) then
        bad("opts." .. name, "a positive finite number of seconds expected, "
            .. "got " .. tostring(v), level + 1)
    end
    return v
end


local function whole(opts, name, default, min, max, level)
    local v = opts[name]
    if v == nil then
        return default
    end
    if type(v) ~= "number" or v % 1 ~= 0 or v < min or v > max then
        bad("opts." .. name, fmt("an integer from %d to %d expected, got %s",
                                 min, max, tostring(v)), level + 1)
    end
    return v
end


local function text(opts, name, default, level)
    local v = opts[name]
    if v == nil then
        return default
    end
    if type(v) ~= "string" or v == "" then
        bad("opts." .. name, "a non-empty string expected, got "
            .. tostring(v), level + 1)
    end
    return v
end


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


-- syntax: client = redis.new(opts)
--
-- opts: host (default "127.0.0.1") and port (6379), or path (a Unix
-- socket); password; db (0); connect_timeout, send_timeout, read_timeout
-- (seconds, default 0.1 each: a request is never held longer waiting for
-- Redis); pool_size (default 32) and keepalive (idle seconds, default 60).
-- Raises on a bad option, and when no lua-resty-redis is installed.
function _M.new(opts, level)
    level = level or 2
    if type(opts) ~= "table" then
        bad("opts.redis", "table expected, got " .. type(opts), level)
    end

    if not driver then
        error("lua-resty-redis not found: install OpenResty's resty.redis "
              .. "or Debian's lua-nginx-redis (nginx.redis)", level)
    end

    local self = {
        host = text(opts, "host", "127.0.0.1", level),
        port = whole(opts, "port", 6379, 1, 65535, level),
        path = text(opts, "path", nil, level),
        password = text(opts, "password", nil, level),
        db = whole(opts, "db", 0, 0, 65535, level),
        connect_timeout = seconds(opts, "connect_timeout", 0.1, level),
        send_timeout = seconds(opts, "send_timeout", 0.1, level),
        read_timeout = seconds(opts, "read_timeout", 0.1, level),
        pool_size = whole(opts, "pool_size", 32, 1, 100000, level),
        keepalive = seconds(opts, "keepalive", 60, level),
    }
    if self.path and self.path:sub(1, 5) ~= "unix:" then
        self.path = "unix:" .. self.path
    end

    -- The pool is per address, database and password: a connection made
    -- for one never serves another.
    self.pool = concat({ "resty.counter", self.path or self.host,
                         self.port, self.db,
                         self.password and ngx.md5(self.password) or "" },
                       ":")
    return setmetatable(self, mt)
end


-- A connection from the pool (or a new one, authenticated and on the
-- right database), or nil and an error.
local function connect(self)
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

    local options = { pool = self.pool, pool_size = self.pool_size }
    if self.path then
        ok, err = red:connect(self.path, options)
    else
        ok, err = red:connect(self.host, self.port, options)
    end
    if not ok then
        return nil, "redis connect to " .. (self.path or (self.host .. ":"
                    .. self.port)) .. " failed: " .. tostring(err)
    end

    if not rawget(driver, "set_timeouts") then
        -- one timeout for everything: the longest of send and read
        red:set_timeout(1000 * (self.read_timeout > self.send_timeout
                                and self.read_timeout or self.send_timeout))
    end

    if red:get_reused_times() == 0 then
        if self.password then
            ok, err = red:auth(self.password)
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
function _M.eval(self, script, nkeys, ...)
    local red, err = connect(self)
    if not red then
        return nil, err
    end

    local res
    res, err = red:evalsha(script.sha, nkeys, ...)
    if not res and is_noscript(err) then
        res, err = red:eval(script.source, nkeys, ...)
    end

    release(self, red, res)
    if not res then
        return nil, err
    end
    return res
end


-- syntax: res, err = client:command(name, ...)
--
-- One command, for tests and cold paths (e.g. PING, DEL). The same
-- connection handling as eval().
function _M.command(self, name, ...)
    local red, err = connect(self)
    if not red then
        return nil, err
    end

    local res
    res, err = red[name](red, ...)
    release(self, red, res)
    if not res then
        return nil, err
    end
    return res
end


return _M
