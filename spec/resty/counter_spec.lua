-- resty.counter inside a real nginx worker (run by spec/run-in-nginx.lua).
--
-- Counts live in the shared engine of the dict, which no spec can empty:
-- every spec counts under keys of its own (key()).

local counter = require "resty.counter"
local race = require "helpers.race"

-- Specs that send requests to this nginx (see spec/helpers/it_http.lua).
local it_http = require("helpers.it_http")(it, pending)

local MAX_SAFE = 2^53 - 1


-- The message of the error fn raises.
local function raised(fn, ...)
    local ok, err = pcall(fn, ...)
    assert(not ok, "expected an error")
    return err
end


local spec_number = 0
-- A key no other spec (or earlier run of this one) has counted.
local function key(name)
    return name .. "-" .. spec_number .. "-" .. ngx.now()
end


describe("resty.counter", function()
    local dict

    before_each(function()
        spec_number = spec_number + 1
        dict = ngx.shared.counters
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

        it("refuses a dict too small for an engine, saying so", function()
            local c, err = counter.new("tiny")
            assert.is_nil(c)
            assert.equal('no shared engine in dict "tiny": the shared dict has '
                         .. 'no room left for the engine', err)
        end)

        it("takes half the dict's zone for its engine, once", function()
            local m = counter.new("counters"):self_metrics()
            assert.equal(512 * 1024, m.engine_bytes)
            assert.is_true(m.engine_max_keys > 4000, m.engine_max_keys)
            assert.equal(m.engine_bytes,
                         counter.new("counters"):self_metrics().engine_bytes)
        end)
    end)

    describe("incr(), get() and sync()", function()
        it("counts where every reader sees it at once", function()
            local c = counter.new("counters", 3600)
            local a, b = key("a"), key("b")
            assert.is_true(c:incr(a))
            c:incr(a)
            c:incr(b, 5)
            assert.equal(2, c:get(a))
            assert.equal(5, counter.new("counters", 60):get(b),
                         "another counter of the dict reads the same value")
            assert.is_nil(dict:get(a), "the dict gets a copy on sync")
            assert.is_true(c:sync())
            assert.equal(2, dict:get(a))
            assert.equal(5, dict:get(b))
        end)

        it("synced by hand, get reads the dict, as Kong's does", function()
            local c = counter.new("counters")
            local k = key("manual")
            c:incr(k)
            assert.is_nil(c:get(k))
            assert.is_true(c:sync())
            assert.equal(1, c:get(k))
        end)

        it("adds to what the dict held before the engine knew the key", function()
            local k = key("old")
            dict:set(k, 40)
            local c = counter.new("counters", 3600)
            c:incr(k, 2)
            assert.equal(42, c:get(k))
            c:sync()
            assert.equal(42, dict:get(k))
        end)

        it("copies a value once, however often it syncs", function()
            local c = counter.new("counters")
            local k = key("once")
            c:incr(k, 3)
            c:sync()
            c:sync()
            assert.equal(3, dict:get(k))
            c:incr(k)
            c:sync()
            assert.equal(4, dict:get(k))
        end)

        it("creates a key touched with a zero step", function()
            local c = counter.new("counters")
            local k = key("zero")
            c:incr(k, 0)
            c:sync()
            assert.equal(0, dict:get(k))
        end)

        it("takes negative, fractional and numeric-string steps", function()
            local c = counter.new("counters")
            local n, f, s = key("n"), key("f"), key("s")
            c:incr(n, -4)
            c:incr(f, 0.25)
            c:incr(f, 0.5)
            c:incr(f, 2)
            c:incr(s, "12")
            c:incr(s, "0.5")
            c:sync()
            assert.equal(-4, dict:get(n))
            assert.equal(2.75, dict:get(f))
            assert.equal(12.5, dict:get(s))
        end)

        it("keeps integer steps exact up to 2^53 - 1", function()
            local c = counter.new("counters", 3600)
            local k = key("big")
            c:incr(k, MAX_SAFE - 10)
            for _ = 1, 10 do
                c:incr(k)
            end
            c:sync()
            assert.equal(MAX_SAFE, dict:get(k))
            assert.equal("9007199254740991", string.format("%d", c:get(k)))
        end)

        it("shares each key between the counters of a dict", function()
            local c1 = counter.new("counters", 3600)
            local c2 = counter.new("counters", 3600)
            local k = key("k")
            c1:incr(k, 1)
            c2:incr(k, 10)
            assert.equal(11, c1:get(k))
            c1:sync()
            assert.equal(11, dict:get(k))
        end)

        it("counts many keys exactly across many syncs", function()
            local c = counter.new("counters")
            local expected = {}
            local prefix = key("many")
            for round = 1, 20 do
                for i = 1, 300 do
                    local k = prefix .. ((i * round) % 500)
                    c:incr(k, i % 3)
                    expected[k] = (expected[k] or 0) + i % 3
                end
                assert.is_true(c:sync())
            end
            for k, n in pairs(expected) do
                assert.equal(n, dict:get(k), k)
            end
        end)

        it_http("reads every worker's counts the moment they are made", function()
            local k = key("workers")
            local seen, sent = {}, 0
            -- Until both workers have counted (the kernel picks one per
            -- connection), then a few more.
            for _ = 1, 400 do
                local body = assert(race.get("/counter/incr?key=" .. k))
                sent = sent + 1
                seen[body:match("worker (%d)")] = true
                assert.equal(sent, counter.new("counters", 60):get(k))
                if seen["0"] and seen["1"] and sent >= 20 then
                    break
                end
            end
            assert.is_true(seen["0"] and seen["1"], "both workers counted")
        end)

        it_http("waits for another worker's sync, then copies what it could not see", function()
            -- This worker (0) begins a sync and holds it across a sleep, as
            -- a long one would; meanwhile requests count and sync by hand.
            -- Those in worker 1 wait (the first blocks worker 1 until the
            -- lock is free, the others queue behind it), then find their
            -- count in the dict.
            local C = require("resty.counter.abi").C
            local ffi = require "ffi"
            local c = counter.new("counters")
            local out = ffi.new("const rc_changed_t *[1]")
            local count = ffi.new("uint32_t[1]")
            local written = ffi.new("uint32_t[1]")
            local rc
            for _ = 1, 100 do
                rc = C.rc_counter_sync_begin(c.engine.ptr, 0, nil, nil, out,
                                             count, written)
                if rc ~= 1 then
                    break
                end
                ngx.sleep(0.01)
            end
            assert.equal(0, rc)
            finally(function()
                C.rc_counter_sync_end(c.engine.ptr)
            end)
            local prefix = key("wait")
            local threads = {}
            for i = 1, 16 do
                threads[i] = ngx.thread.spawn(race.get,
                                              "/counter/incr_sync?key=" .. prefix .. i)
            end
            ngx.sleep(0.3)
            C.rc_counter_sync_end(c.engine.ptr)
            local in_worker_1, waited = 0, 0
            for i = 1, 16 do
                local _, body = ngx.thread.wait(threads[i])
                local worker, result, value, took = body:match(
                    "worker (%d) sync (.-) dict (%S+) took (%S+)")
                if worker == "1" then
                    in_worker_1 = in_worker_1 + 1
                    assert.equal("true", result, body)
                    assert.equal("1", value, body)
                    if tonumber(took) >= 0.1 then
                        waited = waited + 1
                    end
                else
                    -- The holder's own worker cannot wait for itself.
                    assert.matches("another sync is running", result, 1, true)
                end
            end
            assert.is_true(in_worker_1 > 0, "no request reached worker 1")
            assert.is_true(waited > 0, "a sync in worker 1 waited")
            assert.is_true(c:sync())
        end)
    end)

    describe("bad input", function()
        local c

        before_each(function()
            c = counter.new("counters")
        end)

        it("raises on bad keys and counts nothing", function()
            local before = c:self_metrics().engine_keys
            local cases = {
                { nil, 'bad "key" argument: string expected, got nil' },
                { "", 'bad "key" argument: empty string' },
                { 1, 'bad "key" argument: string expected, got 1 (a number)' },
                { {}, 'bad "key" argument: string expected, got a table' },
                { true, 'bad "key" argument: string expected, got true (a boolean)' },
                { string.rep("x", 65535),
                  'bad "key" argument: 65535 bytes, longer than 65534' },
            }
            for _, case in ipairs(cases) do
                local err = raised(c.incr, c, case[1])
                assert.matches(case[2], err, 1, true)
                assert.matches(case[2], raised(c.get, c, case[1]), 1, true)
                assert.matches(case[2], raised(c.reset, c, case[1], 1), 1, true)
            end
            assert.equal(before, c:self_metrics().engine_keys)
        end)

        it("accepts a key of 65534 bytes (the engine's kind byte takes one)", function()
            local k = string.rep("x", 65534 - 20) .. key("long"):sub(1, 20)
            c:incr(k)
            c:sync()
            assert.equal(1, dict:get(k))
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
            local k = key("k")
            local before = c:self_metrics().engine_keys
            for _, case in ipairs(cases) do
                local err = raised(c.incr, c, k, case[1])
                assert.matches('bad "step" argument: ', err, 1, true)
                assert.matches(case[2], err, 1, true)
            end
            -- Refused before the key got a record: not even a 0.
            assert.equal(before, c:self_metrics().engine_keys)
            c:sync()
            assert.is_nil(dict:get(k))
        end)

        it("blames the caller's line for a bad key or step", function()
            assert.matches("counter_spec.lua:%d+:",
                           raised(function() c:incr(nil) end))
            assert.matches("counter_spec.lua:%d+:",
                           raised(function() c:incr("k", "x") end))
        end)
    end)

    describe("exact range", function()
        it("refuses a step past 2^53 - 1 and changes nothing", function()
            local c = counter.new("counters", 3600)
            local k = key("p")
            assert.is_true(c:incr(k, MAX_SAFE))
            assert.is_true(c:incr(k, -5))
            local ok, err = c:incr(k, 10)
            assert.is_nil(ok)
            assert.equal('value out of exact integer range: key "' .. k
                         .. '" in dict "counters"', err)
            assert.equal(MAX_SAFE - 5, c:get(k))
            assert.is_true(c:incr(k, 5))
            assert.is_nil(c:incr(k))
            assert.is_nil(c:incr(k, 0.5))
            assert.equal(MAX_SAFE, c:get(k))
        end)

        it("counts the dict's old value in the range", function()
            local c = counter.new("counters", 3600)
            local k = key("edge")
            dict:set(k, MAX_SAFE - 1)
            assert.is_true(c:incr(k))
            assert.is_true(c:sync())
            assert.equal(MAX_SAFE, dict:get(k))

            local ok, err = c:incr(k)
            assert.is_nil(ok)
            assert.matches("value out of exact integer range", err, 1, true)
            -- (A fraction below the double's step there would round away.)
            assert.is_nil(c:incr(k, 1.5))
            assert.equal(MAX_SAFE, c:get(k))
            assert.is_true(c:sync())
            assert.equal(MAX_SAFE, dict:get(k), "the dict's value was not rounded")

            assert.equal(MAX_SAFE - 100, c:reset(k, 100))
            assert.is_true(c:sync())
            assert.equal(MAX_SAFE - 100, dict:get(k))
        end)
    end)

    describe("reset()", function()
        it("subtracts atomically and returns the new value", function()
            local c = counter.new("counters")
            local k = key("r")
            c:incr(k, 10)
            local newval, err, forcible = c:reset(k, 4)
            assert.equal(6, newval)
            assert.is_nil(err)
            assert.is_false(forcible)
            c:sync()
            assert.equal(6, dict:get(k))
        end)

        it("creates a missing key at minus the number, as incr(key, -n, n) does", function()
            local c = counter.new("counters")
            local k = key("missing")
            assert.equal(-7, c:reset(k, 7))
            c:sync()
            assert.equal(-7, dict:get(k))
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

        it("refuses a key whose dict value is no number, changing nothing", function()
            local c = counter.new("counters", 3600)
            local k = key("str")
            dict:set(k, "text")
            local newval, err = c:reset(k, 1)
            assert.is_nil(newval)
            assert.equal("not a number", err)
            assert.equal("text", c:get(k))
            -- Once the dict's value goes, the key is the counter's again.
            dict:delete(k)
            assert.is_true(c:sync())
            assert.equal(0, c:get(k))
            assert.equal(0, dict:get(k))
        end)
    end)

    describe("get() and get_keys()", function()
        it("get returns nil for a key nobody counted", function()
            assert.is_nil(counter.new("counters"):get(key("nothing")))
            assert.is_nil(counter.new("counters", 60):get(key("nothing")))
        end)

        it("get_keys lists the dict's keys", function()
            local other = ngx.shared.other
            other:flush_all()
            other:flush_expired()
            local c = counter.new("other")
            local prefix = key("k")
            for i = 1, 5 do
                c:incr(prefix .. i)
            end
            c:sync()
            local keys = c:get_keys(0)
            local mine = {}
            for _, k in ipairs(keys) do
                if k:sub(1, #prefix) == prefix then
                    mine[#mine + 1] = k
                end
            end
            assert.equal(5, #mine)
            assert.equal(2, #c:get_keys(2))
            assert.equal(#keys, #c:get_keys())
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
        it("leaves a dict value that is no number, and counts on", function()
            local c = counter.new("counters", 3600)
            local s, fine = key("s"), key("fine")
            dict:set(s, "not a number")
            c:incr(s, 2)
            c:incr(fine, 1)
            local ok, err = c:sync()
            assert.is_nil(ok)
            assert.matches('1 of 2 keys not copied to dict "counters", kept for '
                           .. 'the next sync', err, 1, true)
            assert.matches('key "' .. s .. '": not a number', err, 1, true)
            assert.equal("not a number", dict:get(s), "left alone")
            assert.equal(1, dict:get(fine))
            local m = c:self_metrics()
            assert.equal(1, m.failed)
            assert.equal(1, m.pending_keys)

            -- More counts arrive; once the dict's value goes, they show.
            c:incr(s, 3)
            dict:delete(s)
            assert.is_true(c:sync())
            assert.equal(5, dict:get(s))
            assert.equal(5, c:get(s))
            assert.equal(0, c:self_metrics().pending_keys)
        end)

        it("refuses new keys when its engine is full, and keeps every count made", function()
            local c = assert(counter.new("small_engine", 3600))
            local prefix = key("t")
            local kept = {}
            local refused = 0
            for i = 1, 400 do
                local k = prefix .. i
                local ok, err = c:incr(k, i)
                if ok then
                    kept[k] = i
                else
                    refused = refused + 1
                    assert.equal("no room for a new key in the shared engine", err)
                end
            end
            assert.is_true(refused > 0, "a 32k dict's engine cannot hold 400 keys")
            assert.is_true(next(kept) ~= nil)
            local m = c:self_metrics()
            assert.equal(refused, m.refused)
            assert.is_true(m.engine_refused >= refused)
            for k, n in pairs(kept) do
                assert.equal(n, c:get(k))
                assert.is_true(c:incr(k), "a known key still counts")
            end
        end)

        it("keeps values a full dict cannot take, and copies them later", function()
            local other = ngx.shared.other
            local c = assert(counter.new("other", 3600))
            local k = key("w")
            -- Fill the dict's own half with other data: large values, then
            -- keys the size of ours, until not one more fits.
            finally(function()
                other:flush_all()
                other:flush_expired()
            end)
            other:flush_all()
            other:flush_expired()
            local filler = 0
            while other:safe_set("filler" .. filler, string.rep("x", 200)) do
                filler = filler + 1
            end
            while other:safe_set(k .. filler, filler) do
                filler = filler + 1
            end
            c:incr(k, 3)
            local ok, err = c:sync()
            assert.is_nil(ok)
            assert.matches("no memory", err, 1, true)
            assert.equal(3, c:get(k), "the count is safe in the engine")
            other:flush_all()
            other:flush_expired()
            assert.is_true(c:sync())
            assert.equal(3, other:get(k))
        end)

        it("syncs on its own timer, and two counters on a dict share it", function()
            local before = ngx.timer.pending_count()
            local c1 = counter.new("other", 0.05)
            local after_first = ngx.timer.pending_count()
            local c2 = counter.new("other", 0.05)
            assert.is_true(after_first <= before + 1)
            assert.equal(after_first, ngx.timer.pending_count(),
                         "the second counter made no timer")
            local k = key("t")
            c1:incr(k, 2)
            c2:incr(k, 3)
            ngx.sleep(0.2)
            assert.equal(5, ngx.shared.other:get(k))
        end)

        it("loses nothing while manual syncs and a fast timer interleave", function()
            local c = counter.new("other", 0.001)
            local k = key("mixed")
            local n = 0
            for i = 1, 2000 do
                c:incr(k)
                n = n + 1
                if i % 100 == 0 then
                    ngx.sleep(0.002)       -- let the timer run
                end
                if i % 333 == 0 then
                    c:sync()
                end
            end
            c:sync()
            assert.equal(n, ngx.shared.other:get(k))
        end)

        it("sync_all() syncs every counter of the worker", function()
            local c1 = counter.new("counters")
            local c2 = counter.new("other")
            local k1, k2 = key("all1"), key("all2")
            c1:incr(k1)
            c2:incr(k2, 2)
            -- Its result is every sync's: small_engine's dict half cannot
            -- hold what its full engine holds (the spec above), so not all
            -- of them succeed.
            local ok = counter.sync_all()
            local all_ok = c1:sync() and c2:sync()
                           and counter.new("small_engine"):sync()
            assert.equal(all_ok, ok)
            assert.equal(1, dict:get(k1))
            assert.equal(2, ngx.shared.other:get(k2))
        end)
    end)

    describe("self_metrics()", function()
        it("reports this worker's syncs and the engine's keys", function()
            local c = counter.new("counters")
            local before = c:self_metrics()
            c:incr(key("m1"))
            c:incr(key("m2"))
            local m = c:self_metrics()
            assert.equal(before.engine_keys + 2, m.engine_keys)
            for _, name in ipairs({ "syncs", "failed", "out_of_range",
                                    "pending_keys", "refused", "took_over",
                                    "evictions", "lost", "engine_max_keys",
                                    "engine_refused", "engine_bytes" }) do
                assert.is_number(m[name], name)
            end
            assert.equal(0, m.evictions)
            assert.equal(0, m.lost)
            c:sync()
            assert.equal(m.syncs + 1, c:self_metrics().syncs)
        end)
    end)

    describe("the hot path", function()
        it("compiles in the JIT without a trace abort", function()
            local c = counter.new("counters", 3600)
            local hot, even, odd = key("hot"), key("even"), key("odd")
            local aborts, compiled = require("helpers.jit").aborts_in(
                function()
                    for _ = 1, 100000 do
                        c:incr(hot)
                        c:incr(hot)
                        c:incr(even, 2)
                        c:incr(odd, 2)
                    end
                end)
            assert.same({}, aborts)
            assert.is_true(compiled > 0, "the loop was compiled")
            assert.equal(200000, c:get(hot))
            assert.equal(200000, c:get(even))
            assert.equal(200000, c:get(odd))
        end)
    end)
end)
