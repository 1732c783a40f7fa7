-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- Exact int64 values with Redis semantics, and the sliding window, through
-- LuaJIT's FFI into the Rust core (src/int64.rs, src/window.rs; the C
-- declarations and codes are in resty.counter.abi).
-- Shared by resty.counter.strict, resty.counter.lax and resty.counter.limit.
--
-- A counter value lives in the shared dict as a number while it is within
-- +-(2^53 - 1), where a double is exact, and as a base-10 string beyond
-- (as Redis keeps an INCR counter), so that it stays exact over the whole
-- int64 range. To Lua a value is likewise a number within +-(2^53 - 1) and
-- an int64_t cdata beyond.


local ffi = require "ffi"
local abi = require "resty.counter.abi"
local check = require "resty.counter.check"


local C = abi.C
local core = abi.core
local ffi_new = ffi.new
local ffi_string = ffi.string
local ffi_istype = ffi.istype
local ffi_cast = ffi.cast
local tonumber = tonumber
local tostring = tostring
local type = type
local floor = math.floor
local fmt = string.format


local MAX_SAFE = 2 ^ 53 - 1
local INT64_MAX = ffi_new("int64_t", 9223372036854775807LL)
local int64_t = ffi.typeof("int64_t")
local uint64_t = ffi.typeof("uint64_t")


local _M = {
    _VERSION = core._VERSION,
    C = C,
    max_safe_integer = MAX_SAFE,

    OP_ADD = abi.OP_ADD,
    OP_SUB = abi.OP_SUB,
    OP_SET = abi.OP_SET,

    -- The comparators of inc_if/set_if, by name, as the core numbers them.
    CMP = {
        always = abi.CMP_ALWAYS, eq = abi.CMP_EQ, ne = abi.CMP_NE,
        lt = abi.CMP_LT, le = abi.CMP_LE, gt = abi.CMP_GT, ge = abi.CMP_GE,
    },
}


local CMP = _M.CMP
local CMP_ALWAYS = CMP.always


local result = ffi_new("rc_int_result_t")
local parsed = ffi_new("int64_t[1]")


local bad = check.bad
local expected = check.expected


-- syntax: v = int.lua_value(i64)
--
-- An int64_t cdata as Lua users get it: a number when exact as a double.
local function lua_value(v)
    if v <= MAX_SAFE and v >= -MAX_SAFE then
        return tonumber(v)
    end
    return v
end
_M.lua_value = lua_value


-- syntax: n = int.integer(value, name, level)
--
-- An integer argument: a number that is an integer within +-(2^53 - 1)
-- (beyond, a double may not be the number written), an int64_t or
-- uint64_t cdata within the int64 range, or a base-10 string (an optional
-- "-" and digits; `ngx.var.*` values are strings). Returns a number or an
-- int64_t cdata; anything else raises, naming the argument.
function _M.integer(value, name, level)
    local t = type(value)
    if t == "number" then
        if value ~= value or value == 1 / 0 or value == -1 / 0 then
            bad(name, tostring(value) .. " is not a finite number",
                level + 1)
        end
        if value ~= floor(value) then
            bad(name, fmt("%.17g is not an integer", value), level + 1)
        end
        if value > MAX_SAFE or value < -MAX_SAFE then
            -- check.amount's words, and what to pass instead.
            bad(name, fmt("%.17g is beyond the exact integer range +-%d: "
                          .. "pass an int64_t cdata or a decimal string",
                          value, MAX_SAFE), level + 1)
        end
        return value
    end

    if t == "cdata" then
        if ffi_istype(int64_t, value) then
            return value
        end
        if ffi_istype(uint64_t, value) then
            if value > INT64_MAX then
                bad(name, tostring(value) .. " is beyond the int64 range",
                    level + 1)
            end
            return ffi_cast(int64_t, value)
        end
        bad(name, "int64_t expected, got " .. tostring(ffi.typeof(value))
                  .. " (a cdata)", level + 1)
    end

    if t == "string" then
        if C.rc_int_parse(value, #value, parsed) ~= 0 then
            -- The words of check.amount for the same mistakes.
            local n = tonumber(value)
            if not n then
                bad(name, fmt("%q is not a number", value), level + 1)
            end
            bad(name, fmt("%q is not a base-10 int64", value), level + 1)
        end
        return lua_value(parsed[0])
    end

    -- check.amount's words: "number" (an integer, which 1.5 is told).
    expected(name, "number", value, level + 1)
end


-- syntax: code = int.cmp(value, level)
function _M.cmp(value, level)
    local code = CMP[value]
    if not code then
        expected("cmp", "one of always, eq, ne, lt, le, gt, ge", value,
                 level + 1)
    end
    return code
end


-- syntax: applied, new, old, value = int.apply(raw, op, cmp, operand, n)
-- syntax: nil, err = int.apply(raw, op, cmp, operand, n)
--
-- One update of a dict value (nil when missing): `op n` if the value
-- compares true against `operand`. `applied` is true or false; `new` and
-- `old` are int64_t cdata; `value` is what to store when applied: a number
-- within +-(2^53 - 1), where a double is exact (no string to make), and
-- the base-10 text beyond.
--
-- The dict values it reads are those it writes, and numbers a plain
-- `dict:set` or `dict:incr` left there when they are exact integers.
function _M.apply(raw, op, cmp, operand, n)
    local rc
    local t = type(raw)
    if t == "number" then
        if raw ~= floor(raw) or raw > MAX_SAFE or raw < -MAX_SAFE then
            return nil, "value is not an integer"
        end
        rc = C.rc_int_apply_i64(raw, op, cmp or CMP_ALWAYS, operand or 0, n,
                                result)
    elseif t == "string" or raw == nil then
        rc = C.rc_int_apply(raw, raw and #raw or 0, op, cmp or CMP_ALWAYS,
                            operand or 0, n, result)
    else
        return nil, "value is not an integer"
    end

    if rc < 0 then
        return nil, core.error_message(rc)
    end

    local new = result.new_value
    if rc == 1 then
        if new <= MAX_SAFE and new >= -MAX_SAFE then
            return true, new, result.old_value, tonumber(new)
        end
        return true, new, result.old_value,
               ffi_string(result.text, result.len)
    end
    return false, new, new
end


local text_buf = ffi_new("char[20]")


-- syntax: text = int.text(v)
--
-- A number (an exact integer) or an int64_t cdata as base-10 text.
function _M.text(v)
    if type(v) == "number" then
        return fmt("%.0f", v)
    end
    return ffi_string(text_buf, C.rc_int_format(v, text_buf))
end


-- syntax: v = int.decode(raw)
-- syntax: nil, err = int.decode(raw)
--
-- A dict value as Lua users get it; nil (missing) is 0.
function _M.decode(raw)
    if raw == nil then
        return 0
    end

    local t = type(raw)
    if t == "string" then
        if C.rc_int_parse(raw, #raw, parsed) ~= 0 then
            return nil, "value is not an integer"
        end
        return lua_value(parsed[0])
    end

    if t == "number" and raw == floor(raw) and raw <= MAX_SAFE
       and raw >= -MAX_SAFE
    then
        return raw
    end
    return nil, "value is not an integer"
end


return _M
