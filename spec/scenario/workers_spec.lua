-- Several workers counting under load: the dict holds exactly what the
-- access log says was served, key by key.

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"
local load = require "helpers.load"

local CONF = assert(nginx.read_file("spec/scenario/counting.conf"))


describe("resty.counter with 4 workers under load", function()
    local srv

    after_each(function()
        if srv then
            srv:cleanup()
        end
    end)

    it("adds up every worker's counts exactly, per key", function()
        srv = nginx.start({ workers = 4, http = CONF })
        local run = load.start(srv, "/fast", { seconds = 3, keys = 50,
                                               connections = 32 })
        local report = load.wait(run)
        local logged, counted = load.settle(srv, 10)

        local per_uri_logged, _, pids = load.logged(srv)
        local per_uri_counted = load.counted(srv)
        assert.is_true(logged > 1000, "wrk sent too little: " .. report)
        local served_by = 0
        for _ in pairs(pids) do
            served_by = served_by + 1
        end
        assert.is_true(served_by >= 2, "requests reached one worker only")
        assert.equal(logged, counted)
        assert.same(per_uri_logged, per_uri_counted)
        srv:stop()          -- QUIT: the exit paths log too
        assert.same({}, srv:unexpected_errors())
    end)
end)
