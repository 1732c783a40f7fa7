-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- Requests per window (default: per minute) and their latency, per key:
-- counts, average, p50/p90/p99/max and a sliding-window rate, as JSON or in
-- the Prometheus text format. The engine behind the drop-in
-- resty.greencheek.request.counter.
--
-- Every request is recorded in the shared engine of the dict's zone
-- (docs/engine.md, stage 3): one FFI call, atomic adds, no lock, visible to
-- every worker at once and safe from the death of any. A key's record holds
-- a ring of `previous` + 1 window slots (reused as windows roll on) and a
-- total since the key was first recorded (for Prometheus' counters). At
-- most `max_keys` keys are made: requests for keys beyond are recorded
-- under `overflow_key`, and one that keeps coming takes the place of the
-- tracked key with the fewest requests (docs/engine.md, "Admission past
-- max_keys"). With `idle_timeout`, a key with no request for that
-- long is removed (by scrapes, and by a new key that finds max_keys full),
-- and counts from 0 if it comes back. There is nothing to flush.


local ffi = require "ffi"
local base = require "resty.core.base"
local abi = require "resty.counter.abi"
local check = require "resty.counter.check"
local engine = require "resty.counter.engine"


local C = abi.C
local abi_string = abi.string
local failure = abi.failure
local ngx = ngx
local ngx_now = ngx.now
local ngx_sleep = ngx.sleep
local get_phase = ngx.get_phase
local get_request = base.get_request
local req_start_time = ngx.req.start_time
local check_key = check.key
local check_latency = check.latency
local check_func = check.func
local dot_call = check.dot_call
local attach = engine.attach
local engine_stats = engine.stats
local check_epoch = engine.check_epoch
local last_error = engine.last_error
local ffi_gc = ffi.gc
local ffi_new = ffi.new
local ffi_string = ffi.string
local floor = math.floor
local setmetatable = setmetatable
local tonumber = tonumber
local tostring = tostring
local type = type


local MAX_PREVIOUS = 64

-- At most one expiry a second per worker from new keys that find max_keys
-- full (a flood of them must not walk the engine per request).
local EXPIRE_EVERY = 1
local HUGE = 1 / 0

-- The Prometheus latency buckets' upper edges by default, seconds: the
-- client libraries' defaults. At most MAX_EDGES (histogram::MAX_EDGES in
-- src/histogram.rs): each is a line per key in the text and a word per key
-- in the engine.
local DEFAULT_BUCKETS = {
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
}
local MAX_EDGES = 32

local KEYS_FULL = abi.KEYS_FULL
local FULL = abi.FULL
local WIDTH_MISMATCH = abi.WIDTH_MISMATCH
local EDGES_MISMATCH = abi.EDGES_MISMATCH
local TOTAL_ONLY = abi.TOTAL_ONLY

-- Records read, then keys rendered, per step of a scrape in a phase that
-- can yield, and the pause between steps, when the worker serves other
-- requests. Not ngx.sleep(0): without OpenResty's delayed-events patch
-- (Debian's nginx has none) it warns and becomes a timer that expires in
-- the same pass of the event loop, which then serves nothing meanwhile.
local SCRAPE_STEP = 500
local SCRAPE_PAUSE = 0.001
-- Bytes of text per piece handed to write(), about (a piece ends after
-- the key that reaches them). Each piece is a Lua string: made in memory
-- the Lua heap reuses while under LuaJIT's 128 KB direct-mapping threshold
-- (a larger one is mapped afresh, one page fault per 4 KB, and unmapped
-- when collected), and each is one step of the garbage collector, whose
-- cycles sweep every live string of the worker: the fewer the pieces,
-- the less of that work per scrape (see docs/request-counter.md, "What a
-- scrape costs"). The whole text of 100,000 keys (150 MB) as one string
-- takes fresh pages from the kernel (some 60 ms for the copy alone).
local WRITE_BYTES = 32 * 1024
local YIELDABLE = check.yieldable

local cells_out = ffi_new("const uint64_t *[1]")
local out_len = ffi_new("size_t[1]")
local rendered_out = ffi_new("uint32_t[1]")


local _M = { _VERSION = abi._VERSION }
local mt = { __index = _M }


local bad = check.bad


-- The options of requests.new (and of the drop-in's configure).
local OPTIONS = {
    window = true, previous = true, max_keys = true, overflow_key = true,
    flush_interval = true, lock_timeout = true, clock = true,
    idle_timeout = true,
    buckets = true,
}


local function option(opts, name, default, valid, expected, level)
    -- Not a tail call: the level counts this frame.
    local value = check.option(valid, expected)(opts[name], "opts." .. name,
                                                level + 1, default or false)
    return value
end


local function positive_integer(max)
    return function(v)
        return type(v) == "number" and v >= 1 and v <= max and v % 1 == 0
    end
end


local function non_negative_integer(max)
    return function(v)
        return type(v) == "number" and v >= 0 and v <= max and v % 1 == 0
    end
end


local function positive_finite(v)
    return type(v) == "number" and v > 0 and v < HUGE
end


local function is_function(v)
    return type(v) == "function"
end


-- A key is a check.key key that is also valid UTF-8, so that the JSON
-- shows it as it is.
local function check_request_key(key, level)
    check_key(key, level + 1)
    if C.rc_utf8_valid(key, #key) == 0 then
        bad("key", "not valid UTF-8", level + 1)
    end
end
_M.check_key = check_request_key


-- syntax: ms = requests.latency_ms(latency, level)
--
-- A latency in seconds, as $request_time gives it (a string) or a number,
-- converted to milliseconds. Raises on anything else (check.latency).
local function latency_ms(latency, level)
    if type(latency) == "number" and latency >= 0 and latency < HUGE then
        return latency * 1000
    end
    return check_latency(latency, level + 1) * 1000
end
_M.latency_ms = latency_ms


local function now_of(self)
    local now = self.clock and self.clock() or ngx_now()
    return now
end


-- Removes the keys idle for idle_timeout (if set) at `now`: how many.
local function expire(self, now)
    if self.idle_timeout == 0 or type(now) ~= "number" then
        return 0
    end
    local overflow_key = self.overflow_key
    local n = C.rc_requests_expire(self.engine, self.ring, self.histogram,
                                   self.edges_s, self.edges, self.window,
                                   now, self.idle_timeout,
                                   overflow_key, #overflow_key, 0)
    return n
end


-- The cells of `key`'s record in the engine, made at its first request.
-- A key past max_keys (or for which the engine has no room) is recorded
-- under the overflow key; only keys with a record of their own are cached,
-- so a flood of new keys cannot grow the worker's memory.
local function key_cells(self, key, level)
    check_request_key(key, level + 1)

    local capped = key ~= "all" and key ~= self.overflow_key
    if capped and not self.cells[self.overflow_key] then
        -- The overflow key's record is made before the first capped key's,
        -- so that it has room once the engine has none for new keys. (It
        -- is shown once it has counted a request.)
        key_cells(self, self.overflow_key, level + 1)
    end
    local rc = C.rc_requests_key(self.engine, key, #key, self.ring,
                                 self.histogram, self.edges, self.max_keys,
                                 capped and 1 or 0, cells_out)
    if rc == KEYS_FULL and capped and self.idle_timeout > 0 then
        -- Idle keys may have kept the places: expire them, once a second
        -- at most, and try again.
        local now = now_of(self)
        if type(now) == "number" and now >= self.next_expire then
            self.next_expire = now + EXPIRE_EVERY
            if expire(self, now) > 0 then
                rc = C.rc_requests_key(self.engine, key, #key, self.ring,
                                       self.histogram, self.edges,
                                       self.max_keys, 1, cells_out)
            end
        end
    end
    if rc == KEYS_FULL and capped then
        -- Counted among the keys refused; one that shows more requests
        -- than a tracked key takes its place (docs/engine.md, "Admission
        -- past max_keys").
        local now = now_of(self)
        if type(now) == "number" and now >= 0 then
            local overflow_key = self.overflow_key
            rc = C.rc_requests_admit(self.engine, key, #key, self.ring,
                                     self.histogram, self.edges_s,
                                     self.edges, self.max_keys, overflow_key,
                                     #overflow_key, now, cells_out)
            if rc == 1 then
                self.metrics.admitted = self.metrics.admitted + 1
            end
        end
    end
    if rc >= 0 then
        local cells = cells_out[0]
        self.cells[key] = cells
        self.cached = self.cached + 1
        return cells
    end

    if (rc == KEYS_FULL or rc == FULL) and capped then
        local metrics = self.metrics
        if rc == KEYS_FULL then
            metrics.overflowed = metrics.overflowed + 1
        else
            metrics.refused = metrics.refused + 1
        end
        local cells = self.cells[self.overflow_key]
        if cells then
            return cells
        end
        -- Not a tail call: the level counts this frame.
        local err
        cells, err = key_cells(self, self.overflow_key, level + 1)
        return cells, err
    end

    if rc == WIDTH_MISMATCH then
        return nil, 'request key "' .. key .. '" has a record of another '
                    .. 'shape: every request counter of a dict must have '
                    .. 'the same "previous"'
    end
    return nil, 'request key "' .. key .. '": ' .. last_error()
end


-- What requests.new and the drop-in's configure share: misuse raises at
-- `level` as error() would count it from the function calling this one.
local function construct(shdict_name, opts, level)
    level = level + 1
    check.string(shdict_name, "shdict_name", level)
    opts = check.table(opts, "opts", level)
    check.options(opts, OPTIONS, "opts", level)

    local window = option(opts, "window", 60, positive_integer(2 ^ 31),
                          "a whole number of seconds >= 1", level)
    local previous = option(opts, "previous", 2,
                            non_negative_integer(MAX_PREVIOUS),
                            "an integer from 0 to " .. MAX_PREVIOUS, level)
    local max_keys = option(opts, "max_keys", 1000,
                            positive_integer(2 ^ 31),
                            "an integer >= 1", level)
    local overflow_key = opts.overflow_key or "_overflow"
    check_request_key(overflow_key, level)
    local flush_interval = option(opts, "flush_interval", 1,
                                  positive_finite,
                                  "a positive finite number of seconds",
                                  level)
    local lock_timeout = option(opts, "lock_timeout", 1, positive_finite,
                                "a positive finite number of seconds", level)
    local clock = option(opts, "clock", nil, is_function, "function", level)
    local idle_timeout = check.idle_seconds(opts.idle_timeout,
                                            "opts.idle_timeout", level, 0)
    local buckets = check.edges(opts.buckets, "opts.buckets", MAX_EDGES,
                                level, DEFAULT_BUCKETS)
    local edges = #buckets

    local handle, err = attach(shdict_name)
    if not handle then
        return nil, err
    end

    -- Every request counter of a dict counts at the same edges: the first
    -- one's are the engine's.
    local edges_s = ffi_new("double[?]", edges)
    local shape = ffi_new("rc_requests_shape_t")
    for i = 1, edges do
        edges_s[i - 1] = buckets[i]
        -- As latency_ms makes a latency's: one on an edge counts in it.
        shape.edges_ms[i - 1] = buckets[i] * 1000
    end
    local rc = C.rc_requests_edges(handle.ptr, edges_s, edges)
    if rc == EDGES_MISMATCH then
        return nil, 'the dict "' .. shdict_name .. '" has request counters '
                    .. 'with other buckets: every request counter of a dict '
                    .. 'must have the same "buckets"'
    elseif rc ~= 0 then
        return nil, "cannot set the buckets: " .. failure(rc)
    end

    local ring = previous + 1
    -- 1: records with histograms; 0: the engine is too small for them (no
    -- percentiles). The same in every worker.
    local histogram = C.rc_requests_layout(handle.ptr, ring, edges)
    shape.ring = ring
    shape.histogram = histogram
    shape.edges = edges

    -- flush_interval and lock_timeout are checked and kept for configs
    -- written for the flushing versions; nothing uses them any more.
    local self = setmetatable({
        dict = handle.dict,
        dict_name = shdict_name,
        handle = handle,
        engine = handle.ptr,
        window = window,
        previous = previous,
        ring = ring,
        histogram = histogram,
        -- The Prometheus edges (seconds) and how many; with the ring and
        -- the histogram flag, what the request path passes in one pointer.
        edges_s = edges_s,
        edges = edges,
        shape = shape,
        max_keys = max_keys,
        overflow_key = overflow_key,
        flush_interval = flush_interval,
        lock_timeout = lock_timeout,
        clock = clock,
        idle_timeout = idle_timeout,
        next_expire = 0,    -- when a full max_keys may expire keys again
        cells = {},         -- key -> its record's cells (registered keys)
        cached = 0,         -- keys in `cells`
        -- The engine's epoch (bumped by each removal of a record) when
        -- `cells` was last known good, and where to read it.
        epoch = C.rc_engine_epoch(handle.ptr),
        seen_epoch = C.rc_engine_epoch(handle.ptr)[0],
        metrics = {
            overflowed = 0, refused = 0, total_only = 0, admitted = 0,
        },
    }, mt)
    return self
end
_M._new = construct


-- syntax: r, err = requests.new(shdict_name, opts?)
--
-- context: init_by_lua*, init_worker_by_lua* and every later phase
--
-- opts: window (seconds, integer, default 60), previous (windows kept
-- before the current one, default 2), max_keys (default 1000),
-- overflow_key (default "_overflow"), idle_timeout (seconds without a
-- request after which a key is removed, its place among max_keys given
-- back; 0, the default: never), buckets (the upper edges of the
-- Prometheus latency buckets, seconds: a list of 1 to 32 increasing
-- numbers, default { 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
-- 10 }; every request counter of a dict must have the same, or new()
-- returns nil and an error), flush_interval and lock_timeout
-- (checked, and unused: there is nothing to flush), clock (a function
-- returning epoch seconds, for tests; default the request's start time,
-- and ngx.now() for `now`). An unknown option raises.
function _M.new(shdict_name, opts)
    -- Not a tail call: the level counts this frame.
    local r, err = construct(shdict_name, opts, 2)
    return r, err
end


local function window_of(self, level)
    local clock = self.clock
    local start
    if clock then
        start = clock()
    else
        -- A timer has a request object too, whose start time is 0.
        start = get_request() and req_start_time() or 0
        if start == 0 then
            start = ngx_now()
        end
    end

    if type(start) ~= "number" then
        bad("clock", "returned " .. type(start) .. ", not a number",
            level + 1)
    end
    -- Not a tail call: the JIT gives up on traces with too many of them.
    local w = floor(start / self.window)
    return w
end


local function record_in(self, key, w, ms, level)
    local cells = self.cells[key]
    if not cells then
        local err
        cells, err = key_cells(self, key, level + 1)
        if not cells then
            return nil, err
        end
    end

    local rc = C.rc_requests_record(cells, self.shape, w, ms)
    if rc ~= 0 then
        if rc ~= TOTAL_ONLY then
            return nil, failure(rc)
        end
        -- Its window's slot holds a newer window: this worker's clock is
        -- `previous` + 1 windows behind another's. Counted in the total.
        self.metrics.total_only = self.metrics.total_only + 1
    end
    return true
end


-- syntax: ok, err = r:record_from(key, latency, with_all, level)
--
-- What record() and record_with_all() do, for modules that wrap them (the
-- greencheek drop-in). Misuse raises at `level` as error() would count it
-- from the caller: 2 blames the caller's caller.
function _M.record_from(self, key, latency, with_all, level)
    if type(self) ~= "table" then
        dot_call("r", "record_from", level + 1)
    end
    local ms = latency_ms(latency, level + 1)
    local w = window_of(self, level + 1)
    check_epoch(self)
    local ok, err = record_in(self, key, w, ms, level + 1)
    if ok and with_all then
        ok, err = record_in(self, "all", w, ms, level + 1)
    end
    return ok, err
end
local record_from = _M.record_from


-- syntax: ok, err = r:record(key, latency)
--
-- context: any phase; meant for log_by_lua*
--
-- Records one request of `latency` seconds (a number or a numeric string
-- such as $request_time) under `key`, in the window of the request's start
-- time. Misuse raises; `nil, err` only if the worker cannot hold more.
function _M.record(self, key, latency)
    if type(self) ~= "table" then
        dot_call("r", "record", 2)
    end
    local ok, err = record_from(self, key, latency, false, 2)
    return ok, err
end


-- syntax: ok, err = r:record_with_all(key, latency)
--
-- As record(), under `key` and under "all".
function _M.record_with_all(self, key, latency)
    if type(self) ~= "table" then
        dot_call("r", "record_with_all", 2)
    end
    local ok, err = record_from(self, key, latency, true, 2)
    return ok, err
end


-- syntax: ok = r:flush()
--
-- context: any phase
--
-- Nothing to do: every request is in the shared engine the moment it is
-- recorded. Kept (it returns true) for configs written for the flushing
-- versions.
function _M.flush(self)
    if type(self) ~= "table" then
        dot_call("r", "flush", 2)
    end
    return true
end


-- Calls `step()` until it says 1 (done), pausing between calls unless
-- `no_pause`: the worker serves others meanwhile. Nil and the error (its
-- own, or its code's) for a failure.
local function in_steps(step, no_pause)
    while true do
        local rc, err = step()
        if rc == 1 then
            return true
        end
        if rc ~= 0 then
            return nil, err or failure(rc)
        end
        if not no_pause then
            ngx_sleep(SCRAPE_PAUSE)
        end
    end
end


-- A report of every key (or of `only_key`), read a step at a time where
-- the phase can yield (see the README's "What a scrape costs"); with the
-- step size for its rendering. With `for_prometheus`, the windows'
-- percentiles (their histograms) are not read: the text shows none.
local function report(self, only_key, for_prometheus)
    local now = now_of(self)
    local ptr
    if type(now) == "number" then
        expire(self, now)
        ptr = C.rc_requests_report(self.engine, self.ring, self.histogram,
                                   self.edges_s, self.edges, self.window,
                                   now, only_key or "",
                                   only_key and #only_key or 0,
                                   only_key and 1 or 0)
    end
    if ptr == nil then
        return nil, "cannot start a report (clock gave " .. tostring(now)
                    .. ")"
    end
    ptr = ffi_gc(ptr, C.rc_report_free)
    if for_prometheus then
        C.rc_report_without_percentiles(ptr)
    end

    local n = YIELDABLE[get_phase()] and SCRAPE_STEP or 0
    if not only_key then
        local engine_ptr = self.engine
        local ok, err = in_steps(function()
            return C.rc_requests_report_walk(engine_ptr, ptr, n)
        end)
        if not ok then
            return nil, err
        end
    end

    local overflow_key = self.overflow_key
    C.rc_report_key_info(ptr, tonumber(C.rc_requests_tracked(self.engine)),
                         self.max_keys, overflow_key, #overflow_key)
    C.rc_requests_admission(self.engine, ptr)
    local memory = engine_stats(self.handle)
    C.rc_report_engine_memory(ptr, memory.used_bytes, memory.bytes)
    return ptr, n
end


-- Hands the text rendered so far to `write`, then forgets it; what write
-- returned.
local function hand_on(ptr, write)
    local text = C.rc_report_text(ptr, out_len)
    local len = out_len[0]
    if text == nil or len == 0 then
        return true
    end
    local piece = ffi_string(text, len)
    C.rc_report_clear_text(ptr)
    local ok, err = write(piece)
    return ok, err
end


-- One step of a scrape with `write`: up to `n` more keys (0: all) rendered
-- and handed to `write` in pieces of about WRITE_BYTES. 1 when the text is
-- whole, 0 when keys are left, a negative code (and write's error).
local function write_step(ptr, n, write)
    local left = n
    while true do
        local done = C.rc_report_render_upto(ptr, left, WRITE_BYTES,
                                             rendered_out)
        if done < 0 then
            return done
        end
        local ok, err = hand_on(ptr, write)
        if not ok then
            return -1, err or "write failed"
        end
        if done == 1 then
            return 1
        end
        if n > 0 then
            left = left - rendered_out[0]
            if left <= 0 then
                return 0
            end
        end
    end
end


-- The text begun on `ptr` (begin's return code `rc`), rendered `n` keys a
-- step (0: at once): returned whole or, with `write`, handed to it in
-- pieces (then true; see write_step). The report is freed at once (its
-- text may be 100 MB).
local function render(ptr, n, rc, write)
    local ok, err
    if rc == 0 then
        ok, err = in_steps(function()
            if write then
                return write_step(ptr, n, write)
            end
            return C.rc_report_render(ptr, n)
        end, n == 0)
    else
        err = failure(rc)
    end
    local text = ok
    if ok and not write then
        text = C.rc_report_text(ptr, out_len)
        text = text ~= nil and abi_string(text, out_len[0])
    end
    C.rc_report_free(ffi_gc(ptr, nil))
    if not text then
        return nil, err or failure(-4)
    end
    return text
end


local function json(self, only_key, write)
    local ptr, n = report(self, only_key)
    if not ptr then
        return nil, n
    end
    local rc = C.rc_report_begin_json(ptr, self.dict:free_space(),
                                      self.dict:capacity(),
                                      only_key and 1 or 0)
    -- Not a tail call: the level counts this frame.
    local text, err = render(ptr, n, rc, write)
    return text, err
end


-- syntax: json, err = r:stats()
-- syntax: ok, err = r:stats(write)
--
-- context: any phase; in steps with 1 ms pauses between them in the phases
-- that can yield (rewrite, access, content, timer...)
--
-- Every registered key's windows as JSON, in greencheek's shape plus
-- p50/p90/p99/max, keys in byte order. Read straight from the engine, no
-- dict scan; each key's figures are one snapshot; a key made while the
-- report is read may or may not be in it.
--
-- With `write` (a function, such as ngx.print), the text is not returned
-- but handed to write(piece) a step at a time, in order (the pieces make
-- the same text); a write returning nil or false stops the scrape, which
-- returns nil and write's second value. The worker then never holds more
-- than one step's text (see the README's "What a scrape costs").
function _M.stats(self, write)
    if type(self) ~= "table" then
        dot_call("r", "stats", 2)
    end
    write = check_func(write, "write", 2, false)
    local text, err = json(self, nil, write)
    return text, err
end


-- syntax: json, err = r:single_stats(key)
--
-- context: any phase (one key: it never yields)
function _M.single_stats(self, key)
    if type(self) ~= "table" then
        dot_call("r", "single_stats", 2)
    end
    check_request_key(key, 2)
    local text, err = json(self, key)
    return text, err
end


-- syntax: text, err = r:prometheus()
-- syntax: ok, err = r:prometheus(write)
--
-- context: any phase; in steps as stats() is
--
-- The Prometheus text exposition format: requests per key as a counter,
-- latency as a histogram (both since the key was first recorded), the
-- sliding-window rate as a gauge. `write` as for stats().
function _M.prometheus(self, write)
    if type(self) ~= "table" then
        dot_call("r", "prometheus", 2)
    end
    write = check_func(write, "write", 2, false)
    local ptr, n = report(self, nil, true)
    if not ptr then
        return nil, n
    end
    local name = self.dict_name
    local rc = C.rc_report_begin_prometheus(ptr, name, #name)
    local text, err = render(ptr, n, rc, write)
    return text, err
end


-- syntax: metrics = r:self_metrics()
--
-- This worker's own counts: overflowed (new keys past max_keys, recorded
-- under the overflow key), refused (new keys the engine had no room for,
-- likewise), total_only (requests whose window slot held a newer window:
-- in the total only), admitted (new keys past max_keys this worker made
-- in place of a tracked key with fewer requests), cached (keys whose
-- record this worker knows); and
-- pending, always 0 (nothing waits for a flush: kept for the flushing
-- versions' callers).
function _M.self_metrics(self)
    if type(self) ~= "table" then
        dot_call("r", "self_metrics", 2)
    end
    local m = self.metrics
    return {
        overflowed = m.overflowed, refused = m.refused,
        total_only = m.total_only, admitted = m.admitted,
        cached = self.cached, pending = 0,
    }
end


-- syntax: ok = requests.flush_all()
--
-- context: any phase
--
-- Nothing to do (see flush()); returns true. Kept so that an
-- exit_worker_by_lua* written for the flushing versions keeps working.
function _M.flush_all()
    return true
end


return _M
