-- The greencheek drop-in with 4 workers under wrk load, with 5 HUP reloads
-- while slow requests are in flight: each window's request count per key
-- equals the access log's, exactly.

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"
local load = require "helpers.load"
local json = require "dkjson"

local CONF = assert(nginx.read_file("spec/scenario/requests.conf"))


-- { [window start] = { [uri] = n, all = n } } from the access log.
local function logged(srv)
    local per_window, total = {}, 0
    local f = io.open(srv.dir .. "/access.log")
    if f then
        for line in f:lines() do
            local start, uri = line:match("^(%d+) (%S+)$")
            if start then
                local w = per_window[tonumber(start)] or { all = 0 }
                per_window[tonumber(start)] = w
                w[uri] = (w[uri] or 0) + 1
                w.all = w.all + 1
                total = total + 1
            end
        end
        f:close()
    end
    return per_window, total
end


-- The same shape from /stats, and the total under "all".
local function counted(srv)
    local status, body = srv:get("/stats")
    assert(status == 200, "GET /stats failed: " .. tostring(status))
    local doc = assert(json.decode(body), "not JSON: " .. body)
    local per_window, total = {}, 0
    for key, windows in pairs(doc.stats) do
        for _, period in pairs(windows) do
            if period.requests > 0 then
                local start = period.startofminute_epoch
                per_window[start] = per_window[start] or {}
                per_window[start][key] = period.requests
                if key == "all" then
                    total = total + period.requests
                end
            end
        end
    end
    return per_window, total, doc
end


describe("resty.greencheek.request.counter under load", function()
    local srv

    after_each(function()
        if srv then
            srv:cleanup()
        end
    end)

    it("counts every request of 4 workers across 5 HUP reloads", function()
        srv = nginx.start({ workers = 4, http = CONF })
        local runs = {
            load.start(srv, "/fast", { seconds = 5 }),
            load.start(srv, "/slow", { seconds = 5, threads = 1,
                                       connections = 16 }),
        }
        nginx.sleep(1)
        for _ = 1, 5 do
            srv:signal("HUP")
            nginx.sleep(0.6)
        end
        for _, run in ipairs(runs) do
            load.wait(run)
        end

        local expected, sent = logged(srv)
        local got, total, doc
        -- (The last requests log after their responses: a short poll.)
        for _ = 1, 100 do
            got, total, doc = counted(srv)
            if total >= sent then
                break
            end
            nginx.sleep(0.1)
        end
        assert.is_true(sent > 1000, "too little load: " .. sent)
        assert.is_true(((expected[next(expected)] or {})["/slow"] or 0) > 10,
                       "no slow requests")
        assert.same(expected, got)
        assert.equal(sent, total)
        assert.equal(2, doc.key_info.tracked)   -- /fast and /slow

        -- The same numbers in the Prometheus text.
        local status, text = srv:get("/metrics")
        assert.equal(200, status)
        local all = text:match('resty_requests_total{dict="request_'
                               .. 'stats",key="all"} (%d+)')
        assert.equal(sent, tonumber(all))
        srv:stop()          -- QUIT: the exit paths log too
        assert.same({}, srv:unexpected_errors())
    end)
end)
