-- resty.counter inside a real nginx worker (run by spec/run-in-nginx.lua).

local counter = require "resty.counter"

local MAX_SAFE = 2^53 - 1


local function fresh(name)
    local dict = ngx.shared[name]
    dict:flush_all()
    dict:flush_expired()
    return dict
end


-- The message of the error fn raises, and the "file:line:" it blames.
local function raised(fn, ...)
    local ok, err = pcall(fn, ...)
    assert(not ok, "expected an error")
    return err
end


describe("resty.counter", function()
    local dict

    before_each(function()
        dict = fresh("counters")
    end)

    describe("new()", function()
        it("returns a counter for a known dict", function()
            local c, err = counter.new("counters")
            assert.is_nil(err)
            assert.is_table(c)
        end)

        it("returns nil and a clear error for an unknown dict", function()
            local c, err = counter.new("no_such_dict")
            assert.is_nil(c)
            assert.equal('shared dict "no_such_dict" not found', err)
        end)

        it("raises on a dict name that is not a string", function()
            assert.matches('bad "shdict_name" argument: string expected, got nil',
                           raised(counter.new), 1, true)
            assert.matches('bad "shdict_name" argument: string expected, got 1 (a number)',
                           raised(counter.new, 1), 1, true)
        end)

        it("raises on an interval that is not a positive finite number", function()
            for _, bad in ipairs({ 0, -1, 0 / 0, 1 / 0, "1", {} }) do
                local err = raised(counter.new, "counters", bad)
                assert.matches('bad "sync_interval" argument', err, 1, true)
            end
        end)

        it("blames the caller's line", function()
            local err = raised(function() counter.new(nil) end)
            assert.matches("counter_spec.lua:%d+:", err)
        end)
    end)

    describe("incr() and sync()", function()
        it("counts in the worker and applies on sync", function()
            local c = counter.new("counters")
            assert.is_true(c:incr("a"))
            c:incr("a")
            c:incr("b", 5)
            assert.is_nil(dict:get("a"), "nothing reaches the dict before a sync")
            assert.is_true(c:sync())
            assert.equal(2, dict:get("a"))
            assert.equal(5, dict:get("b"))
            assert.equal(2, c:get("a"))
        end)

        it("adds to what is already in the dict, like incr(key, delta, 0)", function()
            dict:set("a", 40)
            local c = counter.new("counters")
            c:incr("a", 2)
            c:sync()
            assert.equal(42, dict:get("a"))
        end)

        it("applies a delta only once", function()
            local c = counter.new("counters")
            c:incr("a", 3)
            c:sync()
            c:sync()
            assert.equal(3, dict:get("a"))
            c:incr("a")
            c:sync()
            assert.equal(4, dict:get("a"))
        end)

        it("creates a key touched with a zero step", function()
            local c = counter.new("counters")
            c:incr("zero", 0)
            c:sync()
            assert.equal(0, dict:get("zero"))
        end)

        it("takes negative, fractional and numeric-string steps", function()
            local c = counter.new("counters")
            c:incr("n", -4)
            c:incr("f", 0.25)
            c:incr("f", 0.5)
            c:incr("f", 2)
            c:incr("s", "12")
            c:incr("s", "0.5")
            c:sync()
            assert.equal(-4, dict:get("n"))
            assert.equal(2.75, dict:get("f"))
            assert.equal(12.5, dict:get("s"))
        end)

        it("keeps integer steps exact up to 2^53 - 1", function()
            local c = counter.new("counters")
            c:incr("big", MAX_SAFE - 10)
            for _ = 1, 10 do
                c:incr("big")
            end
            c:sync()
            assert.equal(MAX_SAFE, dict:get("big"))
            assert.equal("9007199254740991", string.format("%d", dict:get("big")))
        end)

        it("keeps counters on one dict apart from each other", function()
            local c1 = counter.new("counters")
            local c2 = counter.new("counters")
            c1:incr("k", 1)
            c2:incr("k", 10)
            c1:sync()
            assert.equal(1, dict:get("k"))
            c2:sync()
            assert.equal(11, dict:get("k"))
        end)

        it("counts many keys exactly across many intervals", function()
            local c = counter.new("counters")
            local expected = {}
            for round = 1, 20 do
                for i = 1, 300 do
                    local key = "k" .. ((i * round) % 500)
                    c:incr(key, i % 3)
                    expected[key] = (expected[key] or 0) + i % 3
                end
                assert.is_true(c:sync())
            end
            for key, n in pairs(expected) do
                assert.equal(n, dict:get(key), key)
            end
        end)
    end)

    describe("bad input", function()
        local c

        before_each(function()
            c = counter.new("counters")
        end)

        local function assert_nothing_counted()
            assert.is_true(c:sync())
            assert.same({}, dict:get_keys(0))
        end

        it("raises on bad keys and counts nothing", function()
            local cases = {
                { nil, 'bad "key" argument: string expected, got nil' },
                { "", 'bad "key" argument: empty string' },
                { 1, 'bad "key" argument: string expected, got 1 (a number)' },
                { {}, 'bad "key" argument: string expected, got a table' },
                { true, 'bad "key" argument: string expected, got true (a boolean)' },
                { string.rep("x", 65536),
                  'bad "key" argument: 65536 bytes, longer than 65535' },
            }
            for _, case in ipairs(cases) do
                local err = raised(c.incr, c, case[1])
                assert.matches(case[2], err, 1, true)
                assert.matches(case[2], raised(c.get, c, case[1]), 1, true)
                assert.matches(case[2], raised(c.reset, c, case[1], 1), 1, true)
            end
            assert_nothing_counted()
        end)

        it("accepts a key of exactly 65535 bytes", function()
            local key = string.rep("x", 65535)
            c:incr(key)
            c:sync()
            assert.equal(1, dict:get(key))
        end)

        it("raises on bad steps and counts nothing", function()
            local cases = {
                { 0 / 0, "is not a finite number" },
                { 1 / 0, "inf is not a finite number" },
                { -1 / 0, "-inf is not a finite number" },
                { {}, "number expected, got a table" },
                { true, "number expected, got true (a boolean)" },
                { "abc", '"abc" is not a number' },
                { "nan", "is not a finite number" },
                { 2^53, "beyond the exact integer range" },
                { -2^53, "beyond the exact integer range" },
                { 1e300, "beyond the exact integer range" },
            }
            for _, case in ipairs(cases) do
                local err = raised(c.incr, c, "k", case[1])
                assert.matches('bad "step" argument: ', err, 1, true)
                assert.matches(case[2], err, 1, true)
            end
            -- Refused before the key got a slot: not even a 0 is synced.
            c:sync()
            assert.is_nil(dict:get("k"))
        end)

        it("blames the caller's line for a bad key or step", function()
            assert.matches("counter_spec.lua:%d+:",
                           raised(function() c:incr(nil) end))
            assert.matches("counter_spec.lua:%d+:",
                           raised(function() c:incr("k", "x") end))
        end)
    end)

    describe("exact range", function()
        it("refuses to push a dict value past 2^53 - 1 and keeps the delta", function()
            local c = counter.new("counters")
            dict:set("edge", MAX_SAFE - 1)
            c:incr("edge")
            assert.is_true(c:sync())
            assert.equal(MAX_SAFE, dict:get("edge"))

            c:incr("edge")
            local ok, err = c:sync()
            assert.is_nil(ok)
            assert.matches("1 of 1 keys not applied", err, 1, true)
            assert.matches("value out of exact integer range", err, 1, true)
            assert.equal(MAX_SAFE, dict:get("edge"), "the value was not rounded")
            local m = c:self_metrics()
            assert.equal(1, m.out_of_range)
            assert.equal(1, m.pending_keys, "the delta stays pending")

            -- Once room is made, the kept delta arrives.
            assert.equal(MAX_SAFE - 100, c:reset("edge", 100))
            assert.is_true(c:sync())
            assert.equal(MAX_SAFE - 99, dict:get("edge"))
        end)

        it("flushes a key early when its pending sum would leave the range", function()
            local c = counter.new("counters")
            assert.is_true(c:incr("p", MAX_SAFE))
            assert.is_nil(dict:get("p"))
            assert.is_true(c:incr("p", -5))
            assert.is_true(c:incr("p", 10))
            assert.equal(MAX_SAFE - 5, dict:get("p"),
                         "the pending sum went to the dict before overflowing")
            -- The 10 left pending cannot follow: refused, not rounded.
            assert.is_nil(c:sync())
            assert.equal(MAX_SAFE - 5, dict:get("p"))
            assert.equal(1, c:self_metrics().pending_keys)
            c:reset("p", 10)
            assert.is_true(c:sync())
            assert.equal(MAX_SAFE - 5, dict:get("p"))
        end)

        it("returns an error to the caller when the early flush is refused", function()
            local c = counter.new("counters")
            dict:set("q", MAX_SAFE)
            c:incr("q", MAX_SAFE - 1)
            local ok, err = c:incr("q", 5)
            assert.is_nil(ok)
            assert.equal("value out of exact integer range", err)
            assert.equal(MAX_SAFE, dict:get("q"))
        end)
    end)

    describe("reset()", function()
        it("subtracts atomically and returns the new value", function()
            local c = counter.new("counters")
            c:incr("r", 10)
            c:sync()
            local newval, err, forcible = c:reset("r", 4)
            assert.equal(6, newval)
            assert.is_nil(err)
            assert.is_false(forcible)
        end)

        it("creates a missing key at 0, as incr(key, -n, n) does", function()
            local c = counter.new("counters")
            assert.equal(0, c:reset("missing", 7))
            assert.equal(0, dict:get("missing"))
        end)

        it("raises on a bad number", function()
            local c = counter.new("counters")
            for _, bad in ipairs({ 0 / 0, 1 / 0, "x", {}, 2^53 }) do
                assert.matches('bad "number" argument: ',
                               raised(c.reset, c, "r", bad), 1, true)
            end
            assert.matches('bad "number" argument: number expected, got nil',
                           raised(c.reset, c, "r"), 1, true)
        end)

        it("returns the dict's error for a non-number value", function()
            local c = counter.new("counters")
            dict:set("str", "text")
            local newval, err = c:reset("str", 1)
            assert.is_nil(newval)
            assert.equal("not a number", err)
        end)
    end)

    describe("get() and get_keys()", function()
        it("get returns nil for a missing key and excludes pending counts", function()
            local c = counter.new("counters")
            assert.is_nil(c:get("nothing"))
            c:incr("x")
            assert.is_nil(c:get("x"))
        end)

        it("get_keys works without an argument", function()
            local c = counter.new("counters")
            for i = 1, 5 do
                c:incr("key" .. i)
            end
            c:sync()
            local keys = c:get_keys()
            table.sort(keys)
            assert.same({ "key1", "key2", "key3", "key4", "key5" }, keys)
            assert.equal(2, #c:get_keys(2))
            assert.equal(5, #c:get_keys(0))
        end)

        it("get_keys raises on a bad max_count", function()
            local c = counter.new("counters")
            for _, bad in ipairs({ -1, 1.5, "3", {} }) do
                assert.matches('bad "max_count" argument',
                               raised(c.get_keys, c, bad), 1, true)
            end
        end)
    end)

    describe("no lost counts", function()
        it("keeps a delta that failed to apply and retries it", function()
            local c = counter.new("counters")
            dict:set("s", "not a number")
            c:incr("s", 2)
            c:incr("fine", 1)
            local ok, err = c:sync()
            assert.is_nil(ok)
            assert.matches('1 of 2 keys not applied to dict "counters", kept pending',
                           err, 1, true)
            assert.matches('key "s": not a number', err, 1, true)
            assert.equal(1, dict:get("fine"))
            local m = c:self_metrics()
            assert.equal(1, m.failed)
            assert.equal(1, m.pending_keys)

            -- More counts arrive for the key while it is pending.
            c:incr("s", 3)
            dict:delete("s")
            assert.is_true(c:sync())
            assert.equal(5, dict:get("s"))
            assert.equal(0, c:self_metrics().pending_keys)
        end)

        it("counts and logs evictions when the dict is full", function()
            local tiny = fresh("tiny")
            local c = counter.new("tiny")
            local evictions = 0
            for round = 1, 5 do
                for i = 1, 400 do
                    c:incr("round" .. round .. "-key-" .. i)
                end
                c:sync()
                evictions = c:self_metrics().evictions
            end
            assert.is_true(evictions > 0, "a 12k dict cannot hold 2000 keys")
            assert.equal(0, c:self_metrics().lost)
            assert.is_true(#tiny:get_keys(0) < 2000)
        end)

        it("syncs on its own timer, and two counters on a dict share it", function()
            local before = ngx.timer.pending_count()
            local c1 = counter.new("other", 0.05)
            local after_first = ngx.timer.pending_count()
            local c2 = counter.new("other", 0.05)
            assert.equal(before + 1, after_first)
            assert.equal(after_first, ngx.timer.pending_count(),
                         "the second counter made no timer")
            fresh("other")
            c1:incr("t", 2)
            c2:incr("t", 3)
            ngx.sleep(0.2)
            assert.equal(5, ngx.shared.other:get("t"))
        end)

        it("loses nothing while manual syncs and a fast timer interleave", function()
            local other = fresh("other")
            local c = counter.new("other", 0.001)
            local n = 0
            for i = 1, 2000 do
                c:incr("mixed")
                n = n + 1
                if i % 100 == 0 then
                    ngx.sleep(0.002)       -- let the timer run
                end
                if i % 333 == 0 then
                    c:sync()
                end
            end
            c:sync()
            assert.equal(n, other:get("mixed"))
        end)

        it("sync_all() syncs every counter of the worker", function()
            local c1 = counter.new("counters")
            local c2 = counter.new("other")
            fresh("other")
            c1:incr("all1")
            c2:incr("all2", 2)
            assert.is_true(counter.sync_all())
            assert.equal(1, dict:get("all1"))
            assert.equal(2, ngx.shared.other:get("all2"))
        end)
    end)

    describe("self_metrics()", function()
        it("reports this worker's syncs and pending keys", function()
            local c = counter.new("counters")
            c:incr("m1")
            c:incr("m2")
            local m = c:self_metrics()
            assert.same({ syncs = 0, evictions = 0, failed = 0, out_of_range = 0,
                          lost = 0, pending_keys = 2 }, m)
            c:sync()
            m = c:self_metrics()
            assert.equal(1, m.syncs)
            assert.equal(0, m.pending_keys)
        end)
    end)

    describe("the hot path", function()
        it("compiles in the JIT without a trace abort", function()
            local c = counter.new("counters")
            local aborts, compiled = require("helpers.jit").aborts_in(
                function()
                    for _ = 1, 100000 do
                        c:incr("hot")
                        c:incr("hot")
                        c:incr("even", 2)
                        c:incr("odd", 2)
                    end
                end)
            c:sync()
            assert.same({}, aborts)
            assert.is_true(compiled > 0, "the loop was compiled")
            assert.equal(200000, dict:get("hot"))
            assert.equal(200000, dict:get("even"))
            assert.equal(200000, dict:get("odd"))
        end)
    end)
end)
