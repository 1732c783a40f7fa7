-- resty.counter.log and resty.counter.backoff, and the modules that use
-- them, inside a real nginx worker, read back from its error.log: a
-- failure that repeats writes one line per cause per interval with a
-- count, and a lax counter on Redis backs off while Redis is down.

local log = require "resty.counter.log"
local backoff = require "resty.counter.backoff"
local counter = require "resty.counter"
local lax = require "resty.counter.lax"
local strict = require "resty.counter.strict"
local error_log = require "helpers.error_log"

local PORT = tonumber(os.getenv("REDIS_PORT"))
local PASSWORD = os.getenv("REDIS_PASSWORD")

-- These specs read nginx's error.log, which `resty` does not write there:
-- they run in the runner's nginx (tagged #http, see
-- spec/helpers/it_http.lua), where it is <prefix>/error.log.
local it_log = require("helpers.it_http")(function(name, fn)
    if error_log.available() then
        return it(name, fn)
    end
    return pending(name .. " (needs <prefix>/error.log)")
end, pending)


local function now()
    ngx.update_time()
    return ngx.now()
end


describe("resty.counter.log", function()
    local interval = log.interval

    before_each(function()
        log.forget()
    end)

    after_each(function()
        log.interval = interval
    end)

    it_log("logs a cause at once, then one line per interval with a count", function()
        log.interval = 0.3
        local mark = error_log.mark()
        assert.is_true(log.failure("spec.log",
                                   '3 keys not flushed to dict "a" (key "x": timeout)'))
        -- the same cause: the names and numbers differ, the words do not
        for i = 1, 12039 do
            assert.is_false(log.failure("spec.log", i .. ' keys not flushed to '
                                        .. 'dict "b" (key "y": timeout)'))
        end
        -- another cause has its own lines
        assert.is_true(log.failure("spec.log", "dict is full"))
        assert.is_false(log.failure("spec.log", "dict is full"))
        local lines = error_log.since(mark, "spec.log: ")
        assert.equal(2, #lines)
        assert.matches('spec.log: 3 keys not flushed to dict "a" (key "x": timeout)',
                       lines[1], 1, true)
        assert.matches("spec.log: dict is full", lines[2], 1, true)

        ngx.sleep(0.35)
        assert.is_true(log.failure("spec.log",
                                   '1 keys not flushed to dict "c" (key "z": timeout)'))
        lines = error_log.since(mark, "spec.log: ")
        assert.equal(3, #lines)
        assert.matches('spec.log: 12,040 failures in the last 0%.%d s: 1 keys not '
                       .. 'flushed to dict "c" %(key "z": timeout%)', lines[3])
        -- the count starts afresh
        assert.is_false(log.failure("spec.log", '2 keys not flushed to dict "c" '
                                    .. '(key "z": timeout)'))
        assert.equal(3, #error_log.since(mark, "spec.log: "))
    end)

    it_log("logs a lone failure after a quiet interval as it is", function()
        log.interval = 0.1
        local mark = error_log.mark()
        assert.is_true(log.failure("spec.lone", "redis is down", "down"))
        ngx.sleep(0.15)
        assert.is_true(log.failure("spec.lone", "redis is down again", "down"))
        local lines = error_log.since(mark, "spec.lone: ")
        assert.equal(2, #lines)
        assert.matches("spec.lone: redis is down again", lines[2], 1, true)
    end)

    it("writes counts with thousands separators", function()
        assert.equal("7", log.thousands(7))
        assert.equal("999", log.thousands(999))
        assert.equal("1,000", log.thousands(1000))
        assert.equal("12,040", log.thousands(12040))
        assert.equal("1,234,567", log.thousands(1234567))
    end)

    it_log("resty.counter: a key that fails every sync is logged once per "
           .. "interval, not at every sync", function()
        -- Its dict value is text (someone else's): the count waits in the
        -- engine, and every sync says so.
        local dict = ngx.shared.other
        local k = "text-" .. ngx.now()
        dict:set(k, "text")
        local c = counter.new("other")
        c:incr(k, 5)
        local mark = error_log.mark()
        for _ = 1, 50 do
            local ok, err = c:sync()
            assert.is_nil(ok)
            assert.matches('keys not copied to dict "other", kept for the next '
                           .. 'sync (key "' .. k .. '": not a number)', err, 1,
                           true)
        end
        assert.equal(1, #error_log.since(mark, 'not copied to dict "other"'))
        -- the dict's value goes: the count arrives
        dict:delete(k)
        assert.is_true(c:sync())
        assert.equal(5, dict:get(k))
    end)
end)


describe("resty.counter.backoff", function()
    it("doubles the wait from first to max, and a success ends it", function()
        local b = backoff.new(0.02, 1)
        assert.is_true(b:due())
        local waits = {}
        for i = 1, 9 do
            b:result(false)
            waits[i] = b.wait
            assert.is_false(b:due())
            assert.near(ngx.now() + b.wait, b.next_try, 1e-9)
        end
        assert.same({ 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1, 1, 1 }, waits)
        assert.equal(9, b.failures)
        b:result(true)
        assert.is_true(b:due())
        assert.equal(0, b.failures)
        b:result(false)
        assert.equal(0.02, b.wait)
    end)

    it("is due again once the wait is over", function()
        local b = backoff.new(0.05, 0.05)
        b:result(false)
        assert.is_false(b:due())
        ngx.sleep(0.06)
        assert.is_true(b:due())
    end)
end)


describe("resty.counter.lax on Redis while Redis is down", function()
    before_each(function()
        log.forget()
    end)

    it_log("backs off, logs once, and flushes within a second of Redis' return",
           function()
        local shared = assert(strict.new(nil, {
            name = "backoff", redis = { port = PORT, password = PASSWORD } }))
        assert(shared:clear())
        -- Nothing listens on port 1: every connect is refused at once.
        local c = assert(lax.new(nil, { name = "backoff", allowed_lag = 0.02,
                                        redis = { port = 1 } }))
        local mark = error_log.mark()
        c:inc("k", 7)
        ngx.sleep(2)

        -- Every 20 ms that would be 100 tries (each an nginx error line for
        -- the refused connect, and one of ours); backing off 20, 40, 80 ms
        -- ... up to 1 s, 7 or 8.
        local refused = #error_log.since(mark, "connect() failed")
        assert.is_true(refused >= 3 and refused <= 10,
                       refused .. " connects refused in 2 s")
        local ours = error_log.since(mark, "resty.counter.lax: ")
        assert.equal(1, #ours)
        assert.matches("resty.counter.lax: flush to redis: redis connect to "
                       .. "127.0.0.1:1 failed: connection refused", ours[1], 1, true)
        assert.equal(1, c:pending_keys())

        -- Redis is back: the same client, pointed at the real server.
        local client = c.shared.engine.client
        client.port, client.password = PORT, PASSWORD
        local back = now()
        while shared:get("k") ~= 7 and now() - back < 3 do
            ngx.sleep(0.01)
        end
        assert.equal(7, shared:get("k"))
        -- the longest wait is 1 s, and a tick comes every 20 ms
        assert.is_true(now() - back < 1.5, (now() - back) .. " s")
        assert.equal(0, c:pending_keys())
    end)
end)
