-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- Argument checks shared by every module of the library, so that the same
-- mistake gets the same message everywhere. Misuse raises, as lua-resty-core
-- does: `error('bad "key" argument: ...', level)`, blaming the caller, and
-- quotes the value it got with its type (`got "1" (a string)`).
--
-- `level` is counted from the function that calls these helpers, as for
-- error(): 2 blames that function's caller.


local store = require "resty.counter.store"


local error = error
local getmetatable = getmetatable
local pairs = pairs
local tonumber = tonumber
local tostring = tostring
local type = type
local concat = table.concat
local sort = table.sort
local byte = string.byte
local fmt = string.format
local sub = string.sub


local MAX_SAFE = store.max_safe_integer
local MAX_KEY_LEN = store.max_key_len

-- A quoted string is cut after this many bytes.
local MAX_QUOTED = 40


local _M = {
    max_safe_integer = MAX_SAFE,
    max_key_len = MAX_KEY_LEN,
    -- Phases where ngx.sleep works.
    yieldable = {
        rewrite = true, access = true, content = true, timer = true,
        ssl_cert = true, ssl_session_fetch = true, ssl_client_hello = true,
        preread = true,
    },
}


-- syntax: text = check.describe(value)
--
-- A value as a message quotes it, with its type: `"1" (a string)`,
-- `16391 (a number)`, `true (a boolean)`, `1LL (a cdata)`, `nil`,
-- `a table`, `a function`. Long strings are cut ("...").
local function describe(value)
    local t = type(value)
    if t == "string" then
        if #value > MAX_QUOTED then
            return fmt("%q... (a string of %d bytes)",
                       sub(value, 1, MAX_QUOTED), #value)
        end
        return fmt("%q (a string)", value)
    end

    if t == "number" then
        local text = fmt("%.14g", value)
        if value == value and tonumber(text) ~= value then
            text = fmt("%.17g", value)
        end
        return text .. " (a number)"
    end

    if t == "boolean" or t == "cdata" then
        return tostring(value) .. " (a " .. t .. ")"
    end

    if value == nil then
        return "nil"
    end
    return "a " .. t
end
_M.describe = describe


-- syntax: check.bad(name, why, level)
local function bad(name, why, level)
    error(fmt('bad "%s" argument: %s', name, why), level + 1)
end
_M.bad = bad


-- syntax: check.expected(name, what, value, level)
--
-- Raises `bad "<name>" argument: <what> expected, got <value described>`.
local function expected(name, what, value, level)
    bad(name, what .. " expected, got " .. describe(value), level + 1)
end
_M.expected = expected


-- syntax: check.dot_call(object, method, level)
--
-- Raises the message for a method called with a dot instead of a colon
-- (`c.incr("k")`, where `self` is then "k"). Methods test `self` with a
-- type test on their hot path (a test the JIT removes once `self` is known
-- to be a table) and call this only when it fails.
local function dot_call(object, method, level)
    error(fmt("use %s:%s(...), not %s.%s(...)", object, method, object,
              method), level + 1)
end
_M.dot_call = dot_call


-- syntax: check.self(self, mt, object, method, level)
--
-- For methods whose first argument may itself be a table (a batch): the
-- object must be one of the class of `mt`, else it was called with a dot.
function _M.self(self, mt, object, method, level)
    if getmetatable(self) ~= mt then
        dot_call(object, method, level + 1)
    end
end


-- The edit distance of a and b (insertions, deletions, substitutions and
-- swaps of neighbours), for "did you mean".
local function distance(a, b)
    local la, lb = #a, #b
    local prev2, prev = {}, {}
    for j = 0, lb do
        prev[j] = j
    end
    for i = 1, la do
        local row = { [0] = i }
        for j = 1, lb do
            local cost = byte(a, i) == byte(b, j) and 0 or 1
            local d = prev[j] + 1
            if row[j - 1] + 1 < d then
                d = row[j - 1] + 1
            end
            if prev[j - 1] + cost < d then
                d = prev[j - 1] + cost
            end
            if i > 1 and j > 1 and byte(a, i) == byte(b, j - 1)
               and byte(a, i - 1) == byte(b, j) and prev2[j - 2] + 1 < d
            then
                d = prev2[j - 2] + 1
            end
            row[j] = d
        end
        prev2, prev = prev, row
    end
    return prev[lb]
end


-- syntax: check.options(opts, known, name, level)
--
-- Raises on a key of the table `opts` that is not in the set `known`,
-- naming it (the first in sorted order) and the option it is closest to:
-- `bad "opts" argument: unknown option "timout" (did you mean
-- "timeout"?)`. A typo is never silently taken for the default.
function _M.options(opts, known, name, level)
    local unknown
    for key in pairs(opts) do
        if not known[key] then
            unknown = unknown or {}
            unknown[#unknown + 1] = key
        end
    end
    if not unknown then
        return
    end

    sort(unknown, function(a, b) return tostring(a) < tostring(b) end)
    local key = unknown[1]
    if type(key) ~= "string" then
        bad(name, "unknown option " .. describe(key) .. " (options are "
            .. "named by strings)", level + 1)
    end

    local names, best, best_distance = {}, nil, 3
    for option in pairs(known) do
        names[#names + 1] = option
        local d = distance(key, option)
        if d < best_distance or d == best_distance and best
                                   and option < best
        then
            best, best_distance = option, d
        end
    end
    if best and best_distance <= 2 and best_distance < #key then
        bad(name, fmt('unknown option "%s" (did you mean "%s"?)', key, best),
            level + 1)
    end
    sort(names)
    bad(name, fmt('unknown option "%s" (known: %s)', key,
                  concat(names, ", ")), level + 1)
end


-- syntax: t = check.table(value, name, level)
--
-- A table, or nil (then an empty table): an optional `opts` argument.
function _M.table(value, name, level)
    if value == nil then
        return {}
    end
    if type(value) ~= "table" then
        expected(name, "table", value, level + 1)
    end
    return value
end


-- syntax: s = check.string(value, name, level)
function _M.string(value, name, level)
    if type(value) ~= "string" then
        expected(name, "string", value, level + 1)
    end
    return value
end


-- The option checkers below take the value, the name it is known by
-- ("opts.timeout"), the level and a default: a nil value gives `default`,
-- and with `default` nil a nil value is refused as missing. Pass `false` as
-- the default of an option that may stay unset (nil is returned then).
local function default_of(default)
    if default == false then
        return nil
    end
    return default
end


-- syntax: checker = check.option(valid, what)
--
-- A checker `checker(value, name, level, default?)` of the values for
-- which `valid(value)` is true, described as `what` in its message.
local function option(valid, what)
    return function(value, name, level, default)
        if value == nil and default ~= nil then
            return default_of(default)
        end
        if not valid(value) then
            expected(name, what, value, level + 1)
        end
        return value
    end
end
_M.option = option


-- syntax: s = check.seconds(value, name, level, default?)
--
-- A positive finite number of seconds.
_M.seconds = option(function(v)
    return type(v) == "number" and v > 0 and v < 1 / 0
end, "a positive finite number of seconds")


-- syntax: s = check.idle_seconds(value, name, level, default?)
--
-- 0 (never) or a positive finite number of seconds: how long something
-- unused is kept.
_M.idle_seconds = option(function(v)
    return type(v) == "number" and v >= 0 and v < 1 / 0
end, "0 (never) or a positive finite number of seconds")


-- syntax: s = check.text(value, name, level, default?)
--
-- A non-empty string.
_M.text = option(function(v)
    return type(v) == "string" and v ~= ""
end, "a non-empty string")


-- syntax: s = check.directory(value, name, level, default?)
--
-- A directory's path: a non-empty string without a NUL byte.
_M.directory = option(function(v)
    return type(v) == "string" and v ~= "" and not v:find("\0", 1, true)
end, "a directory path (a non-empty string without NUL)")


-- syntax: b = check.flag(value, name, level, default?)
_M.flag = option(function(v)
    return type(v) == "boolean"
end, "boolean")


-- syntax: f = check.func(value, name, level, default?)
_M.func = option(function(v)
    return type(v) == "function"
end, "function")


-- syntax: list = check.edges(value, name, max, level, default?)
--
-- The upper edges of histogram buckets, in seconds: a list (a table with
-- keys 1 to n only) of 1 to `max` positive finite numbers, each above the
-- one before and at most 1e9 (31 years). Returns a copy.
function _M.edges(value, name, max, level, default)
    if value == nil and default ~= nil then
        return default_of(default)
    end
    local what = fmt("a list of 1 to %d increasing numbers of seconds",
                     max)
    if type(value) ~= "table" then
        expected(name, what, value, level + 1)
    end
    local n = #value
    if n < 1 or n > max then
        bad(name, fmt("%s expected, got a table of %d", what, n), level + 1)
    end
    for k in pairs(value) do
        if type(k) ~= "number" or k % 1 ~= 0 or k < 1 or k > n then
            bad(name, fmt("%s expected, got a table with the key %s", what,
                          describe(k)), level + 1)
        end
    end
    local copy = {}
    for i = 1, n do
        local edge = value[i]
        local at = fmt("%s[%d]", name, i)
        if type(edge) ~= "number" or not (edge > 0 and edge <= 1e9) then
            expected(at, "a number of seconds above 0, at most 1e9", edge,
                     level + 1)
        end
        if i > 1 and edge <= copy[i - 1] then
            expected(at, fmt("a number above %s[%d] (%s)", name, i - 1,
                             describe(copy[i - 1])), edge, level + 1)
        end
        copy[i] = edge
    end
    return copy
end


-- syntax: n = check.integer(value, name, min, max, level, default?)
--
-- A number that is an integer from `min` to `max` (max may be 1/0).
function _M.integer(value, name, min, max, level, default)
    if value == nil and default ~= nil then
        return default_of(default)
    end
    if type(value) ~= "number" or value % 1 ~= 0 or value < min
       or value > max
    then
        local range = max == 1 / 0 and fmt("an integer >= %d", min)
                      or fmt("an integer from %d to %d", min, max)
        expected(name, range, value, level + 1)
    end
    return value
end


-- syntax: s = check.name(value, name, level, default)
--
-- The name of a counter or limiter: 1 to 64 letters, digits, "_", "." or
-- "-" (it becomes part of its keys).
function _M.name(value, name, level, default)
    if value == nil then
        return default
    end
    if type(value) ~= "string" or #value == 0 or #value > 64
       or value:find("[^%w_.-]")
    then
        expected(name, '1 to 64 letters, digits, "_", "." or "-"', value,
                 level + 1)
    end
    return value
end


-- syntax: check.key(key, level, max_len?)
--
-- A key is a non-empty string of at most max_key_len bytes (the shared
-- dict's own limit), or `max_len` when given (a module that prefixes its
-- keys leaves room for the prefix). Numbers are refused rather than
-- converted: 1 and "1" would otherwise count as one key in the dict but two
-- in the worker.
function _M.key(key, level, max_len)
    if type(key) ~= "string" then
        expected("key", "string", key, level + 1)
    end

    local len = #key
    if len == 0 then
        bad("key", "empty string", level + 1)
    end

    max_len = max_len or MAX_KEY_LEN
    if len > max_len then
        bad("key", fmt("%d bytes, longer than %d", len, max_len), level + 1)
    end
end


-- A number from a number or a numeric string (as `ngx.var.*` gives them),
-- for check.amount and check.latency.
local function number(value, name, level)
    if type(value) == "number" then
        return value
    end
    if type(value) ~= "string" then
        expected(name, "number", value, level + 1)
    end

    local n = tonumber(value)
    if not n then
        bad(name, fmt("%q is not a number", value), level + 1)
    end
    return n
end


local function finite(n, name, level)
    if n ~= n or n == 1 / 0 or n == -1 / 0 then
        bad(name, tostring(n) .. " is not a finite number", level + 1)
    end
end


-- syntax: n = check.amount(value, name, level)
--
-- An amount (a step, a reset) is a finite number within +-(2^53 - 1), the
-- range a shared dict holds exactly. A numeric string is accepted and
-- converted, as arithmetic in Lua would (`ngx.var.bytes_sent` is a string).
function _M.amount(value, name, level)
    local n = number(value, name, level + 1)
    finite(n, name, level + 1)
    if n > MAX_SAFE or n < -MAX_SAFE then
        bad(name, fmt("%.17g is beyond the exact integer range +-%d", n,
                      MAX_SAFE), level + 1)
    end

    return n
end


-- syntax: n = check.latency(value, level)
--
-- A duration in seconds: a finite number >= 0, or a numeric string as
-- $request_time gives it. The messages are those of check.amount for the
-- same mistakes.
function _M.latency(value, level)
    local n = number(value, "latency", level + 1)
    finite(n, "latency", level + 1)
    if n < 0 then
        bad("latency", fmt("%.17g is negative", n), level + 1)
    end

    return n
end


return _M
