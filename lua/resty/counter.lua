-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- Counters in memory every worker shares, copied to a shared dict: a
-- drop-in for Kong's lua-resty-counter 0.2, with exact integers and no lost
-- counts.
--
-- Each key's count lives in the shared engine (resty.counter.engine,
-- docs/engine.md), in the dict's own zone: `incr` adds to it atomically,
-- without a lock, and every worker sees the sum at once; a worker killed or
-- reloaded takes nothing with it. A sync, by timer or by hand, copies the
-- values that changed into the dict with `safe_set`, for code that reads
-- the dict itself: a copy, so a sync cut short by a kill loses nothing and
-- the next one (any worker's) finishes it.


local abi = require "resty.counter.abi"
local check = require "resty.counter.check"
local engine = require "resty.counter.engine"
local lifecycle = require "resty.counter.lifecycle"
local log = require "resty.counter.log"
local ffi = require "ffi"


local C = abi.C
local abi_string = abi.string
local ngx = ngx
local ngx_WARN = ngx.WARN
local get_phase = ngx.get_phase
local check_key = check.key
local check_amount = check.amount
local dot_call = check.dot_call
local log_failure = log.failure
local ffi_new = ffi.new
local ffi_string = ffi.string
local counter_add = C.rc_counter_add
local counter_add_fractional = C.rc_counter_add_fractional
local counter_value = C.rc_counter_value
local SHDICT_STORE = engine.shdict_store
local pairs = pairs
local pcall = pcall
local setmetatable = setmetatable
local tostring = tostring
local type = type
local find = string.find
local fmt = string.format


local MAX_SAFE = check.max_safe_integer
local MAX_KEY_LEN = engine.max_key_len
local COUNTER = abi.COUNTER_KIND
local WIDTH = abi.COUNTER_WIDTH
local NEEDS_BASE = abi.NEEDS_BASE
local FOREIGN = abi.FOREIGN
local FULL = abi.FULL
local OUT_OF_EXACT_RANGE = abi.OUT_OF_EXACT_RANGE
local NOT_A_NUMBER = "not a number"
local OUT_OF_RANGE = "value out of exact integer range"
local SOURCE = "resty.counter"
-- How long a sync by hand waits for another worker's: a sync of 100,000
-- keys takes some tens of milliseconds.
local SYNC_WAIT_MS = 1000


local _M = { _VERSION = "0.2.0" }
local mt = { __index = _M }


-- This worker's counters by dict name: { counters = {...}, timed = {...} },
-- each the argument of the dict's lifecycle job.
local syncers = {}


-- Takes the dict's value for a key new to the engine as its base: counts
-- from before the engine (an older version, reloaded). A value that is no
-- number belongs to someone else: the key is marked foreign, and its dict
-- value is left alone until it is a number again or gone.
local function import_base(dict, cells, key)
    local base = dict:get(key)
    if base ~= nil and type(base) ~= "number" then
        base = 0 / 0
    end
    C.rc_counter_import_base(cells, base or 0)
end


-- The cells of a key first seen by this worker, made in the engine when
-- `create` is set and no worker has counted it yet. Raises on a bad key:
-- `level` as for check.key, from the caller's caller.
local function record(self, key, create)
    check_key(key, 3, MAX_KEY_LEN)

    local cells, made, code = engine.record(self.engine, COUNTER, key, WIDTH,
                                            create)
    if not cells then
        if code == FULL then
            local metrics = self.metrics
            metrics.refused = metrics.refused + 1
            log_failure(SOURCE, fmt('dict "%s": %s: new keys are refused '
                                    .. '(counted in self_metrics().refused)',
                                    self.dict_name, made))
        end
        return nil, made
    end

    if made then
        import_base(self.dict, cells, key)
    end
    self.cells[key] = cells
    return cells
end


-- Copies into the dict the changed values the engine left to Lua (it
-- writes plain ones itself): keys whose dict value from before the engine
-- is still to be taken, and values it could not write (no memory, beyond
-- 2^53), whose errors this words. The body of a sync, between taking the
-- engine's mirror lock and letting it go.
local function publish(self, changed, count)
    local dict = self.dict
    local metrics = self.metrics
    local failed, first_key, first_err = 0, nil, nil
    for i = 0, count - 1 do
        local change = changed[i]
        local cells, status, value = change.cells, change.status, change.value
        local key = ffi_string(change.key, change.key_len)
        if status == NEEDS_BASE or status == FOREIGN then
            -- The worker that made the key died before it took the dict's
            -- old value, or that value was no number: take it now (once,
            -- whoever is first).
            import_base(dict, cells, key)
            value = counter_value(cells)
            if value ~= value then
                status = FOREIGN
            elseif value > MAX_SAFE or value < -MAX_SAFE then
                status = OUT_OF_EXACT_RANGE
            else
                status = 0
            end
        end

        local err
        if status == 0 then
            local ok
            ok, err = dict:safe_set(key, value)
            if ok then
                C.rc_counter_mirrored(cells, value)
            end
        elseif status == FOREIGN then
            err = NOT_A_NUMBER
        else
            err = OUT_OF_RANGE
            metrics.out_of_range = metrics.out_of_range + 1
        end

        if err then
            failed = failed + 1
            if not first_key then
                first_key, first_err = key, err
            end
        end
    end
    return failed, first_key, first_err
end


local changed_out = ffi_new("const rc_changed_t *[1]")
local count_out = ffi_new("uint32_t[1]")
local written_out = ffi_new("uint32_t[1]")


-- Copies what changed into the dict. With `wait_ms` 0 (a timer's tick),
-- returns true at once when another worker is syncing: its next tick
-- copies what that sync began too early to see.
local function sync_waiting(self, wait_ms)
    local handle = self.engine
    local ptr = handle.ptr
    local rc = C.rc_counter_sync_begin(ptr, wait_ms, handle.zone, SHDICT_STORE,
                                       changed_out, count_out, written_out)
    if rc == 1 then
        if wait_ms == 0 then
            return true
        end
        local err = fmt('dict "%s": another sync is running (waited %d ms '
                        .. 'for it)', self.dict_name, wait_ms)
        log_failure(SOURCE, err)
        return nil, err
    end
    if rc < 0 then
        local err = "cannot start a sync: " .. engine.last_error()
        log_failure(SOURCE, err)
        return nil, err
    end

    local metrics = self.metrics
    if rc == 2 then
        metrics.took_over = metrics.took_over + 1
        log_failure(SOURCE, fmt('dict "%s": a worker died during a sync; this '
                                .. 'one does it again', self.dict_name), nil,
                    ngx_WARN)
    end

    local count = count_out[0]
    local ok, failed, first_key, first_err = pcall(publish, self,
                                                   changed_out[0], count)
    C.rc_counter_sync_end(ptr)
    metrics.syncs = metrics.syncs + 1
    if not ok then
        local err = "sync failed: " .. tostring(failed)
        log_failure(SOURCE, err)
        return nil, err
    end

    metrics.pending_keys = failed
    if failed > 0 then
        metrics.failed = metrics.failed + failed
        local err = fmt('%d of %d keys not copied to dict "%s", kept for the '
                        .. 'next sync (key "%s": %s)', failed,
                        count + written_out[0],
                        self.dict_name, first_key, first_err)
        -- A key that fails every sync (its dict value is no number, the
        -- dict is full): one line per interval.
        log_failure(SOURCE, err)
        return nil, err
    end

    return true
end


-- syntax: ok, err = c:sync()
--
-- context: any phase where shared dicts work (all of them)
--
-- Copies every key whose value changed since the last sync (by any worker)
-- into the dict: when it returns, the dict holds every count made before
-- the call. One sync runs at a time on a dict: while another worker's runs,
-- this one waits for it (up to 1 s, blocking, as the sync itself does),
-- then copies what that one began too early to see (unless a sync begun
-- after this call has already copied everything). A value that cannot
-- be copied (dict full, beyond 2^53) is copied by a later sync; then
-- `nil, err` says how many keys and why. Never yields.
local function sync(self)
    if type(self) ~= "table" then
        dot_call("c", "sync", 2)
    end
    return sync_waiting(self, SYNC_WAIT_MS)
end
_M.sync = sync


-- Syncs each counter of a list: true, or nil and the first error.
local function sync_list(counters, wait_ms)
    local ok, first_err = true, nil
    for i = 1, #counters do
        local synced, err = sync_waiting(counters[i], wait_ms)
        if not synced then
            ok, first_err = nil, first_err or err
        end
    end
    return ok, first_err
end


-- The lifecycle job of one dict's counters in this worker: a tick syncs
-- the timed ones, and returns at once when another worker is syncing (its
-- next tick copies what that sync began too early to see). The final work
-- (reload, shutdown, exit_worker_by_lua*) syncs every counter of the dict,
-- waiting for another worker's sync as a sync by hand does, so that what
-- this worker counted last reaches the dict before it goes.
local function sync_job(syncer, reason)
    if reason == "tick" then
        return sync_list(syncer.timed, 0)
    end
    return sync_list(syncer.counters, SYNC_WAIT_MS)
end


-- syntax: c, err = counter.new(shdict_name, sync_interval?)
--
-- context: init_worker_by_lua*, and any phase where timers can be made;
-- without sync_interval, also init_by_lua*.
function _M.new(shdict_name, sync_interval)
    check.string(shdict_name, "shdict_name", 2)
    check.seconds(sync_interval, "sync_interval", 2, false)

    local handle, err = engine.attach(shdict_name)
    if not handle then
        return nil, err
    end

    local syncer = syncers[shdict_name]
    if not syncer then
        syncer = { counters = {}, timed = {} }
    end

    if sync_interval and get_phase() == "init" then
        return nil, "cannot create a sync timer in init_by_lua*: "
                    .. "create the counter in init_worker_by_lua*"
    end
    -- One job per dict: a shorter interval replaces its timer.
    local ok
    ok, err = lifecycle.every("resty.counter sync " .. shdict_name,
                              sync_interval, sync_job, syncer,
                              { order = lifecycle.ORDER_SYNC })
    if not ok then
        return nil, "failed to create the sync timer: " .. err
    end

    -- Every counter of the dict in this worker shares one key cache.
    handle.counter_cells = handle.counter_cells or {}

    local self = setmetatable({
        -- The request path's method on the object itself: `c:incr()` then
        -- finds it in the object's own table, not through the metatable's
        -- __index, which LuaJIT's interpreter resolves in C at some 150
        -- instructions a call (measured with callgrind, bench/RESULTS.md).
        incr = _M.incr,
        dict = handle.dict,
        dict_name = shdict_name,
        engine = handle,
        cells = handle.counter_cells,   -- key -> cells
        exact = sync_interval ~= nil,
        metrics = { syncs = 0, failed = 0, out_of_range = 0, refused = 0,
                    took_over = 0, pending_keys = 0 },
    }, mt)

    syncers[shdict_name] = syncer
    syncer.counters[#syncer.counters + 1] = self
    if sync_interval then
        syncer.timed[#syncer.timed + 1] = self
    end

    return self
end


local function out_of_range(self, key)
    return nil, fmt('%s: key "%s" in dict "%s"', OUT_OF_RANGE, key,
                    self.dict_name)
end


-- Adds a checked step to a key's cells: nil and an error when the sum would
-- leave +-(2^53 - 1) (nothing changes then).
local function add(self, key, cells, step)
    local rc
    if step % 1 == 0 then
        rc = counter_add(cells, step)
    else
        rc = counter_add_fractional(cells, step)
    end
    if rc ~= 0 then
        return out_of_range(self, key)
    end
    return true
end


-- syntax: ok, err = c:incr(key, step?)
--
-- context: any phase
--
-- Adds to the key's count in the shared engine, atomically and without a
-- lock: every worker reads the new value at once. A step is a finite
-- number within +-(2^53 - 1), default 1; integer steps are kept exact.
-- Misuse raises; `nil, err` when the engine has no room for a new key, or
-- when the sum would leave +-(2^53 - 1) (nothing is added then).
function _M.incr(self, key, step)
    if type(self) ~= "table" then
        dot_call("c", "incr", 2)
    end

    -- A bad step raises before the key gets a record: a raised incr leaves
    -- no trace, not even a key created at 0.
    if step ~= nil and (type(step) ~= "number"
                        or not (step >= -MAX_SAFE and step <= MAX_SAFE))
    then
        step = check_amount(step, "step", 2)
    end

    local cells = self.cells[key]
    if not cells then
        local err
        cells, err = record(self, key, true)
        if not cells then
            return nil, err
        end
    end

    -- No tail call: this is the request path, which the JIT compiles.
    local rc
    if step == nil then
        rc = counter_add(cells, 1)
    elseif step % 1 == 0 then
        rc = counter_add(cells, step)
    else
        rc = counter_add_fractional(cells, step)
    end
    if rc ~= 0 then
        return out_of_range(self, key)
    end
    return true
end


-- syntax: newval, err = c:reset(key, number)
--
-- context: any phase
--
-- Subtracts `number` from the key atomically: counts other workers add
-- meanwhile survive. Returns the new value, as every worker sees it; or
-- nil and "not a number" when the dict holds something else for the key
-- (nothing is subtracted then, as `dict:incr` would refuse).
function _M.reset(self, key, number)
    if type(self) ~= "table" then
        dot_call("c", "reset", 2)
    end
    check_key(key, 2, MAX_KEY_LEN)
    number = check_amount(number, "number", 2)

    local cells = self.cells[key]
    if not cells then
        local err
        cells, err = record(self, key, true)
        if not cells then
            return nil, err
        end
    end

    local value = counter_value(cells)
    if value ~= value then
        -- The dict holds something else than a number there (NaN).
        return nil, NOT_A_NUMBER
    end
    local ok, err = add(self, key, cells, -number)
    if not ok then
        return nil, err
    end
    -- The shape of dict:incr's answer (newval, err, forcible): nothing is
    -- evicted here.
    return counter_value(cells), nil, false
end


-- syntax: value, flags = c:get(key)
--
-- context: any phase
--
-- A counter made with a sync interval reads the key's value in the engine:
-- every worker's counts, the moment they were made. One synced by hand
-- (no interval) reads the dict, which changes when sync() copies into it,
-- as Kong's does. A key the engine never counted reads the dict either way.
function _M.get(self, key)
    if type(self) ~= "table" then
        dot_call("c", "get", 2)
    end
    check_key(key, 2, MAX_KEY_LEN)
    if not self.exact then
        return self.dict:get(key)
    end

    local cells = self.cells[key]
    if not cells then
        cells = record(self, key, false)
        if not cells then
            return self.dict:get(key)
        end
    end

    local value = counter_value(cells)
    if value ~= value then
        -- Foreign: the dict's value is no number; it is what there is.
        return self.dict:get(key)
    end
    return value
end


-- syntax: keys = c:get_keys(max_count?)
--
-- context: any phase
--
-- The dict's keys, at most `max_count` (default 1024, 0 for all), as
-- `ngx.shared.DICT:get_keys` returns them.
function _M.get_keys(self, max_count)
    if type(self) ~= "table" then
        dot_call("c", "get_keys", 2)
    end

    if max_count == nil then
        return self.dict:get_keys()
    end

    check.integer(max_count, "max_count", 0, 1 / 0, 2)
    return self.dict:get_keys(max_count)
end


local text_out = ffi_new("const unsigned char *[1]")
local text_len_out = ffi_new("size_t[1]")


-- Gives a record to every key whose dict value is a number and that the
-- engine has none for (counted before the engine, by an older version,
-- and not since), with that value as its base, as incr would: c:get reads
-- the dict for such a key, and the engine's rendering lists records only.
-- Once per worker and dict; again after a refusal (the engine full: `nil,
-- err` then, logged by record()).
local function import_dict_keys(self)
    local handle = self.engine
    if handle.counter_keys_imported then
        return true
    end
    local dict, cells = self.dict, self.cells
    local keys = dict:get_keys(0)
    for i = 1, #keys do
        local key = keys[i]
        if not cells[key] and #key <= MAX_KEY_LEN
           and type(dict:get(key)) == "number"
        then
            local ok, err = record(self, key, true)
            if not ok then
                return nil, err
            end
        end
    end
    handle.counter_keys_imported = true
    return true
end


-- The engine's rendering of the counter's keys (see c:prometheus): the
-- text and the number of keys, or nil and an error. `names` (label names
-- joined by commas) and `separator` split each key into labels; without
-- them the labels are the dict's name and the key. For metrics.lua too.
local function prometheus_text(self, family, names, separator)
    if not self.exact then
        return nil, fmt('dict "%s": a counter without a sync interval reads '
                        .. 'the dict, not the engine', self.dict_name)
    end
    local ok, err = import_dict_keys(self)
    if not ok then
        return nil, err
    end
    local dict_name = self.dict_name
    local n = C.rc_counter_prometheus(self.engine.ptr, family, #family,
                                      dict_name, #dict_name,
                                      names, names and #names or 0,
                                      separator,
                                      separator and #separator or 0,
                                      text_out, text_len_out)
    if n < 0 then
        return nil, "cannot render the keys: " .. engine.last_error()
    end
    return abi_string(text_out[0], text_len_out[0]), n
end
_M._prometheus_text = prometheus_text


-- syntax: text, err = c:prometheus(name?)
--
-- context: any phase
--
-- The counter's keys in the Prometheus text format, rendered in the
-- engine without a lock: one line `name{dict="...",key="..."} value` per
-- key, sorted by key, as resty.counter.metrics renders them (name
-- defaults to "resty_counts_total"; no HELP or TYPE line). Each value is
-- what c:get(key) reads at that moment, every worker's counts; a key
-- whose dict value is no number is left out. The first call in a worker
-- also gives engine records to the dict's numbers that have none (keys
-- counted before the engine: `get_keys(0)`, once). Only for a counter
-- made with a sync interval: one synced by hand reads the dict (`nil,
-- err`); and `nil, err` when the engine cannot render or has no room for
-- such a key.
function _M.prometheus(self, name)
    if type(self) ~= "table" then
        dot_call("c", "prometheus", 2)
    end
    if name == nil then
        name = "resty_counts_total"
    elseif type(name) ~= "string" or not find(name, "^[%a_:][%w_:]*$") then
        check.expected("name", "a metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)",
                       name, 2)
    end
    local text, err = prometheus_text(self, name)
    if not text then
        return nil, err
    end
    return text
end


-- syntax: metrics = c:self_metrics()
--
-- context: any phase
--
-- This worker's counts for this counter: syncs; failed (keys a sync could
-- not copy into the dict, tried again by the next); out_of_range (of
-- those, values beyond +-(2^53 - 1)); pending_keys (keys the last sync
-- left uncopied); refused (new keys refused by a full engine); took_over
-- (syncs of workers that died, done again). And the engine's, shared by
-- every worker: engine_keys, engine_max_keys, engine_refused (since it was
-- made), engine_bytes. `evictions` and `lost` are always 0 now (a sync
-- never evicts; nothing pending lives in a worker to lose), kept for
-- configurations that read them.
function _M.self_metrics(self)
    if type(self) ~= "table" then
        dot_call("c", "self_metrics", 2)
    end

    local metrics = self.metrics
    local stats = engine.stats(self.engine)
    return {
        syncs = metrics.syncs,
        failed = metrics.failed,
        out_of_range = metrics.out_of_range,
        pending_keys = metrics.pending_keys,
        refused = metrics.refused,
        took_over = metrics.took_over,
        evictions = 0,
        lost = 0,
        engine_keys = stats.keys,
        engine_max_keys = stats.max_keys,
        engine_refused = stats.refused,
        engine_bytes = stats.bytes,
    }
end


-- syntax: ok = counter.sync_all()
--
-- context: any phase
--
-- Syncs every counter of this worker, timed or not. Counts are safe in the
-- engine without it. In `exit_worker_by_lua_block` it runs the final work
-- of every periodic job of the worker (lifecycle.exit(): syncs, then lax
-- flushes, then metrics), which copies the last values into the dict
-- before the worker goes.
function _M.sync_all()
    if get_phase() == "exit_worker" then
        return lifecycle.exit()
    end
    local ok = true
    for _, syncer in pairs(syncers) do
        if not sync_list(syncer.counters, SYNC_WAIT_MS) then
            ok = nil
        end
    end
    return ok
end


return _M
