-- The Redis backends on a real Redis Cluster of three masters, each with a
-- replica, that spec/run-in-nginx.lua starts on loopback
-- (REDIS_CLUSTER_PORTS, REDIS_CLUSTER_REPLICAS, REDIS_PASSWORD), from
-- inside an nginx worker. The clients are given one
-- node (a seed) and must find every slot's owner by themselves: MOVED,
-- ASK during a slot's migration, a slot that moves while in use. A node
-- that stops and comes back is in spec/scenario/redis_nodes_spec.lua (the
-- workers here cannot restart it: they run as another user).

local strict = require "resty.counter.strict"
local lax = require "resty.counter.lax"
local limit = require "resty.counter.limit"
local redis = require "resty.counter.redis"
local redis_server = require "helpers.redis"

local PASSWORD = os.getenv("REDIS_PASSWORD")
local PORTS = {}
for port in (os.getenv("REDIS_CLUSTER_PORTS") or ""):gmatch("%d+") do
    PORTS[#PORTS + 1] = tonumber(port)
end
local REPLICAS = {}
for port in (os.getenv("REDIS_CLUSTER_REPLICAS") or ""):gmatch("%d+") do
    REPLICAS[#REPLICAS + 1] = tonumber(port)
end
local cluster = redis_server.cluster(PORTS, PASSWORD, REPLICAS)


-- The clients' connect, send and read timeouts, in seconds. The default
-- (0.1 s) keeps a request from waiting on Redis; these specs check where
-- commands go, not how fast: with 7 nodes and nginx on 2 cores beside
-- other tests (load 8-10), a node's first reply took longer than 0.1 s
-- and a spec failed with "timeout" in 2 runs of 7.
local TIMEOUT = 5


-- Backend options with node i as the seed.
local function seed(i, extra)
    local opts = { port = PORTS[i], password = PASSWORD,
                   connect_timeout = TIMEOUT, send_timeout = TIMEOUT,
                   read_timeout = TIMEOUT }
    for k, v in pairs(extra or {}) do
        opts[k] = v
    end
    return opts
end


-- A counter name not used before whose slot node i serves.
local used = 0
local function name_on(i)
    for _ = 1, 1000 do
        used = used + 1
        local name = "cl" .. used
        local slot = redis.key_slot(name)
        if cluster:owner(slot) == i then
            return name, slot
        end
    end
    error("no name found for node " .. i)
end


-- Commands of a kind node i refused with a redirection so far.
local function rejected(i, command)
    local stats = cluster:cli(i, "INFO commandstats")
    return tonumber(stats:match("cmdstat_" .. command
                                .. ":[^\n]*rejected_calls=(%d+)")) or 0
end


describe("resty.counter.redis on a Redis Cluster", function()
    it("computes a key's slot as the cluster does", function()
        -- the reference value of the cluster specification
        assert.equal(12739, redis.key_slot("123456789"))
        for _, key in ipairs({ "a", "rc:{name}:k", "{user1000}.following",
                               "foo{}{bar}", "foo{{bar}}zap", "foo{bar}{zap}",
                               "{}", "x{", "}{", "rc:{c.l-1_x}:\xff\0k" }) do
            -- %z: a NUL in a Lua 5.1 pattern would end it
            local quoted = key:gsub("%z", "\\0"):gsub("\xff", "\\xff")
            local out = cluster:cli(1, "CLUSTER KEYSLOT \"" .. quoted .. "\"")
            assert.equal(tonumber(out:match("%d+")), redis.key_slot(key),
                         key)
        end
    end)

    it("follows MOVED from any node and remembers the slot's owner",
       function()
        local name = name_on(2)
        local c = assert(strict.new(nil, { name = name, redis = seed(1) }))
        local before1, before2 = rejected(1, "evalsha"),
                                 rejected(2, "evalsha")
        for _ = 1, 20 do
            assert(c:inc("k"))
        end
        assert.equal(20, c:get("k"))
        assert.equal(20, cluster:get("rc:{" .. name .. "}:k"))
        -- one redirection, for the first call; the node itself none
        assert.equal(before1 + 1, rejected(1, "evalsha"))
        assert.equal(before2, rejected(2, "evalsha"))
    end)

    it("runs every strict method on counters spread over the nodes",
       function()
        for i = 1, #PORTS do
            local name = name_on(i)
            local c = assert(strict.new(nil, { name = name,
                                               redis = seed(i % 3 + 1) }))
            assert.equal(5, c:inc("a", 5))
            assert.equal(3, c:dec("a", 2))
            assert.equal(7, c:set("b", 7))
            assert.same({ 8, 7 }, { c:inc_if("b", "gt", 6, 1) })
            assert.same({ 3, 3 }, { c:set_if("a", "eq", 4, 1) })
            assert.same({ 3, 8, 0 }, c:get_all({ "a", "b", "none" }))
            assert.same({ 4, 10 }, c:inc_all({ { "a", 1 }, { "b", 2 } }))
            assert.equal(10, cluster:get("rc:{" .. name .. "}:b"))
            assert.equal(4, c:del("a"))
            assert(c:clear())
            assert.is_nil(cluster:get("rc:{" .. name .. "}:b"))
            assert.equal(0, c:get("b"))
        end
    end)

    -- Two lax counters per node ("two workers", seeded at different
    -- nodes) on `dict` (nil: counting in the worker), 150 incs each
    -- spread over 3 keys.
    local function lax_workers(dict)
        local names = {}
        local workers = {}
        for i = 1, #PORTS do
            names[i] = name_on(i)
            workers[i] = {}
            for w = 1, 2 do
                workers[i][w] = assert(lax.new(dict, {
                    name = names[i], redis = seed(w), allowed_lag = 3600 }))
            end
        end
        for n = 1, 300 do
            for i = 1, #PORTS do
                workers[i][n % 2 + 1]:inc("k" .. n % 3)
            end
        end
        return names, workers
    end

    it("flushes lax counters to every node exactly", function()
        local names, workers = lax_workers(nil)
        for i = 1, #PORTS do
            assert(workers[i][1]:flush())
            assert(workers[i][2]:flush())
            for k = 0, 2 do
                assert.equal(100, cluster:get("rc:{" .. names[i] .. "}:k"
                                              .. k))
            end
        end
    end)

    it("flushes lax counters in the shared engine to every node exactly, "
       .. "one flush sending every worker's counts", function()
        local names, workers = lax_workers("lax_engine")
        for i = 1, #PORTS do
            assert(workers[i][2]:flush())
            assert.equal(0, workers[i][1]:pending_keys())
            for k = 0, 2 do
                assert.equal(100, cluster:get("rc:{" .. names[i] .. "}:k"
                                              .. k))
                assert.equal(100, workers[i][1]:get("k" .. k))
            end
        end
    end)

    it("holds a limit across limiters seeded at different nodes", function()
        local name = name_on(3)
        local a = assert(limit.new(nil, { name = name, limit = 10,
                                          window = 60, redis = seed(1) }))
        local b = assert(limit.new(nil, { name = name, limit = 10,
                                          window = 60, redis = seed(2) }))
        local allowed = 0
        for n = 1, 30 do
            if (n % 2 == 0 and a or b):incoming("ip", true) then
                allowed = allowed + 1
            end
        end
        assert.equal(10, allowed)
    end)

    it("follows a slot that moved while in use, counting each call once",
       function()
        local name, slot = name_on(1)
        local c = assert(strict.new(nil, { name = name, redis = seed(2) }))
        for _ = 1, 5 do
            assert(c:inc("k"))
        end
        cluster:move(slot, 3)
        local before = rejected(1, "evalsha")
        for _ = 1, 5 do
            assert(c:inc("k"))
        end
        assert.equal(10, c:get("k"))
        assert.equal(10, cluster:get("rc:{" .. name .. "}:k"))
        -- the old owner refused the first call after the move, no other
        assert.equal(before + 1, rejected(1, "evalsha"))
    end)

    it("sends new keys to the importing node during a migration (ASK)",
       function()
        local name, slot = name_on(2)
        local c = assert(strict.new(nil, { name = name, redis = seed(1) }))
        local l = assert(lax.new(nil, { name = name, redis = seed(1),
                                        allowed_lag = 3600 }))
        assert.equal(3, c:inc("old", 3))
        cluster:begin_move(slot, 3)
        local ok, err = pcall(function()
            assert.equal(4, c:inc("new", 4))        -- ASK, then ASKING
            assert.equal(4, c:inc("old"))           -- still at node 2
            assert.equal(4, c:get("new"))

            -- Keys on both sides: Redis refuses (nothing ran); the
            -- counters say so and keep their numbers.
            local values, get_err = c:get_all({ "old", "new" })
            assert.is_nil(values)
            assert.matches("TRYAGAIN", get_err)
            local news, batch_err = c:inc_all({ { "old", 1 }, { "new", 1 } })
            assert.is_nil(news)
            assert.matches("TRYAGAIN", batch_err)
            l:inc("old", 10)
            assert.is_nil(l:flush())
            assert.equal(1, l:pending_keys())       -- kept, to resend
        end)
        cluster:finish_move()
        assert(ok, err)
        -- the lax delta whose batch Redis refused goes through now, once
        assert(l:flush())
        assert(l:flush())
        assert.same({ 14, 4 }, c:get_all({ "old", "new" }))
        assert.equal(14, cluster:get("rc:{" .. name .. "}:old"))
        assert.equal(4, cluster:get("rc:{" .. name .. "}:new"))
    end)

    it("follows a failover: the old master, now a replica, redirects",
       function()
        local name = name_on(2)
        local c = assert(strict.new(nil, { name = name, redis = seed(1) }))
        local l = assert(lax.new(nil, { name = name, redis = seed(3),
                                        allowed_lag = 3600 }))
        for _ = 1, 5 do
            assert(c:inc("k"))
            l:inc("lax")
        end
        assert(l:flush())
        local old = PORTS[2]
        cluster:failover(2)             -- PORTS[2] is the promoted replica
        local ok, err = pcall(function()
            assert.are_not.equal(old, PORTS[2])
            for _ = 1, 5 do
                assert(c:inc("k"))
                l:inc("lax")
            end
            assert(l:flush())
            assert.equal(10, c:get("k"))
            assert.same({ 10, 10 }, c:get_all({ "k", "lax" }))
        end)
        cluster:failover(2)             -- and back, for the other specs
        assert(ok, err)
        assert.equal(10, cluster:get("rc:{" .. name .. "}:k"))
        assert.equal(old, PORTS[2])
    end)

    it("says so for a database other than 0, which a cluster lacks",
       function()
        local c = assert(strict.new(nil, { name = name_on(1),
                                           redis = seed(1, { db = 1 }) }))
        local new, err = c:inc("k")
        assert.is_nil(new)
        assert.matches("SELECT 1 failed", err, 1, true)
    end)

    it("refuses a prefix with braces, which would move the hash tag",
       function()
        local ok, err = pcall(strict.new, nil, { prefix = "app{x}:",
                                                 redis = seed(1) })
        assert.is_false(ok)
        assert.matches('bad "opts.prefix" argument', err, 1, true)
    end)
end)
