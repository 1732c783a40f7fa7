-- resty.counter.limit inside a real nginx worker (spec/run-in-nginx.lua),
-- on an injected clock.

local limit = require "resty.counter.limit"
local abi = require "resty.counter.abi"
local engine = require "resty.counter.engine"
local ffi = require "ffi"

-- Specs that send requests to this nginx (see spec/helpers/it_http.lua).
local it_http = require("helpers.it_http")(it, pending)


local function raised(fn, ...)
    local ok, err = pcall(fn, ...)
    assert(not ok, "expected an error")
    return err
end


describe("resty.counter.limit", function()
    local t
    -- Records stay in the engine (a flush of the dict leaves them): each
    -- test names its limiters apart.
    local run = 0

    local function clock()
        return t
    end

    before_each(function()
        run = run + 1
        t = 1000
    end)

    -- limit.new with the names of this test.
    local function new(dict_name, opts)
        opts.name = (opts.name or "limit") .. "-" .. run
        return limit.new(dict_name, opts)
    end

    -- A limiter's counts of `key` in the window of now: current, previous
    -- (read from its record in the engine; 0, 0 when there is none).
    local prev_out, current_out = ffi.new("double[1]"), ffi.new("double[1]")
    local function counts(lim, key)
        local handle = assert(engine.attach("limit"))
        local cells = engine.record(handle, abi.LIMIT_KIND,
                                    lim.prefix .. key, abi.LIMIT_WIDTH, false)
        if not cells then
            return 0, 0
        end
        local index = math.floor(t / lim.window)
        assert(abi.C.rc_limit_counts(cells, index, prev_out, current_out) >= 0)
        return current_out[0], prev_out[0]
    end

    describe("new()", function()
        it("returns nil and a clear error for an unknown dict", function()
            local lim, err = limit.new("no_such_dict", { limit = 1, window = 1 })
            assert.is_nil(lim)
            assert.equal('shared dict "no_such_dict" not found', err)
        end)

        it("raises on bad options, blaming the caller", function()
            local cases = {
                { nil, 'bad "opts" argument: table expected, got nil' },
                { {}, 'bad "opts.limit" argument: an integer from 1 to 4294967295 '
                       .. 'expected, got nil' },
                { { limit = 0, window = 1 }, 'bad "opts.limit"' },
                { { limit = 1.5, window = 1 }, 'bad "opts.limit"' },
                { { limit = 0 / 0, window = 1 }, 'bad "opts.limit"' },
                { { limit = 1 / 0, window = 1 }, 'bad "opts.limit"' },
                { { limit = 1 }, 'bad "opts.window" argument' },
                { { limit = 1, window = 0 }, 'bad "opts.window"' },
                { { limit = 1, window = 1 / 0 }, 'bad "opts.window"' },
                { { limit = 1, window = 1, algorithm = "leaky" },
                  'bad "opts.algorithm" argument: "fixed" or "sliding" expected, '
                  .. 'got "leaky" (a string)' },
                { { limit = 1, window = 1, name = "a/b" }, 'bad "opts.name"' },
                { { limit = 1, window = 1, clock = 5 }, 'bad "opts.clock"' },
                { { limit = 1, window = 1, shadow = "yes" },
                  'bad "opts.shadow" argument: boolean expected, got "yes" '
                  .. '(a string)' },
                { { limit = 1, window = 1, near_limit_ratio = 0 },
                  'bad "opts.near_limit_ratio" argument: a number above 0 and '
                  .. 'at most 1 expected, got 0 (a number)' },
                { { limit = 1, window = 1, near_limit_ratio = 1.5 },
                  'bad "opts.near_limit_ratio"' },
                { { limit = 1, window = 1, near_limit_ratio = 0 / 0 },
                  'bad "opts.near_limit_ratio"' },
                { { limit = 1, window = 1, near_limit_ratio = "0.8" },
                  'bad "opts.near_limit_ratio"' },
                { { limit = 1, window = 1, shadwo = true },
                  'bad "opts" argument: unknown option "shadwo" (did you mean '
                  .. '"shadow"?)' },
                { { limit = 1, window = 1, near_limit = 0.9 },
                  'bad "opts" argument: unknown option "near_limit"' },
            }
            for _, case in ipairs(cases) do
                assert.matches(case[2], raised(limit.new, "limit", case[1]), 1, true)
            end
            assert.matches("limit_spec.lua:%d+:",
                           raised(function() limit.new("limit", {}) end))
        end)
    end)

    describe("fixed window", function()
        local lim

        before_each(function()
            lim = assert(new("limit", { limit = 3, window = 10, clock = clock }))
        end)

        it("allows `limit` events per window, then rejects", function()
            assert.same({ 0, 2 }, { lim:incoming("a", true) })
            assert.same({ 0, 1 }, { lim:incoming("a", true) })
            assert.same({ 0, 0 }, { lim:incoming("a", true) })
            assert.same({ nil, "rejected" }, { lim:incoming("a", true) })
            assert.same({ nil, "rejected" }, { lim:incoming("a", true) })
            assert.same({ 0, 2 }, { lim:incoming("b", true) }, "keys are apart")
            t = 1009.999
            assert.same({ nil, "rejected" }, { lim:incoming("a", true) })
            t = 1010
            assert.same({ 0, 2 }, { lim:incoming("a", true) }, "a new window")
        end)

        it("does not count a dry run or a rejection", function()
            assert.same({ 0, 2 }, { lim:incoming("a", false) })
            assert.same({ 0, 2 }, { lim:incoming("a", false) })
            for _ = 1, 3 do
                lim:incoming("a", true)
            end
            assert.same({ nil, "rejected" }, { lim:incoming("a", false) })
            lim:incoming("a", true)
            assert.equal(3, counts(lim, "a"), "the rejection was not counted")
        end)

        it("gives an event back with uncommit", function()
            for _ = 1, 3 do
                lim:incoming("a", true)
            end
            assert.is_true(lim:uncommit("a"))
            assert.same({ 0, 0 }, { lim:incoming("a", true) })
            assert.same({ nil, "not found" }, { lim:uncommit("zz") })
            lim:incoming("z", true)
            assert.is_true(lim:uncommit("z"))
            assert.same({ nil, "nothing to uncommit" }, { lim:uncommit("z") })
            assert.equal(0, counts(lim, "z"))
            lim:incoming("z", true)
            t = 1010
            assert.same({ nil, "nothing to uncommit" }, { lim:uncommit("z") },
                        "the new window counted nothing")
        end)

        it("combines with another limiter", function()
            local strict2 = new("limit", { limit = 1, window = 10, clock = clock,
                                                 name = "other" })
            local function both(key)
                local delay, err = lim:incoming(key, true)
                if not delay then
                    return nil, err
                end
                delay, err = strict2:incoming(key, true)
                if not delay then
                    lim:uncommit(key)
                    return nil, err
                end
                return true
            end
            assert.is_true(both("a"))
            assert.same({ nil, "rejected" }, { both("a") })
            assert.same({ nil, "rejected" }, { both("a") })
            assert.same({ 0, 1 }, { lim:incoming("a", false) },
                        "the first limiter counted one event only")
        end)

        it("tells how long until the window frees", function()
            t = 1002.5
            assert.equal(0, lim:wait("a"))
            assert.equal(7.5, lim:reset("a"))
            for _ = 1, 3 do
                lim:incoming("a", true)
            end
            assert.equal(7.5, lim:wait("a"))
        end)

        it("rolls its counts with the windows", function()
            lim:incoming("a", true)
            lim:incoming("a", true)
            t = 1010
            assert.same({ 0, 2 }, { lim:incoming("a", true) })
            assert.same({ 1, 2 }, { counts(lim, "a") })
            t = 1030
            assert.same({ 0, 0 }, { counts(lim, "a") }, "two windows on")
        end)

        it("refuses a limit past 32 bits on one node", function()
            assert.matches('bad "opts.limit" argument: an integer from 1 to '
                           .. '4294967295 expected, got 4294967296',
                           raised(limit.new, "limit",
                                  { limit = 2 ^ 32, window = 1 }), 1, true)
            local big = assert(new("limit", { limit = 2 ^ 32 - 1,
                                             window = 10, clock = clock }))
            assert.same({ 0, 2 ^ 32 - 2 }, { big:incoming("a", true) })
        end)

        it("raises on bad keys", function()
            -- Named "limit": the longest key depends on the name.
            local plain = assert(limit.new("limit", { limit = 3, window = 10 }))
            for _, m in ipairs({ "incoming", "uncommit", "wait", "reset" }) do
                assert.matches('bad "key" argument: string expected, got nil',
                               raised(plain[m], plain), 1, true)
                assert.matches('bad "key" argument: empty string',
                               raised(plain[m], plain, ""), 1, true)
                assert.matches('bad "key" argument: 65535 bytes, longer than 65512',
                               raised(plain[m], plain, ("k"):rep(65535)), 1, true)
            end
        end)
    end)

    describe("a full engine", function()
        it("refuses new keys with nil, err; keys it has keep counting",
           function()
            local lim = assert(new("limit_small", { limit = 2, window = 10,
                                                   clock = clock }))
            local n, err = 0, nil
            for i = 1, 10000 do
                local delay
                delay, err = lim:incoming("key" .. i, true)
                if not delay then
                    break
                end
                n = i
            end
            assert.equal("no room for a new key in the shared engine", err)
            assert.is_true(n > 10, tostring(n))
            local handle = assert(engine.attach("limit_small"))
            assert.is_true(engine.stats(handle).refused >= 1)
            assert.same({ 0, 0 }, { lim:incoming("key1", true) })
            assert.same({ nil, "rejected" }, { lim:incoming("key1", true) })
            local missing = "key" .. (n + 1)
            assert.same({ 0, 1 }, { lim:incoming(missing, false) },
                        "a dry run needs no record")
            assert.equal(0, lim:wait(missing))
            assert.same({ nil, "not found" }, { lim:uncommit(missing) })
        end)
    end)


    describe("a limit per client over many clients", function()
        -- Keys with 6-digit numbers: all records of one size.
        local function fill_count()
            local full = assert(limit.new("limit_churn_full", {
                limit = 1, window = 1, name = "churn",
                clock = function() return 1000 end }))
            for i = 1, 100000 do
                if not full:incoming("k" .. (100000 + i), true) then
                    return i - 1
                end
            end
        end

        it_http("removes records of past windows; new keys reuse the room",
                function()
            local churn = require "helpers.limit_churn"
            local race = require "helpers.race"
            -- How many such keys the engine holds at once.
            local capacity = fill_count()
            assert.is_true(capacity > 20 and capacity < 10000,
                           tostring(capacity))
            -- New keys at capacity / 20 a second, one in worker 0 and one
            -- in whichever worker the kernel picks each batch, for 28 s:
            -- 1.4 times what the engine holds. A record is stale 2 windows
            -- after its event, swept within a second, and its room comes
            -- back 10 s after its removal (docs/engine.md): about 14 s of
            -- keys are held at a time, 0.7 of what fits.
            local interval = 2 / (capacity / 20)
            local from, allowed, refused, seen = 200000, 0, 0, {}
            local last_err
            ngx.update_time()
            local start = ngx.now()
            local batches = math.floor(28 / interval)
            for batch = 1, batches do
                local a, r, err = churn.run(from, 1)
                allowed, refused = allowed + a, refused + r
                last_err = err or last_err
                local body = assert(race.get("/limit/churn?from="
                                             .. (from + 1) .. "&n=1"))
                from = from + 2
                local worker, a2, r2, err2 = body:match(
                    "worker (%d) allowed (%d+) refused (%d+) (.*)\n")
                assert(worker, body)
                seen[worker] = true
                allowed, refused = allowed + a2, refused + r2
                if err2 ~= "nil" then
                    last_err = err2
                end
                ngx.update_time()
                local pause = start + batch * interval - ngx.now()
                if pause > 0 then
                    ngx.sleep(pause)
                end
            end
            local stats = engine.stats(assert(engine.attach("limit_churn")))
            assert.equal(0, refused, tostring(last_err))
            assert.is_true(allowed > 1.2 * capacity,
                           allowed .. " keys, " .. capacity .. " fit")
            assert.is_true(seen["1"], "worker 1 made keys")
            assert.is_true(stats.removed > 0.2 * capacity, stats.removed)
            assert.is_true(stats.reused > 0, stats.reused)
        end)
    end)


    describe("a removed record", function()
        it_http("never gets the event of a worker that kept its cells",
                function()
            local race = require "helpers.race"
            -- Worker 1's answer to an event of "k" at `now`.
            local function event_in_worker_1(now)
                for _ = 1, 200 do
                    local body = assert(race.get("/limit/kept?key=k&now="
                                                 .. now))
                    local answer = body:match("\r\n\r\n(.*)\n$")
                    if answer ~= "skipped" then
                        return answer
                    end
                end
                error("worker 1 never took a request")
            end

            assert.equal("allowed", event_in_worker_1(1000))
            assert.equal("rejected", event_in_worker_1(1001),
                         "worker 1 counts in the record it keeps")
            -- Two windows on, this worker's sweep removes the record.
            t = 1025
            local lim = assert(limit.new("limit", { limit = 1, window = 10,
                                                    name = "kept",
                                                    clock = clock }))
            assert.same({ 0, 0 }, { lim:incoming("other", true) })
            local handle = assert(engine.attach("limit"))
            assert.is_nil(engine.record(handle, abi.LIMIT_KIND, "kept/k",
                                        abi.LIMIT_WIDTH, false))
            -- Worker 1's next event goes into a record of its own, that
            -- this worker sees: its event is over the limit.
            assert.equal("allowed", event_in_worker_1(1025))
            assert.is_not_nil(engine.record(handle, abi.LIMIT_KIND, "kept/k",
                                            abi.LIMIT_WIDTH, false))
            assert.same({ nil, "rejected" }, { lim:incoming("k", true) })
        end)
    end)


    describe("sliding window", function()
        local lim

        before_each(function()
            lim = assert(new("limit", { limit = 10, window = 1, clock = clock,
                                              algorithm = "sliding" }))
        end)

        it("weighs the previous window by what is left of it", function()
            for _ = 1, 10 do
                assert.is_not_nil(lim:incoming("a", true))
            end
            assert.same({ nil, "rejected" }, { lim:incoming("a", true) })
            -- Next window, 0.5 s in: 10 * 0.5 + current.
            t = 1001.5
            for i = 1, 5 do
                assert.same({ 0, 5 - i }, { lim:incoming("a", true) })
            end
            assert.same({ nil, "rejected" }, { lim:incoming("a", true) })
            -- 0.75 s in: 10 * 0.25 + 5 = 7.5, room for 2.
            t = 1001.75
            assert.same({ 0, 1 }, { lim:incoming("a", false) })
            assert.same({ 0, 1 }, { lim:incoming("a", true) })
            assert.same({ 0, 0 }, { lim:incoming("a", true) })
            assert.same({ nil, "rejected" }, { lim:incoming("a", true) })
            -- Two windows later nothing is left.
            t = 1003.1
            assert.same({ 0, 9 }, { lim:incoming("a", true) })
        end)

        it("tells when the estimate first leaves room", function()
            for _ = 1, 10 do
                lim:incoming("a", true)
            end
            t = 1001.2
            -- 10 * 0.8 + 0 = 8: allowed now.
            assert.equal(0, lim:wait("a"))
            lim:incoming("a", true)
            lim:incoming("a", true)
            -- 10 * (1 - e) + 2 + 1 <= 10 from e = 0.3.
            local wait = lim:wait("a")
            assert.is_true(math.abs(wait - 0.1) < 1e-9, tostring(wait))
        end)
    end)

    describe("shadow mode", function()
        -- The same events through an enforcing limiter and a shadow one:
        -- the same counts, the same decisions, but the shadow one lets
        -- every event through.
        local function same_decisions(algorithm, limit_n, window, steps)
            local opts = { limit = limit_n, window = window, clock = clock,
                           algorithm = algorithm }
            opts.name = "enforce"
            local enforce = assert(new("limit", opts))
            opts.name, opts.shadow = "shadow", true
            local shadow = assert(new("limit", opts))

            local would = 0
            for _, step in ipairs(steps) do
                t = step.t
                for _ = 1, step.events do
                    local e = { enforce:incoming("k", true) }
                    local s = { shadow:incoming("k", true) }
                    if e[1] == nil then
                        assert.same({ nil, "rejected" }, e)
                        assert.same({ 0, 0, "rejected" }, s)
                        would = would + 1
                    else
                        assert.same(e, s)
                    end
                end
                assert.same({ counts(enforce, "k") }, { counts(shadow, "k") })
                assert.equal(enforce:wait("k"), shadow:wait("k"))
            end

            local e, s = enforce:self_metrics(), shadow:self_metrics()
            assert.equal(would, e.rejected)
            assert.equal(0, e.shadow_rejected)
            assert.equal(0, s.rejected)
            assert.equal(would, s.shadow_rejected)
            assert.equal(e.allowed, s.allowed)
            assert.equal(e.near_limit, s.near_limit)
            return would, s
        end

        it("decides and counts as enforced, and never rejects", function()
            local would, m = same_decisions("fixed", 3, 10, {
                { t = 1000, events = 5 }, { t = 1009, events = 2 },
                { t = 1010, events = 2 }, { t = 1015, events = 4 },
            })
            -- 1000-1009: 3 of 7; 1010-1019: 3 of 6.
            assert.equal(7, would)
            assert.equal(6, m.allowed)
        end)

        it("follows the sliding estimate as enforced", function()
            local would = same_decisions("sliding", 10, 1, {
                { t = 1000.2, events = 14 }, { t = 1001.5, events = 8 },
                { t = 1001.75, events = 3 }, { t = 1002.1, events = 12 },
                { t = 1004, events = 11 },
            })
            assert.is_true(would > 0)
        end)

        it("answers a dry run as it would a commit, counting nothing",
           function()
            local lim = assert(new("limit", {
                limit = 1, window = 10, clock = clock, shadow = true }))
            assert.same({ 0, 0 }, { lim:incoming("a", true) })
            assert.same({ 0, 0, "rejected" }, { lim:incoming("a", false) })
            assert.equal(1, counts(lim, "a"))
            assert.same({ allowed = 1, near_limit = 1, rejected = 0,
                          shadow_rejected = 0, failed_open = 0,
                          failed_closed = 0 }, lim:self_metrics())
        end)
    end)

    describe("near-limit counts", function()
        local function near(opts, events)
            opts.window, opts.clock = 10, clock
            local lim = assert(new("limit", opts))
            for _ = 1, events do
                lim:incoming("a", true)
            end
            return lim:self_metrics()
        end

        it("counts allowed events from 0.8 of the limit by default",
           function()
            -- 8, 9 and 10 of 10 are near; 11 and 12 are rejected.
            local m = near({ limit = 10 }, 12)
            assert.equal(10, m.allowed)
            assert.equal(3, m.near_limit)
            assert.equal(2, m.rejected)
            run = run + 1
            assert.equal(6, near({ limit = 10, near_limit_ratio = 0.5 },
                                 12).near_limit)
            run = run + 1
            assert.equal(1, near({ limit = 10, near_limit_ratio = 1 },
                                 12).near_limit)
            run = run + 1
            -- 0.28 * 25 is 7.0000000000000009 in doubles, 7 / 25 is 0.28:
            -- the 7th event is near.
            assert.equal(4, near({ limit = 25, near_limit_ratio = 0.28 },
                                 10).near_limit)
        end)

        it("weighs the previous window in the sliding estimate", function()
            local lim = assert(new("limit", {
                limit = 10, window = 1, clock = clock, algorithm = "sliding",
                near_limit_ratio = 0.5 }))
            for _ = 1, 4 do
                lim:incoming("a", true)
            end
            assert.equal(0, lim:self_metrics().near_limit)
            -- 0.5 s into the next window: 4 * 0.5 + 3 = 5 is near.
            t = 1001.5
            for _ = 1, 2 do
                lim:incoming("a", true)
            end
            assert.equal(0, lim:self_metrics().near_limit)
            lim:incoming("a", true)
            assert.equal(1, lim:self_metrics().near_limit)
        end)

        it("counts neither dry runs nor uncommitted limits apart", function()
            local lim = assert(new("limit", { limit = 2, window = 10,
                                                    clock = clock }))
            lim:incoming("a", false)
            lim:incoming("a", true)
            lim:incoming("a", true)
            lim:incoming("a", false)
            local other = assert(new("limit", {
                limit = 2, window = 10, clock = clock, name = "other" }))
            other:incoming("a", true)
            assert.same({ 2, 1, 0 }, { lim:self_metrics().allowed,
                                       lim:self_metrics().near_limit,
                                       lim:self_metrics().rejected })
            assert.equal(1, other:self_metrics().allowed)
        end)
    end)

    describe("set_headers()", function()
        it_http("sets the RateLimit headers and Retry-After", function()
            -- Through a request: headers need one.
            local race = require "helpers.race"
            local body = race.get("/limit/headers")
            assert.matches("RateLimit%-Limit: 2\r\n", body)
            assert.matches("RateLimit%-Remaining: 1\r\n", body)
            assert.matches("RateLimit%-Reset: %d+\r\n", body)
            assert.is_nil(body:find("Retry-After", 1, true))
            race.get("/limit/headers")
            body = race.get("/limit/headers")
            assert.matches("HTTP/1.1 429", body)
            assert.matches("RateLimit%-Remaining: 0\r\n", body)
            assert.matches("Retry%-After: %d+\r\n", body)
        end)
    end)
end)
