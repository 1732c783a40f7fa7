-- resty.counter.lax with a Redis backend, against the real redis-server
-- that spec/run-in-nginx.lua starts: batched flushes, applied exactly once
-- even when a reply is lost, nothing lost while Redis cannot be reached.

local lax = require "resty.counter.lax"
local strict = require "resty.counter.strict"
local redis = require "resty.counter.redis"
local backend_helper = require "helpers.redis_backend"

local backend = backend_helper.options


-- A lax counter that never flushes by itself (the specs flush by hand).
local function counter(name, extra, opts)
    opts = opts or {}
    opts.name, opts.redis, opts.allowed_lag = name, backend(extra), 3600
    return assert(lax.new(nil, opts))
end


local raw = redis.new(backend())


describe("resty.counter.lax on Redis", function()
    local shared

    before_each(function()
        shared = assert(strict.new(nil, { name = "lx", redis = backend() }))
        assert(shared:clear())
    end)

    it("flushes the deltas of several workers in batches, exactly", function()
        local a, b = counter("lx"), counter("lx")
        for i = 1, 1000 do
            a:inc("k" .. i % 10)
            b:inc("k" .. i % 10, 2)
        end
        assert.equal(10, a:pending_keys())
        assert(a:flush())
        assert(b:flush())
        for i = 0, 9 do
            assert.equal(300, shared:get("k" .. i))
        end
        assert.equal(0, a:pending_keys())
        -- a's flush told it the shared value then (100): a lags by a flush
        assert.equal(101, a:inc("k1"))
        assert(a:flush())
        assert.equal(302, a:inc("k1"))
    end)

    it("flushes more keys than fit one script in several batches",
       function()
        local c = counter("lx")
        for i = 1, 2500 do
            c:inc("many" .. i, i)
        end
        assert(c:flush())
        assert.equal(0, c:pending_keys())
        assert.same({ 1, 1000, 1001, 2500 },
                    shared:get_all({ "many1", "many1000", "many1001",
                                     "many2500" }))
    end)

    it("never reads Redis to count, so it works in any phase", function()
        local c = counter("lx")
        assert(shared:set("known", 40))
        assert.equal(1, c:inc("known"))        -- not yet seen: view 0 + 1
        assert(c:flush())
        assert.equal(42, c:inc("known"))       -- seen at the flush: 41 + 1
        assert(c:flush())
        assert.equal(42, shared:get("known"))
    end)

    it("gives a key its ttl when the flush creates it", function()
        local c = counter("lx")
        c:inc("t", 1, 30)
        assert(c:flush())
        local pttl = raw:command("pttl", "rc:{lx}:t")
        assert.is_true(pttl > 29000 and pttl <= 30000, tostring(pttl))
    end)

    it("applies a batch once when its reply was lost", function()
        -- Another client keeps Redis busy for 300 ms: the flush's read
        -- times out after 50 ms, yet Redis runs it when it gets to it.
        local c = counter("lx", { read_timeout = 0.05 })
        for _ = 1, 7 do
            c:inc("once")
        end
        backend_helper.while_busy(raw, function()
            local ok, err = c:flush()
            assert.is_nil(ok)
            assert.matches("timeout", err)
            assert.equal(1, c:pending_keys())  -- kept, under its batch id
            c:inc("once", 3)                   -- waits in the new table
        end)
        -- Redis gets to the flush's script right after the busy one.
        assert.equal(7, backend_helper.settled(function()
            return shared:get("once")
        end))                                  -- it did run, once

        -- The next flush sends it again under its id (Redis knows it: a
        -- duplicate, not applied twice), then the 3.
        assert(c:flush())
        assert.equal(1, c:self_metrics().duplicates)
        assert.equal(10, shared:get("once"))
        assert.equal(0, c:pending_keys())
    end)

    it("loses no batch when flushes outlast the flush interval",
       function()
        -- Its own timer flushes every 20 ms, and a flush waits 50 ms for
        -- a reply. Redis holds every command for 0.4 s, and drops those
        -- of a connection closed meanwhile: the batches sent then time
        -- out and never ran, so each must be sent again under its id.
        local c = assert(lax.new(nil, {
            name = "lx", redis = backend({ read_timeout = 0.05 }),
            allowed_lag = 0.02 }))
        assert(raw:command("client", "pause", 400, "all"))
        local sent = 0
        ngx.update_time()
        local stop = ngx.now() + 0.6
        repeat
            c:inc("held")
            sent = sent + 1
            ngx.sleep(0.003)
        until ngx.now() >= stop

        local got
        for _ = 1, 300 do
            got = shared:get("held")
            if got == sent and c:pending_keys() == 0 then
                break
            end
            ngx.sleep(0.01)
        end
        assert.is_true(sent > 50, "too few increments: " .. sent)
        assert.equal(sent, got)
        assert.equal(0, c:pending_keys())
        assert.equal(0, c:self_metrics().dropped)
    end)

    it("never runs two flushes of one counter at a time", function()
        -- Redis holds every command for 0.3 s, less than the flush's read
        -- timeout: the flush in progress waits while ticks come every
        -- 20 ms. Each script sent is counted while it runs.
        local c = assert(lax.new(nil, {
            name = "lx", redis = backend({ read_timeout = 1 }),
            allowed_lag = 0.02 }))
        local stats = {}
        backend_helper.watch_scripts(c.shared.engine.client, stats)
        assert(raw:command("client", "pause", 300, "all"))
        ngx.update_time()
        local stop = ngx.now() + 0.5
        local sent = 0
        repeat
            c:inc("one")
            sent = sent + 1
            ngx.sleep(0.003)
        until ngx.now() >= stop

        for _ = 1, 300 do
            if shared:get("one") == sent and c:pending_keys() == 0 then
                break
            end
            ngx.sleep(0.01)
        end
        assert.equal(sent, shared:get("one"))
        assert.is_true(stats.scripts >= 2, "flushes sent: " .. stats.scripts)
        assert.equal(1, stats.most)
    end)

    it("keeps every delta while Redis cannot be reached", function()
        local down = counter("lx", { port = 1, connect_timeout = 0.05 })
        for i = 1, 50 do
            down:inc("k" .. i % 5)
        end
        for _ = 1, 3 do
            local ok, err = down:flush()
            assert.is_nil(ok)
            assert.matches("redis connect to 127.0.0.1:1 failed", err, 1, true)
            down:inc("k0")
        end
        assert.equal(5, down:pending_keys())
        assert.equal(0, down:self_metrics().dropped)

        -- Beyond max_pending keys, the excess is dropped and counted.
        local capped = counter("lx", { port = 1, connect_timeout = 0.05 },
                               { max_pending = 3 })
        for i = 1, 10 do
            capped:inc("c" .. i)
        end
        assert.is_nil(capped:flush())
        assert.equal(3, capped:pending_keys())
        assert.equal(7, capped:self_metrics().dropped)
    end)

    it("drops and counts a delta Redis refuses as an overflow", function()
        local c = counter("lx")
        assert(shared:set("max", 9223372036854775807LL))
        c:inc("max")
        c:inc("fine", 5)
        assert(c:flush())
        assert.equal(1, c:self_metrics().dropped)
        assert.equal(9223372036854775807LL, shared:get("max"))
        assert.equal(5, shared:get("fine"))
    end)
end)
