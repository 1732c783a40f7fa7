-- resty.counter and a lax counter on one node, on the shared engine, with
-- the configuration Kong's lua-resty-counter documents (no
-- exit_worker_by_lua_block): requests in flight at a reload, reloads in
-- quick succession and workers killed with SIGKILL lose 0 counts against
-- the access log, and each value is exact the moment the load stops,
-- whichever worker is asked.

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"
local load = require "helpers.load"

local CONF = assert(nginx.read_file("spec/scenario/engine.conf"))

-- The counters on the engine that count at once, no flush to wait for:
-- how the config makes one, and its method that counts.
local COUNTERS = {
    { name = "resty.counter",
      new = 'require("resty.counter").new("counters", 0.1)',
      count = "incr" },
    { name = "a lax counter on one node",
      new = 'require("resty.counter.lax").new("counters", { name = "c" })',
      count = "inc" },
}


-- Sends `n` requests to /slow?s=<seconds>&i=<i> in the background with
-- curl; returns a function that waits for them all.
local function in_flight(srv, n, seconds)
    local out = srv.dir .. "/in-flight"
    nginx.sh("mkdir -p " .. out)
    for i = 1, n do
        nginx.sh(string.format("curl -s -o /dev/null --max-time 20 '%s' & "
                               .. "echo $! > %s/%d.pid",
                               srv:url("/slow?s=" .. seconds .. "&i=" .. i),
                               out, i))
    end
    return function()
        for i = 1, n do
            local pid = nginx.read_file(out .. "/" .. i .. ".pid"):match("%d+")
            for _ = 1, 250 do
                if not nginx.sh("kill -0 " .. pid .. " 2>/dev/null") then
                    break
                end
                nginx.sleep(0.1)
            end
        end
    end
end


-- Every URI of the access log against the engine's value for it, asked
-- once, right after the load: no settling, no sync awaited. With `slack`,
-- the per-URI differences may add up to that many (see the SIGKILL spec).
local function assert_exact(srv, slack)
    local per_uri, logged = load.logged(srv)
    local uris = {}
    for uri in pairs(per_uri) do
        uris[#uris + 1] = (uri:gsub("&", "%%26"))
    end
    local status, body = srv:get("/exact?uris=" .. table.concat(uris, ","))
    assert.equal(200, status)
    local counted = {}
    for uri, value in body:gmatch("(%S+) (%S+)") do
        counted[uri] = tonumber(value)
    end
    if not slack then
        assert.same(per_uri, counted)
        return logged
    end
    local off = 0
    for uri, n in pairs(per_uri) do
        off = off + math.abs(n - (counted[uri] or 0))
    end
    for uri in pairs(counted) do
        if not per_uri[uri] then
            off = off + counted[uri]
        end
    end
    assert.is_true(off <= slack, off .. " off the access log")
    return logged
end


for _, counter in ipairs(COUNTERS) do
    describe(counter.name .. " on the shared engine, Kong's configuration",
             function()
        local srv
        local function start()
            return nginx.start({ workers = 2, http = CONF,
                                 vars = { counter_new = counter.new,
                                          count = counter.count } })
        end

        after_each(function()
            if srv then
                srv:cleanup()
            end
        end)

        it("loses 0 counts of requests in flight at a reload", function()
            srv = start()
            local run = load.start(srv, "/fast", { seconds = 3, keys = 10 })
            nginx.sleep(0.5)
            local wait = in_flight(srv, 30, 0.5)
            nginx.sleep(0.2)
            local before = srv:worker_pids()
            srv:signal("HUP")
            wait()
            load.wait(run)
            nginx.sleep(0.3)

            -- The old workers exited after their requests finished.
            for _, pid in ipairs(before) do
                assert.is_false(nginx.sh("kill -0 " .. pid .. " 2>/dev/null"),
                                "old worker " .. pid .. " still runs")
            end
            local per_uri, logged = load.logged(srv)
            local slow = 0
            for uri, n in pairs(per_uri) do
                if uri:find("^/slow") then
                    slow = slow + n
                end
            end
            assert.equal(30, slow, "every request in flight was served")
            assert.is_true(logged > 1000, "too little load")
            assert_exact(srv)
            srv:stop()          -- QUIT: the exit paths log too
            assert.same({}, srv:unexpected_errors())
        end)

        it("loses 0 counts over 20 reloads in quick succession", function()
            srv = start()
            local run = load.start(srv, "/fast", { seconds = 5, keys = 20 })
            local slow = load.start(srv, "/slow", { seconds = 5, keys = 5,
                                                    threads = 1,
                                                    connections = 16 })
            nginx.sleep(0.5)
            srv:reloads(20, 0.1)
            load.wait(run)
            load.wait(slow)
            nginx.sleep(0.5)

            assert.is_true(assert_exact(srv) > 1000, "too little load")
            -- Memory: one record per key, whatever the reloads did.
            local _, body = srv:get("/engine")
            local keys, refused = body:match("^(%d+) (%d+)")
            assert.equal(25, tonumber(keys))
            assert.equal(0, tonumber(refused))
            -- The old workers are gone: two remain.
            for _ = 1, 100 do
                if #srv:worker_pids() == 2 then
                    break
                end
                nginx.sleep(0.1)
            end
            assert.equal(2, #srv:worker_pids())
            srv:stop()          -- QUIT: the exit paths log too
            assert.same({}, srv:unexpected_errors())
        end)

        it("loses 0 counts when workers are killed with SIGKILL", function()
            srv = start()
            local run = load.start(srv, "/fast", { seconds = 5, keys = 10 })
            srv:kill_workers(3, 1.2)
            load.wait(run)
            nginx.sleep(0.5)
            -- The request a worker serves when it is killed may be in the
            -- access log or in the count (two handlers of the log phase), not
            -- both: one per kill, either way. Anything beyond is a loss.
            assert.is_true(assert_exact(srv, 3) > 1000, "too little load")
            -- The master reports each kill; nothing else may be logged, the
            -- exit paths included.
            srv:stop()
            local errors = srv:errors_but_kills()
            assert.same({}, errors)
        end)
    end)
end
