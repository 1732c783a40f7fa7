-- What a new user's mistakes get, across every module (resty.counter.check
-- behind them), inside a real nginx worker: an unknown option raises naming
-- it, a wrong value is quoted with its type, a method called with a dot
-- says so, and every message blames the caller's own line, through the
-- nested helpers of the Redis options too.

local counter = require "resty.counter"
local strict = require "resty.counter.strict"
local lax = require "resty.counter.lax"
local limit = require "resty.counter.limit"
local requests = require "resty.counter.requests"
local redis = require "resty.counter.redis"
local check = require "resty.counter.check"
local request_counter = require "resty.greencheek.request.counter"


-- The message `fn` raises, which must start with "<this file>:<line>: "
-- for a line of `fn` itself: `fn` holds only the call (not as a tail call:
-- `return f()` would drop its frame), so that is the caller's own line.
local function raised_at(fn)
    local ok, err = pcall(fn)
    assert.is_false(ok, "expected an error")
    local info = debug.getinfo(fn, "S")
    local src, line = err:match("^(.-):(%d+): ")
    assert.equal(info.short_src, src)
    line = tonumber(line)
    assert.is_true(line >= info.linedefined and line <= info.lastlinedefined,
                   "blames line " .. line .. ", not one of "
                   .. info.linedefined .. "-" .. info.lastlinedefined)
    return err:sub(#src + #tostring(line) + 4)
end


local function did_you_mean(typo, option, name)
    return ('bad "%s" argument: unknown option "%s" (did you mean "%s"?)')
           :format(name or "opts", typo, option)
end


describe("bad input", function()
    describe("an unknown option", function()
        it("raises naming the key, in every constructor", function()
            assert.equal(did_you_mean("timout", "timeout"),
                raised_at(function() strict.new("strict", { timout = 1 }) end))
            assert.equal(did_you_mean("lock_tll", "lock_ttl"),
                raised_at(function() strict.new("strict", { lock_tll = 1 }) end))
            assert.equal(did_you_mean("alowed_lag", "allowed_lag"),
                raised_at(function() lax.new("lax", { alowed_lag = 5 }) end))
            assert.equal(did_you_mean("max_pendng", "max_pending"),
                raised_at(function() lax.new("lax", { max_pendng = 5 }) end))
            assert.equal(did_you_mean("timout", "timeout"),
                raised_at(function() lax.new("lax", { timout = 1 }) end))
            assert.equal(did_you_mean("algoritm", "algorithm"),
                raised_at(function()
                    limit.new("limit", { limit = 1, window = 1, algoritm = "sliding" }) end))
            assert.equal(did_you_mean("on_redis_eror", "on_redis_error"),
                raised_at(function()
                    limit.new("limit", { limit = 1, window = 1, on_redis_eror = "x" }) end))
            assert.equal(did_you_mean("flush_intervall", "flush_interval"),
                raised_at(function()
                    requests.new("requests", { flush_intervall = 5 }) end))
            assert.equal(did_you_mean("flush_intervall", "flush_interval"),
                raised_at(function()
                    request_counter.configure("greencheek", { flush_intervall = 5 }) end))
        end)

        it("lists the known options when no one is close", function()
            assert.equal('bad "opts" argument: unknown option "allowed_lag" (known: '
                         .. 'lock_ttl, name, prefix, redis, timeout)',
                raised_at(function() strict.new("strict", { allowed_lag = 1 }) end))
            assert.equal('bad "opts" argument: unknown option "size" (known: '
                         .. 'algorithm, clock, limit, name, near_limit_ratio, '
                         .. 'on_redis_error, prefix, redis, shadow, window)',
                raised_at(function()
                    limit.new("limit", { limit = 1, window = 1, size = 2 }) end))
            assert.equal('bad "opts" argument: unknown option 1 (a number) '
                         .. '(options are named by strings)',
                raised_at(function() strict.new("strict", { "counter" }) end))
        end)

        it("raises inside opts.redis, through every module that takes it", function()
            local hots = { hots = "10.9.9.9" }
            local expected = did_you_mean("hots", "host", "opts.redis")
            assert.equal(expected,
                raised_at(function() strict.new(nil, { redis = hots }) end))
            assert.equal(expected,
                raised_at(function() lax.new(nil, { redis = hots }) end))
            assert.equal(expected,
                raised_at(function()
                    limit.new(nil, { limit = 1, window = 1, redis = hots }) end))
            assert.equal(did_you_mean("hots", "host"),
                raised_at(function() redis.new(hots) end))
            assert.equal(did_you_mean("passwd", "password", "opts.redis"),
                raised_at(function()
                    strict.new(nil, { redis = { passwd = "x" } }) end))
            assert.equal(did_you_mean("sll", "ssl", "opts.redis"),
                raised_at(function() strict.new(nil, { redis = { sll = true } }) end))
        end)

        it("leaves every documented option accepted", function()
            assert.is_table(strict.new("strict", { name = "all", timeout = 1,
                                                   lock_ttl = 1, prefix = "p:" }))
            assert.is_table(lax.new("lax", { name = "all", timeout = 1, lock_ttl = 1,
                                             prefix = "p:", allowed_lag = 3600,
                                             max_pending = 5 }))
            assert.is_table(limit.new("limit", {
                limit = 1, window = 1, algorithm = "fixed", name = "all",
                clock = ngx.now, prefix = "p:", on_redis_error = "reject" }))
            assert.is_table(requests.new("requests", {
                window = 60, previous = 2, max_keys = 10, overflow_key = "o",
                flush_interval = 3600, lock_timeout = 1, clock = ngx.now }))
            assert.is_table(redis.new({
                host = "127.0.0.1", port = 1, path = "/tmp/x.sock",
                password = "p", username = "u", db = 1, connect_timeout = 1,
                send_timeout = 1, read_timeout = 1, pool_size = 1,
                keepalive = 1, ssl = false, ssl_verify = true,
                server_name = "localhost" }))
        end)
    end)

    describe("a wrong value", function()
        it("is quoted with its type, blaming the caller", function()
            local cases = {
                { function() counter.new("counters", "1") end,
                  'bad "sync_interval" argument: a positive finite number of '
                  .. 'seconds expected, got "1" (a string)' },
                { function() counter.new(1) end,
                  'bad "shdict_name" argument: string expected, got 1 (a number)' },
                { function() strict.new("strict", { timeout = "1" }) end,
                  'bad "opts.timeout" argument: a positive finite number of '
                  .. 'seconds expected, got "1" (a string)' },
                { function() strict.new("strict", { name = ("x"):rep(100) }) end,
                  'bad "opts.name" argument: 1 to 64 letters, digits, "_", "." '
                  .. 'or "-" expected, got "' .. ("x"):rep(40) .. '"... (a string '
                  .. 'of 100 bytes)' },
                { function() strict.new("strict", true) end,
                  'bad "opts" argument: table expected, got true (a boolean)' },
                { function() lax.new("lax", { allowed_lag = "5" }) end,
                  'bad "opts.allowed_lag" argument: a positive finite number of '
                  .. 'seconds expected, got "5" (a string)' },
                { function() lax.new("lax", { max_pending = 0.5 }) end,
                  'bad "opts.max_pending" argument: an integer >= 1 expected, '
                  .. 'got 0.5 (a number)' },
                { function() lax.new("lax", { spool_dir = "" }) end,
                  'bad "opts.spool_dir" argument: a directory path (a '
                  .. 'non-empty string without NUL) expected, got "" (a '
                  .. 'string)' },
                { function() limit.new("limit", { limit = "10", window = 1 }) end,
                  'bad "opts.limit" argument: an integer from 1 to 4294967295 '
                  .. 'expected, got "10" (a string)' },
                { function() limit.new("limit", { limit = 1, window = 1, clock = 5 }) end,
                  'bad "opts.clock" argument: function expected, got 5 (a number)' },
                { function() requests.new("requests", { window = "60" }) end,
                  'bad "opts.window" argument: a whole number of seconds >= 1 '
                  .. 'expected, got "60" (a string)' },
                { function() request_counter.configure(5) end,
                  'bad "dict_name" argument: string expected, got 5 (a number)' },
                { function() request_counter.stats({}) end,
                  'bad "dict_name" argument: string expected, got a table' },
                { function() strict.new(nil, { redis = { port = "16391" } }) end,
                  'bad "opts.redis.port" argument: an integer from 1 to 65535 '
                  .. 'expected, got "16391" (a string)' },
                { function() lax.new(nil, { redis = { port = 16391.5 } }) end,
                  'bad "opts.redis.port" argument: an integer from 1 to 65535 '
                  .. 'expected, got 16391.5 (a number)' },
                { function()
                    limit.new(nil, { limit = 1, window = 1, redis = { ssl = "yes" } }) end,
                  'bad "opts.redis.ssl" argument: boolean expected, got "yes" '
                  .. '(a string)' },
                { function() strict.new(nil, { redis = { username = "u" } }) end,
                  'bad "opts.redis.username" argument: needs opts.redis.password' },
                { function() strict.new(nil, { redis = "127.0.0.1:6379" }) end,
                  'bad "opts.redis" argument: table expected, got "127.0.0.1:6379" '
                  .. '(a string)' },
                { function() strict.new(nil, { redis = {}, prefix = "{p}" }) end,
                  'bad "opts.prefix" argument: a string without "{" or "}" (the '
                  .. 'name is the hash tag) expected, got "{p}" (a string)' },
                { function()
                    limit.new(nil, { limit = 1, window = 1, redis = {},
                                     on_redis_error = "deny" }) end,
                  'bad "opts.on_redis_error" argument: "allow" or "reject" '
                  .. 'expected, got "deny" (a string)' },
                { function() redis.new({ db = -1 }) end,
                  'bad "opts.db" argument: an integer from 0 to 65535 expected, '
                  .. 'got -1 (a number)' },
            }
            for _, case in ipairs(cases) do
                assert.equal(case[2], raised_at(case[1]))
            end
        end)

        it("is quoted with its type in the methods too", function()
            local c = counter.new("counters")
            local s = strict.new("strict")
            local lim = limit.new("limit", { limit = 1, window = 1 })
            local cases = {
                { function() c:incr(1) end,
                  'bad "key" argument: string expected, got 1 (a number)' },
                { function() c:incr("k", { 1 }) end,
                  'bad "step" argument: number expected, got a table' },
                { function() c:get_keys(-1) end,
                  'bad "max_count" argument: an integer >= 0 expected, got -1 '
                  .. '(a number)' },
                { function() s:inc("k", true) end,
                  'bad "n" argument: number expected, got true (a boolean)' },
                { function() s:inc_if("k", "<", 1) end,
                  'bad "cmp" argument: one of always, eq, ne, lt, le, gt, ge '
                  .. 'expected, got "<" (a string)' },
                { function() s:inc("k", 1, "60") end,
                  'bad "ttl" argument: a positive finite number of seconds '
                  .. 'expected, got "60" (a string)' },
                { function() s:inc_all({ { "a" }, "b" }) end,
                  'bad "updates" argument: entry 2: table expected, got "b" '
                  .. '(a string)' },
                { function() lim:set_headers("k", "1") end,
                  'bad "remaining" argument: number or nil expected, got "1" '
                  .. '(a string)' },
            }
            for _, case in ipairs(cases) do
                assert.equal(case[2], raised_at(case[1]))
            end
        end)

        it("describes each type", function()
            assert.equal("nil", check.describe(nil))
            assert.equal('"1" (a string)', check.describe("1"))
            assert.equal("16391 (a number)", check.describe(16391))
            assert.equal("0.1 (a number)", check.describe(0.1))
            assert.equal("9007199254740992 (a number)", check.describe(2^53))
            assert.equal("inf (a number)", check.describe(1 / 0))
            assert.equal("false (a boolean)", check.describe(false))
            assert.equal("12LL (a cdata)", check.describe(12LL))
            assert.equal("a table", check.describe({}))
            assert.equal("a function", check.describe(print))
            assert.equal('"a\\\nb" (a string)', check.describe("a\nb"))
        end)
    end)

    describe("a method called with a dot", function()
        local function objects()
            return {
                { "c", counter.new("counters"),
                  { "incr", "sync", "reset", "get", "get_keys", "self_metrics" } },
                { "c", strict.new("strict"),
                  { "inc", "dec", "get", "set", "del", "inc_if", "set_if",
                    "clear" },
                  { "get_all", "inc_all", "set_all", "inc_all_if", "set_all_if" } },
                { "c", lax.new("lax", { allowed_lag = 3600 }),
                  { "inc", "dec", "get", "set", "del", "inc_if", "set_if",
                    "clear", "pending_keys", "self_metrics" },
                  { "get_all", "inc_all", "set_all", "inc_all_if", "set_all_if" } },
                { "lim", limit.new("limit", { limit = 1, window = 1 }),
                  { "incoming", "uncommit", "wait", "reset", "self_metrics",
                    "set_headers" } },
                { "r", requests.new("requests", { flush_interval = 3600 }),
                  { "record", "record_with_all", "flush", "stats", "single_stats",
                    "prometheus", "self_metrics" } },
                { "client", redis.new({ port = 1 }),
                  { "command", "command_at" }, { "eval" } },
            }
        end

        it("says so, naming the method, for every public method", function()
            local n = 0
            for _, object in ipairs(objects()) do
                local name, obj = object[1], object[2]
                for list = 3, 4 do
                    for _, m in ipairs(object[list] or {}) do
                        local expected = ("use %s:%s(...), not %s.%s(...)")
                                         :format(name, m, name, m)
                        assert.equal(expected, raised_at(function() obj[m]("k") end))
                        assert.equal(expected, raised_at(function() obj[m]() end))
                        if list == 4 then
                            -- their first argument is a table (a batch, a
                            -- script): the object is told by its class
                            assert.equal(expected,
                                raised_at(function() obj[m]({ { "k" } }) end))
                        end
                        n = n + 1
                    end
                end
            end
            assert.equal(50, n)
        end)

        it("is the message of the issue's own mistake", function()
            local c = counter.new("counters")
            assert.equal("use c:incr(...), not c.incr(...)",
                         raised_at(function() c.incr("k") end))
        end)
    end)
end)
