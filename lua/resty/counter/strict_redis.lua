-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- The Redis engine of resty.counter.strict: the same methods, each one
-- atomic server-side step. resty.counter.strict validates the arguments
-- and calls these when it was made with `opts.redis`.
--
-- Keys live under `<prefix>{<name>}:<key>`: one hash tag per counter, so
-- that a batch's keys are in one Redis Cluster slot and a script may touch
-- them all. Every update is one Lua script run by EVALSHA (see
-- resty.counter.redis): Redis runs a script alone, so the comparison and
-- the write of `inc_if`/`set_if` and a whole batch are one step. Values
-- are Redis integers (INCRBY's own int64 arithmetic, with its overflow
-- check); the script compares them as decimal text, since Redis' Lua has
-- only doubles, and returns them as text, exact over the whole int64
-- range. A batch that fails half-way puts back what it changed (values and
-- expiries) before it returns, still inside the same step.


local int = require "resty.counter.int"
local redis = require "resty.counter.redis"


local ngx = ngx
local get_phase = ngx.get_phase
local int_decode = int.decode
local int_text = int.text
local unpack = unpack
local fmt = string.format
local floor = math.floor


local _M = {}


-- Phases without cosockets: a strict call there cannot reach Redis.
local NO_COSOCKET = {
    init = true, init_worker = true, set = true, header_filter = true,
    body_filter = true, log = true, balancer = true, exit_worker = true,
}


-- ARGV[1]: the op (0 add, 1 sub, 2 set); then per key: cmp (0 always,
-- 1 eq, 2 ne, 3 lt, 4 le, 5 gt, 6 ge), operand, n (decimal text), ttl in
-- ms ("" for none). Returns { 1, new1, old1, new2, old2, ... } as text, or
-- { 0, index, message } having changed nothing.
local IS_INT = [[
local MAX, MIN = "9223372036854775807", "9223372036854775808"

-- What Redis itself takes for an integer: canonical base-10 int64.
local function is_int(v)
    local neg = string.sub(v, 1, 1) == "-"
    local digits = neg and string.sub(v, 2) or v
    if digits == "0" then
        return not neg
    end
    if not string.find(digits, "^[1-9]%d*$") or #digits > 19 then
        return false
    end
    if #digits < 19 then
        return true
    end
    return digits <= (neg and MIN or MAX)
end
]]


local UPDATE = redis.script(IS_INT .. [[
local op = tonumber(ARGV[1])

local function compare(a, b)
    local an, bn = string.sub(a, 1, 1) == "-", string.sub(b, 1, 1) == "-"
    if an ~= bn then
        return an and -1 or 1
    end
    local r
    if #a ~= #b then
        r = #a < #b and -1 or 1
    elseif a == b then
        r = 0
    else
        r = a < b and -1 or 1
    end
    return an and -r or r
end

local function holds(cmp, cur, operand)
    if cmp == 0 then
        return true
    end
    local r = compare(cur, operand)
    if cmp == 1 then return r == 0 end
    if cmp == 2 then return r ~= 0 end
    if cmp == 3 then return r < 0 end
    if cmp == 4 then return r <= 0 end
    if cmp == 5 then return r > 0 end
    return r >= 0
end

local undo = {}
local function rollback()
    for i = #undo, 1, -1 do
        local u = undo[i]
        if u.raw then
            redis.call("SET", u.key, u.raw)
            if u.pttl > 0 then
                redis.call("PEXPIRE", u.key, u.pttl)
            end
        else
            redis.call("DEL", u.key)
        end
    end
end

local out = { 1 }
for i = 1, #KEYS do
    local key = KEYS[i]
    local at = 2 + (i - 1) * 4
    local cmp, operand, n, ttl = tonumber(ARGV[at]), ARGV[at + 1],
                                 ARGV[at + 2], ARGV[at + 3]
    local raw = redis.call("GET", key)
    local cur = raw or "0"
    local garbage = raw and not is_int(raw)
    if garbage and not (op == 2 and cmp == 0) then
        rollback()
        return { 0, i, "value is not an integer" }
    end
    if garbage then
        cur = "0"
    end

    if holds(cmp, cur, operand) then
        undo[#undo + 1] = { key = key, raw = raw,
                            pttl = raw and redis.call("PTTL", key) or -2 }
        if op == 2 then
            if ttl ~= "" then
                redis.call("SET", key, n, "PX", ttl)
            else
                redis.call("SET", key, n)
            end
        else
            local r = redis.pcall(op == 0 and "INCRBY" or "DECRBY", key, n)
            if type(r) == "table" and r.err then
                rollback()
                return { 0, i, "increment or decrement would overflow" }
            end
            if not raw and ttl ~= "" then
                redis.call("PEXPIRE", key, ttl)
            end
        end
        out[#out + 1] = redis.call("GET", key)
    else
        out[#out + 1] = cur
    end
    out[#out + 1] = cur
end
return out
]])


-- KEYS[1]; returns { 1, old } having deleted it, or { 0, message }.
local DEL = redis.script(IS_INT .. [[
local raw = redis.call("GET", KEYS[1])
if raw and not is_int(raw) then
    return { 0, "value is not an integer" }
end
redis.call("DEL", KEYS[1])
return { 1, raw or "0" }
]])


-- syntax: engine = strict_redis.new(opts, name, level)
function _M.new(opts, name, level)
    local key_prefix = redis.key_prefix(opts, name, level + 1)
    return {
        client = redis.new(opts.redis, level + 1, "opts.redis"),
        key_prefix = key_prefix,
        -- SCAN's pattern for clear(): glob characters escaped
        pattern = key_prefix:gsub("[%*%?%[%]\\]", "\\%0") .. "*",
    }
end


local function reachable()
    local phase = get_phase()
    if NO_COSOCKET[phase] then
        return nil, "redis cannot be reached in the " .. phase
                    .. " phase (no cosockets there): use a lax counter"
    end
    return true
end


local function ttl_ms(ttl)
    if not ttl then
        return ""
    end
    local ms = floor(ttl * 1000)
    return fmt("%d", ms < 1 and 1 or ms)
end


-- One batch of updates (one update is a batch of one), atomically.
-- Returns news, olds (Lua values) or nil, err, index.
-- Entries per batch: one script call's arguments must fit LuaJIT's
-- unpack (some 8,000 values; each entry takes 5).
local MAX_BATCH = 1000


function _M.update_all(engine, op, count, keys, cmps, operands, ns, ttls)
    local ok, err = reachable()
    if not ok then
        return nil, err
    end
    if count > MAX_BATCH then
        return nil, "batch too large for one redis script: " .. count
                    .. " entries, at most " .. MAX_BATCH
    end

    -- KEYS, then ARGV, in one list (unpack only spreads the last one).
    local argv = {}
    local prefix = engine.key_prefix
    for i = 1, count do
        argv[i] = prefix .. keys[i]
    end
    local at = count + 1
    argv[at] = fmt("%d", op)
    for i = 1, count do
        argv[at + 1] = fmt("%d", cmps[i])
        argv[at + 2] = int_text(operands[i] or 0)
        argv[at + 3] = int_text(ns[i])
        argv[at + 4] = ttl_ms(ttls[i])
        at = at + 4
    end

    local res
    res, err = engine.client:eval(UPDATE, count, unpack(argv))
    if not res then
        return nil, err
    end
    if res[1] == 0 then
        return nil, res[3], res[2]
    end

    local news, olds = {}, {}
    for i = 1, count do
        local new, old
        new, err = int_decode(res[2 * i])
        if new == nil then
            return nil, err, i
        end
        old, err = int_decode(res[2 * i + 1])
        if old == nil then
            return nil, err, i
        end
        news[i], olds[i] = new, old
    end
    return news, olds
end


-- The value of one key (0 when missing).
function _M.get(engine, key)
    local ok, err = reachable()
    if not ok then
        return nil, err
    end

    local raw
    raw, err = engine.client:command("get", engine.key_prefix .. key)
    if raw == nil then
        return nil, err
    end
    return int_decode(raw ~= ngx.null and raw or nil)
end


-- The values of several keys, read together (MGET: one step).
function _M.get_all(engine, keys, count)
    local ok, err = reachable()
    if not ok then
        return nil, err
    end
    if count > MAX_BATCH then
        return nil, "batch too large for one redis call: " .. count
                    .. " keys, at most " .. MAX_BATCH
    end

    local rkeys = {}
    for i = 1, count do
        rkeys[i] = engine.key_prefix .. keys[i]
    end
    local raws
    raws, err = engine.client:command("mget", unpack(rkeys))
    if not raws then
        return nil, err
    end

    local values = {}
    for i = 1, count do
        local raw = raws[i]
        local value
        value, err = int_decode(raw ~= ngx.null and raw or nil)
        if value == nil then
            return nil, err, i
        end
        values[i] = value
    end
    return values
end


-- Removes a key; its old value (0 when missing).
function _M.del(engine, key)
    local ok, err = reachable()
    if not ok then
        return nil, err
    end

    local res
    res, err = engine.client:eval(DEL, 1, engine.key_prefix .. key)
    if not res then
        return nil, err
    end
    if res[1] == 0 then
        return nil, res[2]
    end
    return int_decode(res[2])
end


-- Removes every key of this counter: SCAN for its prefix, DEL in batches.
-- A key created meanwhile may survive.
function _M.clear(engine)
    local ok, err = reachable()
    if not ok then
        return nil, err
    end

    local cursor = "0"
    repeat
        local res
        -- On a cluster, the node that serves this counter's slot.
        res, err = engine.client:command_at(engine.key_prefix, "scan",
                                            cursor, "match", engine.pattern,
                                            "count", 1000)
        if not res then
            return nil, err
        end
        cursor = res[1]
        local found = res[2]
        if #found > 0 then
            ok, err = engine.client:command("del", unpack(found))
            if not ok then
                return nil, err
            end
        end
    until cursor == "0"
    return true
end


return _M
