-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- The Redis engine of resty.counter.limit: the same windows and the same
-- decisions, cluster-wide. resty.counter.limit validates the arguments and
-- calls these when it was made with `opts.redis`.
--
-- A window's count lives under `<prefix>{<name>}:<window index>:<key>`
-- (one hash tag per limiter: a key's two windows share a Cluster slot).
-- One script decides and counts in one step: it reads the counts, compares
-- the estimate with the limit, and only then increments, creating the
-- count with its expiry (2 windows) in the same step. The fixed window
-- therefore never allows more than `limit` per window across all nodes.
--
-- When Redis cannot be reached within the client's timeouts the request is
-- not held longer; `opts.on_redis_error` says what the limiter answers
-- then: "allow" (fail open, the default) or "reject" (fail closed), each
-- outcome counted. resty.counter.limit makes the answers (shadow mode,
-- near-limit counts) from what these return.


local check = require "resty.counter.check"
local redis = require "resty.counter.redis"


local ngx = ngx
local get_phase = ngx.get_phase
local tonumber = tonumber
local type = type
local fmt = string.format
local floor = math.floor


local _M = {}


local NO_COSOCKET = {
    init = true, init_worker = true, set = true, header_filter = true,
    body_filter = true, log = true, balancer = true, exit_worker = true,
}


-- KEYS: the current window's count, the previous one's. ARGV: limit,
-- commit (1/0), sliding (1/0), elapsed and window (seconds), ttl (ms).
-- Returns { 1 (allowed) or 0 (over the limit), used }, `used` as text
-- with every digit (Redis would cut a Lua number to an integer, tostring
-- to 14 digits), so the near-limit test is the dict's.
local INCOMING = redis.script([[
local limit, commit, sliding = tonumber(ARGV[1]), ARGV[2] == "1",
                               ARGV[3] == "1"
local elapsed, window = tonumber(ARGV[4]), tonumber(ARGV[5])
local count = tonumber(redis.call("GET", KEYS[1]) or "0") + 1
local used = count
if sliding then
    local prev = tonumber(redis.call("GET", KEYS[2]) or "0")
    used = prev * ((window - elapsed) / window) + count
end
local text = string.format("%.17g", used)
if used > limit then
    return { 0, text }
end
if commit then
    if redis.call("INCR", KEYS[1]) == 1 then
        redis.call("PEXPIRE", KEYS[1], ARGV[6])
    end
end
return { 1, text }
]])


-- KEYS[1]: the current count. Takes one back unless it is 0.
local UNCOMMIT = redis.script([[
local count = tonumber(redis.call("GET", KEYS[1]) or "0")
if count <= 0 then
    return 0
end
redis.call("DECR", KEYS[1])
return 1
]])


-- syntax: engine = limit_redis.new(opts, name, level)
function _M.new(opts, name, level)
    local key_prefix = redis.key_prefix(opts, name, level + 1)
    local on_error = opts.on_redis_error or "allow"
    if on_error ~= "allow" and on_error ~= "reject" then
        check.expected("opts.on_redis_error", '"allow" or "reject"',
                       on_error, level + 1)
    end

    return {
        client = redis.new(opts.redis, level + 1, "opts.redis"),
        key_prefix = key_prefix,
        fail_open = on_error == "allow",
        -- what Redis being unreachable made this worker answer
        failed_open = 0,
        failed_closed = 0,
    }
end


local function reachable()
    local phase = get_phase()
    if NO_COSOCKET[phase] then
        return nil, "redis cannot be reached in the " .. phase
                    .. " phase (no cosockets there)"
    end
    return true
end


local function count_key(engine, index, key)
    return engine.key_prefix .. fmt("%d", index) .. ":" .. key
end


-- syntax: fail_open = limit_redis.failed(engine)
--
-- Counts an event Redis could not decide; true when the limiter fails
-- open (allows it), false when it fails closed.
function _M.failed(engine)
    if engine.fail_open then
        engine.failed_open = engine.failed_open + 1
        return true
    end
    engine.failed_closed = engine.failed_closed + 1
    return false
end


-- syntax: allowed, used = limit_redis.incoming(engine, lim, index, elapsed,
--                                              key, commit)
-- syntax: nil, err = limit_redis.incoming(...)
--
-- Redis's decision (`allowed` true or false, counted there when allowed
-- and `commit`) and the window's use after the event; nil and the reason
-- when Redis could not decide.
function _M.incoming(engine, lim, index, elapsed, key, commit)
    local ok, err = reachable()
    if not ok then
        return nil, err
    end

    local res
    res, err = engine.client:eval(INCOMING, 2,
                                  count_key(engine, index, key),
                                  count_key(engine, index - 1, key),
                                  fmt("%d", lim.limit), commit and "1" or "0",
                                  lim.sliding and "1" or "0",
                                  fmt("%.17g", elapsed),
                                  fmt("%.17g", lim.window),
                                  fmt("%d", floor(lim.ttl * 1000)))
    if not res then
        return nil, err
    end
    return res[1] == 1, tonumber(res[2])
end


function _M.uncommit(engine, index, key)
    local ok, err = reachable()
    if not ok then
        return nil, err
    end

    local res
    res, err = engine.client:eval(UNCOMMIT, 1, count_key(engine, index, key))
    if not res then
        return nil, err
    end
    if res == 0 then
        return nil, "nothing to uncommit"
    end
    return true
end


-- The current and previous counts of a key (0 when Redis cannot tell).
function _M.counts(engine, index, key)
    if not reachable() then
        return 0, 0
    end
    local res = engine.client:command("mget", count_key(engine, index, key),
                                      count_key(engine, index - 1, key))
    if type(res) ~= "table" then
        return 0, 0
    end
    return tonumber(res[1]) or 0, tonumber(res[2]) or 0
end


return _M
