-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- Rate limits on one node: at most `limit` events per `window` seconds and
-- key, over all workers, with the `incoming(key, commit)` / `uncommit(key)`
-- protocol of lua-resty-limit-traffic, so that limiters combine.
--
-- Windows are aligned on multiples of `window` seconds of the clock
-- (ngx.now() unless `opts.clock` is given). On one node each (limiter
-- name, key) has one record in the dict's shared engine (docs/engine.md,
-- "Limit records"): the current window's count, the previous window's and
-- the window's index in one 16-byte pair, so that an event is one
-- compare-and-swap that rolls the window when it has turned and adds 1,
-- decided before it writes: a rejected event (or a dry run) writes
-- nothing, and nothing is ever undone.
-- A record last written in a window before the previous one holds nothing
-- a decision reads: the limiter sweeps such records of its own out of the
-- engine (a step at a time, see `sweep`), so that a limit per client
-- address over many addresses does not fill it.
--
-- fixed: an event is allowed when the window's count with it is at most
-- `limit`. Every event that is counted is one compare-and-swap from the
-- count its decision saw, so at most `limit` events are allowed per
-- window, exactly, whatever the workers.
-- sliding: the count of the previous window weighed by the part of it still
-- inside the last `window` seconds, plus the current count (the estimate of
-- src/window.rs): an event is allowed when that is at most `limit`. Its
-- accuracy against an exact sliding log is in docs/limit.md.
--
-- Shadow mode (`opts.shadow`), to try a limit in production: the same
-- counts and the same decisions, but an event over the limit is let
-- through, the caller told with a third value ("rejected"). It is not
-- counted, as in enforcing mode, so the counts, and every later decision,
-- are exactly those the limit would make if enforced.
--
-- With `opts.redis` the counts live in Redis (resty.counter.limit_redis).


local ffi = require "ffi"
local abi = require "resty.counter.abi"
local check = require "resty.counter.check"
local engine_mod = require "resty.counter.engine"
local limit_redis = require "resty.counter.limit_redis"


local ngx = ngx
local ngx_shared = ngx.shared
local ngx_now = ngx.now
local ngx_header = ngx.header
local check_key = check.key
local dot_call = check.dot_call
local C = abi.C
local FULL = abi.FULL
local LIMIT_KIND = abi.LIMIT_KIND
local LIMIT_WIDTH = abi.LIMIT_WIDTH
local engine_attach = engine_mod.attach
local engine_record = engine_mod.record
local check_epoch = engine_mod.check_epoch
local setmetatable = setmetatable
local tostring = tostring
local type = type
local ceil = math.ceil
local floor = math.floor


local _M = { _VERSION = "0.1.0" }
local mt = { __index = _M }


local ALGORITHMS = { fixed = true, sliding = true }

-- The largest limit on one node: a record counts each window in 32 bits.
local MAX_LIMIT = 2 ^ 32 - 1

local used_out = ffi.new("double[1]")
local prev_out = ffi.new("double[1]")
local current_out = ffi.new("double[1]")

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
-- opts: limit (events per window, an integer >= 1; at most 2^32 - 1 on one
-- node, where larger raises), window (seconds, a positive number),
-- algorithm ("fixed", the default, or "sliding"), name
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

    local limit = check.integer(opts.limit, "opts.limit", 1,
                                opts.redis ~= nil and 1 / 0 or MAX_LIMIT, 2)
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

    local engine, handle
    if opts.redis ~= nil then
        engine = limit_redis.new(opts, name, 2)
    else
        if not ngx_shared[shdict_name] then
            return nil, 'shared dict "' .. shdict_name .. '" not found'
        end
        if C.rc_strict_supported() < 0 then
            return nil, engine_mod.last_error()
        end
        local err
        handle, err = engine_attach(shdict_name)
        if not handle then
            return nil, err
        end
    end

    return setmetatable({
        engine = engine,
        handle = handle,
        limit = limit,
        window = window,
        sliding = algorithm == "sliding",
        algorithm = algorithm,
        prefix = name .. "/",
        -- As before the engine, when the dict's key held the window index
        -- too (up to 16 bytes): the engine's key ("l<name>/<key>") is
        -- shorter, Redis' keys have the index.
        max_key_len = check.max_key_len - #name - 18,
        clock = clock,
        shadow = shadow,
        near_limit_ratio = near_limit_ratio,
        -- what this worker answered to committed events (self_metrics)
        allowed = 0,
        near_limit = 0,
        rejected = 0,
        shadow_rejected = 0,
        -- On Redis: a window's count must outlive the next window (the
        -- sliding estimate reads it there).
        ttl = 2 * window,
        -- key -> the cells of its record, while the engine's epoch (bumped
        -- by each removal of a record) is `seen_epoch`.
        cells = {},
        cached = 0,
        epoch = handle and C.rc_engine_epoch(handle.ptr),
        seen_epoch = handle and C.rc_engine_epoch(handle.ptr)[0],
        -- The sweep of this limiter's stale records: the next index slot,
        -- and when it may run again (periodic, and on a refusal).
        cursor = handle and ffi.new("uint32_t[1]"),
        next_sweep = 0,
        next_refused_sweep = 0,
    }, mt)
end


-- Records' cells are cached per limiter, up to this many keys; past it,
-- keys are looked up in the engine at each call.
local MAX_CACHED = 10000


-- The window now: its index and the time elapsed in it, and the time.
local function current(self)
    local window = self.window
    local now = self.clock()
    local index = floor(now / window)
    return index, now - index * window, now
end


-- Sweeps of a limiter's stale records (written in a window before the
-- previous one: no decision reads them), one step of SWEEP_STEP index
-- slots at a time, resuming where the last stopped, at most once every
-- SWEEP_EVERY seconds per limiter and worker from the event path, and once
-- as often when a new key is refused for room (then tried again).
local SWEEP_STEP = 16384
local SWEEP_EVERY = 1


-- One sweep step at window `index`: how many records it removed (0 when
-- the engine could not: the next step tries again).
local function sweep(self, index)
    local prefix = self.prefix
    local n = C.rc_limit_expire(self.handle.ptr, prefix, #prefix, index,
                                self.cursor, SWEEP_STEP)
    return n > 0 and n or 0
end


-- The cells of `key`'s record, made when `create`; nil when there is none
-- (and not to be made); nil, err when the engine is full. `index` and
-- `now`: the window and the time, for a sweep when the engine is full.
local function cells_of(self, key, create, index, now)
    -- A removed record's kept cells are dropped first.
    check_epoch(self)
    local cells = self.cells[key]
    if cells then
        return cells
    end
    -- A full engine refuses a new key ("no room for a new key in the
    -- shared engine"), counted in its refused keys (engine.stats): stale
    -- records may hold the room; sweep a step, and try once more.
    local handle, full_key = self.handle, self.prefix .. key
    local found, err, code = engine_record(handle, LIMIT_KIND, full_key,
                                           LIMIT_WIDTH, create)
    local due = now and now >= self.next_refused_sweep
    if not found and code == FULL and due then
        self.next_refused_sweep = now + SWEEP_EVERY
        if sweep(self, index) > 0 then
            found, err = engine_record(handle, LIMIT_KIND, full_key,
                                       LIMIT_WIDTH, create)
        end
    end
    if not found then
        return nil, err
    end
    if self.cached < MAX_CACHED then
        self.cells[key] = found
        self.cached = self.cached + 1
    end
    return found
end


-- A window index the engine refuses: a clock before 1970 or past 2^63.
local function bad_clock(index)
    return "bad clock: window index " .. tostring(index)
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
-- A new key when the engine is full: nil, "no room for a new key in the
-- shared engine".
function _M.incoming(self, key, commit)
    if type(self) ~= "table" then
        dot_call("lim", "incoming", 2)
    end
    check_key(key, 2, self.max_key_len)

    local index, elapsed, now = current(self)
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

    if now >= self.next_sweep then
        self.next_sweep = now + SWEEP_EVERY
        sweep(self, index)
    end
    -- A dry run makes no record: a key without one has no events.
    local cells, err = cells_of(self, key, commit, index, now)
    if not cells then
        if err then
            return nil, err
        end
        return within(self, 1, false)
    end
    local rc = C.rc_limit_incoming(cells, index, elapsed, self.window,
                                   self.limit, self.sliding and 1 or 0,
                                   commit and 1 or 0, used_out)
    if rc < 0 then
        return nil, bad_clock(index)
    end
    if rc == 0 then
        return over(self, commit)
    end
    return within(self, used_out[0], commit)
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

    local index = current(self)
    if self.engine then
        local ok, err = limit_redis.uncommit(self.engine, index, key)
        return ok, err
    end
    local cells, err = cells_of(self, key, false)
    if not cells then
        return nil, err or "not found"
    end
    local rc = C.rc_limit_uncommit(cells, index, self.sliding and 1 or 0)
    if rc < 0 then
        return nil, bad_clock(index)
    end
    if rc == 0 then
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

    local index, elapsed = current(self)
    local count, prev
    if self.engine then
        count, prev = limit_redis.counts(self.engine, index, key)
    else
        count, prev = 0, 0
        local cells = cells_of(self, key, false)
        if cells then
            local rc = C.rc_limit_counts(cells, index, prev_out, current_out)
            if rc >= 0 then
                count, prev = current_out[0], prev_out[0]
            end
            if rc == 1 then
                -- The record is a window ahead of this worker's clock.
                elapsed = 0
            end
        end
    end
    if self.sliding then
        return C.rc_sliding_wait(prev or 0, count, elapsed, self.window,
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
    local _, elapsed = current(self)
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
