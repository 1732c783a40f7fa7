-- resty.counter.redis against the real redis-server that
-- spec/run-in-nginx.lua starts on loopback (REDIS_PORT, REDIS_SOCKET,
-- REDIS_PASSWORD), from inside an nginx worker.

local redis = require "resty.counter.redis"

local PORT = tonumber(os.getenv("REDIS_PORT"))
local SOCKET = os.getenv("REDIS_SOCKET")
local PASSWORD = os.getenv("REDIS_PASSWORD")
local TLS_PORT = tonumber(os.getenv("REDIS_TLS_PORT"))


local function client(opts)
    opts = opts or {}
    opts.port = opts.port or PORT
    if opts.password == nil then
        opts.password = PASSWORD
    elseif opts.password == false then
        opts.password = nil
    end
    return redis.new(opts)
end


-- The specs of a host by name need unit.conf's location with a resolver
-- and the dnsmasq the runner starts on loopback.
local it_dns = os.getenv("DNS_SERVER") == "1"
               and require("helpers.it_http")(it, pending)
               or function(name)
    pending(name .. " (needs dnsmasq on this machine)")
end


local function raised(fn, ...)
    local ok, err = pcall(fn, ...)
    assert(not ok, "expected an error")
    return err
end


describe("resty.counter.redis", function()
    it("uses the stack's own lua-resty-redis", function()
        -- OpenResty's is resty.redis (0.33 on the tested stack); Debian's
        -- is the same library as nginx.redis (0.27, no set_timeouts).
        -- spec/run-in-nginx.lua says which stack this is.
        local expected = ({ openresty = "resty.redis",
                            debian = "nginx.redis" })[
                            os.getenv("COUNTER_STACK") or ""]
        if expected then
            assert.equal(expected, redis.driver_name)
        else
            assert.is_truthy(redis.driver_name == "resty.redis"
                             or redis.driver_name == "nginx.redis")
        end
    end)

    it("runs a script by EVALSHA, loading it once on NOSCRIPT", function()
        local c = client()
        assert(c:command("script", "flush"))
        local script = redis.script("return redis.call('INCRBY', KEYS[1], "
                                    .. "ARGV[1])")
        assert.equal(40, #script.sha)
        assert(c:command("del", "spec:eval"))
        assert.equal(5, c:eval(script, 1, "spec:eval", "5"))
        assert.equal(12, c:eval(script, 1, "spec:eval", "7"))
        assert.equal(1, c:command("script", "exists", script.sha)[1])
    end)

    it("writes integers exactly: no 1e+14", function()
        assert.equal("100000000000000", redis.integer(1e14))
        assert.equal("-9007199254740991", redis.integer(-(2 ^ 53 - 1)))
        assert.equal("9223372036854775807",
                     redis.integer(9223372036854775807LL))
        assert.equal("123", redis.integer("123"))
        assert.is_nil(redis.integer(1.5))
        assert.is_nil(redis.integer(2 ^ 53))
        assert.is_nil(redis.integer(0 / 0))
        assert.is_nil(redis.integer("1e14"))

        local c = client()
        assert(c:command("del", "spec:exact"))
        assert.equal(1e14, c:command("incrby", "spec:exact",
                                     redis.integer(1e14)))
    end)

    it("returns Redis error replies as nil, err", function()
        local c = client()
        assert(c:command("set", "spec:text", "abc"))
        local script = redis.script("return redis.call('INCRBY', KEYS[1], 1)")
        local res, err = c:eval(script, 1, "spec:text")
        assert.is_nil(res)
        assert.matches("value is not an integer", err, 1, true)
        -- and the connection went back to the pool in a clean state
        assert.equal(1, c:eval(script, 1, "spec:fresh" .. ngx.now()))
    end)

    it("reaches Redis through its Unix socket and another database",
       function()
        local c = client({ path = SOCKET, db = 3 })
        assert(c:command("set", "spec:db", "three"))
        assert.equal("three", c:command("get", "spec:db"))
        local c0 = client()
        assert.equal(ngx.null, c0:command("get", "spec:db"))
    end)

    it("fails fast and clearly on an unreachable address", function()
        local c = client({ port = 1, connect_timeout = 0.05 })
        ngx.update_time()
        local start = ngx.now()
        local res, err = c:command("ping")
        ngx.update_time()
        assert.is_nil(res)
        assert.matches("redis connect to 127.0.0.1:1 failed: ", err, 1, true)
        assert.is_true(ngx.now() - start < 1)
    end)

    it("says so when the password is wrong or missing", function()
        local res, err = client({ password = "wrong" }):command("ping")
        assert.is_nil(res)
        assert.matches("redis AUTH failed", err, 1, true)
        res, err = client({ password = false }):command("ping")
        assert.is_nil(res)
        assert.matches("NOAUTH", err, 1, true)
    end)

    it("authenticates as an ACL user, and says so when it cannot",
       function()
        local admin = client()
        assert.equal("OK", admin:command("acl", "setuser", "spec-counter",
                                          "reset", "on", ">user-secret",
                                          "~spec:acl:*", "+@all"))
        local c = client({ username = "spec-counter",
                           password = "user-secret" })
        assert.equal(3, c:command("incrby", "spec:acl:k", 3))
        -- the user's own key rule applies: not the default user
        local res, err = c:command("incrby", "other:k", 1)
        assert.is_nil(res)
        assert.matches("NOPERM", err, 1, true)

        res, err = client({ username = "spec-counter", password = "wrong" })
                   :command("ping")
        assert.is_nil(res)
        assert.matches("redis AUTH failed", err, 1, true)
        assert.equal(1, admin:command("acl", "deluser", "spec-counter"))
        assert(admin:command("del", "spec:acl:k"))
    end)

    it("speaks TLS, verifying the server's certificate and name",
       function()
        -- nginx checks the certificate's DNS names, not its IP addresses:
        -- a host given as an address needs server_name.
        local res, err = client({ port = TLS_PORT, ssl = true })
                         :command("ping")
        assert.is_nil(res)
        -- "certificate host mismatch", or, when the handshake completed
        -- without waiting, our words for lua-resty-core's assertion
        assert.matches("redis TLS handshake with 127.0.0.1:" .. TLS_PORT
                       .. " failed: certificate ", err, 1, true)

        local tls = { port = TLS_PORT, ssl = true, server_name = "localhost" }
        local c = client(tls)
        assert.equal("PONG", c:command("ping"))
        assert.equal(2, c:command("incrby", "spec:tls", 2))
        assert.equal("2", client():command("get", "spec:tls"))  -- same data
        assert(c:command("del", "spec:tls"))

        -- a name the certificate does not carry
        tls.server_name = "other.example"
        res, err = client(tls):command("ping")
        assert.is_nil(res)
        assert.matches("redis TLS handshake with 127.0.0.1:" .. TLS_PORT
                       .. " failed: certificate ", err, 1, true)
        -- unless the user turns verification off
        tls.ssl_verify = false
        assert.equal("PONG", client(tls):command("ping"))

        -- TLS to the plain port: a clear, fast failure
        ngx.update_time()
        local start = ngx.now()
        res, err = client({ ssl = true }):command("ping")
        ngx.update_time()
        assert.is_nil(res)
        assert.matches("redis TLS handshake with 127.0.0.1:" .. PORT
                       .. " failed: ", err, 1, true)
        assert.is_true(ngx.now() - start < 1)
    end)

    -- In the runner's nginx (#http): `resty` configures a resolver of its
    -- own, which this spec is about not having.
    require("helpers.it_http")(it, pending)("says that a host name needs "
                                            .. "nginx's resolver directive",
                                            function()
        -- The timer the specs run in has none (nginx reads no /etc/hosts).
        local res, err = client({ host = "localhost" }):command("ping")
        assert.is_nil(res)
        assert.equal("redis connect to localhost:" .. PORT .. " failed: no "
                     .. 'resolver defined to resolve "localhost" (a host name '
                     .. "needs nginx's resolver directive, e.g. \"resolver "
                     .. '127.0.0.53;\" in the http block, or give an IP '
                     .. "address)", err)
    end)

    it_dns("reaches a host given by name through nginx's resolver", function()
        local strict = require "resty.counter.strict"
        local direct = assert(strict.new(nil, {
            name = "by_name", redis = { port = PORT, password = PASSWORD } }))
        assert(direct:clear())
        local get = require("helpers.race").get
        assert.matches("\r\n\r\n5\n$", get("/redis/by_name?n=5"))
        assert.matches("\r\n\r\n7\n$", get("/redis/by_name?n=2"))
        assert.equal(7, direct:get("k"))
    end)

    it("raises on bad options, naming them", function()
        assert.matches('bad "opts" argument: table expected, got "127.0.0.1" %(a string%)',
                       raised(redis.new, "127.0.0.1"))
        assert.matches('bad "opts.port" argument: an integer from 1 to 65535',
                       raised(redis.new, { port = 0 }))
        assert.matches('bad "opts.read_timeout" argument',
                       raised(redis.new, { read_timeout = -1 }))
        assert.matches('bad "opts.password" argument',
                       raised(redis.new, { password = 5 }))
        assert.matches('bad "opts.db" argument',
                       raised(redis.new, { db = 1.5 }))
        assert.matches('bad "opts.username" argument: needs opts.password',
                       raised(redis.new, { username = "u" }))
        assert.matches('bad "opts.ssl" argument: boolean expected',
                       raised(redis.new, { ssl = "yes" }))
    end)
end)
