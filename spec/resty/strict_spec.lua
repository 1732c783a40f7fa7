-- resty.counter.strict inside a real nginx worker (spec/run-in-nginx.lua).

local strict = require "resty.counter.strict"
local race = require "helpers.race"
local held = require "helpers.strict_held"
local hold, master_pid = held.hold, held.master_pid

-- Specs that send requests to this nginx (see spec/helpers/it_http.lua).
local it_http = require("helpers.it_http")(it, pending)


local MAX = 9223372036854775807LL
local MIN = -9223372036854775807LL - 1
local MAX_SAFE = 2^53 - 1


local function fresh(name)
    local dict = ngx.shared[name]
    dict:flush_all()
    dict:flush_expired()
    return dict
end


-- Strict values live in the dict's engine, which flush_all does not
-- touch: each spec starts with the counters it uses cleared.
local function cleared(dict_name, ...)
    for _, name in ipairs({ "counter", "other", ... }) do
        assert(strict.new(dict_name, { name = name }):clear())
    end
end


local function raised(fn, ...)
    local ok, err = pcall(fn, ...)
    assert(not ok, "expected an error")
    return err
end


describe("resty.counter.strict", function()
    local dict, c

    before_each(function()
        dict = fresh("strict")
        cleared("strict", "race")
        c = assert(strict.new("strict"))
    end)

    describe("new()", function()
        it("returns nil and a clear error for an unknown dict", function()
            local s, err = strict.new("no_such_dict")
            assert.is_nil(s)
            assert.equal('shared dict "no_such_dict" not found', err)
        end)

        -- This CPU has the instruction (x86_64 or aarch64); one without is
        -- played by the library's answer replaced (its message on such a
        -- CPU is src/ffi_engine.rs's test): strict, lax and limit on one
        -- node refuse in `new`, with the library's last error.
        it("returns nil, err from strict, lax and limit where no pair swaps",
           function()
            local abi = require "resty.counter.abi"
            assert.equal(0, abi.C.rc_strict_supported())
            local names = { "resty.counter.strict", "resty.counter.lax",
                            "resty.counter.limit" }
            local saved = {}
            for _, name in ipairs(names) do
                saved[name] = package.loaded[name]
                package.loaded[name] = nil
            end
            local real = abi.C
            local fake = setmetatable({
                rc_strict_supported = function() return abi.NO_DWCAS end,
            }, { __index = function(_, k) return real[k] end })
            package.loaded["resty.counter.abi"] =
                setmetatable({ C = fake }, { __index = abi })
            local ok, err = pcall(function()
                local made = {
                    { require("resty.counter.strict").new("strict") },
                    { require("resty.counter.lax").new("strict") },
                    { require("resty.counter.limit").new("limit",
                                                         { limit = 1,
                                                           window = 1 }) },
                }
                for i, got in ipairs(made) do
                    assert.is_nil(got[1], names[i])
                    assert.equal("string", type(got[2]), names[i])
                end
            end)
            package.loaded["resty.counter.abi"] = abi
            for _, name in ipairs(names) do
                package.loaded[name] = saved[name]
            end
            assert(ok, err)
        end)

        it("raises on bad arguments, blaming the caller", function()
            assert.matches('bad "shdict_name" argument: string expected, got nil',
                           raised(strict.new), 1, true)
            assert.matches('bad "opts" argument: table expected, got "x" (a string)',
                           raised(strict.new, "strict", "x"), 1, true)
            for _, name in ipairs({ "", "a/b", "a!b", ("x"):rep(65), 1 }) do
                assert.matches('bad "opts.name" argument',
                               raised(strict.new, "strict", { name = name }), 1, true)
            end
            for _, t in ipairs({ 0, -1, 0 / 0, 1 / 0, "1" }) do
                assert.matches('bad "opts.timeout" argument',
                               raised(strict.new, "strict", { timeout = t }), 1, true)
            end
            local err = raised(function() strict.new(nil) end)
            assert.matches("strict_spec.lua:%d+:", err)
        end)
    end)

    describe("inc, dec, get, set, del", function()
        it("count from 0 and return the new value", function()
            assert.equal(0, c:get("a"))
            assert.equal(1, c:inc("a"))
            assert.equal(6, c:inc("a", 5))
            assert.equal(4, c:dec("a", 2))
            assert.equal(3, c:dec("a"))
            assert.equal(-7, c:inc("b", -7))
            assert.equal(3, c:get("a"))
            assert.equal(42, c:set("a", 42))
            assert.equal(42, c:get("a"))
            assert.equal(42, c:del("a"))
            assert.equal(0, c:get("a"))
            assert.equal(0, c:del("a"))
        end)

        it("keep values in the engine, apart by name, not in the dict", function()
            c:inc("a", 12)
            assert.is_nil(dict:get("counter/a"))
            local other = strict.new("strict", { name = "other" })
            other:inc("a", 3)
            assert.equal(3, other:get("a"))
            assert.equal(12, c:get("a"))
            c:set("big", MAX_SAFE)
            assert.is_true(c:inc("big") == 9007199254740992LL)
            assert.equal(MAX_SAFE, c:dec("big"))
            c:set("s", "12")
            assert.equal(13, c:inc("s"))
            assert.same({ "big", "s" }, (function()
                local keys = {}
                for k in pairs(c:_values()) do
                    if k ~= "a" then keys[#keys + 1] = k end
                end
                table.sort(keys)
                return keys
            end)())
        end)

        it("accept integers as numbers, int64 cdata and decimal strings", function()
            assert.equal(5, c:inc("a", "5"))
            assert.equal(7, c:inc("a", 2LL))
            assert.equal(8, c:inc("a", 1ULL))
            assert.equal(-2, c:inc("a", "-10"))
        end)

        it("raise on bad keys", function()
            for _, key in ipairs({ nil, 1, true, {} }) do
                assert.matches('bad "key" argument: string expected',
                               raised(c.inc, c, key), 1, true)
            end
            assert.matches('bad "key" argument: empty string',
                           raised(c.get, c, ""), 1, true)
            -- The engine's 65535 bytes, less the kind byte and the prefix
            -- "counter/" (the dict's took one byte more).
            local longest = ("k"):rep(65535 - 9)
            assert.equal(1, c:inc(longest))
            assert.matches('bad "key" argument: 65527 bytes, longer than 65526',
                           raised(c.inc, c, longest .. "k"), 1, true)
            for _, m in ipairs({ "inc", "dec", "get", "set", "del" }) do
                assert.matches('bad "key"', raised(c[m], c, nil, 1), 1, true)
            end
        end)

        it("raise on amounts that are not exact integers", function()
            local cases = {
                { 0 / 0, "is not a finite number" },
                { 1 / 0, "inf is not a finite number" },
                { -1 / 0, "-inf is not a finite number" },
                { 1.5, "1.5 is not an integer" },
                { "1.5", '"1.5" is not a base-10 int64' },
                { "abc", '"abc" is not a number' },
                { " 1", '" 1" is not a base-10 int64' },
                { 2^53, "beyond the exact integer range +-9007199254740991: pass an int64_t" },
                { -2^63, "beyond the exact integer range +-9007199254740991" },
                { "9223372036854775808", '"9223372036854775808" is not a base-10 int64' },
                { "-9223372036854775809", '"-9223372036854775809" is not a base-10 int64' },
                { 9223372036854775808ULL, "beyond the int64 range" },
                { true, "number expected, got true (a boolean)" },
                { {}, "number expected, got a table" },
            }
            for _, case in ipairs(cases) do
                for _, m in ipairs({ "inc", "dec", "set" }) do
                    local err = raised(c[m], c, "a", case[1])
                    assert.matches('bad "n" argument: ', err, 1, true)
                    assert.matches(case[2], err, 1, true)
                end
            end
            assert.matches('bad "n" argument: number expected, got nil',
                           raised(c.set, c, "a"), 1, true)
            assert.equal(0, c:get("a"), "nothing was applied")
        end)

        it("raise on a bad ttl", function()
            for _, ttl in ipairs({ 0, -1, 0 / 0, 1 / 0, "1" }) do
                assert.matches('bad "ttl" argument',
                               raised(c.inc, c, "a", 1, ttl), 1, true)
            end
        end)

        it("blame the caller's line", function()
            local err = raised(function() c:inc("a", 0.5) end)
            assert.matches("strict_spec.lua:%d+:", err)
        end)
    end)

    describe("int64 edges", function()
        it("hold max and min exactly, as int64 cdata", function()
            local v = c:set("a", "9223372036854775807")
            assert.equal("cdata", type(v))
            assert.is_true(v == MAX)
            assert.is_true(c:get("a") == MAX)
            assert.is_true(c:set("b", MIN) == MIN)
            assert.is_true(c:get("b") == MIN)
            assert.is_true(c:dec("a") == MAX - 1)
            assert.is_true(c:inc("a") == MAX)
        end)

        it("refuse max + 1 and min - 1, leaving the value as it was", function()
            c:set("a", MAX)
            local v, err = c:inc("a", 1)
            assert.is_nil(v)
            assert.equal("increment or decrement would overflow", err)
            assert.is_true(c:get("a") == MAX)
            v, err = c:inc("a", MAX)
            assert.is_nil(v)
            assert.equal("increment or decrement would overflow", err)

            c:set("b", MIN)
            v, err = c:dec("b", 1)
            assert.is_nil(v)
            assert.equal("increment or decrement would overflow", err)
            v, err = c:inc("b", -1)
            assert.is_nil(v)
            assert.equal("increment or decrement would overflow", err)
            assert.is_true(c:get("b") == MIN)

            -- dec by min: -(min) does not exist, but -1 - min does.
            v, err = c:dec("c", MIN)
            assert.is_nil(v)
            assert.equal("increment or decrement would overflow", err)
            c:set("c", -1)
            assert.is_true(c:dec("c", MIN) == MAX)
        end)

        it("returns numbers up to 2^53 - 1 and cdata past it", function()
            assert.equal("number", type(c:set("a", MAX_SAFE)))
            assert.equal(MAX_SAFE, c:get("a"))
            local v = c:inc("a")
            assert.equal("cdata", type(v))
            assert.is_true(v == 9007199254740992LL)
            assert.is_true(c:inc("a") == 9007199254740993LL)
            assert.is_true(c:get("a") == 9007199254740993LL)
        end)
    end)

    describe("values an older version left in the dict", function()
        it("move into the engine the first time a key is touched", function()
            dict:set("counter/x", 41)
            dict:set("counter/y", "9223372036854775806")
            dict:set("counter/z", 5, 0.2)
            assert.equal(42, c:inc("x"))
            assert.is_nil(dict:get("counter/x"), "moved, not copied")
            assert.is_true(c:inc("y") == MAX)
            assert.equal(5, c:get("z"))
            assert.same({ 42, 5 }, c:get_all({ "x", "z" }))
            ngx.sleep(0.3)
            assert.equal(0, c:get("z"), "with the time it had left")
            -- Once moved, the dict is not read again.
            dict:set("counter/x", 100)
            assert.equal(42, c:get("x"))
        end)

        it("are not taken when they are no integer, and left as they were", function()
            for i, raw in ipairs({ "abc", "1.5", " 1", "", 1.5, true }) do
                dict:set("counter/x" .. i, raw)
                assert.equal(1, c:inc("x" .. i))
                assert.equal(raw, dict:get("counter/x" .. i))
            end
        end)
    end)


    describe("inc_if and set_if", function()
        it("apply when the comparison holds and return new, old", function()
            local cases = {
                -- cmp, operand, holds for the value 5
                { "eq", 5, true }, { "eq", 4, false },
                { "ne", 4, true }, { "ne", 5, false },
                { "lt", 6, true }, { "lt", 5, false },
                { "le", 5, true }, { "le", 4, false },
                { "gt", 4, true }, { "gt", 5, false },
                { "ge", 5, true }, { "ge", 6, false },
                { "always", nil, true }, { "always", 99, true },
            }
            for _, case in ipairs(cases) do
                c:set("a", 5)
                local new, old = c:inc_if("a", case[1], case[2], 3)
                if case[3] then
                    assert.same({ 8, 5 }, { new, old }, case[1])
                else
                    assert.same({ 5, 5 }, { new, old }, case[1])
                end
                c:set("a", 5)
                new, old = c:set_if("a", case[1], case[2], -1)
                if case[3] then
                    assert.same({ -1, 5 }, { new, old }, case[1])
                else
                    assert.same({ 5, 5 }, { new, old }, case[1])
                end
            end
        end)

        it("compare a missing key as 0 and do not create it on failure", function()
            assert.same({ 0, 0 }, { c:inc_if("m", "gt", 0, 1) })
            assert.is_nil(dict:get("counter/m"))
            assert.same({ 1, 0 }, { c:inc_if("m", "eq", 0) })
        end)

        it("compare at the int64 edges and overflow only when applied", function()
            c:set("a", MAX)
            local new, old = c:inc_if("a", "lt", MAX, 1)
            assert.is_true(new == MAX and old == MAX)
            local v, err = c:inc_if("a", "eq", "9223372036854775807", 1)
            assert.is_nil(v)
            assert.equal("increment or decrement would overflow", err)
            new = c:set_if("a", "ge", MAX, MIN)
            assert.is_true(new == MIN)
        end)

        it("raise on a bad comparator or operand", function()
            assert.matches('bad "cmp" argument: one of always, eq, ne, lt, le, gt, ge '
                           .. 'expected, got "<" (a string)', raised(c.inc_if, c, "a", "<", 1),
                           1, true)
            assert.matches('bad "cmp" argument: one of always, eq, ne, lt, le, gt, ge '
                           .. 'expected, got nil', raised(c.set_if, c, "a", nil, 1, 1), 1, true)
            assert.matches('bad "operand" argument: number expected, got nil',
                           raised(c.inc_if, c, "a", "lt", nil, 1), 1, true)
            assert.matches('bad "operand" argument: nan is not a finite number',
                           raised(c.set_if, c, "a", "eq", 0 / 0, 1), 1, true)
            assert.matches('bad "n" argument: 0.5 is not an integer',
                           raised(c.inc_if, c, "a", "lt", 1, 0.5), 1, true)
        end)
    end)

    describe("batches", function()
        it("keep input order, with duplicates applied in turn", function()
            c:set("b", 10)
            local news = c:inc_all({ { "a", 1 }, { "b", 2 }, { "a", 5 }, { "c" } })
            assert.same({ 1, 12, 6, 1 }, news)
            assert.same({ 6, 12, 1, 0 }, c:get_all({ "a", "b", "c", "zz" }))
            assert.same({ 7, -1, 8 },
                        c:set_all({ { "a", 7 }, { "b", -1 }, { "c", 8 } }))
            assert.same({ 7, -1, 8 }, c:get_all({ "a", "b", "c" }))
            assert.same({}, c:get_all({}))
            assert.same({}, c:inc_all({}))
        end)

        it("apply conditional updates and return news and olds", function()
            c:set_all({ { "a", 1 }, { "b", 5 } })
            local news, olds = c:inc_all_if({
                { "a", "lt", 3, 10 }, { "b", "lt", 3, 10 }, { "a", "gt", 5, 1 },
                { "c", "always", nil, 2 },
            })
            assert.same({ 11, 5, 12, 2 }, news)
            assert.same({ 1, 5, 11, 0 }, olds)
            news, olds = c:set_all_if({ { "a", "eq", 12, 0 }, { "b", "ne", 5, 0 } })
            assert.same({ 0, 5 }, news)
            assert.same({ 12, 5 }, olds)
        end)

        it("see a key's value across entries whether or not they applied", function()
            c:set("a", 5)
            local news, olds = c:inc_all_if({ { "a", "lt", 0, 1 }, { "a", "always", nil, 1 },
                                              { "a", "eq", 6, 10 } })
            assert.same({ 5, 6, 16 }, news)
            assert.same({ 5, 5, 6 }, olds)
            assert.equal(16, c:get("a"))
        end)

        it("apply all or nothing", function()
            c:set("a", 1)
            c:set("b", MAX)
            local news, err, i = c:inc_all({ { "a", 1 }, { "b", 1 }, { "c", 1 } })
            assert.is_nil(news)
            assert.equal("increment or decrement would overflow", err)
            assert.equal(2, i)
            assert.equal(1, c:get("a"))
            assert.equal(0, c:get("c"))
            news, err, i = c:inc_all_if({ { "c", "eq", 0, 1 }, { "b", "always", nil, 1 } })
            assert.is_nil(news)
            assert.equal("increment or decrement would overflow", err)
            assert.equal(2, i)
            assert.same({ 1, 0 }, c:get_all({ "a", "c" }))
        end)

        it("raise on bad batches before touching anything", function()
            assert.matches('bad "updates" argument: table expected, got nil',
                           raised(c.inc_all, c), 1, true)
            assert.matches('bad "keys" argument: table expected, got "a" (a string)',
                           raised(c.get_all, c, "a"), 1, true)
            assert.matches('bad "updates" argument: entry 2: table expected, '
                           .. 'got "b" (a string)',
                           raised(c.set_all, c, { { "a", 1 }, "b" }), 1, true)
            assert.matches('bad "key" argument: empty string',
                           raised(c.inc_all, c, { { "a", 1 }, { "", 1 } }), 1, true)
            assert.matches('bad "n" argument: 1.5 is not an integer',
                           raised(c.inc_all_if, c, { { "a", "lt", 1, 1.5 } }), 1, true)
            assert.matches('bad "cmp" argument',
                           raised(c.set_all_if, c, { { "a", "lte", 1, 1 } }), 1, true)
            assert.matches('bad "n" argument: number expected, got nil',
                           raised(c.set_all, c, { { "a" } }), 1, true)
            assert.matches("strict_spec.lua:%d+:",
                           raised(function() c:inc_all({ { 1 } }) end))
            assert.equal(0, c:get("a"))
        end)
    end)

    describe("clear()", function()
        it("removes this counter's keys and nothing else", function()
            local other = strict.new("strict", { name = "other" })
            c:inc("a")
            c:inc("b", 2)
            other:inc("a", 3)
            dict:set("plain", 1)
            dict:set("counter", 1)
            assert.is_true(c:clear())
            assert.same({ 0, 0 }, c:get_all({ "a", "b" }))
            assert.equal(3, other:get("a"))
            assert.equal(1, dict:get("plain"))
            assert.equal(1, dict:get("counter"))
        end)
    end)

    describe("ttl", function()
        it("is set by the call that creates the key, and kept by later ones", function()
            assert.equal(1, c:inc("w", 1, 0.3))
            ngx.sleep(0.1)
            assert.equal(3, c:inc("w", 2))
            assert.equal(4, c:inc("w", 1, 10), "a ttl on an existing key changes nothing")
            local new = c:inc_if("w", "lt", 100, 1)
            assert.equal(5, new)
            c:inc_all({ { "w", 1 } })
            -- Kept from the first call (0.3 s, 0.1 s ago), not renewed
            -- (10 s): gone 0.3 s later.
            assert.equal(6, c:get("w"))
            ngx.sleep(0.3)
            assert.equal(0, c:get("w"))
            assert.equal(1, c:inc("w"), "an expired key starts again from 0")
        end)

        it("is absent unless asked for; set replaces it", function()
            c:inc("a")
            c:set("b", 5, 0.2)
            c:set("c", 5, 0.2)
            c:set("c", 6)
            c:set_all({ { "d", 1, 0.2 } })
            c:inc_all({ { "e", 1, 0.2 } })
            c:set("e", 2)
            ngx.sleep(0.3)
            assert.same({ 1, 0, 6, 0, 2 }, c:get_all({ "a", "b", "c", "d", "e" }))
        end)
    end)

    describe("batches of other workers", function()
        it("make updates of their keys wait, and time out with nil, \"timeout\"", function()
            local quick = strict.new("strict", { timeout = 0.05 })
            -- The master's pid: a live process of this nginx.
            local release = hold("strict", "k", master_pid())
            local v, err = quick:inc("k")
            assert.is_nil(v)
            assert.equal("timeout", err)
            v, err = quick:get("k")
            assert.is_nil(v)
            assert.equal("timeout", err)
            local news
            news, err = quick:inc_all({ { "j", 1 } })
            assert.is_nil(news)
            assert.equal("timeout", err, "one batch at a time")
            assert.equal(1, quick:inc("j"), "other keys are free")
            release()
            assert.equal(1, quick:inc("k"))
            assert.same({ 2, 1 }, quick:inc_all({ { "j", 1 }, { "k", 0 } }))
        end)

        it_http("time out in the log phase too, spinning for the timeout only", function()
            local release = hold("strict", "held", master_pid())
            local body = race.get("/strict/log_timeout")
            assert.matches("200 OK", body)
            for _ = 1, 100 do
                if dict:get("log_timeout:err") then
                    break
                end
                ngx.sleep(0.01)
            end
            release()
            assert.equal("timeout", dict:get("log_timeout:err"))
            local took = dict:get("log_timeout:took")
            assert.is_true(took >= 0.049 and took < 0.5, tostring(took))
        end)

        it("are finished (rolled back) when their worker died", function()
            c:set("k", 7)
            -- A pid past pid_max: no such process.
            hold("strict", "k", 4194305)
            assert.equal(8, c:inc("k"))
            assert.equal(9, c:inc("k"))
            assert.same({ 10 }, c:inc_all({ { "k", 1 } }))
        end)
    end)

    describe("a full engine", function()
        it("refuses new keys with nil, err and evicts nothing", function()
            fresh("strict_small")
            local s = assert(strict.new("strict_small"))
            assert(s:clear())
            local n, err = 0, nil
            for i = 1, 10000 do
                local v
                v, err = s:inc("key" .. i, 1)
                if not v then
                    break
                end
                n = i
            end
            assert.equal("no room for a new key in the shared engine", err)
            assert.is_true(n > 10)
            for i = 1, n do
                assert.equal(1, s:get("key" .. i))
            end
            assert.equal(0, s:get("key" .. (n + 1)), "a read makes no record")
            assert(s:clear())
        end)
    end)

    describe("keys made with a ttl, many more than fit", function()
        it_http("give their room back once expired; values stay exact",
                function()
            local churn = require "helpers.strict_churn"
            local engine = require "resty.counter.engine"
            -- How many such keys (6-digit numbers: records of one size)
            -- the engine holds at once.
            local full = assert(strict.new("strict_churn_full",
                                           { name = "churn" }))
            local capacity
            for i = 1, 100000 do
                if not full:inc("k" .. (100000 + i)) then
                    capacity = i - 1
                    break
                end
            end
            assert.is_true(capacity > 20 and capacity < 10000,
                           tostring(capacity))
            -- A new key every `interval` s, at capacity / 18 a second, for
            -- 45 s: 2.5 times what the engine holds. Each is made here
            -- (worker 0) with a ttl of 1 s, counted again by whichever
            -- worker the kernel picks, and read here: 2. A record is
            -- swept within a second of its expiry and its room comes back
            -- 10 s after its removal (docs/engine.md): about 12 s of keys
            -- are held at a time, 0.7 of what fits.
            local interval = 18 / capacity
            local counter = churn.counter()
            local made, refused, wrong, slow, seen = 0, 0, 0, 0, {}
            local last_err
            ngx.update_time()
            local start = ngx.now()
            local keys = math.floor(45 / interval)
            for n = 1, keys do
                local key = "k" .. (200000 + n)
                ngx.update_time()
                local began = ngx.now()
                local new, err = churn.inc(key)
                if new ~= 1 then
                    refused = refused + 1
                    last_err = err or ("first inc: " .. tostring(new))
                else
                    made = made + 1
                    local body = assert(race.get("/strict/churn?key="
                                                 .. key))
                    local worker, other = body:match(
                        "worker (%d) (%S+) (%S+)\n")
                    assert(worker, body)
                    seen[worker] = true
                    local value = counter:get(key)
                    ngx.update_time()
                    -- Read back within the ttl (a stall of 1 s on a busy
                    -- machine lets the key expire: counted apart).
                    if ngx.now() - began > 0.8 then
                        slow = slow + 1
                    elseif other ~= "2" or value ~= 2 then
                        wrong = wrong + 1
                        last_err = body .. " read " .. tostring(value)
                    end
                end
                -- Output now and then: the runner's watchdog stops a run
                -- silent for 40 s.
                if n % math.floor(15 / interval) == 0 then
                    io.write(string.format(
                        "\nstrict churn: %d keys of %d so far, %d fit\n",
                        n, keys, capacity))
                end
                -- Paced from the start (no drift).
                local ahead = start + n * interval - ngx.now()
                if ahead > 0 then
                    ngx.sleep(ahead)
                end
            end
            assert.equal(0, refused, tostring(last_err))
            assert.equal(0, wrong, tostring(last_err))
            assert.is_true(slow < made / 10, slow .. " slow of " .. made)
            assert.is_true(made > 2 * capacity,
                           made .. " keys, " .. capacity .. " fit")
            assert.is_true(seen["1"], "worker 1 counted keys")
            local stats = engine.stats(assert(engine.attach("strict_churn")))
            assert.is_true(stats.removed > capacity, stats.removed)
            assert.is_true(stats.reused > 0, stats.reused)
            assert.is_true(counter:self_metrics().swept > 0)
        end)
    end)


    describe("del", function()
        it("gives the key's record back at once", function()
            local engine = require "resty.counter.engine"
            local handle = assert(engine.attach("strict"))
            local g = assert(strict.new("strict", { name = "gone" }))
            assert(g:clear())
            assert.equal(3, g:inc("k", 3))
            local before = engine.stats(handle)
            assert.equal(3, g:del("k"))
            local after = engine.stats(handle)
            assert.equal(before.removed + 1, after.removed)
            assert.equal(before.keys - 1, after.keys)
            assert.equal(1, g:self_metrics().swept)
            -- The kept cells went with it: a new record counts from 0.
            assert.equal(0, g:get("k"))
            assert.equal(1, g:inc("k"))
            assert.equal(1, g:get("k"))
        end)

        -- What a remover killed between its swap to GONE and the removal
        -- leaves: a record still in the index whose pair is GONE (written
        -- here by hand). Every call that meets it goes on with a new
        -- record for the key.
        it("a record left GONE is reclaimed by the next call", function()
            local ffi = require "ffi"
            local abi = require "resty.counter.abi"
            local engine = require "resty.counter.engine"
            local handle = assert(engine.attach("strict"))
            local function leave_gone(name, key)
                local cells = assert(engine.record(handle, abi.STRICT_KIND,
                                                   name .. "/" .. key,
                                                   abi.STRICT_WIDTH, false))
                local at = ffi.cast("uintptr_t", cells)
                local pair = ffi.cast("uint64_t *", (at + 15) - (at + 15) % 16)
                pair[0] = -1ULL
                pair[1] = 2
            end
            local g = assert(strict.new("strict", { name = "left_gone" }))
            assert(g:clear())
            assert.equal(5, g:inc("k", 5))
            assert.equal(1, g:set("absent", 1))
            assert.equal(1, g:del("absent"))
            local removed = engine.stats(handle).removed
            -- Its cells are in g's cache, and no epoch moved: the update
            -- itself meets GONE.
            leave_gone("left_gone", "k")
            assert.equal(0, g:get("k"), "GONE reads absent")
            assert.equal(2, g:inc("k", 2))
            assert.equal(removed + 1, engine.stats(handle).removed)
            assert.equal(2, g:get("k"))
            -- A batch meets it: rolled back, run again on a new record.
            leave_gone("left_gone", "k")
            assert.same({ 3, 1 }, g:inc_all({ { "k", 3 }, { "b" } }))
            assert.same({ 3, 1 }, g:get_all({ "k", "b" }))
            -- A snapshot too.
            leave_gone("left_gone", "b")
            assert.same({ 3, 0 }, g:get_all({ "k", "b" }))
            assert.equal(0, g:del("b"))
        end)

        it("leaves a batch's keys whole", function()
            local g = assert(strict.new("strict", { name = "gone_batch" }))
            assert(g:clear())
            assert.same({ 1, 2 }, g:inc_all({ { "a" }, { "b", 2 } }))
            assert.equal(1, g:del("a"))
            assert.same({ 5, 7 }, g:inc_all({ { "a", 5 }, { "b", 5 } }))
            assert.same({ 5, 7 }, g:get_all({ "a", "b" }))
        end)
    end)


    describe("with two workers racing", function()
        it_http("holds every invariant exactly", function()
            local N, CAP = 2000, 8000
            local threads = {}
            local function send(count)
                for _ = 1, count do
                    local i = #threads + 1
                    local path = (i % 2 == 0 and "/race/log" or "/race/content")
                                 .. "?n=" .. N .. "&cap=" .. CAP
                    threads[i] = ngx.thread.spawn(race.get, path)
                end
            end
            -- The kernel spreads connections at random: more requests
            -- until worker 1 has one (8 all to worker 0: 1 in 256).
            send(8)
            -- Worker 0 starts its own run once worker 1 runs one: they
            -- overlap while worker 1 works through its requests.
            for round = 1, 500 do
                if dict:get("tally:started:1") then
                    break
                end
                if round % 50 == 0 and #threads < 32 then
                    send(8)
                end
                ngx.sleep(0.002)
            end
            race.run({ n = N, cap = CAP })
            for i = 1, #threads do
                local ok, body, err = ngx.thread.wait(threads[i])
                assert.is_true(ok)
                assert.matches("200 OK", body or err)
            end
            local runs = #threads + 1
            -- Log phases finish after their responses.
            for _ = 1, 300 do
                if dict:get("tally:done") == runs then
                    break
                end
                ngx.sleep(0.01)
            end
            assert.equal(runs, dict:get("tally:done"))

            local c2 = strict.new("strict", { name = "race" })
            assert.equal(nil, dict:get("tally:first_err"))
            assert.equal(0, dict:get("tally:errors"))
            -- At least 9 * 2000 = 18000 attempts for a cap of 8000.
            assert.equal(CAP, c2:get("capped"))
            assert.equal(CAP, dict:get("tally:applied"))
            assert.equal(dict:get("tally:cas"), c2:get("cas"))
            assert.is_true(c2:get("cas") > N)
            assert.equal(0, dict:get("tally:torn"))
            assert.equal(runs * N, c2:get("pair_a"))
            assert.equal(runs * N, c2:get("pair_b"))
            assert.is_not_nil(dict:get("tally:worker:0"))
            assert.is_not_nil(dict:get("tally:worker:1"), "worker 1 took no part")
            -- How contended the locks were (waits in the phases that can
            -- yield and in the log phase, which spins): shown, not
            -- required, since it depends on how the kernel schedules the
            -- two workers on a busy machine. With the locks disabled this
            -- spec fails (docs/tests.md).
            io.write(string.format("\nrace: lock waits timer %s content %s log %s\n",
                tostring(dict:get("tally:waits:timer")),
                tostring(dict:get("tally:waits:content")),
                tostring(dict:get("tally:waits:log"))))
        end)
    end)
end)
