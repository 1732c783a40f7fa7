-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- Argument checks shared by every module of the library, so that the same
-- mistake gets the same message everywhere. Misuse raises, as lua-resty-core
-- does: `error('bad "key" argument: ...', level)`, blaming the caller.
--
-- `level` is counted from the function that calls these helpers, as for
-- error(): 2 blames that function's caller.


local store = require "resty.counter.store"


local error = error
local tonumber = tonumber
local tostring = tostring
local type = type
local fmt = string.format


local MAX_SAFE = store.max_safe_integer
local MAX_KEY_LEN = store.max_key_len


local _M = {
    max_safe_integer = MAX_SAFE,
    max_key_len = MAX_KEY_LEN,
}


local function bad(name, why, level)
    error(fmt('bad "%s" argument: %s', name, why), level + 1)
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
        bad("key", "string expected, got " .. type(key), level + 1)
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


-- syntax: n = check.amount(value, name, level)
--
-- An amount (a step, a reset) is a finite number within +-(2^53 - 1), the
-- range a shared dict holds exactly. A numeric string is accepted and
-- converted, as arithmetic in Lua would (`ngx.var.bytes_sent` is a string).
function _M.amount(value, name, level)
    local n = value
    if type(n) ~= "number" then
        if type(n) ~= "string" then
            bad(name, "number expected, got " .. type(value), level + 1)
        end

        n = tonumber(n)
        if not n then
            bad(name, fmt("%q is not a number", value), level + 1)
        end
    end

    if n ~= n or n == 1 / 0 or n == -1 / 0 then
        bad(name, tostring(n) .. " is not a finite number", level + 1)
    end

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
    local n = value
    if type(n) ~= "number" then
        if type(n) ~= "string" then
            bad("latency", "number expected, got " .. type(value), level + 1)
        end

        n = tonumber(n)
        if not n then
            bad("latency", fmt("%q is not a number", value), level + 1)
        end
    end

    if not (n >= 0 and n < 1 / 0) then
        if n ~= n or n == 1 / 0 or n == -1 / 0 then
            bad("latency", tostring(n) .. " is not a finite number",
                level + 1)
        end
        bad("latency", fmt("%.17g is negative", n), level + 1)
    end

    return n
end


return _M
