-- resty.counter's keys rendered in the engine (c:prometheus() and
-- resty.counter.metrics' render()), inside a real nginx worker (run by
-- spec/run-in-nginx.lua): byte for byte what the Lua renderer writes,
-- every key once, and values that only grow while another worker counts.
--
-- Each dict here is this spec's own: a rendering lists all its keys.

local counter = require "resty.counter"
local metrics = require "resty.counter.metrics"
local race = require "helpers.race"

-- Specs that send requests to this nginx (see spec/helpers/it_http.lua).
local it_http = require("helpers.it_http")(it, pending)

local MAX_SAFE = 2^53 - 1


local registries_made = 0


-- The rendering of a registry holding `c` (added with `opts`), by the
-- engine and by Lua.
local function both_renders(c, opts)
    registries_made = registries_made + 1
    local m = assert(metrics.new("metrics",
                                 { name = "prom" .. registries_made }))
    m:add(c, opts)
    local by_engine = m:render()
    metrics._engine_keys = false
    local ok, by_lua = pcall(m.render, m)
    metrics._engine_keys = true
    assert(ok, by_lua)
    return by_engine, by_lua
end


-- Asserts that two renderings are the same bytes, showing the first line
-- where they differ.
local function same_text(by_lua, by_engine, what)
    if by_lua == by_engine then
        return
    end
    local a, b = {}, {}
    for line in by_lua:gmatch("([^\n]*)\n") do
        a[#a + 1] = line
    end
    for line in by_engine:gmatch("([^\n]*)\n") do
        b[#b + 1] = line
    end
    for i = 1, math.max(#a, #b) do
        assert.equal(a[i], b[i], (what or "") .. " line " .. i)
    end
    assert.equal(by_lua, by_engine, what)
end


-- The lines of `text` that start with `family`.
local function family_lines(text, family)
    local lines = {}
    for line in text:gmatch("([^\n]*)\n") do
        if line:sub(1, #family + 1) == family .. "{"
           or line:sub(1, #family + 1) == family .. " "
        then
            lines[#lines + 1] = line
        end
    end
    return lines
end


-- Keys and steps that test the escaping and the number format: quotes,
-- backslashes, newlines, bytes that are not UTF-8 (alone, and next to
-- escapes), UTF-8, NUL, separators at either end; values near +-2^53,
-- negative, fractional ones that need 17 digits, one whose 17th digit is a
-- tie (2^-25), tiny and large.
local TRICKY = {
    { "plain", { 3 } },
    { 'q"b\\s\nn', { 2 } },
    { "bin\255\128", { 1 } },
    { "mixed\255\"\\\nend", { -4 } },
    { "caf\195\169 \226\130\172", { 7 } },
    { "nul\0byte", { 5 } },
    { "a:b:c", { MAX_SAFE } },
    { "neg:max", { -MAX_SAFE } },
    { "a::", { 2^51, 0.5 } },
    { ":lead", { 0.1, 0.2 } },
    { "third", { 1 / 3 } },
    { "tie", { 2^-25 } },
    { "tiny", { 1e-300 } },
    { "half", { -0.5 } },
    { "big:frac", { 2^52, 0.5 } },
    { "large", { 123456789012, 0.125 } },
    { "zero", { 5, -5 } },
    { "ab", { 1 } },
    { "abc", { 1 } },
    { "ab\255", { 1 } },
    { "b", { 2^50 } },
    -- Two keys, one series (summed): the byte 0xff shows as \xff.
    { "lit\\xff", { 2 } },
    { "lit\255", { 3.5 } },
}


describe("resty.counter's keys rendered in the engine", function()
    it("c:prometheus() raises on misuse and refuses a counter synced by "
       .. "hand", function()
        local c = assert(counter.new("counter_prom", 60))
        assert.error_matches(function() c.prometheus("x") end,
                             "use c:prometheus(...), not c.prometheus(...)",
                             1, true)
        assert.error_matches(function() c:prometheus("9bad") end,
                             'bad "name" argument: a metric name '
                             .. "([a-zA-Z_:][a-zA-Z0-9_:]*) expected, got "
                             .. '"9bad" (a string)', 1, true)
        assert.error_matches(function() c:prometheus(5) end,
                             'bad "name" argument', 1, true)
        local by_hand = assert(counter.new("counter_prom"))
        local text, err = by_hand:prometheus()
        assert.is_nil(text)
        assert.equal('dict "counter_prom": a counter without a sync '
                     .. "interval reads the dict, not the engine", err)
    end)

    it("writes tricky keys and values byte for byte as the Lua renderer",
       function()
        local c = assert(counter.new("counter_prom", 60))
        for _, case in ipairs(TRICKY) do
            for _, step in ipairs(case[2]) do
                assert(c:incr(case[1], step))
            end
        end
        assert(c:sync())

        local by_engine, by_lua = both_renders(c)
        same_text(by_lua, by_engine)
        local lines = family_lines(by_engine, "resty_counts_total")
        assert.equal(#TRICKY - 1, #lines)
        local expected = {
            'resty_counts_total{dict="counter_prom",key="a:b:c"} '
                .. "9007199254740991",
            'resty_counts_total{dict="counter_prom",key="neg:max"} '
                .. "-9007199254740991",
            'resty_counts_total{dict="counter_prom",key="a::"} '
                .. "2251799813685248.5",
            'resty_counts_total{dict="counter_prom",key=":lead"} '
                .. "0.30000000000000004",
            'resty_counts_total{dict="counter_prom",key="tie"} '
                .. "2.9802322387695313e-08",
            'resty_counts_total{dict="counter_prom",key="mixed\\\\xff\\"'
                .. '\\\\\\nend"} -4',
            'resty_counts_total{dict="counter_prom",key="caf\195\169 '
                .. '\226\130\172"} 7',
            'resty_counts_total{dict="counter_prom",key="bin\\\\xff\\\\x80"} 1',
            'resty_counts_total{dict="counter_prom",key="lit\\\\xff"} 5.5',
        }
        for _, line in ipairs(expected) do
            assert.is_truthy(by_engine:find(line .. "\n", 1, true), line)
        end

        -- c:prometheus() gives the same lines, under the name given.
        local text = assert(c:prometheus())
        assert.equal(table.concat(lines, "\n") .. "\n", text)
        local named = assert(c:prometheus("my_hits"))
        assert.equal((text:gsub("resty_counts_total{", "my_hits{")), named)

        -- Keys split into labels by a list of names, by one separator and
        -- by a longer one.
        by_engine, by_lua = both_renders(c, {
            name = "parts_total", labels = { "first", "second", "rest" },
            separator = ":" })
        same_text(by_lua, by_engine)
        assert.is_truthy(by_engine:find('\nparts_total{first="a",second="b",'
                                        .. 'rest="c"} 9007199254740991\n', 1,
                                        true))
        assert.is_truthy(by_engine:find('\nparts_total{first="a"} '
                                        .. "2251799813685248.5\n", 1, true))
        by_engine, by_lua = both_renders(c, {
            name = "pairs_total", labels = { "x", "y" }, separator = "::" })
        same_text(by_lua, by_engine)
    end)

    it("agrees with the Lua renderer on random keys and values", function()
        local seed = os.time()
        math.randomseed(seed)
        local pieces = { "a", "b", "z", ":", "::", "\\", '"', "\n", "\0",
                         "\128", "\255", "\195\169", " ", "}", "=", "," }
        local c = assert(counter.new("counter_prom_random", 60))
        local made = 0
        while made < 400 do
            local parts = {}
            for i = 1, math.random(1, 10) do
                parts[i] = pieces[math.random(#pieces)]
            end
            local key = table.concat(parts)
            local kind = math.random(4)
            local step
            if kind == 1 then
                step = math.random(-1000000, 1000000)
            elseif kind == 2 then
                step = (math.random() - 0.5) * 10 ^ math.random(-20, 15)
            elseif kind == 3 then
                step = (math.random(0, 1) * 2 - 1)
                       * (2^52 + math.random(0, 2^20))
            else
                step = math.random(-9, 9) / 8
            end
            -- A sum past +-(2^53 - 1) is refused: nil, err (not counted).
            if c:incr(key, step) then
                made = made + 1
            end
        end
        assert(c:sync())
        local by_engine, by_lua = both_renders(c)
        same_text(by_lua, by_engine, "seed " .. seed)
        by_engine, by_lua = both_renders(c, {
            name = "random_total", labels = { "p", "q" }, separator = ":" })
        same_text(by_lua, by_engine, "seed " .. seed)
    end)

    it("lists a key counted before the engine, with its dict value, and "
       .. "leaves out a dict value that is no number", function()
        -- No counter has touched this dict yet: its values are as an older
        -- version (counting in the dict) left them.
        local dict = ngx.shared.counter_prom_legacy
        assert(dict:set("old", 41))
        assert(dict:set("old:frac", 2.25))
        assert(dict:set("other", "a string"))
        local c = assert(counter.new("counter_prom_legacy", 60))
        assert(c:incr("new", 2))
        assert(c:incr("other", 3))  -- the dict's value is no number
        assert.equal(41, c:get("old"))

        local text = assert(c:prometheus())
        assert.equal('resty_counts_total{dict="counter_prom_legacy",'
                     .. 'key="new"} 2\n'
                     .. 'resty_counts_total{dict="counter_prom_legacy",'
                     .. 'key="old"} 41\n'
                     .. 'resty_counts_total{dict="counter_prom_legacy",'
                     .. 'key="old:frac"} 2.25\n', text)
        -- "other" stays in the engine (its dict value is no number).
        assert.matches('key "other": not a number', select(2, c:sync()), 1,
                       true)
        local by_engine, by_lua = both_renders(c)
        same_text(by_lua, by_engine)
        -- A count since is counted on top.
        assert(c:incr("old", 1))
        assert.matches('key="old"} 42\n', c:prometheus(), 1, true)
    end)

    it("renders two dicts' counters under one family once each", function()
        local a = assert(counter.new("counter_prom_random", 60))
        local b = assert(counter.new("counter_prom_legacy", 60))
        registries_made = registries_made + 1
        local m = assert(metrics.new("metrics",
                                     { name = "prom" .. registries_made }))
        m:add(a)
        m:add(b)
        local by_engine = m:render()
        metrics._engine_keys = false
        local by_lua = m:render()
        metrics._engine_keys = true
        same_text(by_lua, by_engine)
        local _, helps = by_engine:gsub("# HELP resty_counts_total ", "")
        assert.equal(1, helps)
    end)

    it_http("sees values only grow while another worker counts, and every "
            .. "count at the end", function()
        -- Requests count `rounds` times over `keys` keys, 1 and 0.5 a
        -- round, in whichever worker the kernel gives them; this worker
        -- renders meanwhile, as often as it can.
        local c = assert(counter.new("counter_prom_race", 60))
        local keys, rounds, requests = 200, 300, 8
        local threads, bodies, finished = {}, {}, 0
        for i = 1, requests do
            threads[i] = ngx.thread.spawn(function()
                bodies[i] = race.get("/counter_prom/incr?keys=" .. keys
                                     .. "&rounds=" .. rounds)
                finished = finished + 1
            end)
        end
        local last, renders, live = {}, 0, 0
        local function check(text)
            local prev_key
            local n = 0
            for key, value in text:gmatch('key="k(%d+)"} (%S+)\n') do
                value = assert(tonumber(value))
                assert(prev_key == nil or key > prev_key, "sorted, once")
                prev_key = key
                assert(value * 2 % 1 == 0, "whole halves: " .. value)
                assert(value >= (last[key] or 0),
                       "key " .. key .. " went down: " .. value)
                if value > (last[key] or 0) and renders > 0 then
                    live = live + 1
                end
                last[key] = value
                n = n + 1
            end
            return n
        end
        while finished < requests do
            check(assert(c:prometheus()))
            renders = renders + 1
            ngx.sleep(0.001)
        end
        local workers = {}
        for i = 1, requests do
            assert(ngx.thread.wait(threads[i]))
            local body = assert(bodies[i], "request " .. i)
            workers[body:match("worker (%d)")] = true
        end
        assert.equal(keys, check(assert(c:prometheus())))
        for key = 0, keys - 1 do
            assert.equal(requests * rounds * 1.5, last[tostring(key)])
        end
        assert.is_true(renders >= 3, "renders: " .. renders)
        assert.is_true(workers["1"] or false, "worker 1 counted")
        assert.is_true(live > 0, "a render saw counts in progress")
    end)
end)
