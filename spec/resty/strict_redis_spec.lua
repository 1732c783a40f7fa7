-- resty.counter.strict with a Redis backend, against the real redis-server
-- that spec/run-in-nginx.lua starts on loopback, from inside an nginx
-- worker: the same methods and semantics as on the dict.

local strict = require "resty.counter.strict"
local redis = require "resty.counter.redis"

local PORT = tonumber(os.getenv("REDIS_PORT"))
local PASSWORD = os.getenv("REDIS_PASSWORD")
local MAX = 9223372036854775807LL
local MIN = -9223372036854775807LL - 1


local function backend(extra)
    local opts = { port = PORT, password = PASSWORD }
    for k, v in pairs(extra or {}) do
        opts[k] = v
    end
    return opts
end


local function counter(name, extra)
    return assert(strict.new(nil, { name = name, redis = backend(extra) }))
end


local raw = redis.new(backend())

-- Specs that send requests to this nginx (see spec/helpers/it_http.lua).
local it_http = require("helpers.it_http")(it, pending)


describe("resty.counter.strict on Redis", function()
    local c

    before_each(function()
        c = counter("rs")
        assert(c:clear())
    end)

    it("keeps keys under the prefix and one hash tag per counter", function()
        assert.equal(5, c:inc("k", 5))
        assert.equal("5", raw:command("get", "rc:{rs}:k"))
        local other = assert(strict.new(nil, { name = "rs", prefix = "app:",
                                               redis = backend() }))
        assert.equal(1, other:inc("k"))
        assert.equal("1", raw:command("get", "app:{rs}:k"))
        assert(other:clear())
    end)

    it("incs, decs, gets, sets and dels with Redis' semantics", function()
        assert.equal(0, c:get("k"))
        assert.equal(1, c:inc("k"))
        assert.equal(11, c:inc("k", 10))
        assert.equal(8, c:dec("k", 3))
        assert.equal(8, c:get("k"))
        assert.equal(-4, c:set("k", -4))
        assert.equal(-4, c:del("k"))
        assert.equal(0, c:del("k"))
        assert.equal(0, c:get("k"))
    end)

    it("is exact over int64 and refuses to overflow, changing nothing",
       function()
        assert.equal(MAX, c:set("big", MAX))
        local new, err = c:inc("big", 1)
        assert.is_nil(new)
        assert.equal("increment or decrement would overflow", err)
        assert.equal(MAX, c:get("big"))
        assert.equal("9223372036854775807", raw:command("get", "rc:{rs}:big"))

        assert.equal(MIN, c:set("small", "-9223372036854775808"))
        new, err = c:dec("small", 1)
        assert.is_nil(new)
        assert.equal("increment or decrement would overflow", err)
        assert.equal(MIN, c:get("small"))

        -- beyond 2^53, where doubles stop being exact
        assert.equal(9007199254740993LL, c:set("edge", "9007199254740993"))
        assert.equal(9007199254740994LL, c:inc("edge", 1))
    end)

    it("says a non-integer value is not one, and set repairs it", function()
        assert(raw:command("set", "rc:{rs}:text", "abc"))
        local new, err = c:inc("text", 1)
        assert.is_nil(new)
        assert.equal("value is not an integer", err)
        new, err = c:get("text")
        assert.is_nil(new)
        assert.equal("value is not an integer", err)
        new, err = c:del("text")
        assert.is_nil(new)
        assert.equal("value is not an integer", err)
        assert.equal("abc", raw:command("get", "rc:{rs}:text"))
        assert.equal(3, c:set("text", 3))
        assert.equal(4, c:inc("text"))
    end)

    it("says so when the key holds another Redis type", function()
        assert(raw:command("hset", "rc:{rs}:hash", "f", "1"))
        local new, err = c:inc("hash", 1)
        assert.is_nil(new)
        assert.matches("WRONGTYPE", err, 1, true)
        new, err = c:get("hash")
        assert.is_nil(new)
        assert.matches("WRONGTYPE", err, 1, true)
        new, err = c:set("hash", 5)              -- no silent replacing
        assert.is_nil(new)
        assert.matches("WRONGTYPE", err, 1, true)
        assert.equal("1", raw:command("hget", "rc:{rs}:hash", "f"))
    end)

    it("gives a created key its TTL in the same step, and keeps it",
       function()
        assert.equal(1, c:inc("t", 1, 30))
        local pttl = raw:command("pttl", "rc:{rs}:t")
        assert.is_true(pttl > 29000 and pttl <= 30000, tostring(pttl))
        assert.equal(2, c:inc("t", 1, 5))      -- an existing key keeps its
        pttl = raw:command("pttl", "rc:{rs}:t")
        assert.is_true(pttl > 29000, tostring(pttl))
        assert.equal(7, c:set("t", 7))          -- set without ttl: none
        assert.equal(-1, raw:command("pttl", "rc:{rs}:t"))
    end)

    it("compares and updates in one step, exactly", function()
        assert.equal(5, c:set("cap", 5))
        local new, old = c:inc_if("cap", "lt", 6, 1)
        assert.same({ 6, 5 }, { new, old })
        new, old = c:inc_if("cap", "lt", 6, 1)
        assert.same({ 6, 6 }, { new, old })     -- refused: old, old
        new, old = c:set_if("cap", "eq", 6, 0)
        assert.same({ 0, 6 }, { new, old })
        new, old = c:inc_if("missing", "ge", 1, 1)
        assert.same({ 0, 0 }, { new, old })
        assert.equal(0, raw:command("exists", "rc:{rs}:missing"))

        -- Comparisons beyond 2^53 are exact (doubles would call these equal).
        assert(c:set("far", "9007199254740993"))
        new, old = c:inc_if("far", "gt", "9007199254740992", 1)
        assert.equal(9007199254740994LL, new)
        assert.equal(9007199254740993LL, old)
        new, old = c:inc_if("far", "eq", "9007199254740993", 1)
        assert.equal(9007199254740994LL, old)
        assert.equal(old, new)
        new = c:inc_if("far", "lt", MIN, 1)
        assert.equal(9007199254740994LL, new)
        assert.same({ 1, 0 }, { c:inc_if("neg", "gt", -5, 1) })
    end)

    it("applies batches in order, all or nothing", function()
        assert.same({ 1, 2, 12 }, c:inc_all({ { "a" }, { "a" }, { "b", 12 } }))
        assert.same({ 2, 12, 0 }, c:get_all({ "a", "b", "c" }))

        -- The second entry overflows: the first is put back, TTL included.
        assert(c:set("x", 1, 60))
        assert(c:set("y", MAX))
        local news, err, i = c:inc_all({ { "x", 5 }, { "y", 1 } })
        assert.is_nil(news)
        assert.equal("increment or decrement would overflow", err)
        assert.equal(2, i)
        assert.equal(1, c:get("x"))
        assert.is_true(raw:command("pttl", "rc:{rs}:x") > 59000)

        assert(raw:command("set", "rc:{rs}:z", "zz"))
        news = c:set_all({ { "a", 100 }, { "z", 1 } })
        assert.same({ 100, 1 }, news)           -- set repairs, as SET does

        -- A non-integer met half-way: nothing written.
        assert(raw:command("set", "rc:{rs}:z", "zz"))
        news, err, i = c:inc_all({ { "a", 1 }, { "z", 1 } })
        assert.is_nil(news)
        assert.equal("value is not an integer", err)
        assert.equal(2, i)
        assert.equal(100, c:get("a"))
    end)

    it("refuses a batch too large for one script, writing nothing",
       function()
        local updates = {}
        for i = 1, 1001 do
            updates[i] = { "big" .. i, 1 }
        end
        local news, err = c:inc_all(updates)
        assert.is_nil(news)
        assert.matches("batch too large for one redis script", err, 1, true)
        assert.equal(0, c:get("big1"))
        updates[1001] = nil
        assert.equal(1000, #assert(c:inc_all(updates)))
    end)

    it("runs conditional batches in one step", function()
        assert(c:set_all({ { "s1", 1 }, { "s2", 9 } }))
        local news, olds = c:inc_all_if({ { "s1", "lt", 5, 1 },
                                          { "s2", "lt", 5, 1 } })
        assert.same({ 2, 9 }, news)
        assert.same({ 1, 9 }, olds)
        news, olds = c:set_all_if({ { "s1", "eq", 2, 20 },
                                    { "s2", "always", nil, 0 } })
        assert.same({ 20, 0 }, news)
        assert.same({ 2, 9 }, olds)
    end)

    it("clears its own keys and nothing else", function()
        local other = counter("rs-other")
        assert(c:inc("a"))
        assert(other:inc("a"))
        assert(raw:command("set", "unrelated", "1"))
        assert(c:clear())
        assert.equal(0, c:get("a"))
        assert.equal(1, other:get("a"))
        assert.equal("1", raw:command("get", "unrelated"))
        assert(other:clear())
    end)

    it("raises on misuse as on the dict", function()
        local ok, err = pcall(c.inc, c, "", 1)
        assert.is_false(ok)
        assert.matches('bad "key" argument: empty string', err)
        ok, err = pcall(c.inc, c, "k", 1.5)
        assert.is_false(ok)
        assert.matches('bad "n" argument: 1.5 is not an integer', err)
        ok, err = pcall(c.inc_all, c, { { "a", 1 }, { "q", "abc" } })
        assert.is_false(ok)
        assert.matches('"abc" is not a number', err)
        ok, err = pcall(strict.new, nil, { redis = "127.0.0.1" })
        assert.is_false(ok)
        assert.matches('bad "opts.redis" argument: table expected', err)
    end)

    it_http("says in the log phase that Redis cannot be reached there",
            function()
        local dict = ngx.shared.strict
        dict:delete("strict_redis:log")
        assert.matches("200 OK", require("helpers.race").get(
            "/strict_redis/log"))
        for _ = 1, 100 do
            if dict:get("strict_redis:log") then
                break
            end
            ngx.sleep(0.01)
        end
        assert.equal("redis cannot be reached in the log phase (no "
                     .. "cosockets there): use a lax counter",
                     dict:get("strict_redis:log"))
    end)

    it("fails fast with a clear error when Redis cannot be reached",
       function()
        local down = counter("rs", { port = 1, connect_timeout = 0.05 })
        ngx.update_time()
        local start = ngx.now()
        local new, err = down:inc("k")
        ngx.update_time()
        assert.is_nil(new)
        assert.matches("redis connect to 127.0.0.1:1 failed", err, 1, true)
        assert.is_true(ngx.now() - start < 1)
        local wrong = counter("rs", { password = "wrong" })
        new, err = wrong:get("k")
        assert.is_nil(new)
        assert.matches("AUTH failed", err, 1, true)
    end)
end)
