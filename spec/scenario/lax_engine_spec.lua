-- Lax counters on Redis in the shared engine (one node of 2 workers, a
-- real redis-server on loopback, wrk): the counts in Redis equal the
-- requests of the access log when workers are killed with SIGKILL under
-- load, at a HUP with requests in flight and no exit_worker_by_lua_block,
-- at QUIT with requests in flight and docs/lax.md's exit line, and over
-- 20 HUPs in quick succession (the engine's keys bounded). Any [error]
-- line fails a test. LAX_ENGINE_DICT=nil runs the same on lax's
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


-- Load that keeps `connections` requests to /slow (0.5 s each) in flight
-- for `seconds`.
local function in_flight(srv, seconds, connections)
    return load.start(srv, "/slow", { seconds = seconds, threads = 1,
                                      connections = connections or 30 })
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
    it("says what TERM with requests in flight loses", function()
        -- TERM is nginx's fast shutdown: each worker exits at once, its
        -- requests in flight cut (in neither the access log nor the
        -- count), no timer runs again, and exit_worker_by_lua has no
        -- cosocket. What the last flushes had not sent stays in the
        -- engine and goes with the master: at most the counts of the last
        -- allowed_lag (50 ms here) plus one flush's time. Measured, not
        -- hidden; QUIT loses nothing (above).
        srv = node(redis.port, true)
        local run = load.start(srv, "/hit", { seconds = 3, keys = 10 })
        local slow = in_flight(srv, 3)
        nginx.sleep(1.2)
        local pid = srv:pid()
        srv.last_pid = pid
        srv:signal("TERM")
        assert.is_true(srv:wait_exit(10), "nginx did not exit at TERM")
        load.wait(run)
        load.wait(slow)
        local expected = load.logged(srv)
        local total = logged_total(expected)
        local lost, extra = compare(redis, expected)
        print(string.format("TERM: %d requests logged, %d lost, %d extra",
                            total, lost, extra))
        assert.equal(0, extra)
        -- The last 50 ms at this load rate, twice over.
        assert.is_true(lost <= total / 1.2 * 0.1, lost .. " lost of "
                       .. total)
        assert.same({}, srv:unexpected_errors())
    end)
end)
