-- resty.counter.lax on Redis with a dict: every worker counts into the
-- shared engine in the dict's zone (src/engine/lax.rs), reads include
-- every worker's unsent counts, and any worker's flush moves them all
-- exactly once through the counter's journal. Against the real
-- redis-server that spec/run-in-nginx.lua starts.
--
-- Two counter objects of one name in this worker stand for two workers:
-- they share the engine's records as two workers do (the #http specs use
-- the other worker itself).

local lax = require "resty.counter.lax"
local redis = require "resty.counter.redis"
local abi = require "resty.counter.abi"
local race = require "helpers.race"
local ffi = require "ffi"

-- Specs that send requests to this nginx (see spec/helpers/it_http.lua).
local it_http = require("helpers.it_http")(it, pending)

local backend_helper = require "helpers.redis_backend"

local C = abi.C
local backend = backend_helper.options


-- A lax counter in the engine that never flushes by itself.
local function counter(name, extra, dict)
    return assert(lax.new(dict or "lax_engine", {
        name = name, redis = backend(extra), allowed_lag = 3600 }))
end


local raw = redis.new(backend())
local fresh = backend_helper.fresh


-- Makes the counter's flush lock look held by a process that died.
local function held_by_the_dead(c)
    local lock = ffi.cast("uint64_t *", c.journal)
    -- pid 0x7fffffff exists nowhere; instance 1.
    lock[0] = 0x17fffffffULL
end


describe("resty.counter.lax on Redis in the shared engine", function()
    it("counts every worker's incs into one total, read at once",
       function()
        local name, shared = fresh("sum")
        local a, b = counter(name), counter(name)
        for _ = 1, 3 do
            a:inc("k")
        end
        assert.equal(5, b:inc("k", 2))        -- a's 3 are in b's view
        assert.equal(5, a:get("k"))           -- Redis 0 + unsent 5
        assert.equal(1, a:pending_keys())
        assert.equal(0, shared:get("k"))

        -- a's flush moves b's counts too, once.
        assert(a:flush())
        assert.equal(5, shared:get("k"))
        assert.equal(0, b:pending_keys())
        assert(b:flush())
        assert.equal(5, shared:get("k"))
        assert.equal(6, b:inc("k"))           -- seen 5 (a's flush) + 1
        assert.equal(-4, a:dec("k", 10))
    end)

    it("flushes more keys than one batch holds, exactly", function()
        local name, shared = fresh("many")
        local c = counter(name)
        for i = 1, 700 do
            c:inc("m" .. i, i)
        end
        assert.equal(700, c:pending_keys())
        assert(c:flush())
        assert.equal(0, c:pending_keys())
        assert.same({ 1, 256, 257, 700 },
                    shared:get_all({ "m1", "m256", "m257", "m700" }))
    end)

    it("gives a key its ttl when the flush creates it", function()
        local name = fresh("ttl")
        local c = counter(name)
        c:inc("t", 1, 30)
        c:inc("t", 1, 60)                      -- the first request stands
        assert(c:flush())
        local pttl = raw:command("pttl", "rc:{" .. name .. "}:t")
        assert.is_true(pttl > 29000 and pttl <= 30000, tostring(pttl))
    end)

    it("sends a batch left in flight by a dead flusher first, under its id",
       function()
        local name, shared = fresh("dead")
        local a, b = counter(name), counter(name)
        a:inc("d", 7)
        -- a's flush begins (its batch is journaled), then a dies.
        local out = ffi.new("rc_lax_batch_t")
        assert.equal(abi.LAX_NEW_BATCH,
                     C.rc_lax_flush_begin(a.handle.ptr, a.journal, a.prefix,
                                          #a.prefix, 0, out))
        local seq = out.seq
        held_by_the_dead(a)
        b:inc("d", 3)                          -- after the batch was made
        -- b takes the lock over and sends the left batch (7) first, then
        -- a new one (3).
        assert(b:flush())
        assert.equal(10, shared:get("d"))
        assert.equal(0, b:pending_keys())
        assert.is_true(C.rc_lax_flush_begin(b.handle.ptr, b.journal,
                                            b.prefix, #b.prefix, 0, out)
                       == abi.LAX_NOTHING)
        assert.is_true(seq > 0)
    end)

    it("applies a batch once when its reply was lost, whoever resends it",
       function()
        -- Another client keeps Redis busy for 300 ms: a's read times out
        -- after 50 ms, yet Redis runs the script when it gets to it.
        local name, shared = fresh("lost")
        local a = counter(name, { read_timeout = 0.05 })
        local b = counter(name)
        a:inc("once", 7)
        backend_helper.while_busy(raw, function()
            local ok, err = a:flush()
            assert.is_nil(ok)
            assert.matches("timeout", err)
            a:inc("once", 3)
        end)
        assert.equal(7, backend_helper.settled(function()
            return shared:get("once")
        end))                                  -- it did run, once

        -- The other "worker" sends the journaled batch again under its id
        -- (a duplicate to Redis), then the 3.
        assert(b:flush())
        assert.equal(1, b:self_metrics().duplicates)
        assert.equal(10, shared:get("once"))
        assert.equal(0, a:pending_keys())
    end)

    it("keeps a batch of unknown fate when its resend cannot connect",
       function()
        -- A batch that may have run must be resent under its id, however
        -- the resend fails: a refused connect proves only that the resend
        -- did not run (a Redis Cluster's master stopped mid-flush, then
        -- refusing: the batch was applied twice).
        local name, shared = fresh("resend")
        local a = counter(name, { read_timeout = 0.05 })
        local down = counter(name, { port = 1, connect_timeout = 0.05 })
        local b = counter(name)
        a:inc("once", 7)
        backend_helper.while_busy(raw, function()
            assert.is_nil(a:flush())           -- timeout: unknown
        end)
        assert.equal(7, backend_helper.settled(function()
            return shared:get("once")
        end))                                  -- it did run
        local ok, err = down:flush()
        assert.is_nil(ok)
        assert.matches("connect", err)
        a:inc("once", 3)
        assert(b:flush())
        assert.equal(1, b:self_metrics().duplicates)
        assert.equal(10, shared:get("once"))
    end)

    it("never runs two flushes of one counter at a time", function()
        -- Redis holds every command for 0.3 s; two counters of one name
        -- (two workers' timers) flush every 20 ms meanwhile.
        local name, shared = fresh("one")
        local stats = {}
        local made = {}
        for i = 1, 2 do
            made[i] = assert(lax.new("lax_engine", {
                name = name, redis = backend({ read_timeout = 1 }),
                allowed_lag = 0.02 }))
        end
        -- Both objects share one client (one pool), as two workers'
        -- flushes would reach one Redis.
        made[2].shared.engine.client = made[1].shared.engine.client
        backend_helper.watch_scripts(made[1].shared.engine.client, stats)
        assert(raw:command("client", "pause", 300, "all"))
        ngx.update_time()
        local stop = ngx.now() + 0.5
        local sent = 0
        repeat
            made[sent % 2 + 1]:inc("one")
            sent = sent + 1
            ngx.sleep(0.003)
        until ngx.now() >= stop
        for _ = 1, 300 do
            if shared:get("one") == sent and made[1]:pending_keys() == 0 then
                break
            end
            ngx.sleep(0.01)
        end
        assert.equal(sent, shared:get("one"))
        assert.is_true(stats.scripts >= 2, "flushes sent: " .. stats.scripts)
        assert.equal(1, stats.most)
    end)

    it("keeps every count while Redis cannot be reached", function()
        local name, shared = fresh("down")
        local down = counter(name, { port = 1, connect_timeout = 0.05 })
        for i = 1, 50 do
            down:inc("k" .. i % 5)
        end
        for _ = 1, 3 do
            local ok, err = down:flush()
            assert.is_nil(ok)
            assert.matches("redis connect to 127.0.0.1:1 failed", err, 1,
                           true)
            down:inc("k0")
        end
        assert.equal(5, down:pending_keys())
        assert.equal(0, down:self_metrics().dropped)
        assert(counter(name):flush())
        assert.equal(13, shared:get("k0"))
        assert.equal(10, shared:get("k4"))
    end)

    it("drops what is unsent on a strict set or delete", function()
        local name, shared = fresh("set")
        local a, b = counter(name), counter(name)
        a:inc("s", 4)
        assert.equal(10, b:set("s", 10))
        assert.equal(10, a:get("s"))
        a:inc("s", 1)
        assert(a:flush())
        assert.equal(11, shared:get("s"))
        b:inc("s", 2)
        assert.equal(13, a:del("s"))
        assert(a:flush())
        assert.equal(0, shared:get("s"))
    end)

    it("refuses past the int64 range as Redis would", function()
        local name = fresh("big")
        local c = counter(name)
        assert.equal(9223372036854775807LL,
                     c:inc("big", 9223372036854775807LL))
        local v, err = c:inc("big")
        assert.is_nil(v)
        assert.equal("increment or decrement would overflow", err)
        assert.equal(9223372036854775806LL, c:dec("big"))
    end)

    it("refuses a new key clearly when the engine is full, keeps the rest",
       function()
        local name, shared = fresh("full")
        local c = counter(name, nil, "lax_engine_small")
        local made, refused_err = 0, nil
        for i = 1, 300 do
            local v, err = c:inc("f" .. i)
            if v then
                made = made + 1
            else
                refused_err = refused_err or err
            end
        end
        assert.is_true(made > 10 and made < 300, "keys made: " .. made)
        assert.matches("no room for a new key in the shared engine",
                       refused_err, 1, true)
        assert.equal(300 - made, c:self_metrics().refused)
        -- The keys already there still count, and flush exactly.
        assert.equal(2, c:inc("f1"))
        assert(c:flush())
        assert.equal(2, shared:get("f1"))
        assert.equal(1, shared:get("f" .. made))
    end)

    it_http("reads and flushes another worker's counts at once", function()
        local name, shared = fresh("http")
        local c = counter(name)
        local seen, sent = {}, 0
        for _ = 1, 400 do
            local body = assert(race.get("/lax_engine/inc?name=" .. name
                                         .. "&key=w"))
            sent = sent + 1
            seen[body:match("worker (%d)")] = true
            assert.equal(sent, c:get("w"))
            if seen["0"] and seen["1"] and sent >= 20 then
                break
            end
        end
        assert.is_true(seen["0"] and seen["1"], "both workers counted")
        assert.equal(0, shared:get("w"))
        -- This worker's flush sends the other worker's counts too.
        assert(c:flush())
        assert.equal(sent, shared:get("w"))
        assert.equal(0, c:pending_keys())
    end)
end)
