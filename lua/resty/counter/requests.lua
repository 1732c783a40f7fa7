-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- Requests per window (default: per minute) and their latency, per key:
-- counts, average, p50/p90/p99/max and a sliding-window rate, as JSON or in
-- the Prometheus text format. The engine behind the drop-in
-- resty.greencheek.request.counter.
--
-- Each worker records into native memory (the Rust core, one FFI call per
-- request, no shared-dict lock). A timer flushes to the shared dict under a
-- lock only flushes take: every (key, window) record is merged with the
-- dict's by the Rust core and written back. Window records expire by TTL;
-- each key also has a total since it was first recorded (for Prometheus'
-- counters). Keys are registered in the dict, at most `max_keys` of them:
-- requests for keys beyond are recorded under `overflow_key`.


local ffi = require "ffi"
local base = require "resty.core.base"
local check = require "resty.counter.check"
local log = require "resty.counter.log"
local store = require "resty.counter.store"
local new_tab = require "table.new"


local C = store.lib
local failure = store.failure
local ngx = ngx
local ngx_log = ngx.log
local ngx_ERR = ngx.ERR
local ngx_now = ngx.now
local ngx_sleep = ngx.sleep
local ngx_shared = ngx.shared
local update_time = ngx.update_time
local get_phase = ngx.get_phase
local get_request = base.get_request
local req_start_time = ngx.req.start_time
local timer_every = ngx.timer.every
local worker_pid = ngx.worker.pid
local check_key = check.key
local check_latency = check.latency
local dot_call = check.dot_call
local log_failure = log.failure
local ffi_errno = ffi.errno
local ffi_gc = ffi.gc
local libc = ffi.C
local ffi_new = ffi.new
local ffi_string = ffi.string
local floor = math.floor
local pcall = pcall
local setmetatable = setmetatable
local tonumber = tonumber
local tostring = tostring
local type = type
local fmt = string.format


ffi.cdef[[
typedef struct rc_requests_s rc_requests_t;
typedef struct rc_report_s rc_report_t;

int32_t rc_utf8_valid(const unsigned char *ptr, size_t len);
rc_requests_t *rc_requests_new(void);
void rc_requests_free(rc_requests_t *store);
int32_t rc_requests_alloc(rc_requests_t *store);
int32_t rc_requests_record(rc_requests_t *store, uint32_t slot,
    double latency_ms);
int32_t rc_requests_merge(rc_requests_t *store, uint32_t slot,
    const unsigned char *stored, size_t stored_len,
    const unsigned char **out, size_t *out_len);
int32_t rc_requests_release(rc_requests_t *store, uint32_t slot);
uint32_t rc_requests_pending(const rc_requests_t *store);

rc_report_t *rc_report_new(uint32_t window, double now, uint32_t previous);
void rc_report_free(rc_report_t *report);
int32_t rc_report_add_key(rc_report_t *report, const unsigned char *key,
    size_t len);
int32_t rc_report_put(rc_report_t *report, uint32_t key, int32_t window,
    const unsigned char *record, size_t len);
void rc_report_key_info(rc_report_t *report, uint32_t tracked,
    uint32_t max_keys, const unsigned char *overflow_key, size_t len);
const unsigned char *rc_report_json(rc_report_t *report, double free_space,
    double capacity, int32_t single, size_t *out_len);
const unsigned char *rc_report_prometheus(rc_report_t *report,
    const unsigned char *dict, size_t dict_len, size_t *out_len);
]]


-- libc's kill(2), to ask whether a process exists (signal 0). Declared
-- apart: another module may have declared it already.
pcall(ffi.cdef, "int kill(int pid, int sig);")
local ESRCH = 3


local CORRUPT_RECORD = -5
local MAX_PREVIOUS = 64
local HUGE = 1 / 0

-- The dict's keys, all under "rc:" (use a dict of its own for this).
local LOCK_KEY = "rc:lock"
local COUNT_KEY = "rc:n"        -- how many keys are registered
local CAPPED_KEY = "rc:c"       -- how many of them count against max_keys
local INDEX_PREFIX = "rc:i:"    -- rc:i:<n> -> the n-th key
local KEY_PREFIX = "rc:k:"      -- rc:k:<key> -> its n
local TOTAL_PREFIX = "rc:t:"    -- rc:t:<key> -> record since first seen
local WINDOW_PREFIX = "rc:w:"   -- rc:w:<window>:<key> -> that window's

-- A lock left by a worker that died while flushing frees itself; a
-- waiting worker that sees the holder's process gone takes it over at once.
local LOCK_TTL = 10
local TAKEOVER_PREFIX = "rc:lock:dead:"   -- one takeover per dead token

-- Phases where ngx.sleep works: a flush there waits for the lock without
-- blocking the worker; elsewhere it spins, bounded by lock_timeout.
local YIELDABLE = {
    rewrite = true, access = true, content = true, timer = true,
    ssl_cert = true, ssl_session_fetch = true, ssl_client_hello = true,
    preread = true,
}

local out_ptr = ffi_new("const unsigned char *[1]")
local out_len = ffi_new("size_t[1]")


local _M = { _VERSION = store._VERSION }
local mt = { __index = _M }


-- Every engine of this worker, for flush_all().
local engines = {}


local bad = check.bad
local SOURCE = "resty.counter.requests"


-- The options of requests.new (and of the drop-in's configure).
local OPTIONS = {
    window = true, previous = true, max_keys = true, overflow_key = true,
    flush_interval = true, lock_timeout = true, clock = true,
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


-- The timer callback; the premature run at reload and shutdown flushes
-- too (exit_worker catches what requests in flight add after it).
local function tick(premature, self)
    -- At exit, wait for the lock without yielding: the worker is going.
    self:flush(premature)
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

    local dict = ngx_shared[shdict_name]
    if not dict then
        return nil, 'shared dict "' .. shdict_name .. '" not found'
    end

    local ptr = C.rc_requests_new()
    if ptr == nil then
        return nil, failure(-4)
    end

    local self = setmetatable({
        dict = dict,
        dict_name = shdict_name,
        store = ffi_gc(ptr, C.rc_requests_free),
        window = window,
        previous = previous,
        max_keys = max_keys,
        overflow_key = overflow_key,
        lock_timeout = lock_timeout,
        clock = clock,
        windows = {},       -- window number -> { key -> slot }
        slot_key = {},      -- slot -> key
        slot_window = {},   -- slot -> window number
        pending = {},       -- slots in use, in the order they were made
        unregistered = 0,   -- pending keys not known to be registered
        registered = {},    -- keys known to be registered in the dict
        full = false,       -- the dict's registry reached max_keys
        flushing = false,
        metrics = { flushes = 0, failed = 0, overflowed = 0, corrupt = 0 },
    }, mt)

    if get_phase() == "init" then
        return nil, "cannot create the flush timer in init_by_lua*: "
                    .. "create it in init_worker_by_lua*"
    end

    local ok, err = timer_every(flush_interval, tick, self)
    if not ok then
        return nil, "failed to create the flush timer: " .. err
    end

    engines[#engines + 1] = self
    return self
end
_M._new = construct


-- syntax: r, err = requests.new(shdict_name, opts?)
--
-- context: init_worker_by_lua*, and any phase where timers can be made
--
-- opts: window (seconds, integer, default 60), previous (windows kept
-- before the current one, default 2), max_keys (default 1000),
-- overflow_key (default "_overflow"), flush_interval (seconds, default 1),
-- lock_timeout (seconds a flush waits for another worker's, default 1),
-- clock (a function returning epoch seconds, for tests; default the
-- request's start time, and ngx.now() for `now`). An unknown option
-- raises.
function _M.new(shdict_name, opts)
    -- Not a tail call: the level counts this frame.
    local r, err = construct(shdict_name, opts, 2)
    return r, err
end


-- A new slot for `key` in window `w`. Keys not registered in the dict
-- once the registry is full (or more of them pending than it could take)
-- go to the overflow key.
local function new_slot(self, slots, key, w, level)
    check_request_key(key, level + 1)

    local registered = self.registered
    if not registered[key] and key ~= "all" and key ~= self.overflow_key
    then
        if self.full or self.unregistered >= self.max_keys then
            self.metrics.overflowed = self.metrics.overflowed + 1
            key = self.overflow_key
            local slot = slots[key]
            if slot then
                return slot
            end

        else
            self.unregistered = self.unregistered + 1
        end
    end

    local slot = C.rc_requests_alloc(self.store)
    if slot < 0 then
        return nil, failure(slot)
    end

    slots[key] = slot
    self.slot_key[slot] = key
    self.slot_window[slot] = w
    local pending = self.pending
    pending[#pending + 1] = slot
    return slot
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
    local slots = self.windows[w]
    if not slots then
        slots = new_tab(0, 8)
        self.windows[w] = slots
    end

    local slot = slots[key]
    if not slot then
        local err
        slot, err = new_slot(self, slots, key, w, level + 1)
        if not slot then
            return nil, err
        end
    end

    local rc = C.rc_requests_record(self.store, slot, ms)
    if rc ~= 0 then
        return nil, failure(rc)
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


-- True when the flush lock's `holder` (a token "<pid>:...") names a
-- process that no longer exists: a worker killed (or crashed) mid-flush,
-- whose lock would block every flush for LOCK_TTL. A process of another
-- user (EPERM) or a token without a pid counts as alive.
local function holder_dead(holder)
    local pid = type(holder) == "string" and tonumber(holder:match("^(%d+):"))
    if not pid or pid == worker_pid() then
        return false
    end
    return libc.kill(pid, 0) == -1 and ffi_errno() == ESRCH
end


-- Frees the lock of a dead holder. Of the workers that see it dead, the one
-- that adds the takeover key for that token deletes it, and only while it
-- is still that token with seconds to live (it cannot expire and be taken
-- by a live worker in between).
local function take_over(dict, holder)
    if dict:safe_add(TAKEOVER_PREFIX .. holder, true, LOCK_TTL)
       and dict:get(LOCK_KEY) == holder
       and (dict:ttl(LOCK_KEY) or 0) > 1
    then
        dict:delete(LOCK_KEY)
        ngx_log(ngx_ERR, "resty.counter.requests: took over the flush lock "
                .. "of a worker that died while flushing (", holder, ")")
    end
end


local function lock(self, no_yield)
    local dict = self.dict
    local token = worker_pid() .. ":" .. tostring(self)
    local yieldable = not no_yield and YIELDABLE[get_phase()]
    local deadline, checked
    local wait = 0.001
    while true do
        local ok, err = dict:safe_add(LOCK_KEY, token, LOCK_TTL)
        if ok then
            return token
        end

        if err ~= "exists" then
            return nil, "cannot take the flush lock: " .. err
        end

        local holder = dict:get(LOCK_KEY)
        if holder ~= checked then      -- once per holder, not per spin
            checked = holder
            if holder_dead(holder) then
                take_over(dict, holder)
            end
        end

        update_time()
        local now = ngx_now()
        deadline = deadline or now + self.lock_timeout
        if now >= deadline then
            return nil, "timeout waiting for another worker's flush"
        end

        if yieldable then
            -- Flushes hold the lock for milliseconds: waits of 1, 2, 4, 5,
            -- 5... ms find it free soon after. Longer sleeps would keep
            -- this worker's records pending longer than its interval,
            -- which is what a kill -9 loses.
            ngx_sleep(wait)
            wait = wait * 2 < 0.005 and wait * 2 or 0.005
        end
    end
end


local function unlock(self, token)
    local dict = self.dict
    if dict:get(LOCK_KEY) == token then
        dict:delete(LOCK_KEY)
    end
end


-- The merged record of a slot and the dict's `stored`, as a Lua string.
local function merged(self, slot, stored)
    local rc = C.rc_requests_merge(self.store, slot, stored,
                                   stored and #stored or 0, out_ptr, out_len)
    if rc ~= 0 then
        return nil, rc
    end
    local value = ffi_string(out_ptr[0], out_len[0])
    return value
end


-- Never evicts: in a full dict a write fails ("no memory") and the record
-- stays pending, where an eviction would silently drop other records (or
-- the key registry). Expired windows still make room.
local function set(self, key, value, ttl)
    local ok, err = self.dict:safe_set(key, value, ttl)
    return ok, err
end


-- A stored record that is not one is replaced (logged, counted): keeping
-- it would block the key's records forever.
local function merge_stored(self, slot, dict_key)
    local stored = self.dict:get(dict_key)
    if stored ~= nil and type(stored) ~= "string" then
        stored = "?"
    end

    local value, rc = merged(self, slot, stored)
    if not value and rc == CORRUPT_RECORD then
        self.metrics.corrupt = self.metrics.corrupt + 1
        log_failure(SOURCE, fmt('"%s" in dict "%s" is not a record: replaced',
                                dict_key, self.dict_name))
        stored = nil
        value, rc = merged(self, slot, nil)
    end

    if not value then
        return nil, failure(rc)
    end
    return value, stored
end


-- Registers `key` in the dict (under the flush lock); false when the
-- registry is full.
local function register(self, key)
    local dict = self.dict
    if dict:get(KEY_PREFIX .. key) then
        return true
    end

    -- "all" and the overflow key are always kept: max_keys is about the
    -- others, the keys callers (or attackers) choose.
    local capped = key ~= "all" and key ~= self.overflow_key
    local count = dict:get(CAPPED_KEY) or 0
    if capped and count >= self.max_keys then
        self.full = true
        return false
    end

    local n = (dict:get(COUNT_KEY) or 0) + 1
    local ok, err = set(self, INDEX_PREFIX .. n, key)
    if ok then
        ok, err = set(self, KEY_PREFIX .. key, n)
    end
    if ok then
        ok, err = set(self, COUNT_KEY, n)
    end
    if ok and capped then
        ok, err = set(self, CAPPED_KEY, count + 1)
    end
    if not ok then
        return nil, err
    end
    return true
end


-- Merges one slot into the dict: its window's record and the key's total,
-- both or neither.
local function flush_slot(self, slot)
    local key, w = self.slot_key[slot], self.slot_window[slot]
    local registered = self.registered
    if not registered[key] then
        local ok, err = register(self, key)
        if ok == nil then
            return nil, err
        end

        if ok then
            registered[key] = true
        else
            self.metrics.overflowed = self.metrics.overflowed + 1
            key = self.overflow_key
            ok, err = register(self, key)
            if not ok then
                return nil, err
            end
            registered[key] = true
        end
    end

    local now = self.clock and self.clock() or ngx_now()
    -- Shown until the window is `previous` windows old; one more window of
    -- margin.
    local ttl = (w + self.previous + 2) * self.window - now
    if ttl <= 0 then
        -- Already too old to be shown: nothing to keep but the total.
        ttl = nil
    end

    local window_key = WINDOW_PREFIX .. w .. ":" .. key
    local total_key = TOTAL_PREFIX .. key
    local window_value, old_window
    if ttl then
        window_value, old_window = merge_stored(self, slot, window_key)
        if not window_value then
            return nil, old_window
        end
    end

    local total_value, err = merge_stored(self, slot, total_key)
    if not total_value then
        return nil, err
    end

    local ok
    if ttl then
        ok, err = set(self, window_key, window_value, ttl)
        if not ok then
            return nil, err
        end
    end

    ok, err = set(self, total_key, total_value)
    if not ok then
        -- Undo the window's part: the slot stays pending, whole.
        if ttl then
            if old_window then
                set(self, window_key, old_window, ttl)
            else
                self.dict:delete(window_key)
            end
        end
        return nil, err
    end

    return true
end


local function flush_locked(self)
    local pending = self.pending
    local kept = {}
    local failed, first_err = 0, nil
    for i = 1, #pending do
        local slot = pending[i]
        local ok, err = flush_slot(self, slot)
        if ok then
            C.rc_requests_release(self.store, slot)
            self.slot_key[slot] = nil
            self.slot_window[slot] = nil
        else
            failed = failed + 1
            first_err = first_err or err
            kept[#kept + 1] = slot
        end
    end

    -- Rebuild the (key, window) -> slot map from what stays pending.
    local windows = {}
    for i = 1, #kept do
        local slot = kept[i]
        local w = self.slot_window[slot]
        windows[w] = windows[w] or {}
        windows[w][self.slot_key[slot]] = slot
    end
    self.windows = windows
    self.pending = kept
    self.unregistered = 0
    return failed, first_err
end


-- syntax: ok, err = r:flush(no_yield?)
--
-- context: any phase where shared dicts work; waits for another worker's
-- flush with ngx.sleep where it can, by spinning elsewhere or with
-- `no_yield` (at most lock_timeout)
--
-- Merges this worker's records into the dict. What cannot be written
-- stays pending for the next flush, and `nil, err` says why.
function _M.flush(self, no_yield)
    if type(self) ~= "table" then
        dot_call("r", "flush", 2)
    end
    if self.flushing or #self.pending == 0 then
        return true
    end

    self.flushing = true
    local token, err = lock(self, no_yield)
    if not token then
        self.flushing = false
        self.metrics.failed = self.metrics.failed + 1
        log_failure(SOURCE, fmt('flush of dict "%s" postponed: %s',
                                self.dict_name, err))
        return nil, err
    end

    local ok, failed, first_err = pcall(flush_locked, self)
    unlock(self, token)
    self.flushing = false
    self.metrics.flushes = self.metrics.flushes + 1

    if not ok then
        log_failure(SOURCE, "flush failed: " .. tostring(failed))
        return nil, failed
    end

    if failed > 0 then
        self.metrics.failed = self.metrics.failed + failed
        err = fmt('%d records not written to dict "%s", kept pending: %s',
                  failed, self.dict_name, first_err)
        log_failure(SOURCE, err)
        return nil, err
    end

    return true
end


local function report(self, only_key)
    local now = self.clock and self.clock() or ngx_now()
    local ptr = C.rc_report_new(self.window, now, self.previous)
    if ptr == nil then
        return nil, "cannot start a report (clock gave " .. tostring(now)
                    .. ")"
    end
    ptr = ffi_gc(ptr, C.rc_report_free)

    local dict = self.dict
    local current = floor(now / self.window)
    local n = dict:get(COUNT_KEY) or 0
    local prefixes = {}
    for age = 0, self.previous do
        prefixes[age] = WINDOW_PREFIX .. (current - age) .. ":"
    end

    local function add(key)
        local index = C.rc_report_add_key(ptr, key, #key)
        if index < 0 then
            return nil, failure(index)
        end

        local total = dict:get(TOTAL_PREFIX .. key)
        if type(total) == "string" then
            C.rc_report_put(ptr, index, -1, total, #total)
        end

        for age = 0, self.previous do
            local record = dict:get(prefixes[age] .. key)
            if type(record) == "string" then
                C.rc_report_put(ptr, index, age, record, #record)
            end
        end
        return true
    end

    if only_key then
        add(only_key)
    else
        for i = 1, n do
            local key = dict:get(INDEX_PREFIX .. i)
            if type(key) == "string" then
                add(key)
            end
        end
    end

    local overflow_key = self.overflow_key
    C.rc_report_key_info(ptr, dict:get(CAPPED_KEY) or 0, self.max_keys,
                         overflow_key, #overflow_key)
    return ptr
end


-- syntax: json, err = r:stats()
--
-- context: any phase
--
-- Every registered key's windows as JSON, in greencheek's shape plus
-- p50/p90/p99/max. One dict read per record: no scan of the dict.
function _M.stats(self)
    if type(self) ~= "table" then
        dot_call("r", "stats", 2)
    end
    local ptr, err = report(self)
    if not ptr then
        return nil, err
    end

    local text = C.rc_report_json(ptr, self.dict:free_space(),
                                  self.dict:capacity(), 0, out_len)
    if text == nil then
        return nil, failure(-4)
    end
    return ffi_string(text, out_len[0])
end


-- syntax: json, err = r:single_stats(key)
--
-- context: any phase
function _M.single_stats(self, key)
    if type(self) ~= "table" then
        dot_call("r", "single_stats", 2)
    end
    check_request_key(key, 2)
    local ptr, err = report(self, key)
    if not ptr then
        return nil, err
    end

    local text = C.rc_report_json(ptr, self.dict:free_space(),
                                  self.dict:capacity(), 1, out_len)
    if text == nil then
        return nil, failure(-4)
    end
    return ffi_string(text, out_len[0])
end


-- syntax: text, err = r:prometheus()
--
-- context: any phase
--
-- The Prometheus text exposition format: requests per key as a counter,
-- latency as a histogram (both since the key was first recorded), the
-- sliding-window rate as a gauge.
function _M.prometheus(self)
    if type(self) ~= "table" then
        dot_call("r", "prometheus", 2)
    end
    local ptr, err = report(self)
    if not ptr then
        return nil, err
    end

    local name = self.dict_name
    local text = C.rc_report_prometheus(ptr, name, #name, out_len)
    if text == nil then
        return nil, failure(-4)
    end
    return ffi_string(text, out_len[0])
end


-- syntax: metrics = r:self_metrics()
--
-- This worker's own counts: flushes, failed (records kept pending after a
-- failed write: the dict was full), overflowed (requests counted under the
-- overflow key), corrupt (records replaced), pending (records now).
function _M.self_metrics(self)
    if type(self) ~= "table" then
        dot_call("r", "self_metrics", 2)
    end
    local m = self.metrics
    return {
        flushes = m.flushes, failed = m.failed,
        overflowed = m.overflowed, corrupt = m.corrupt,
        pending = tonumber(C.rc_requests_pending(self.store)),
    }
end


-- syntax: ok = requests.flush_all()
--
-- context: any phase; meant for exit_worker_by_lua*
function _M.flush_all()
    local ok = true
    for i = 1, #engines do
        if not engines[i]:flush() then
            ok = nil
        end
    end
    return ok
end


return _M
