-- Two nginx "nodes" (2 workers each) sharing one real redis-server on
-- loopback, under wrk load on both: the lax counts in Redis equal the
-- requests both access logs show, exactly, through a Redis restart in the
-- middle and a Redis that freezes past the flush interval; a cluster-wide
-- fixed-window limit holds across both nodes. Then the same nodes on a
-- Redis Cluster of three masters, each given a different node as its
-- seed: exact through the counter's slot moving to another master and
-- that master stopping and coming back.

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"
local load = require "helpers.load"
local redis_server = require "helpers.redis"

local CONF = assert(nginx.read_file("spec/scenario/redis_nodes.conf"))


local function node(port)
    return nginx.start({ workers = 2, http = CONF,
                         vars = { redis_port = port } })
end


-- Requests per URI in a node's access log.
local function logged(srv, into)
    for uri in (nginx.read_file(srv.dir .. "/access.log") or "")
               :gmatch("%d+ (%S+) 200\n") do
        into[uri] = (into[uri] or 0) + 1
    end
    return into
end


-- redis: a server or a cluster (helpers.redis), anything with get(key).
local function counted(redis, uris)
    local counts = {}
    for uri in pairs(uris) do
        counts[uri] = redis:get("rc:{nodes}:" .. uri)
    end
    return counts
end


-- Polls until Redis holds the logged totals (10 s at most).
local function settle(redis, expected)
    local got
    for _ = 1, 100 do
        got = counted(redis, expected)
        local same = true
        for uri, n in pairs(expected) do
            if got[uri] ~= n then
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


-- Crashes only: flushes failing while Redis is away are logged as errors.
local function crashes(srv)
    local found = {}
    for _, line in ipairs(srv:errors()) do
        if line:find("exited on signal") or line:find("panicked")
           or line:find("%[alert%]") or line:find("%[emerg%]")
        then
            found[#found + 1] = line
        end
    end
    return found
end


-- One GET: the status, the seconds it took and curl's output (headers
-- and body).
local function timed(srv, path)
    local out = nginx.read("curl -s -D - --max-time 5 -w "
                           .. "'\\ntime %{time_total}\\n' '"
                           .. srv:url(path) .. "'")
    return tonumber(out:match("HTTP/1.1 (%d+)")),
           tonumber(out:match("\ntime ([%d.]+)")), out
end


-- When the load on both nodes is over and both have stopped (QUIT: the
-- last flushes run from a timer), Redis (a server or a cluster) holds
-- exactly the counts of both access logs.
local function all_counted(runs, a, b, redis)
    for _, run in ipairs(runs) do
        load.wait(run)
    end
    a:stop()
    b:stop()

    local expected = logged(b, logged(a, {}))
    local total = 0
    for _, n in pairs(expected) do
        total = total + n
    end
    assert.is_true(total > 2000, "too little load: " .. total)
    assert.same(expected, settle(redis, expected))
    assert.same({}, crashes(a))
    assert.same({}, crashes(b))
end


local function cleanup(redis, a, b)
    for _, srv in ipairs({ a, b }) do
        if srv then
            srv:cleanup()
        end
    end
    redis:cleanup()
end


-- Both nodes under load on /limited (50 per 1 s window across all nodes):
-- no window of the two access logs together allows more, and the limit
-- was reached.
local function limit_holds(a, b)
    local runs = {
        load.start(a, "/limited", { seconds = 3 }),
        load.start(b, "/limited", { seconds = 3 }),
    }
    for _, run in ipairs(runs) do
        load.wait(run)
    end
    local per_window, allowed, rejected = {}, 0, 0
    for _, srv in ipairs({ a, b }) do
        for status, window in (nginx.read_file(srv.dir .. "/limited.log")
                               or ""):gmatch("(%d+) (%d+)\n") do
            if status == "200" then
                per_window[window] = (per_window[window] or 0) + 1
                allowed = allowed + 1
            else
                rejected = rejected + 1
            end
        end
    end
    assert.is_true(rejected > 1000, "the limit was never reached")
    local full = 0
    for window, n in pairs(per_window) do
        assert.is_true(n <= 50, "window " .. window .. ": " .. n)
        if n == 50 then
            full = full + 1
        end
    end
    assert.is_true(full >= 2, "no window filled up")
    assert.same({}, crashes(a))
    assert.same({}, crashes(b))
end


describe("lax and limit on Redis across two nodes", function()
    local redis, a, b

    before_each(function()
        -- Persistence, so that a restart keeps what Redis had applied.
        redis = redis_server.start({ conf = { "appendonly yes",
                                              "appendfsync always" } })
        a, b = node(redis.port), node(redis.port)
    end)

    after_each(function()
        cleanup(redis, a, b)
    end)

    it("use the stack's own lua-resty-redis", function()
        -- OpenResty's is resty.redis; Debian's the same library (0.27) as
        -- nginx.redis.
        local expected = nginx.stack.name == "openresty" and "resty.redis"
                         or "nginx.redis"
        assert.same({ 200, expected .. "\n" }, { a:get("/driver") })
    end)

    it("count every request of both nodes exactly, through a restart "
       .. "and a freeze of Redis", function()
        local runs = {
            load.start(a, "/hit", { seconds = 8, keys = 20 }),
            load.start(b, "/hit", { seconds = 8, keys = 20 }),
        }
        nginx.sleep(1.5)
        redis:stop()             -- unreachable: deltas wait in the workers
        nginx.sleep(3)
        redis:start_again()
        nginx.sleep(1)
        redis:freeze()           -- hung past the flush interval: timeouts
        nginx.sleep(0.8)         -- whose batches may or may not have run
        redis:thaw()
        all_counted(runs, a, b, redis)
    end)

    it("fail fast while Redis is stopped or hung: strict with a clear "
       .. "error, limits open or closed as chosen", function()
        assert.equal(200, (timed(a, "/strict")))
        for _, fault in ipairs({ "stop", "freeze" }) do
            redis[fault](redis)
            for _ = 1, 5 do
                local status, took, out = timed(a, "/strict")
                assert.equal(503, status, out)
                assert.is_true(took < 0.6, fault .. ": " .. took)
                if fault == "stop" then
                    assert.matches("redis connect to 127.0.0.1:%d+ failed",
                                   out)
                else
                    assert.matches("timeout", out)
                end
                status, took, out = timed(a, "/limited")
                assert.equal(429, status, out)      -- fails closed
                assert.is_true(took < 0.6, fault .. ": " .. took)
                status, took, out = timed(a, "/open")
                assert.equal(200, status, out)      -- fails open
                assert.matches("X%-Limit%-Error: ", out)
                assert.is_true(took < 0.6, fault .. ": " .. took)
            end
            if fault == "stop" then
                redis:start_again()
            else
                redis:thaw()
            end
            assert.equal(200, (timed(a, "/strict")))
        end
        assert.same({}, crashes(a))
    end)

    it("hold a fixed-window limit across both nodes", function()
        limit_holds(a, b)
    end)
end)


describe("lax, strict and limit on a Redis Cluster across two nodes",
         function()
    local cluster, a, b

    before_each(function()
        -- Persistence, so that a node's restart keeps what it had applied.
        cluster = redis_server.start_cluster({
            conf = { "appendonly yes", "appendfsync always" } })
        -- Each nginx knows one master, a different one, as its seed.
        a, b = node(cluster.ports[1]), node(cluster.ports[2])
    end)

    after_each(function()
        cleanup(cluster, a, b)
    end)

    it("count every request exactly through a slot's move and its new "
       .. "master's restart", function()
        local slot = tonumber(cluster:cli(1, "CLUSTER KEYSLOT nodes")
                              :match("%d+"))
        local from = cluster:owner(slot)
        local to = from % 3 + 1
        local runs = {
            load.start(a, "/hit", { seconds = 9, keys = 20 }),
            load.start(b, "/hit", { seconds = 9, keys = 20 }),
        }
        nginx.sleep(1.5)
        -- Migrating: new keys get ASK, batches mixing both sides TRYAGAIN.
        cluster:begin_move(slot, to)
        nginx.sleep(0.5)
        cluster:finish_move()        -- the routes learned are stale: MOVED
        nginx.sleep(1.5)

        -- The slot's master away: strict fails fast and says where, the
        -- lax deltas wait in the workers.
        cluster:stop_node(to)
        local status, took, out = timed(a, "/strict")
        assert.equal(503, status, out)
        assert.is_true(took < 0.6, out)
        assert.matches("127.0.0.1:" .. cluster.ports[to], out, 1, true)
        nginx.sleep(1.5)
        cluster:start_node(to)

        all_counted(runs, a, b, cluster)
        assert.equal(to, cluster:owner(slot))
    end)

    it("hold a fixed-window limit across both nodes", function()
        limit_holds(a, b)
    end)
end)
