-- Lax counters on Redis in the shared engine (one node of 2 workers, a
-- real redis-server on loopback, wrk): the counts in Redis equal the
-- requests of the access log when workers are killed with SIGKILL under
-- load, at a HUP with requests in flight and no exit_worker_by_lua_block,
-- at QUIT with requests in flight and docs/lax.md's exit line, over 20
-- HUPs in quick succession (the engine's keys bounded), and at TERM and at
-- QUIT with Redis paused, where the exit line spools what it cannot send
-- and the next start sends it. Any [error] line fails a test, and the
-- [warn] lines are matched. LAX_ENGINE_DICT=nil runs the same on lax's
-- per-worker pending table (no dict), for the comparison.

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"
local load = require "helpers.load"
local redis_server = require "helpers.redis"

local CONF = assert(nginx.read_file("spec/scenario/lax_engine.conf"))
local DICT = os.getenv("LAX_ENGINE_DICT") or '"lax_engine"'

local EXIT_LINE = [[
exit_worker_by_lua_block {
    require("resty.counter.lax").flush_all()
}]]


local function node(port, exit_line)
    return nginx.start({ workers = 2, http = CONF,
                         vars = { redis_port = port, dict = DICT,
                                  exit_worker = exit_line and EXIT_LINE
                                                or "" } })
end


-- Redis' count of each URI of `expected`, polled until equal (10 s at
-- most); how many requests of the access log Redis lacks (lost) and has
-- beyond it (extra).
local function compare(redis, expected)
    local got = redis_server.settle(redis, "rc:{laxe}:", expected)
    local lost, extra = 0, 0
    for uri, n in pairs(expected) do
        local diff = n - (tonumber(got[uri]) or 0)
        if diff > 0 then
            lost = lost + diff
        else
            extra = extra - diff
        end
    end
    return lost, extra, got
end


local function logged_total(per_uri)
    local total = 0
    for _, n in pairs(per_uri) do
        total = total + n
    end
    return total
end


-- The spool's files (in the prefix's logs/), by path.
local function spool_files(srv)
    local out = nginx.read("ls " .. srv.dir .. "/logs/ | grep '[.]spool$' "
                           .. "|| true")
    local files = {}
    for name in out:gmatch("[^\n]+") do
        files[#files + 1] = srv.dir .. "/logs/" .. name
    end
    return files
end


-- True once the spool is empty (5 s at most).
local function wait_no_spool(srv)
    for _ = 1, 50 do
        if #spool_files(srv) == 0 then
            return true
        end
        nginx.sleep(0.1)
    end
    return false
end


-- The [warn] lines the spool gives at a worker's exit.
local SPOOLED_AT_EXIT = '%[warn%].* counter "laxe" on redis: %d+ keys in '
    .. '%d+ batch%(es%) spooled to .*/logs for the next start of nginx '
    .. '%(no flush can run at this exit%)'
local SPOOLED_AFTER_ERROR = '%[warn%].* counter "laxe" on redis: %d+ keys '
    .. 'in %d+ batch%(es%) spooled to .*/logs for the next start of nginx '
    .. '%(last error: flush to redis: timeout'


-- The [warn] of a counter on Redis without a dict (LAX_ENGINE_DICT=nil).
local NIL_FORM = '%[warn%].* counter "laxe" on redis counts in each worker'


-- The error log's [warn] lines are exactly `pattern`'s (at least one),
-- and the nil form's.
local function assert_warns(srv, pattern)
    local matched, others = 0, {}
    for line in ((srv:error_log() or "") .. "\n"):gmatch("([^\n]*)\n") do
        if line:find(pattern) then
            matched = matched + 1
        elseif line:find("[warn]", 1, true)
               and not (DICT == "nil" and line:find(NIL_FORM))
        then
            others[#others + 1] = line
        end
    end
    assert.same({}, others)
    assert.is_true(matched > 0, "no line like " .. pattern)
end


-- Starts the stopped node again: the spool is sent, and Redis equals the
-- access log's `expected` exactly, the spool gone.
local function start_again_exact(srv, redis, expected, what)
    srv:start_again()
    local lost, extra = compare(redis, expected)
    print(string.format("%s: %d requests logged, then %d lost, %d extra",
                        what, logged_total(expected), lost, extra))
    assert.equal(0, lost)
    assert.equal(0, extra)
    assert.is_true(wait_no_spool(srv), "the spool is still there")
    srv:stop()
end


-- Load that keeps `connections` requests to /slow (0.5 s each) in flight
-- for `seconds`.
local function in_flight(srv, seconds, connections)
    return load.start(srv, "/slow", { seconds = seconds, threads = 1,
                                      connections = connections or 30 })
end


-- Load on /hit and 30 requests to /slow in flight for `seconds`, started
-- `after` seconds ago.
local function under_load(srv, seconds, after)
    local runs = { load.start(srv, "/hit", { seconds = seconds, keys = 10 }),
                   in_flight(srv, seconds) }
    nginx.sleep(after)
    return runs
end


-- The requests of the access log, per URI, once the load has ended.
local function load_over(srv, runs)
    for _, run in ipairs(runs) do
        load.wait(run)
    end
    return load.logged(srv)
end


describe("lax on Redis in the shared engine", function()
    local redis, srv

    before_each(function()
        redis = redis_server.start()
    end)

    after_each(function()
        if srv then
            srv:cleanup()
        end
        redis:cleanup()
    end)

    it("loses 0 counts when workers are killed with SIGKILL", function()
        srv = node(redis.port, true)
        local run = load.start(srv, "/hit", { seconds = 5, keys = 10 })
        srv:kill_workers(3, 1.2)
        load.wait(run)
        local expected = load.logged(srv)
        local total = logged_total(expected)
        assert.is_true(total > 1000, "too little load: " .. total)
        -- The request a worker serves when it is killed is in the access
        -- log or in the count (two handlers of the log phase), not both:
        -- one per kill, either way. Anything beyond is a loss.
        local lost, extra = compare(redis, expected)
        print(string.format("SIGKILL x3: %d requests logged, %d lost, "
                            .. "%d extra (dict %s)", total, lost, extra,
                            DICT))
        assert.is_true(lost + extra <= 3, lost .. " lost, " .. extra
                       .. " extra of " .. total)
        srv:stop()
        local errors = srv:errors_but_kills()
        assert.same({}, errors)
    end)

    it("loses 0 counts of requests in flight at a HUP without an exit "
       .. "hook, and at QUIT with the exit line", function()
        for _, exit_line in ipairs({ false, true }) do
            srv = node(redis.port, exit_line)
            local run = load.start(srv, "/hit", { seconds = 3, keys = 10 })
            local slow = in_flight(srv, 3)
            nginx.sleep(1.2)
            srv:signal("HUP")        -- 30 requests in flight
            nginx.sleep(1.2)
            if exit_line then
                srv:stop()           -- QUIT, 30 requests in flight
            end
            load.wait(run)
            load.wait(slow)
            if not exit_line then
                nginx.sleep(0.3)
                srv:stop()
            end
            local expected = load.logged(srv)
            assert.is_true(expected["/slow"] >= 90,
                           "too few requests in flight: "
                           .. tostring(expected["/slow"]))
            local lost, extra = compare(redis, expected)
            assert.equal(0, lost)
            assert.equal(0, extra)
            assert.same({}, srv:unexpected_errors())
            srv:cleanup()
            srv = nil
            assert(redis:cli("flushall"))
        end
    end)

    it("loses 0 counts over 20 HUPs in quick succession, engine bounded",
       function()
        srv = node(redis.port, false)
        local run = load.start(srv, "/hit", { seconds = 5, keys = 20 })
        local slow = in_flight(srv, 5, 16)
        nginx.sleep(0.5)
        srv:reloads(20, 0.1)
        load.wait(run)
        load.wait(slow)
        nginx.sleep(0.5)
        local expected = load.logged(srv)
        assert.is_true(logged_total(expected) > 1000, "too little load")
        local lost, extra = compare(redis, expected)
        assert.equal(0, lost)
        assert.equal(0, extra)
        if DICT ~= "nil" then
            -- One record per key (20 /hit, 1 /slow) and the journal,
            -- whatever the reloads did; nothing unsent, nothing refused.
            local _, body = srv:get("/engine")
            local unsent, keys, refused = body:match("^(%d+) (%d+) (%d+)")
            assert.equal(0, tonumber(unsent))
            assert.equal(22, tonumber(keys))
            assert.equal(0, tonumber(refused))
        end
        srv:stop()
        assert.same({}, srv:unexpected_errors())
    end)

    it("loses 0 counts at TERM with requests in flight and the exit line: "
       .. "the spool, sent by the next start", function()
        -- TERM is nginx's fast shutdown: each worker exits at once, its
        -- requests in flight cut (in neither the access log nor the
        -- count), no timer runs again, and exit_worker_by_lua has no
        -- cosocket. The exit line spools what the last flushes had not
        -- sent (the prefix's logs/); the next start sends it.
        srv = node(redis.port, true)
        local runs = under_load(srv, 3, 1.2)
        srv.last_pid = srv:pid()
        srv:signal("TERM")
        assert.is_true(srv:wait_exit(10), "nginx did not exit at TERM")
        local expected = load_over(srv, runs)

        -- Before the next start Redis lacks what was spooled.
        local files = spool_files(srv)
        assert.is_true(#files > 0, "nothing spooled")
        for _, file in ipairs(files) do
            assert.equal("600\n", nginx.read("stat -c %a " .. file))
        end
        local missing = 0
        for uri, n in pairs(expected) do
            missing = missing + n - (tonumber(redis:get("rc:{laxe}:" .. uri))
                                     or 0)
        end
        assert.is_true(missing > 0, "nothing was left to spool")

        start_again_exact(srv, redis, expected, string.format(
            "TERM (%d counts in %d spool file(s))", missing, #files))
        assert.same({}, srv:unexpected_errors())
        assert_warns(srv, SPOOLED_AT_EXIT)
    end)

    it("loses 0 counts at QUIT while Redis is paused: the spool, sent by "
       .. "the next start", function()
        srv = node(redis.port, true)
        local runs = under_load(srv, 2, 1)
        redis:freeze()
        nginx.sleep(0.3)
        srv:stop()                   -- QUIT, 30 requests in flight
        local expected = load_over(srv, runs)
        local files = spool_files(srv)
        redis:thaw()
        assert.is_true(expected["/slow"] >= 30, "too few requests in "
                       .. "flight: " .. tostring(expected["/slow"]))
        assert.is_true(#files > 0, "nothing spooled")

        start_again_exact(srv, redis, expected, string.format(
            "QUIT, Redis paused (%d spool file(s))", #files))
        -- The flushes that timed out while Redis was paused, said.
        assert.same({}, srv:unexpected_errors({
            { "flush to redis: timeout", "Redis paused on purpose" },
            { "lua tcp socket read timed out", "nginx's own line for each "
              .. "of those flushes" },
            { "flush to redis: the spooled batch .* %(sent again later%): "
              .. "timeout", "Redis resumed on purpose: busy a moment with "
              .. "what waited; the file stays for the next flush" },
        }))
        assert_warns(srv, SPOOLED_AFTER_ERROR)
    end)
end)
