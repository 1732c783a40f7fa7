-- Graceful reload (HUP) and shutdown (QUIT) under load, with handlers that
-- sleep so that requests are in flight at each signal: 0 counts lost
-- against the access log. Relies on the final syncs of the premature timer
-- tick and of exit_worker_by_lua (spec/scenario/counting.conf).

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"
local load = require "helpers.load"

local CONF = assert(nginx.read_file("spec/scenario/counting.conf"))


local function start_load(srv, seconds)
    return {
        load.start(srv, "/fast", { seconds = seconds, keys = 20 }),
        load.start(srv, "/slow", { seconds = seconds, keys = 5,
                                   threads = 1, connections = 16 }),
    }
end


local function wait_all(runs)
    for _, run in ipairs(runs) do
        load.wait(run)
    end
end


describe("resty.counter across signals", function()
    local srv

    after_each(function()
        if srv then
            srv:cleanup()
        end
    end)

    it("loses 0 counts over 10 HUP reloads under load", function()
        srv = nginx.start({ workers = 2, http = CONF })
        local runs = start_load(srv, 7)
        nginx.sleep(1)
        for _ = 1, 10 do
            srv:signal("HUP")
            nginx.sleep(0.5)
        end
        wait_all(runs)

        local logged, counted = load.settle(srv, 15)
        local per_uri = load.logged(srv)
        assert.is_true(logged > 1000, "too little load")
        assert.is_true((per_uri["/slow?k=1"] or 0) > 10, "no slow requests")
        local exits = 0
        while nginx.read_file(srv.dir .. "/final." .. (exits + 1)) do
            exits = exits + 1
        end
        assert.is_true(exits >= 20, "old workers did not exit: " .. exits)
        assert.equal(logged, counted)
        assert.same(per_uri, (load.counted(srv)))
        srv:stop()          -- QUIT: the exit paths log too
        assert.same({}, srv:unexpected_errors())
    end)

    it("loses 0 counts on QUIT under load", function()
        srv = nginx.start({ workers = 2, http = CONF })
        local runs = start_load(srv, 4)
        nginx.sleep(2)
        srv:stop()          -- QUIT: in-flight requests finish first
        assert.is_true(srv:wait_exit(15), "nginx did not exit")
        wait_all(runs)

        local _, logged = load.logged(srv)
        -- The worker that exited last wrote the highest-numbered file.
        local n = 0
        while nginx.read_file(srv.dir .. "/final." .. (n + 1)) do
            n = n + 1
        end
        assert.equal(2, n, "both workers ran exit_worker")
        local final = tonumber(nginx.read_file(srv.dir .. "/final." .. n))
        assert.is_true(logged > 500, "too little load")
        assert.equal(logged, final)
        assert.same({}, srv:unexpected_errors())
    end)
end)
