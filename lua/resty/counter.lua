-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- Lock-free per-worker counters, synced to a shared dict: a drop-in for
-- Kong's lua-resty-counter 0.2, with exact integers and no lost counts.
--
-- Each worker counts in native memory owned by the Rust core (see
-- resty.counter.store); a sync, by timer or by hand, applies the worker's
-- deltas to the dict with `incr(key, delta, 0)`. A delta that cannot be
-- applied stays pending and is retried; evictions are logged and counted.


local check = require "resty.counter.check"
local log = require "resty.counter.log"
local store = require "resty.counter.store"
local clear_tab = require "table.clear"
local new_tab = require "table.new"


local ngx = ngx
local ngx_WARN = ngx.WARN
local ngx_shared = ngx.shared
local get_phase = ngx.get_phase
local timer_every = ngx.timer.every
local check_key = check.key
local check_amount = check.amount
local dot_call = check.dot_call
local log_failure = log.failure
local pairs = pairs
local setmetatable = setmetatable
local tonumber = tonumber
local type = type
local fmt = string.format


local MAX_SAFE = check.max_safe_integer
local DELTA_OK = store.DELTA_OK
local OUT_OF_RANGE = "value out of exact integer range"
local SOURCE = "resty.counter"


local _M = { _VERSION = "0.2.0" }
local mt = { __index = _M }


-- This worker's counters by dict name: { counters = {...}, timed = {...},
-- interval = n, generation = n }. Counters are held for the worker's life:
-- one collected with deltas pending would lose them.
local syncers = {}


-- Adds `value` to `key` in the dict, never letting the dict's value leave
-- +-(2^53 - 1), past which doubles round. A step of +-1 from inside that
-- range cannot round (2^53 itself is exact), so only larger deltas look at
-- the value first; if another worker moves the key between that look and
-- the incr, the result shows it and the addition is undone (exactly, unless
-- the rounded sum was odd) and reported.
local function apply(dict, key, value)
    if value >= 2 or value <= -2 then
        local current = dict:get(key)
        if type(current) == "number" then
            local sum = current + value
            if sum > MAX_SAFE or sum < -MAX_SAFE then
                return nil, OUT_OF_RANGE
            end
        end
    end

    local newval, err, forcible = dict:incr(key, value, 0)
    if not newval then
        return nil, err
    end

    if newval > MAX_SAFE or newval < -MAX_SAFE then
        dict:incr(key, -value)
        return nil, OUT_OF_RANGE .. " (undone after a concurrent update)"
    end

    return newval, nil, forcible
end


-- The slot of a key first touched in this interval. Raises on a bad key:
-- `level` as for check.key, from the caller's caller.
local function touch(self, key)
    check_key(key, 3)

    local slot, slots = self.store:alloc()
    if not slot then
        return nil, slots
    end

    self.slots = slots
    self.touched[key] = slot
    self.keys[slot] = key
    return slot
end


-- Puts an unapplied delta back as pending, under a fresh slot. Only fails
-- on an int64 overflow of the pending sum (or a bug): then it is lost, and
-- that is logged and counted.
local function keep_pending(self, key, integer, fractional)
    local slot, err = self.touched[key], nil
    if not slot then
        slot, err = touch(self, key)
    end

    if slot then
        local ok
        ok, err = self.store:add(slot, integer, fractional)
        if ok then
            return true
        end
    end

    local metrics = self.metrics
    metrics.lost = metrics.lost + 1
    log_failure(SOURCE, fmt('lost the pending delta of key "%s" in dict '
                            .. '"%s": %s', key, self.dict_name, err))
    return nil, err
end


-- When an explicit step would take a key's pending sum out of the exact
-- range, the pending sum goes to the dict first.
local function apply_now(self, key, slot, step)
    local pending = self.slots[slot]
    local value = tonumber(pending.integer) + pending.fractional
    local _, err, forcible = apply(self.dict, key, value)
    if err then
        log_failure(SOURCE, fmt('cannot apply %s to key "%s" in dict "%s": '
                                .. '%s', value, key, self.dict_name, err))
        return nil, err
    end

    if forcible then
        self.metrics.evictions = self.metrics.evictions + 1
        log_failure(SOURCE, fmt('dict "%s" is full: adding key "%s" evicted '
                                .. 'other keys', self.dict_name, key), nil,
                    ngx_WARN)
    end

    if step % 1 == 0 then
        pending.integer = step
        pending.fractional = 0
    else
        pending.integer = 0
        pending.fractional = step
    end
    return true
end


local function sync_list(counters)
    local ok = true
    for i = 1, #counters do
        if not counters[i]:sync() then
            ok = nil
        end
    end
    return ok
end


-- The timer callback of one dict's counters in this worker. On reload and
-- shutdown it runs once more with `premature` set: that final sync runs
-- too, and exit_worker catches what requests still in flight add after it.
local function tick(premature, syncer, generation) -- luacheck: ignore
    if generation == syncer.generation then
        sync_list(syncer.timed)
    end
end


-- syntax: c, err = counter.new(shdict_name, sync_interval?)
--
-- context: init_worker_by_lua*, and any phase where timers can be made;
-- without sync_interval, also init_by_lua*.
function _M.new(shdict_name, sync_interval)
    check.string(shdict_name, "shdict_name", 2)
    check.seconds(sync_interval, "sync_interval", 2, false)

    local dict = ngx_shared[shdict_name]
    if not dict then
        return nil, 'shared dict "' .. shdict_name .. '" not found'
    end

    local st, err = store.new()
    if not st then
        return nil, err
    end

    local syncer = syncers[shdict_name]
    if not syncer then
        syncer = { counters = {}, timed = {}, generation = 0 }
    end

    if sync_interval and (not syncer.interval
                          or sync_interval < syncer.interval)
    then
        if get_phase() == "init" then
            return nil, "cannot create a sync timer in init_by_lua*: "
                        .. "create the counter in init_worker_by_lua*"
        end

        -- A shorter interval replaces the dict's timer; the old one sees
        -- its generation retired and does nothing from then on.
        local generation = syncer.generation + 1
        local ok
        ok, err = timer_every(sync_interval, tick, syncer, generation)
        if not ok then
            return nil, "failed to create the sync timer: " .. err
        end

        syncer.interval = sync_interval
        syncer.generation = generation
    end

    local self = setmetatable({
        dict = dict,
        dict_name = shdict_name,
        store = st,
        slots = nil,            -- base of the store's slot array
        touched = new_tab(0, 16), -- key -> slot, this interval
        keys = {},              -- slot -> key, this interval
        spare_keys = {},        -- the other half of `keys`, swapped by sync
        metrics = { syncs = 0, evictions = 0, failed = 0, out_of_range = 0,
                    lost = 0 },
    }, mt)

    syncers[shdict_name] = syncer
    syncer.counters[#syncer.counters + 1] = self
    if sync_interval then
        syncer.timed[#syncer.timed + 1] = self
    end

    return self
end


-- syntax: ok, err = c:incr(key, step?)
--
-- context: any phase
--
-- Counts in this worker, without any lock. A step is a finite number
-- within +-(2^53 - 1), default 1; integer steps are kept exact. Misuse
-- raises; `nil, err` only if the key's pending sum could not be made room
-- for (see apply_now).
function _M.incr(self, key, step)
    if type(self) ~= "table" then
        dot_call("c", "incr", 2)
    end

    -- A bad step raises before the key gets a slot: a raised incr leaves
    -- no trace, not even a key created at 0.
    if step ~= nil and (type(step) ~= "number"
                        or not (step >= -MAX_SAFE and step <= MAX_SAFE))
    then
        step = check_amount(step, "step", 2)
    end

    local slot = self.touched[key]
    if not slot then
        local err
        slot, err = touch(self, key)
        if not slot then
            return nil, err
        end
    end

    local pending = self.slots[slot]
    if step == nil then
        -- 2^53 calls in one interval would be needed to leave the exact
        -- range: no check on the common path.
        pending.integer = pending.integer + 1
        return true
    end

    if step % 1 == 0 then
        local sum = pending.integer + step
        if sum > MAX_SAFE or sum < -MAX_SAFE then
            return apply_now(self, key, slot, step)
        end
        pending.integer = sum

    else
        local sum = pending.fractional + step
        if sum > MAX_SAFE or sum < -MAX_SAFE then
            return apply_now(self, key, slot, step)
        end
        pending.fractional = sum
    end

    return true
end


-- syntax: ok, err = c:sync()
--
-- context: any phase where shared dicts work (all of them)
--
-- Applies this worker's pending deltas to the dict. What cannot be applied
-- (dict full, a non-number at the key, out of exact range) stays pending
-- for the next sync: then `nil, err` says how many keys and why. Never
-- yields, so two syncs in one worker never overlap.
function _M.sync(self)
    if type(self) ~= "table" then
        dot_call("c", "sync", 2)
    end

    local deltas, count = self.store:drain()
    if not deltas then
        log_failure(SOURCE, "cannot drain pending deltas: " .. count)
        return nil, count
    end

    -- The drained slots are free now: forget this interval's key mapping
    -- before anything can touch a key again.
    local keys = self.keys
    self.keys = self.spare_keys
    self.spare_keys = keys
    clear_tab(self.touched)

    local dict = self.dict
    local metrics = self.metrics
    local failed, first_key, first_err, evicted = 0, nil, nil, 0
    for i = 0, count - 1 do
        local delta = deltas[i]
        local key = keys[delta.slot]
        local newval, err, forcible
        if delta.status == DELTA_OK then
            newval, err, forcible = apply(dict, key, delta.value)
        else
            err = OUT_OF_RANGE
        end

        if not newval then
            failed = failed + 1
            if not first_key then
                first_key, first_err = key, err
            end
            if err:find(OUT_OF_RANGE, 1, true) then
                metrics.out_of_range = metrics.out_of_range + 1
            end
            keep_pending(self, key, delta.integer, delta.fractional)

        elseif forcible then
            evicted = evicted + 1
        end
    end

    clear_tab(keys)
    metrics.syncs = metrics.syncs + 1

    if evicted > 0 then
        metrics.evictions = metrics.evictions + evicted
        log_failure(SOURCE, fmt('dict "%s" is full: adding %d keys evicted '
                                .. 'other keys', self.dict_name, evicted),
                    nil, ngx_WARN)
    end

    if failed > 0 then
        metrics.failed = metrics.failed + failed
        local err = fmt('%d of %d keys not applied to dict "%s", kept pending '
                  .. 'for the next sync (key "%s": %s)', failed, count,
                  self.dict_name, first_key, first_err)
        -- A key past 2^53 fails every sync: one line per interval.
        log_failure(SOURCE, err)
        return nil, err
    end

    return true
end


-- syntax: newval, err, forcible = c:reset(key, number)
--
-- context: any phase
--
-- Subtracts `number` from the key in the dict atomically, as
-- `dict:incr(key, -number, number)`: counts other workers add meanwhile
-- survive. Only the dict is touched: this worker's pending delta still
-- arrives with the next sync.
function _M.reset(self, key, number)
    if type(self) ~= "table" then
        dot_call("c", "reset", 2)
    end
    check_key(key, 2)
    number = check_amount(number, "number", 2)
    return self.dict:incr(key, -number, number)
end


-- syntax: value, flags = c:get(key)
--
-- context: any phase
--
-- The key's value in the dict (nil when missing): the sum of what every
-- worker has synced, not including this worker's pending delta.
function _M.get(self, key)
    if type(self) ~= "table" then
        dot_call("c", "get", 2)
    end
    check_key(key, 2)
    return self.dict:get(key)
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


-- syntax: metrics = c:self_metrics()
--
-- context: any phase
--
-- This worker's own counts for this counter: syncs, evictions (keys the
-- dict evicted to make room), failed (deltas kept pending after a failed
-- apply), out_of_range (of those, refused as beyond +-(2^53 - 1)), lost
-- (deltas that could not even be kept pending), pending_keys (now).
function _M.self_metrics(self)
    if type(self) ~= "table" then
        dot_call("c", "self_metrics", 2)
    end

    local metrics = self.metrics
    return {
        syncs = metrics.syncs,
        evictions = metrics.evictions,
        failed = metrics.failed,
        out_of_range = metrics.out_of_range,
        lost = metrics.lost,
        pending_keys = tonumber(self.store:pending_keys()),
    }
end


-- syntax: ok = counter.sync_all()
--
-- context: any phase; meant for exit_worker_by_lua*
--
-- Syncs every counter of this worker, timed or not. Put it in
-- `exit_worker_by_lua_block { require("resty.counter").sync_all() }` so
-- that reload and shutdown lose no count. Errors are logged by each sync.
function _M.sync_all()
    local ok = true
    for _, syncer in pairs(syncers) do
        if not sync_list(syncer.counters) then
            ok = nil
        end
    end
    return ok
end


return _M
