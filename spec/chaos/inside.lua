-- The chaos cases that run inside an nginx worker (GET /inside?case=...):
-- precision at the edges of exact ranges, and the bad-input matrix against
-- every public call. Each returns rows for spec/chaos/run.lua:
-- case \t sent \t counted \t lost \t duplicated \t verdict \t detail


local counter = require "resty.counter"
local lax = require "resty.counter.lax"
local limit = require "resty.counter.limit"
local request_counter = require "resty.greencheek.request.counter"
local requests = require "resty.counter.requests"
local strict = require "resty.counter.strict"

local _M = {}

local MAX_SAFE = 2 ^ 53 - 1


local function row(rows, case, sent, counted, lost, dup, ok, detail)
    rows[#rows + 1] = table.concat({ case, sent, counted, lost, dup,
                                     ok and "ok" or "FAIL", detail or "" },
                                   "\t")
end


local function precision()
    local rows = {}
    local dict = ngx.shared.matrix
    dict:flush_all()
    local c = assert(counter.new("matrix"))

    -- A count that would reach 2^53 + 2: refused, the value untouched.
    dict:set("p53", MAX_SAFE)
    local ok, err = c:incr("p53", 3)
    local synced = c:sync()
    local value = dict:get("p53")
    row(rows, "precision: dict at 2^53-1, +3 (resty.counter)", "2^53+2",
        string.format("%.0f", value), 0, 0,
        not ok and err:find("out of exact integer range", 1, true)
        and synced and value == MAX_SAFE,
        "incr: " .. tostring(err))

    -- Steps past the exact range, and past int64: raised, nothing counted.
    for _, case in ipairs({ { "2^53+2", 2 ^ 53 + 2 },
                            { "int64 max+1", 2 ^ 63 },
                            { "-(int64 min)-1", -2 ^ 63 - 2 ^ 11 } }) do
        local accepted, msg = pcall(c.incr, c, "edge", case[2])
        local raised = not accepted
        c:sync()
        row(rows, "precision: step " .. case[1] .. " (resty.counter)",
            case[1], tostring(dict:get("edge") or "nothing"), 0, 0,
            raised and dict:get("edge") == nil, msg)
    end
    dict:delete("p53")

    -- Strict int64 edges: max + 1 and min - 1 are errors, the value stays.
    local s = assert(strict.new("matrix", { name = "p" }))
    for _, case in ipairs({ { "int64 max + 1", "9223372036854775807", 1 },
                            { "int64 min - 1", "-9223372036854775808", -1 } }) do
        assert(s:set("edge", case[2]))
        local new, serr = s:inc("edge", case[3])
        local after = s:get("edge")
        row(rows, "precision: strict " .. case[1], case[1],
            tostring(after):gsub("LL$", ""), 0, 0,
            new == nil and serr == "increment or decrement would overflow"
            and tostring(after):gsub("LL$", "") == case[2],
            "inc: " .. tostring(serr))
    end
    s:del("edge")
    return rows
end


-- The mistakes, each with the inputs that make it.
local BAD_KEYS = {
    { "key nil", nil }, { "key empty", "" }, { "key number", 5 },
    { "key table", {} }, { "key boolean", true },
    { "key 65536 bytes", string.rep("k", 65536) },
}
-- Mistakes for every number a call takes (a step, a reset, a latency).
local BAD_NUMBERS = {
    { "number NaN", 0 / 0 }, { "number inf", 1 / 0 },
    { "number -inf", -1 / 0 }, { "number string", "abc" },
    { "number table", {} }, { "number boolean", true },
    { "number nil", nil },
}
-- Mistakes for counter amounts only, and for latencies only.
local BAD_AMOUNTS = {
    { "amount 2^53", 2 ^ 53 }, { "amount int64 min", -2 ^ 63 },
    { "amount int64 max+1", 2 ^ 63 },
}
local BAD_LATENCIES = {
    { "latency negative", -0.001 }, { "latency int64 min", -2 ^ 63 },
}
-- Accepted by every call: they must not raise.
local GOOD_NUMBERS = {
    { "number \"12\"", "12" }, { "number 0", 0 }, { "number 7", 7 },
}
-- Accepted by the calls that take fractions, refused by the others.
local FRACTIONS = { { "number 1.5", 1.5 }, { "number \"1.5\"", "1.5" } }


local function matrix()
    local rows = {}
    ngx.shared.matrix:flush_all()
    ngx.shared.matrix_requests:flush_all()
    local c = assert(counter.new("matrix"))
    local r = assert(requests.new("matrix_requests",
                                  { flush_interval = 3600 }))
    local s = assert(strict.new("matrix", { name = "s" }))
    local x = assert(lax.new("matrix", { name = "x", allowed_lag = 3600 }))
    local lim = assert(limit.new("matrix", { limit = 1000, window = 60,
                                             name = "l" }))

    -- Every public call that takes a key, and those that take an amount.
    local key_calls = {
        ["counter:incr"] = function(k) return c:incr(k) end,
        ["counter:reset"] = function(k) return c:reset(k, 1) end,
        ["counter:get"] = function(k) return c:get(k) end,
        ["requests:record"] = function(k) return r:record(k, 0.1) end,
        ["requests:single_stats"] = function(k) return r:single_stats(k) end,
        ["record_request"] = function(k)
            return request_counter.record_request("matrix_requests", k, 0.1)
        end,
        ["record_specific_request"] = function(k)
            return request_counter.record_specific_request("matrix_requests",
                                                           k, 0.1)
        end,
        ["single_stats"] = function(k)
            return request_counter.single_stats("matrix_requests", k)
        end,
        ["strict:inc"] = function(k) return s:inc(k, 1) end,
        ["strict:get"] = function(k) return s:get(k) end,
        ["strict:set"] = function(k) return s:set(k, 1) end,
        ["strict:del"] = function(k) return s:del(k) end,
        ["strict:inc_if"] = function(k) return s:inc_if(k, "lt", 5, 1) end,
        ["lax:inc"] = function(k) return x:inc(k, 1) end,
        ["lax:get"] = function(k) return x:get(k) end,
        ["limit:incoming"] = function(k) return lim:incoming(k, true) end,
        ["limit:uncommit"] = function(k) return lim:uncommit(k) end,
    }
    local amount_calls = {
        ["counter:incr"] = function(a)
            -- nil is the default step, not a mistake: pass something else
            if a == nil then
                return c:reset("a", a)
            end
            return c:incr("a", a)
        end,
        ["counter:reset"] = function(a) return c:reset("a", a) end,
    }
    -- Calls that take integers only (Redis semantics): fractions are
    -- mistakes there.
    local integer_calls = {
        ["strict:inc"] = function(a)
            if a == nil then
                return s:set("a", a)
            end
            return s:inc("a", a)
        end,
        ["strict:set"] = function(a) return s:set("a", a) end,
        ["strict:set_if"] = function(a) return s:set_if("a", "ge", a, 1) end,
        ["lax:inc"] = function(a)
            if a == nil then
                return x:set("a", a)
            end
            return x:inc("a", a)
        end,
    }
    local latency_calls = {
        ["requests:record"] = function(a) return r:record("a", a) end,
        ["record_request"] = function(a)
            return request_counter.record_request("matrix_requests", "a", a)
        end,
        ["record_generic_request"] = function(a)
            return request_counter.record_generic_request("matrix_requests",
                                                          a)
        end,
    }

    local calls, raised, crashes, accepted_bad = 0, 0, 0, 0
    local messages = {}     -- mistake -> { normalized message -> true }
    local crash_detail
    local function try(mistake, fn, input, must_raise)
        calls = calls + 1
        local ok, err = pcall(fn, input)
        if ok then
            if must_raise then
                accepted_bad = accepted_bad + 1
                crash_detail = crash_detail or (mistake .. " accepted")
            end
            return
        end

        raised = raised + 1
        if type(err) ~= "string" or not err:find('bad "', 1, true)
           or not must_raise
        then
            crashes = crashes + 1
            crash_detail = crash_detail or (mistake .. ": " .. tostring(err))
            return
        end

        -- The same mistake must read the same everywhere: compare without
        -- the position, the argument's name, the limits in numbers (a
        -- key's longest length depends on the module's prefix) and the
        -- advice some modules add after the message.
        local text = err:gsub("^.-:%d+: ", ""):gsub('^bad "[^"]+"', 'bad "x"')
                        :gsub(": pass .*$", ""):gsub("longer than %d+",
                                                     "longer than N")
        messages[mistake] = messages[mistake] or {}
        messages[mistake][text] = true
    end

    for _, input in ipairs(BAD_KEYS) do
        for _, fn in pairs(key_calls) do
            try(input[1], fn, input[2], true)
        end
    end
    for _, call_set in ipairs({ amount_calls, latency_calls,
                                integer_calls }) do
        for _, input in ipairs(BAD_NUMBERS) do
            for _, fn in pairs(call_set) do
                try(input[1], fn, input[2], true)
            end
        end
        for _, input in ipairs(GOOD_NUMBERS) do
            for _, fn in pairs(call_set) do
                try(input[1], fn, input[2], false)
            end
        end
    end
    for _, input in ipairs(BAD_AMOUNTS) do
        for _, call_set in ipairs({ amount_calls, integer_calls }) do
            for _, fn in pairs(call_set) do
                try(input[1], fn, input[2], true)
            end
        end
    end
    for _, input in ipairs(FRACTIONS) do
        for _, fn in pairs(amount_calls) do
            try(input[1], fn, input[2], false)
        end
        for _, fn in pairs(latency_calls) do
            try(input[1], fn, input[2], false)
        end
        for _, fn in pairs(integer_calls) do
            try(input[1] .. " (integers only)", fn, input[2], true)
        end
    end
    for _, input in ipairs(BAD_LATENCIES) do
        for _, fn in pairs(latency_calls) do
            try(input[1], fn, input[2], true)
        end
    end

    local inconsistent = {}
    for mistake, texts in pairs(messages) do
        local n = 0
        for _ in pairs(texts) do
            n = n + 1
        end
        if n > 1 then
            local list = {}
            for text in pairs(texts) do
                list[#list + 1] = text
            end
            inconsistent[#inconsistent + 1] = mistake .. ": "
                                              .. table.concat(list, " | ")
        end
    end

    -- Nothing bad reached the dicts.
    c:sync()
    r:flush()
    local nan = 0
    local dict = ngx.shared.matrix
    for _, key in ipairs(dict:get_keys(0)) do
        local v = dict:get(key)
        if type(v) == "number" and v ~= v then
            nan = nan + 1
        end
    end
    local stats = r:stats() or ""
    if stats:find("null", 1, true) or stats:lower():find("nan", 1, true) then
        nan = nan + 1
    end

    row(rows, "bad input: " .. calls .. " calls x inputs", calls,
        raised .. " raised", 0, 0, crashes == 0 and accepted_bad == 0,
        "crashes " .. crashes .. ", bad accepted " .. accepted_bad
        .. (crash_detail and (" (" .. crash_detail .. ")") or ""))
    row(rows, "bad input: NaN stored", calls, nan, 0, 0, nan == 0)
    local mistakes = 0
    for _ in pairs(messages) do
        mistakes = mistakes + 1
    end
    row(rows, "bad input: same text for the same mistake", mistakes,
        #inconsistent .. " differ", 0, 0,
        #inconsistent == 0, table.concat(inconsistent, "; "))
    return rows
end


function _M.run(case)
    local rows
    if case == "precision" then
        rows = precision()
    elseif case == "matrix" then
        rows = matrix()
    else
        return "unknown case\n"
    end
    return table.concat(rows, "\n") .. "\n"
end


return _M
