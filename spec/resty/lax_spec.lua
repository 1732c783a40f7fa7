-- resty.counter.lax inside a real nginx worker (spec/run-in-nginx.lua).

local lax = require "resty.counter.lax"
local strict = require "resty.counter.strict"
local race = require "helpers.race"
local held = require "helpers.strict_held"

-- Specs that send requests to this nginx (see spec/helpers/it_http.lua).
local it_http = require("helpers.it_http")(it, pending)


local MAX = 9223372036854775807LL


local function fresh(name)
    local dict = ngx.shared[name]
    dict:flush_all()
    dict:flush_expired()
    return dict
end


local function raised(fn, ...)
    local ok, err = pcall(fn, ...)
    assert(not ok, "expected an error")
    return err
end


-- Lax counters own a timer each: the spec makes a few and keeps them.
local slow = assert(lax.new("lax", { name = "slow", allowed_lag = 3600 }))
local fast = assert(lax.new("lax", { name = "fast" }))


describe("resty.counter.lax", function()
    local dict, shared

    before_each(function()
        dict = fresh("lax")
        slow:clear()
        fast:clear()
        shared = strict.new("lax", { name = "slow" })
    end)

    describe("new()", function()
        it("returns nil and a clear error for an unknown dict", function()
            local c, err = lax.new("no_such_dict")
            assert.is_nil(c)
            assert.equal('shared dict "no_such_dict" not found', err)
        end)

        it("raises on bad arguments, blaming the caller", function()
            assert.matches('bad "shdict_name" argument: string expected, got nil',
                           raised(lax.new), 1, true)
            assert.matches('bad "opts.allowed_lag" argument',
                           raised(lax.new, "lax", { allowed_lag = 0 }), 1, true)
            assert.matches('bad "opts.name" argument',
                           raised(lax.new, "lax", { name = "a/b" }), 1, true)
            assert.matches('bad "opts.exit_timeout" argument: a positive '
                           .. 'finite number of seconds expected, got -1',
                           raised(lax.new, "lax", { exit_timeout = -1 }), 1,
                           true)
            assert.matches("lax_spec.lua:%d+:",
                           raised(function() lax.new("lax", { allowed_lag = -1 }) end))
        end)
    end)

    describe("inc and get", function()
        -- On one node lax writes the shared engine at once (it counted in
        -- the worker until a flush before strict moved onto the engine).
        it("write the shared value at once on one node", function()
            assert.equal(1, slow:inc("a"))
            assert.equal(6, slow:inc("a", 5))
            assert.equal(4, slow:dec("a", 2))
            assert.equal(4, shared:get("a"), "shared at once, nothing pending")
            assert.is_nil(dict:get("slow/a"))
            assert.equal(4, slow:get("a"))
            assert.equal(0, slow:pending_keys())
            assert.is_true(slow:flush())
            assert.equal(4, shared:get("a"))
            assert.is_nil(dict:get("slow/a"), "strict values live in the engine")
            assert.equal(0, slow:pending_keys())
        end)

        it("return the shared value, other workers' counts included", function()
            shared:set("a", 100)
            assert.equal(101, slow:inc("a"))
            shared:inc("a", 50)                   -- another worker, say
            assert.equal(152, slow:inc("a"), "no view as last read: exact")
            assert.equal(152, slow:get("a"))
            assert.equal(153, slow:inc("a"))
            slow:flush()
            assert.equal(153, shared:get("a"))
        end)

        it("flush every allowed_lag by a timer", function()
            fast:inc("a", 3)
            local f = strict.new("lax", { name = "fast" })
            for _ = 1, 50 do
                if f:get("a") == 3 then
                    break
                end
                ngx.sleep(0.01)
            end
            assert.equal(3, f:get("a"))
        end)

        it("share values with a strict counter of the same name", function()
            shared:inc("a", 7)
            slow:inc("a", 1)
            slow:flush()
            assert.equal(8, shared:get("a"))
        end)

        it("raise on bad keys and amounts as strict does", function()
            assert.matches('bad "key" argument: string expected, got nil',
                           raised(slow.inc, slow), 1, true)
            assert.matches('bad "key" argument: empty string',
                           raised(slow.get, slow, ""), 1, true)
            assert.matches('bad "key" argument: 65535 bytes, longer than 65529',
                           raised(slow.inc, slow, ("k"):rep(65535)), 1, true)
            for _, n in ipairs({ 0 / 0, 1 / 0, 1.5, "x", 2^53, {} }) do
                assert.matches('bad "n" argument', raised(slow.inc, slow, "a", n), 1, true)
                assert.matches('bad "n" argument', raised(slow.dec, slow, "a", n), 1, true)
            end
            assert.matches('bad "ttl" argument', raised(slow.inc, slow, "a", 1, 0), 1, true)
            assert.equal(0, slow:pending_keys())
        end)
    end)

    describe("int64 edges", function()
        it("apply strictly, at once, past 2^53, and report overflow", function()
            shared:set("a", MAX - 1)
            local v = slow:inc("a")
            assert.is_true(v == MAX)
            assert.is_true(shared:get("a") == MAX, "applied now, not pending")
            local err
            v, err = slow:inc("a")
            assert.is_nil(v)
            assert.equal("increment or decrement would overflow", err)
            assert.is_true(shared:get("a") == MAX)
            v = slow:dec("a", MAX)
            assert.equal(0, v)
        end)

        it("report an overflow at once, changing nothing", function()
            shared:set("a", MAX)
            local v, err = slow:inc("a", 5)
            assert.is_nil(v)
            assert.equal("increment or decrement would overflow", err)
            assert.is_true(shared:get("a") == MAX)
            assert.equal(0, slow:pending_keys())
            shared:set("a", 0)
            assert.equal(5, slow:inc("a", 5))
        end)
    end)

    describe("a key held by a batch", function()
        it("makes inc wait, and time out", function()
            assert.equal(3, slow:inc("b", 3))
            local release = held.hold("lax", "a", held.master_pid(), "slow")
            local v, err = slow:inc("a", 2)
            assert.is_nil(v)
            assert.equal("timeout", err)
            assert.equal(3, shared:get("b"))
            release()
            assert.equal(1, slow:inc("a", 1))
            assert.is_true(slow:flush())
            assert.equal(1, shared:get("a"))
        end)
    end)

    describe("ttl", function()
        it("is given to the key by the flush that creates it", function()
            slow:inc("w", 2, 0.2)
            slow:inc("w", 1)
            slow:flush()
            assert.equal(3, shared:get("w"))
            slow:inc("w", 1, 10)
            slow:flush()
            assert.equal(4, shared:get("w"))
            ngx.sleep(0.3)
            assert.equal(0, shared:get("w"), "kept, not renewed")
        end)
    end)

    describe("set, del, clear", function()
        it("apply strictly and drop this worker's pending delta", function()
            slow:inc("a", 5)
            assert.equal(10, slow:set("a", 10))
            assert.equal(10, shared:get("a"))
            slow:flush()
            assert.equal(10, shared:get("a"))
            slow:inc("a", 2)
            assert.equal(12, slow:del("a"), "the worker's view of what was removed")
            assert.equal(0, shared:get("a"))
            slow:flush()
            assert.equal(0, shared:get("a"))
            slow:inc("b")
            shared:inc("c")
            assert.is_true(slow:clear())
            slow:flush()
            assert.same({ 0, 0 }, shared:get_all({ "b", "c" }))
        end)
    end)

    describe("inc_if and set_if", function()
        it("compare against the shared value", function()
            shared:set("a", 5)
            slow:inc("a", 3)                       -- shared 8 at once
            assert.same({ 8, 8 }, { slow:inc_if("a", "lt", 8, 1) })
            assert.same({ 9, 8 }, { slow:inc_if("a", "eq", 8, 1) })
            assert.equal(9, shared:get("a"), "nothing pending on one node")
            assert.same({ 0, 9 }, { slow:set_if("a", "ge", 9, 0) })
            assert.equal(0, shared:get("a"), "the set is strict")
            assert.same({ 0, 0 }, { slow:set_if("a", "ne", 0, 7) })
            assert.matches('bad "cmp" argument', raised(slow.inc_if, slow, "a", "x", 1), 1, true)
        end)
    end)

    describe("batches", function()
        it("apply each entry in order", function()
            assert.same({ 1, 2, 5 }, slow:inc_all({ { "a" }, { "a" }, { "b", 5 } }))
            assert.same({ 2, 5, 0 }, slow:get_all({ "a", "b", "c" }))
            assert.same({ 7, 8 }, slow:set_all({ { "a", 7 }, { "b", 8 } }))
            local news, olds = slow:inc_all_if({ { "a", "lt", 8, 1 }, { "b", "lt", 8, 1 } })
            assert.same({ 8, 8 }, news)
            assert.same({ 7, 8 }, olds)
            news, olds = slow:set_all_if({ { "a", "eq", 8, 0 }, { "b", "always", nil, 1 } })
            assert.same({ 0, 1 }, news)
            assert.same({ 8, 8 }, olds)
            assert.matches('bad "updates" argument: entry 2',
                           raised(slow.inc_all, slow, { { "a" }, 1 }), 1, true)
        end)
    end)

    describe("with two workers counting", function()
        it_http("loses nothing", function()
            local N = 5000
            local threads = {}
            local function send(count)
                for _ = 1, count do
                    local i = #threads + 1
                    local path = (i % 2 == 0 and "/race/log" or "/race/content")
                                 .. "?flavour=lax&n=" .. N
                    threads[i] = ngx.thread.spawn(race.get, path)
                end
            end
            -- More requests until worker 1 has one (connections are
            -- spread at random).
            send(6)
            for round = 1, 500 do
                if dict:get("tally:started:1") then
                    break
                end
                if round % 50 == 0 and #threads < 30 then
                    send(6)
                end
                ngx.sleep(0.002)
            end
            race.run({ flavour = "lax", n = N })
            for i = 1, #threads do
                local ok, body = ngx.thread.wait(threads[i])
                assert.is_true(ok)
                assert.matches("200 OK", body)
            end
            local runs = #threads + 1
            local c = strict.new("lax", { name = "race" })
            for _ = 1, 300 do
                if dict:get("tally:done") == runs and c:get("hits") == runs * N then
                    break
                end
                ngx.sleep(0.01)
            end
            assert.equal(runs * N, dict:get("tally:sent"))
            assert.equal(runs * N, c:get("hits"))
            local spread = 0
            for i = 0, 6 do
                spread = spread + c:get("spread" .. i)
            end
            assert.equal(2 * runs * N, spread)
            assert.is_not_nil(dict:get("tally:worker:1"), "worker 1 took no part")
        end)
    end)
end)
