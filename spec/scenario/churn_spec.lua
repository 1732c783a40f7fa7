-- Request keys churning under load for longer than the engine could hold
-- them without reuse: idle keys expire, their records are reused, no
-- request goes to the overflow key, and every key still tracked at the end
-- is exact against the access log.

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"
local requests_http = require "helpers.requests_http"
local load = require "helpers.load"

local CONF = assert(nginx.read_file("spec/scenario/churn.conf"))

-- Three new keys a second for this long: some 90 keys, against some 66
-- records the engine holds. Each is idle 5 s after its second, removed by
-- the next scrape and its record reused 10 s later: some 50 records in
-- use at a time.
local SECONDS = 30


describe("request keys churning under load", function()
    local srv

    after_each(function()
        if srv then
            srv:cleanup()
        end
    end)

    it("run in bounded memory and stay exact", function()
        srv = nginx.start({ workers = 2, http = CONF })
        local run = load.start(srv, "/churn", { seconds = SECONDS, keys = 3,
                                                connections = 8 })
        local peak = 0
        -- Scrapes every half second, as Prometheus would (faster), until
        -- the load's last seconds: its last keys are left to check.
        local stop = os.time() + SECONDS - 2
        while os.time() < stop do
            nginx.sleep(0.5)
            requests_http.scraped(srv, "request_churn")
            local stats = requests_http.engine_stats(srv)
            peak = math.max(peak, stats.keys + stats.free)
        end
        load.wait(run)
        nginx.sleep(0.3)    -- the last requests log after their responses

        local expected, sent = requests_http.logged(srv)
        local got, text = requests_http.scraped(srv, "request_churn")
        local stats = requests_http.engine_stats(srv)
        local keys_made = 0
        for key in pairs(expected) do
            if key:match("^/k/") then
                keys_made = keys_made + 1
            end
        end
        local record_bytes = stats.used_bytes / (stats.keys + stats.free)

        assert.is_true(sent > 10000, "too little load: " .. sent)
        -- More keys than the engine holds without reuse.
        assert.is_true(keys_made * record_bytes > stats.arena_bytes,
                       keys_made .. " keys of " .. record_bytes .. " bytes")
        -- All but the last seconds' keys (idle 5 s, scraped every 0.5 s).
        assert.is_true(stats.removed >= keys_made - 30, stats.removed
                       .. " removed of " .. keys_made)
        assert.is_true(stats.reused > 0)
        assert.equal(0, stats.refused)
        -- Records in use or waiting for reuse, at most: what the arena
        -- holds, never more keys than it.
        assert.is_true(peak < keys_made, "peak " .. peak .. " records")
        assert.is_true(peak * record_bytes <= stats.arena_bytes)
        -- Nothing overflowed: every request had a key of its own.
        assert.is_nil(got._overflow)
        -- The keys still tracked (the last seconds') are exact.
        local live = 0
        for key, n in pairs(got) do
            live = live + 1
            assert.equal(expected[key], n, key)
        end
        assert.is_true(live >= 3, live .. " keys left: " .. text:sub(1, 600))
        srv:stop()
        assert.same({}, srv:unexpected_errors())
    end)
end)
