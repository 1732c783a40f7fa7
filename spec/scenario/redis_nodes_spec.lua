-- Two nginx "nodes" (2 workers each) sharing one real redis-server on
-- loopback, under wrk load on both: the lax counts in Redis equal the
-- requests both access logs show, exactly, through a Redis restart in the
-- middle, a Redis that freezes past the flush interval and one that holds
-- every command (CLIENT PAUSE) past it; through HUP and QUIT with
-- requests in flight, with and without the exit line; a cluster-wide
-- fixed-window limit holds across both nodes. Then the same nodes on a
-- Redis Cluster of three masters, each given a different node as its
-- seed: exact through the counter's slot moving to another master and
-- that master stopping and coming back. Any [error] line in a node's log
-- fails a test, unless the test provokes it on purpose (its allow-list).

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"
local load = require "helpers.load"
local redis_server = require "helpers.redis"

local CONF = assert(nginx.read_file("spec/scenario/redis_nodes.conf"))
-- The lax counter's dict (REDIS_NODES_DICT=nil: lax.new(nil, ...), the
-- counts in each worker).
local DICT = os.getenv("REDIS_NODES_DICT") or '"nodes_lax"'


local EXIT_LINE = [[
exit_worker_by_lua_block {
    require("resty.counter.lax").flush_all()
}]]


-- The Redis client's read timeout, seconds: HUNG where a test hangs Redis
-- on purpose (its flushes time out, fail fast and are sent again), CALM
-- where none does, so that a slow fsync of Redis (appendfsync always, on
-- a busy machine) is not taken for a hang that logs [error] lines.
local HUNG = 0.2
local CALM = 2


-- A node on Redis at `port`, with docs/lax.md's exit line unless
-- `exit_line` is false, and the read timeout `read_timeout` (CALM by
-- default).
local function node(port, exit_line, read_timeout)
    return nginx.start({ workers = 2, http = CONF,
                         vars = { redis_port = port, lax_dict = DICT,
                                  read_timeout = read_timeout or CALM,
                                  exit_worker = exit_line == false and ""
                                                or EXIT_LINE } })
end


-- The [error] lines a test provokes on purpose, and why: Redis stopped
-- (and started again), Redis hung, a cluster's slot moved or master down.
local REDIS_STOPPED = {
    { "connect%(%) failed %(111: Connection refused%)",
      "Redis stopped on purpose: nginx logs the refused connect" },
    { "recv%(%) failed %(104: Connection reset by peer%)",
      "Redis stopped on purpose: nginx logs a reset pooled connection" },
    { "send%(%) failed %(32: Broken pipe%)",
      "Redis stopped on purpose: nginx logs a write to a closed one" },
    { "resty%.counter%.lax: flush to redis: redis connect to "
      .. "127%.0%.0%.1:%d+ failed: connection refused",
      "Redis stopped on purpose: the flush says so, its deltas wait" },
    { "resty%.counter%.lax: flush to redis: connection reset by peer",
      "Redis stopped on purpose: the flush's batch is kept by its id" },
    { "resty%.counter%.lax: flush to redis: broken pipe",
      "Redis stopped on purpose: the flush's batch is kept by its id" },
    { "resty%.counter%.lax: flush to redis: closed",
      "Redis stopped on purpose: the flush's batch is kept by its id" },
    { "resty%.counter%.lax: flush to redis: LOADING ",
      "Redis restarted on purpose: it refuses commands while it loads "
      .. "its append-only file; the batch is kept by its id" },
}
local REDIS_HUNG = {
    { "lua tcp socket read timed out",
      "Redis hung on purpose: nginx logs the read timeout" },
    { "resty%.counter%.lax: flush to redis: timeout",
      "Redis hung on purpose: the flush says so, its batch is kept" },
}


local CLUSTER_MOVES = {
    { "resty%.counter%.lax: flush to redis: TRYAGAIN ",
      "a slot migrating on purpose: a batch with keys on both sides is "
      .. "refused (nothing ran) until the move completes" },
    { "resty%.counter%.lax: flush to redis: CLUSTERDOWN ",
      "a master stopped on purpose: its slots are down until it is back" },
}


local function together(...)
    local all = {}
    for _, list in ipairs({ ... }) do
        for _, allow in ipairs(list) do
            all[#all + 1] = allow
        end
    end
    return all
end


-- Requests per URI in a node's access log.
local function logged(srv, into)
    for uri in (nginx.read_file(srv.dir .. "/access.log") or "")
               :gmatch("%d+ (%S+) %d+\n") do
        into[uri] = (into[uri] or 0) + 1
    end
    return into
end


-- Polls until Redis (a server or a cluster) holds the logged totals
-- (10 s at most).
local function settle(redis, expected)
    return redis_server.settle(redis, "rc:{nodes}:", expected)
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


-- Stops both nodes (QUIT: their workers' exit paths run) and checks that
-- neither logged an [error] line beyond `allowed`.
local function stop_clean(a, b, allowed)
    a:stop()
    b:stop()
    assert.same({}, a:unexpected_errors(allowed))
    assert.same({}, b:unexpected_errors(allowed))
end


-- When the load on both nodes is over and both have stopped (QUIT: the
-- last flushes run from a timer), Redis (a server or a cluster) holds
-- exactly the counts of both access logs, at least `least` requests.
local function all_counted(runs, a, b, redis, allowed, least)
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
    assert.is_true(total > (least or 2000), "too little load: " .. total)
    assert.same(expected, settle(redis, expected))
    stop_clean(a, b, allowed)
end


-- wrk on /hit (20 keys) on both nodes for `seconds`, and the runs given
-- after: every run for all_counted.
local function hit_both(a, b, seconds, ...)
    return { load.start(a, "/hit", { seconds = seconds, keys = 20 }),
             load.start(b, "/hit", { seconds = seconds, keys = 20 }), ... }
end


-- Load that keeps `connections` requests to /slow (0.5 s each) in flight
-- on a node at any moment, for `seconds`.
local function in_flight(srv, seconds, connections)
    return load.start(srv, "/slow", { seconds = seconds, threads = 1,
                                      connections = connections or 30 })
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
    stop_clean(a, b)
end


describe("lax and limit on Redis across two nodes", function()
    local redis, a, b

    -- a with docs/lax.md's exit line, b without; each test starts them
    -- with the read timeout it needs.
    local function start_nodes(read_timeout)
        a = node(redis.port, true, read_timeout)
        b = node(redis.port, false, read_timeout)
    end

    before_each(function()
        -- Persistence, so that a restart keeps what Redis had applied.
        redis = redis_server.start({ conf = { "appendonly yes",
                                              "appendfsync always" } })
    end)

    after_each(function()
        cleanup(redis, a, b)
        a, b = nil, nil
    end)

    it("use the stack's own lua-resty-redis", function()
        start_nodes()
        -- OpenResty's is resty.redis; Debian's the same library (0.27) as
        -- nginx.redis.
        local expected = nginx.stack.name == "openresty" and "resty.redis"
                         or "nginx.redis"
        assert.same({ 200, expected .. "\n" }, { a:get("/driver") })
    end)

    it("count every request of both nodes exactly, through a restart, "
       .. "a freeze and a pause of Redis", function()
        start_nodes(HUNG)
        local runs = hit_both(a, b, 9)
        nginx.sleep(1.5)
        redis:stop()             -- unreachable: deltas wait in the workers
        nginx.sleep(3)
        redis:start_again()
        nginx.sleep(1)
        redis:freeze()           -- hung past the flush interval: timeouts
        nginx.sleep(0.8)         -- whose batches ran once Redis woke up
        redis:thaw()
        nginx.sleep(1)
        -- Every command held 0.8 s (a failover's pause): flushes wait past
        -- their 0.2 s read timeout, four flush intervals, and Redis drops
        -- the batches of the connections they close: resent under their
        -- ids or lost.
        redis:pause(0.8)
        all_counted(runs, a, b, redis, together(REDIS_STOPPED, REDIS_HUNG))
    end)

    it("count every request in flight at HUP and at QUIT, with and "
       .. "without the exit line", function()
        start_nodes()
        -- One node at a time (both count /slow): a, then b.
        local expected = {}
        for _, srv in ipairs({ a, b }) do
            local run = in_flight(srv, 4)
            nginx.sleep(1.2)
            srv:signal("HUP")        -- 30 requests in flight
            nginx.sleep(1.5)
            srv:stop()               -- QUIT, 30 requests in flight
            load.wait(run)
            local before = expected["/slow"] or 0
            expected = logged(srv, expected)
            assert.is_true(expected["/slow"] - before >= 90,
                           "too few requests: " .. expected["/slow"])
            assert.same(expected, settle(redis, expected))
            assert.same({}, srv:unexpected_errors())
        end
    end)

    it("count every request of both nodes across 3 HUPs and a QUIT with "
       .. "requests in flight", function()
        start_nodes()
        local runs = hit_both(a, b, 5, in_flight(a, 5, 16),
                              in_flight(b, 5, 16))
        nginx.sleep(1.2)
        for _, srv in ipairs({ a, b, a }) do
            srv:signal("HUP")
            nginx.sleep(0.9)
        end
        -- QUIT both while the load (and its slow requests) still runs.
        all_counted(runs, a, b, redis)
    end)

    it("count every request when a node stops while Redis holds every "
       .. "command", function()
        start_nodes(HUNG)
        local runs = hit_both(a, b, 3, in_flight(a, 3, 16))
        nginx.sleep(1.5)
        -- The last flushes of a's exiting workers and b's running ones
        -- wait past their read timeout: resent until Redis answers.
        redis:pause(0.6)
        a:stop()
        all_counted(runs, a, b, redis, REDIS_HUNG, 1000)
    end)

    it("spool what could not reach a stopped Redis at exit, said in one "
       .. "line, and send it at the next start", function()
        start_nodes()
        local runs = hit_both(a, b, 1)
        for _, run in ipairs(runs) do
            load.wait(run)
        end
        b:stop()
        redis:stop()
        load.wait(load.start(a, "/hit", { seconds = 1, keys = 20 }))
        local started = os.time()
        a:stop()        -- each worker retries for exit_timeout (1 s)
        assert.is_true(os.time() - started <= 4, "slow to exit")

        -- On the engine the first worker to exit spools every worker's
        -- unsent counts; without it each worker spools its own.
        local spooled = 0
        for line in (a:error_log() .. "\n"):gmatch("([^\n]*)\n") do
            if line:find("[warn]", 1, true)
               and line:find("spooled to", 1, true)
            then
                spooled = spooled + 1
                assert.matches('resty.counter.lax: counter "nodes" on '
                               .. "redis: %d+ keys in %d+ batch%(es%) "
                               .. "spooled to .*/logs for the "
                               .. "next start of nginx %(last error: flush "
                               .. "to redis: redis connect to", line)
            end
        end
        assert.is_true(spooled >= 1 and spooled <= 2, spooled .. " lines")
        assert.same({}, a:unexpected_errors(REDIS_STOPPED))

        redis:start_again()
        a:start_again()
        local expected = logged(b, logged(a, {}))
        assert.same(expected, settle(redis, expected))
        -- (a's log holds its first run's lines too.)
        stop_clean(a, b, REDIS_STOPPED)
    end)

    it("fail fast while Redis is stopped or hung: strict with a clear "
       .. "error, limits open or closed as chosen", function()
        start_nodes(HUNG)
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
        stop_clean(a, b, together(REDIS_STOPPED, REDIS_HUNG))
    end)

    it("hold a fixed-window limit across both nodes", function()
        start_nodes()
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
        local runs = hit_both(a, b, 9)
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

        all_counted(runs, a, b, cluster,
                    together(REDIS_STOPPED, CLUSTER_MOVES))
        assert.equal(to, cluster:owner(slot))
    end)

    it("hold a fixed-window limit across both nodes", function()
        limit_holds(a, b)
    end)
end)
