-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- Rate limits on one node: at most `limit` events per `window` seconds and
-- key, over all workers, with the `incoming(key, commit)` / `uncommit(key)`
-- protocol of lua-resty-limit-traffic, so that limiters combine.
--
-- Windows are aligned on multiples of `window` seconds of the clock
-- (ngx.now() unless `opts.clock` is given). Each window's count is a dict
-- number under "<name>/<window index>/<key>", created by `incr` with its
-- expiry in the same atomic step (`incr(k, 1, 0, init_ttl)`), so no count
-- is ever left without one. Counts are small integers, exact as doubles,
-- and `incr` is atomic across workers: no lock is needed.
--
-- fixed: an event is allowed when the window's count after its `incr` is
-- at most `limit`. Since every `incr` returns a distinct count, at most
-- `limit` events are allowed per window, exactly, whatever the workers.
-- sliding: the count of the previous window weighed by the part of it still
-- inside the last `window` seconds, plus the current count (the estimate of
-- src/window.rs, called through the FFI): an event is allowed when that is
-- at most `limit`. Its accuracy against an exact sliding log is in
-- docs/limit.md.
--
-- A rejected event's `incr` is undone at once. Meanwhile a concurrent call
-- may see the count one higher and be rejected too: under contention at
-- the limit, the limiter errs towards rejecting, never towards allowing.
--
-- Shadow mode (`opts.shadow`), to try a limit in production: the same
-- counts and the same decisions, but an event over the limit is let
-- through, the caller told with a third value ("rejected"). Its count is
-- undone as in enforcing mode, so the counts, and every later decision,
-- are exactly those the limit would make if enforced.


local check = require "resty.counter.check"
local int = require "resty.counter.int"
local limit_redis = require "resty.counter.limit_redis"


local ngx = ngx
local ngx_shared = ngx.shared
local ngx_now = ngx.now
local ngx_header = ngx.header
local check_key = check.key
local dot_call = check.dot_call
local C = int.C
local setmetatable = setmetatable
local tostring = tostring
local type = type
local ceil = math.ceil
local floor = math.floor


local _M = { _VERSION = "0.1.0" }
local mt = { __index = _M }


local ALGORITHMS = { fixed = true, sliding = true }

-- The options of limit.new.
local OPTIONS = { limit = true, window = true, algorithm = true, name = true,
                  clock = true, shadow = true, near_limit_ratio = true,
                  redis = true, prefix = true, on_redis_error = true }

-- An allowed event is near the limit when the window's use after it is
-- at least this part of the limit (by default).
local NEAR_LIMIT_RATIO = 0.8

local check_ratio = check.option(function(v)
    return type(v) == "number" and v > 0 and v <= 1
end, "a number above 0 and at most 1")


-- syntax: lim, err = limit.new(shdict_name, opts)
--
-- context: any phase
--
-- opts: limit (events per window, an integer >= 1), window (seconds, a
-- positive number), algorithm ("fixed", the default, or "sliding"), name
-- (namespace of the keys, default "limit"), clock (a function returning
-- seconds, default ngx.now; for tests), shadow (true: never reject, see
-- `incoming`; default false), near_limit_ratio (an allowed event whose
-- window is then at least this part of the limit is counted as near the
-- limit; above 0 and at most 1, default 0.8). With redis (the options of
-- resty.counter.redis.new), prefix (default "rc:") and on_redis_error
-- ("allow", the default, or "reject"), the counts live in Redis
-- (resty.counter.limit_redis) and `shdict_name` may be nil. An unknown
-- option raises.
function _M.new(shdict_name, opts)
    if type(opts) ~= "table" then
        check.expected("opts", "table", opts, 2)
    end
    check.options(opts, OPTIONS, "opts", 2)
    if not (shdict_name == nil and opts.redis ~= nil) then
        check.string(shdict_name, "shdict_name", 2)
    end

    local limit = check.integer(opts.limit, "opts.limit", 1, 1 / 0, 2)
    local window = check.seconds(opts.window, "opts.window", 2)
    local algorithm = opts.algorithm or "fixed"
    if not ALGORITHMS[algorithm] then
        check.expected("opts.algorithm", '"fixed" or "sliding"', algorithm,
                       2)
    end
    local name = check.name(opts.name, "opts.name", 2, "limit")
    local clock = check.func(opts.clock, "opts.clock", 2, ngx_now)
    local shadow = check.flag(opts.shadow, "opts.shadow", 2, false) or false
    local near_limit_ratio = check_ratio(opts.near_limit_ratio,
                                         "opts.near_limit_ratio", 2,
                                         NEAR_LIMIT_RATIO)

    local engine, dict
    if opts.redis ~= nil then
        engine = limit_redis.new(opts, name, 2)
    else
        dict = ngx_shared[shdict_name]
        if not dict then
            return nil, 'shared dict "' .. shdict_name .. '" not found'
        end
    end

    return setmetatable({
        engine = engine,
        dict = dict,
        limit = limit,
        window = window,
        sliding = algorithm == "sliding",
        algorithm = algorithm,
        prefix = name .. "/",
        -- The window index takes up to 16 bytes more of the dict's key.
        max_key_len = check.max_key_len - #name - 18,
        clock = clock,
        shadow = shadow,
        near_limit_ratio = near_limit_ratio,
        -- what this worker answered to committed events (self_metrics)
        allowed = 0,
        near_limit = 0,
        rejected = 0,
        shadow_rejected = 0,
        -- A window's count must outlive the next window (the sliding
        -- estimate reads it there).
        ttl = 2 * window,
        cache = {},
        cache_prev = {},
        cache_index = false,
        cached = 0,
    }, mt)
end


-- Count keys are cached per window (making the string costs more than
-- the dict's incr); the cache starts afresh with each window, and past
-- this many keys it stops growing until then.
local MAX_CACHED = 10000


-- The window now: its index, the time elapsed in it, and its count key.
local function current(self, key)
    local window = self.window
    local now = self.clock()
    local index = floor(now / window)
    local cache = self.cache
    if index ~= self.cache_index then
        cache = {}
        self.cache = cache
        self.cache_index = index
        self.cache_prev = {}
        self.cached = 0
    end

    local dkey = cache[key]
    if not dkey then
        dkey = self.prefix .. tostring(index) .. "/" .. key
        if self.cached < MAX_CACHED then
            cache[key] = dkey
            self.cached = self.cached + 1
        end
    end
    return index, now - index * window, dkey
end


-- The count of the window before `index` (the current one).
local function previous_count(self, index, key)
    local cache = self.cache_prev
    local dkey = cache[key]
    if not dkey then
        dkey = self.prefix .. tostring(index - 1) .. "/" .. key
        if self.cached < MAX_CACHED then
            cache[key] = dkey
            self.cached = self.cached + 1
        end
    end
    return self.dict:get(dkey) or 0
end


-- The answer to an event over the limit: rejected, or in shadow mode let
-- through with "rejected" as a third value; `err` is a Redis error that
-- made a limit that fails closed answer so. Counted when `counted`.
local function over(self, counted, err)
    if self.shadow then
        if counted then
            self.shadow_rejected = self.shadow_rejected + 1
        end
        return 0, 0, "rejected", err
    end
    if counted then
        self.rejected = self.rejected + 1
    end
    return nil, "rejected", err
end


-- The answer to an allowed event, after which the window's use is
-- `used`; counted (and near the limit or not) when `commit`.
local function within(self, used, commit)
    local limit = self.limit
    if commit then
        self.allowed = self.allowed + 1
        if used / limit >= self.near_limit_ratio then
            self.near_limit = self.near_limit + 1
        end
    end
    return 0, floor(limit - used)
end


-- syntax: delay, remaining = lim:incoming(key, commit)
-- syntax: nil, "rejected" = lim:incoming(key, commit)
-- syntax: 0, 0, "rejected" = lim:incoming(key, commit)   (shadow mode)
-- syntax: nil, err = lim:incoming(key, commit)
--
-- context: any phase (it never yields)
--
-- Counts one event for `key` when `commit` is true and it is allowed;
-- with `commit` false, only tells whether it would be (a dry run).
-- `delay` is always 0 (events are allowed or rejected, never delayed);
-- `remaining` is how many more events the window allows after this one.
-- In shadow mode an event over the limit gets `0, 0, "rejected"`: let
-- through, but not counted, as when enforced (so never `uncommit` it).
-- Other errors are the dict's ("no memory").
function _M.incoming(self, key, commit)
    if type(self) ~= "table" then
        dot_call("lim", "incoming", 2)
    end
    check_key(key, 2, self.max_key_len)

    local dict, limit = self.dict, self.limit
    local index, elapsed, dkey = current(self, key)
    local engine = self.engine
    if engine then
        local allowed, used = limit_redis.incoming(engine, self, index,
                                                   elapsed, key, commit)
        if allowed == nil then
            -- `used` is the reason Redis did not answer.
            if limit_redis.failed(engine) then
                return 0, 0, used
            end
            return over(self, false, used)
        end
        if not allowed then
            return over(self, commit)
        end
        return within(self, used, commit)
    end
    local prev = 0
    if self.sliding then
        prev = previous_count(self, index, key)
    end

    local count, err
    if commit then
        count, err = dict:incr(dkey, 1, 0, self.ttl)
        if not count then
            return nil, err
        end
    else
        count = (dict:get(dkey) or 0) + 1
    end

    local used = count
    if self.sliding then
        used = C.rc_sliding_estimate(prev, count, elapsed, self.window)
    end

    if used > limit then
        if commit then
            dict:incr(dkey, -1)
        end
        return over(self, commit)
    end

    return within(self, used, commit)
end


-- syntax: ok, err = lim:uncommit(key)
--
-- context: any phase
--
-- Gives back one event committed by `incoming` in the current window
-- (when another limiter rejected the request, say).
function _M.uncommit(self, key)
    if type(self) ~= "table" then
        dot_call("lim", "uncommit", 2)
    end
    check_key(key, 2, self.max_key_len)

    local dict = self.dict
    local index, _, dkey = current(self, key)
    if self.engine then
        local ok, err = limit_redis.uncommit(self.engine, index, key)
        return ok, err
    end
    local count, err = dict:incr(dkey, -1)
    if not count then
        return nil, err
    end
    if count < 0 then
        dict:incr(dkey, 1)
        return nil, "nothing to uncommit"
    end
    return true
end


-- syntax: seconds = lim:wait(key)
--
-- context: any phase
--
-- Seconds until one more event for `key` would be allowed, if no other
-- event came meanwhile (0 when allowed now): for `Retry-After`. Fixed: the
-- end of the window when it is full. Sliding: when the estimate first
-- leaves room, maybe within this window.
function _M.wait(self, key)
    if type(self) ~= "table" then
        dot_call("lim", "wait", 2)
    end
    check_key(key, 2, self.max_key_len)

    local index, elapsed, dkey = current(self, key)
    local count, prev
    if self.engine then
        count, prev = limit_redis.counts(self.engine, index, key)
    else
        count = self.dict:get(dkey) or 0
    end
    if self.sliding then
        prev = prev or previous_count(self, index, key)
        return C.rc_sliding_wait(prev, count, elapsed, self.window,
                                 self.limit)
    end
    if count + 1 <= self.limit then
        return 0
    end
    return self.window - elapsed
end


-- syntax: seconds = lim:reset(key)
--
-- context: any phase
--
-- Seconds until the current window ends (`RateLimit-Reset`).
function _M.reset(self, key)
    if type(self) ~= "table" then
        dot_call("lim", "reset", 2)
    end
    check_key(key, 2, self.max_key_len)
    local _, elapsed = current(self, key)
    return self.window - elapsed
end


-- syntax: metrics = lim:self_metrics()
--
-- context: any phase
--
-- What this worker answered to committed events (dry runs are not
-- counted): `allowed`, of them `near_limit` (the window then at least
-- near_limit_ratio of the limit), `rejected` (over the limit) and, in
-- shadow mode, `shadow_rejected` (over the limit, let through). For a
-- limiter on Redis, what it answered when Redis could not: `failed_open`
-- (events allowed) and `failed_closed` (events rejected, or in shadow
-- mode let through with "rejected"), counted apart from the others.
function _M.self_metrics(self)
    if type(self) ~= "table" then
        dot_call("lim", "self_metrics", 2)
    end
    local engine = self.engine
    return {
        allowed = self.allowed,
        near_limit = self.near_limit,
        rejected = self.rejected,
        shadow_rejected = self.shadow_rejected,
        failed_open = engine and engine.failed_open or 0,
        failed_closed = engine and engine.failed_closed or 0,
    }
end


-- syntax: lim:set_headers(key, remaining)
--
-- context: rewrite, access, content, header_filter
--
-- Sets `RateLimit-Limit`, `RateLimit-Remaining` (`remaining` as
-- `incoming` returned it; nil after a rejection is 0) and `RateLimit-Reset`
-- (whole seconds until the window ends, at least 1), and, when
-- `remaining` is nil, `Retry-After` (whole seconds from `wait`, at least
-- 1).
function _M.set_headers(self, key, remaining)
    if type(self) ~= "table" then
        dot_call("lim", "set_headers", 2)
    end
    check_key(key, 2, self.max_key_len)
    if remaining ~= nil and type(remaining) ~= "number" then
        check.expected("remaining", "number or nil", remaining, 2)
    end

    ngx_header["RateLimit-Limit"] = self.limit
    ngx_header["RateLimit-Remaining"] = remaining or 0
    local reset = ceil(self:reset(key))
    ngx_header["RateLimit-Reset"] = reset < 1 and 1 or reset
    if remaining == nil then
        local wait = ceil(self:wait(key))
        ngx_header["Retry-After"] = wait < 1 and 1 or wait
    end
end


return _M
