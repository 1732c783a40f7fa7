-- resty.counter.limit with a Redis backend, against the real redis-server
-- that spec/run-in-nginx.lua starts: limits shared by every limiter (every
-- node) on the same Redis, and the chosen answer when Redis is away.

local limit = require "resty.counter.limit"
local redis = require "resty.counter.redis"

local PORT = tonumber(os.getenv("REDIS_PORT"))
local PASSWORD = os.getenv("REDIS_PASSWORD")
local T0 = 1800000000       -- a multiple of 60


local function backend(extra)
    local opts = { port = PORT, password = PASSWORD }
    for k, v in pairs(extra or {}) do
        opts[k] = v
    end
    return opts
end


local raw = redis.new(backend())


local function limiter(opts, clock)
    opts.redis = opts.redis or backend()
    opts.window = opts.window or 60
    opts.clock = function() return clock.now end
    return assert(limit.new(nil, opts))
end


describe("resty.counter.limit on Redis", function()
    before_each(function()
        assert(raw:command("flushdb"))
    end)

    it("holds a fixed window across limiters (nodes) exactly", function()
        local clock = { now = T0 + 5 }
        local a = limiter({ limit = 10, name = "fx" }, clock)
        local b = limiter({ limit = 10, name = "fx" }, clock)
        local allowed = 0
        for i = 1, 30 do
            local delay = (i % 2 == 0 and a or b):incoming("ip", true)
            if delay then
                allowed = allowed + 1
            end
        end
        assert.equal(10, allowed)
        assert.equal("10", raw:command("get", "rc:{fx}:" .. (T0 / 60)
                                       .. ":ip"))
        local pttl = raw:command("pttl", "rc:{fx}:" .. (T0 / 60) .. ":ip")
        assert.is_true(pttl > 119000 and pttl <= 120000, tostring(pttl))

        clock.now = T0 + 60          -- the next window
        assert.same({ 0, 9 }, { a:incoming("ip", true) })
    end)

    it("answers remaining, dry runs and uncommits", function()
        local clock = { now = T0 }
        local lim = limiter({ limit = 3, name = "dr" }, clock)
        assert.same({ 0, 2 }, { lim:incoming("k", false) })
        assert.same({ 0, 2 }, { lim:incoming("k", true) })
        assert.same({ 0, 1 }, { lim:incoming("k", true) })
        assert.same({ 0, 0 }, { lim:incoming("k", true) })
        assert.same({ nil, "rejected" }, { lim:incoming("k", true) })
        assert.is_true(lim:uncommit("k"))
        assert.same({ 0, 0 }, { lim:incoming("k", true) })
        assert.same({ nil, "nothing to uncommit" },
                    { lim:uncommit("other") })
        assert.equal(60, lim:wait("k"))
    end)

    it("weighs the previous window in the sliding estimate", function()
        local clock = { now = T0 + 10 }
        local lim = limiter({ limit = 10, name = "sl", algorithm = "sliding" },
                            clock)
        for _ = 1, 10 do
            assert(lim:incoming("k", true))
        end
        clock.now = T0 + 60 + 30     -- half of the previous window counts
        local allowed = 0
        for _ = 1, 10 do
            if lim:incoming("k", true) then
                allowed = allowed + 1
            end
        end
        assert.equal(5, allowed)     -- 10 * 0.5 + 5 = 10
        assert.is_true(lim:wait("k") > 0)
    end)

    it("fails open or closed, as chosen, fast, and counts it", function()
        local clock = { now = T0 }
        local down = { port = 1, password = PASSWORD, connect_timeout = 0.05 }
        local open = limiter({ limit = 1, name = "fo", redis = down }, clock)
        ngx.update_time()
        local start = ngx.now()
        local delay, remaining, err = open:incoming("k", true)
        ngx.update_time()
        assert.equal(0, delay)
        assert.equal(0, remaining)
        assert.matches("redis connect to 127.0.0.1:1 failed", err, 1, true)
        assert.is_true(ngx.now() - start < 1)
        assert.equal(1, open:self_metrics().failed_open)

        local closed = limiter({ limit = 1, name = "fc", redis = down,
                                 on_redis_error = "reject" }, clock)
        delay, remaining, err = closed:incoming("k", true)
        assert.is_nil(delay)
        assert.equal("rejected", remaining)
        assert.matches("redis connect to", err, 1, true)
        assert.equal(1, closed:self_metrics().failed_closed)
    end)

    it("in shadow mode decides as enforced and never rejects", function()
        local clock = { now = T0 + 5 }
        local enforce = limiter({ limit = 3, name = "en" }, clock)
        local shadow = limiter({ limit = 3, name = "sh", shadow = true },
                               clock)
        for i = 1, 5 do
            local e = { enforce:incoming("k", true) }
            local s = { shadow:incoming("k", true) }
            if i <= 3 then
                assert.same({ 0, 3 - i }, e)
                assert.same(e, s)
            else
                assert.same({ nil, "rejected" }, e)
                assert.same({ 0, 0, "rejected" }, s)
            end
        end
        assert.same({ 0, 0, "rejected" }, { shadow:incoming("k", false) })
        local index = T0 / 60
        assert.equal("3", raw:command("get", "rc:{sh}:" .. index .. ":k"))
        assert.equal(60 - 5, shadow:wait("k"))
        local m = shadow:self_metrics()
        assert.same({ 3, 0, 2 }, { m.allowed, m.rejected, m.shadow_rejected })
        m = enforce:self_metrics()
        assert.same({ 3, 2, 0 }, { m.allowed, m.rejected, m.shadow_rejected })
    end)

    it("counts events near the limit", function()
        local clock = { now = T0 }
        local lim = limiter({ limit = 10, name = "nl" }, clock)
        for _ = 1, 12 do
            lim:incoming("k", true)
        end
        local m = lim:self_metrics()
        assert.same({ 10, 3, 2 }, { m.allowed, m.near_limit, m.rejected })

        -- Sliding, 0.5 of the limit: 30 s into the next window the
        -- previous 4 weigh 2, so the third event after is near (5).
        local sliding = limiter({ limit = 10, name = "ns",
                                  near_limit_ratio = 0.5,
                                  algorithm = "sliding" }, clock)
        local seen = {}
        for i = 1, 7 do
            if i == 5 then
                clock.now = T0 + 60 + 30
            end
            sliding:incoming("k", true)
            seen[i] = sliding:self_metrics().near_limit
        end
        assert.same({ 0, 0, 0, 0, 0, 0, 1 }, seen)
    end)

    it("judges near the limit on the exact estimate", function()
        -- 2^-22 s into a window (the clock's last bit at T0): the previous
        -- window's 1 event weighs 1 - 4e-9, so after 499,999 in this one
        -- the estimate is 499,999.999999996, below half of 1e6; printed
        -- with 14 digits it would be 500000.
        local clock = { now = T0 + 60 + 2 ^ -22 }
        local lim = limiter({ limit = 1000000, name = "ex",
                              algorithm = "sliding",
                              near_limit_ratio = 0.5 }, clock)
        local index = (T0 + 60) / 60
        assert(raw:command("set", "rc:{ex}:" .. (index - 1) .. ":k", "1"))
        assert(raw:command("set", "rc:{ex}:" .. index .. ":k", "499998"))
        assert.same({ 0, 500000 }, { lim:incoming("k", true) })
        assert.equal(0, lim:self_metrics().near_limit)
        lim:incoming("k", true)
        assert.equal(1, lim:self_metrics().near_limit)
    end)

    it("fails closed in shadow mode by letting through, told so", function()
        local clock = { now = T0 }
        local down = { port = 1, password = PASSWORD, connect_timeout = 0.05 }
        local lim = limiter({ limit = 1, name = "sc", redis = down,
                              on_redis_error = "reject", shadow = true },
                            clock)
        local delay, remaining, rejected, err = lim:incoming("k", true)
        assert.equal(0, delay)
        assert.equal(0, remaining)
        assert.equal("rejected", rejected)
        assert.matches("redis connect to 127.0.0.1:1 failed", err, 1, true)
        local m = lim:self_metrics()
        assert.same({ 1, 0, 0 }, { m.failed_closed, m.rejected,
                                   m.shadow_rejected })
    end)

    it("raises on misuse", function()
        local ok, err = pcall(limit.new, nil, { limit = 1, window = 1,
                                                redis = backend(),
                                                on_redis_error = "maybe" })
        assert.is_false(ok)
        assert.matches('bad "opts.on_redis_error" argument', err)
        ok, err = pcall(limit.new, nil, { limit = 1, window = 1 })
        assert.is_false(ok)
        assert.matches('bad "shdict_name" argument', err)
    end)
end)
