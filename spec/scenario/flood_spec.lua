-- A flood of one-hit request keys cannot hide a real key (issue 12, part
-- 3): 50,000 distinct keys, then 17,619 requests of "login" each after
-- another new key, from wrk over 2 workers. "login" is admitted past the
-- full max_keys and counts at least 99% of its requests (the rest within
-- its error bound), every request is counted under some key or the
-- overflow key, and key_info reports the flood.

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"
local requests_http = require "helpers.requests_http"

local CONF = assert(nginx.read_file("spec/scenario/flood.conf"))

local FLOOD = 50000
local LOGIN = 17619
local THREADS = 2

-- Each wrk thread sends its share of the flood, then its share of login
-- requests each after one more flood key, then requests that record
-- nothing (/) until the run's end: the counts are exact, whatever the
-- speed.
local SCRIPT = [[
local threads = 0
function setup(thread)
    thread:set("id", threads)
    threads = threads + 1
end

local flood, login, n
function init()
    local share = function(total)
        return math.floor(total / %d) + (id < total %% %d and 1 or 0)
    end
    flood, login, n = share(%d), share(%d), 0
end

function request()
    n = n + 1
    if n <= flood then
        return wrk.format(nil, "/hit?k=f" .. id .. "-" .. n)
    end
    local i = n - flood
    if i <= 2 * login then
        if i %% 2 == 0 then
            return wrk.format(nil, "/hit?k=login")
        end
        return wrk.format(nil, "/hit?k=g" .. id .. "-" .. i)
    end
    return wrk.format(nil, "/")
end
]]


local function gauge(text, name, key)
    local labels = 'dict="request_flood"' .. (key and ',key="' .. key .. '"'
                                                  or "")
    local value = text:match(name .. "{" .. labels:gsub("%p", "%%%0")
                             .. "} (%d+)")
    return tonumber(value)
end


describe("a flood of one-hit request keys", function()
    local srv

    after_each(function()
        if srv then
            srv:cleanup()
        end
    end)

    it("cannot hide a real key", function()
        srv = nginx.start({ workers = 2, http = CONF })
        local script = srv.dir .. "/flood.lua"
        local f = assert(io.open(script, "w"))
        f:write(SCRIPT:format(THREADS, THREADS, FLOOD, LOGIN))
        f:close()
        local out = srv.dir .. "/wrk.out"
        -- Enough time for every thread's share at a few thousand
        -- requests a second (a shared, noisy machine).
        assert(nginx.sh(string.format(
            "wrk -t%d -c%d -d30s --timeout 5s -s %s %s > %s 2>&1",
            THREADS, 2 * THREADS, script, srv:url("/"), out)))
        nginx.sleep(0.3)    -- the last requests log after their responses

        local expected, sent = requests_http.logged(srv)
        assert.equal(LOGIN, expected.login,
                     "wrk did not send them all: " .. nginx.read_file(out))
        -- wrk may take a thread's first request() for its template: a
        -- flood key fewer a thread at most.
        assert.is_true(sent >= FLOOD + LOGIN * 2 - THREADS, sent)

        local got, text = requests_http.scraped(srv, "request_flood")
        -- Every request is counted under its key or the overflow key.
        local counted = 0
        for _, n in pairs(got) do
            counted = counted + n
        end
        local off = {}
        for key, n in pairs(got) do
            if n ~= expected[key] and #off < 10 then
                off[#off + 1] = key .. " " .. n .. " of "
                                .. tostring(expected[key])
            end
        end
        assert.equal(sent, counted, table.concat(off, ", "))
        -- Keys tracked are exact, but for "login" (admitted: its first
        -- requests went to the overflow key).
        for key, n in pairs(got) do
            if key ~= "login" and key ~= "_overflow" then
                assert.equal(expected[key], n, key)
            end
        end

        -- "login" has 99% of its requests or more, the rest within its
        -- error bound.
        local login = got.login or 0
        local error = gauge(text, "resty_requests_admission_error", "login")
        assert.is_true(login >= 0.99 * LOGIN, "login counted " .. login
                       .. " of " .. LOGIN)
        assert.is_not_nil(error, "no error bound for login")
        assert.is_true(login <= LOGIN and LOGIN - login <= error,
                       "login " .. login .. ", error " .. error)

        -- The flood, reported in Prometheus and in the JSON's key_info.
        local refused = gauge(text, "resty_requests_refused_requests")
        local refused_keys = gauge(text, "resty_requests_refused_keys")
        local evicted = gauge(text, "resty_requests_evicted_keys")
        assert.is_true(refused >= FLOOD + LOGIN - 1000 - LOGIN, refused)
        assert.is_true(refused_keys >= 0.9 * (FLOOD + LOGIN - 1000),
                       refused_keys)
        local status, json = srv:get("/stats")
        assert.equal(200, status)
        local info = json:match('"key_info":(%b{})')
        assert.is_not_nil(info, json:sub(-600))
        assert.equal(refused, tonumber(info:match('"refused_requests":(%d+)')))
        assert.equal(evicted, tonumber(info:match('"evicted_keys":(%d+)')))
        assert.equal(1000, tonumber(info:match('"tracked":(%d+)')))
        assert.equal(error, tonumber(info:match('"login":(%d+)')))

        -- One-hit keys churned (almost) no record: memory stays bounded.
        local stats = requests_http.engine_stats(srv)
        assert.is_true(evicted <= 10, evicted .. " evicted")
        assert.is_true(stats.keys + stats.free <= 1000 + 10 + 16,
                       "records: " .. stats.keys .. " + " .. stats.free)
        assert.equal(0, stats.refused)

        srv:stop()
        assert.same({}, srv:unexpected_errors())
    end)
end)
