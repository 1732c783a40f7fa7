-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- Strict counters: every call is atomic and immediately consistent across
-- all workers of the node, with Redis' int64 semantics.
--
-- Values live in the shared engine of the dict's zone (docs/engine.md,
-- "Strict records"): one record per key, whose value and state (present,
-- expiry) sit in one 16-byte pair that an update changes by one
-- double-width compare-and-swap, through one FFI call: no lock, no dict
-- call. Batches (inc_all, set_all, ...) and get_all take the engine's batch
-- lock, freeze their records, decide all or nothing and write through a
-- journal, in one FFI call that never yields; a worker killed halfway
-- leaves a journal the next batch (or an update that meets a frozen
-- record) finishes. An update that meets a record a batch holds waits for
-- it: spinning, then sleeping 1 ms where the phase can yield; in phases
-- that cannot (log, header_filter, ...) it keeps spinning. Either way it
-- gives up after `timeout` seconds with `nil, "timeout"`.
--
-- The dict itself holds no strict value (code that reads the dict directly
-- does not see them: read them with c:get / c:get_all). Values an older
-- version of this library left in the dict under "<name>/<key>" are moved
-- into the engine the first time a worker touches the key.
--
-- Records of deleted and expired keys give their room back: `del` removes
-- its key's record at once, and a sweep removes such records of the
-- counter a step at a time (see `sweep`). A removed record's pair is GONE
-- first (src/engine/strict.rs): an update that meets it changed nothing
-- and looks its key up again, so no count lands in a removed record.


local check = require "resty.counter.check"
local int = require "resty.counter.int"
local strict_redis = require "resty.counter.strict_redis"
local engine = require "resty.counter.engine"
local abi = require "resty.counter.abi"
local ffi = require "ffi"
local new_tab = require "table.new"


local ngx = ngx
local ngx_shared = ngx.shared
local ngx_sleep = ngx.sleep
local ngx_now = ngx.now
local update_time = ngx.update_time
local get_phase = ngx.get_phase
local check_key = check.key
local dot_call = check.dot_call
local int_integer = int.integer
local int_cmp = int.cmp
local int_decode = int.decode
local lua_value = int.lua_value
local int_text = int.text
local engine_attach = engine.attach
local engine_record = engine.record
local check_epoch = engine.check_epoch
local ffi_new = ffi.new
local ffi_string = ffi.string
local C = abi.C
local floor = math.floor
local tonumber = tonumber
local ipairs = ipairs
local setmetatable = setmetatable
local type = type
local sub = string.sub
local fmt = string.format


local BUSY = abi.BUSY
local GONE = abi.GONE
local FULL = abi.FULL
local OVERFLOW = abi.OVERFLOW
local NOT_FOUND = abi.NOT_FOUND
local STRICT_KIND = abi.STRICT_KIND
local STRICT_WIDTH = abi.STRICT_WIDTH
local OVERFLOW_MSG = "increment or decrement would overflow"

local OP_ADD = int.OP_ADD
local OP_SUB = int.OP_SUB
local OP_SET = int.OP_SET
local CMP_ALWAYS = int.CMP.always

-- The dict flag of a value that has an expiry (Redis backend's batches
-- share check_updates; the engine keeps expiries itself).
-- Tries before a waiting caller starts sleeping (where it can).
local SPINS = 64


local result = ffi_new("rc_strict_result_t")
local value_out = ffi_new("int64_t[1]")
local failed_out = ffi_new("uint32_t[1]")

-- Phases where ngx.sleep works.
local YIELDABLE = check.yieldable


local _M = { _VERSION = "0.1.0" }
local mt = { __index = _M }


local function check_ttl(ttl, level)
    -- Not a tail call: the level counts this frame.
    ttl = check.seconds(ttl, "ttl", level + 1, false)
    return ttl
end


-- The options of strict.new; lax.new takes these and its own.
local OPTIONS = { name = true, timeout = true, lock_ttl = true,
                  redis = true, prefix = true }


-- What strict.new and lax.new share: `known` is the set of options the
-- public constructor takes; misuse raises at `level` as error() would
-- count it from that constructor (2: its caller).
local function construct(shdict_name, opts, known, level)
    opts = check.table(opts, "opts", level + 1)
    check.options(opts, known, "opts", level + 1)

    -- With a Redis backend the dict is not used (nil is fine).
    if not (shdict_name == nil and opts.redis ~= nil) then
        check.string(shdict_name, "shdict_name", level + 1)
    end

    local name = check.name(opts.name, "opts.name", level + 1, "counter")
    local timeout = check.seconds(opts.timeout, "opts.timeout", level + 1,
                                  0.1)
    local lock_ttl = check.seconds(opts.lock_ttl, "opts.lock_ttl", level + 1,
                                   1)

    if opts.redis ~= nil then
        return setmetatable({
            engine = strict_redis.new(opts, name, level + 1),
            name = name,
            max_key_len = check.max_key_len - #name - 1,
            waits = 0,
        }, mt)
    end

    local dict = ngx_shared[shdict_name]
    if not dict then
        return nil, 'shared dict "' .. shdict_name .. '" not found'
    end
    if C.rc_strict_supported() < 0 then
        return nil, engine.last_error()
    end
    local handle, err = engine_attach(shdict_name)
    if not handle then
        return nil, err
    end

    return setmetatable({
        dict = dict,
        dict_name = shdict_name,
        handle = handle,
        name = name,
        prefix = name .. "/",
        max_key_len = engine.max_key_len - #name - 1,
        timeout = timeout,
        lock_ttl = lock_ttl,
        -- Calls of this object (in this worker) that found a key held by a
        -- batch (or a batch that found another running) and had to wait:
        -- how contended the keys are.
        waits = 0,
        -- key -> the cells of its record: this worker's cache, while the
        -- engine's epoch (bumped by each removal of a record) is
        -- `seen_epoch`.
        cells = {},
        cached = 0,
        epoch = C.rc_engine_epoch(handle.ptr),
        seen_epoch = C.rc_engine_epoch(handle.ptr)[0],
        -- The sweep of this counter's records of deleted and expired keys:
        -- the next index slot, and when it may run again (periodic, and on
        -- a refusal); how many records this object removed in this worker.
        cursor = ffi_new("uint32_t[1]"),
        next_sweep = 0,
        next_refused_sweep = 0,
        swept = 0,
    }, mt)
end


-- syntax: c, err = strict.new(shdict_name, opts?)
--
-- context: any phase
--
-- opts: name (namespace of the keys, default "counter": [%w_.-]+, at most
-- 64 bytes), timeout (the longest wait for a batch that holds a key,
-- default 0.1 s), lock_ttl (accepted and unused on the engine: a dead
-- worker's batch is finished by the next worker that meets it).
-- With redis (the options of resty.counter.redis.new) the values live in
-- Redis instead, under `<prefix>{<name>}:<key>` (prefix default "rc:"),
-- each call one atomic script (resty.counter.strict_redis); the dict is
-- not used and `shdict_name` may be nil. An unknown option raises.
function _M.new(shdict_name, opts)
    -- Not a tail call: the level counts this frame.
    local c, err = construct(shdict_name, opts, OPTIONS, 2)
    return c, err
end


-- Waits while `try(...)` answers BUSY (a batch holds the key, or another
-- batch runs): finishes a dead batch's work when there is one
-- (rc_strict_help), spins, then sleeps 1 ms where the phase can yield.
-- Returns what `try` last returned, or BUSY after `timeout`.
local function wait_busy(self, try, a, b, c, d, e, f)
    self.waits = self.waits + 1
    local ptr = self.handle.ptr
    local can_yield = YIELDABLE[get_phase()]
    update_time()
    local deadline = ngx_now() + self.timeout
    local tries = 0
    while true do
        tries = tries + 1
        if C.rc_strict_help(ptr) == 0 and can_yield and tries > SPINS then
            ngx_sleep(0.001)
        end
        local rc = try(a, b, c, d, e, f)
        if rc ~= BUSY then
            return rc
        end
        update_time()
        if ngx_now() >= deadline then
            return BUSY
        end
    end
end


local function ttl_ms(ttl)
    if not ttl then
        return 0
    end
    -- At least 1 ms (0 would mean "never").
    local ms = floor(ttl * 1000 + 0.5)
    return ms > 0 and ms or 1
end


-- Moves what an older version of this library left in the dict for the
-- key into its record, once per record (the first worker to touch it).
local function import(self, cells, dkey, raw)
    local dict = self.dict
    if raw == nil then
        raw = dict:get(dkey)
    end
    local value = raw ~= nil and int_decode(raw)
    local rc
    if value then
        local left = dict:ttl(dkey) or 0
        local expiry = 0
        if left > 0 then
            update_time()
            expiry = floor((ngx_now() + left) * 1000)
        end
        rc = C.rc_strict_import(cells, 1, value, expiry)
    else
        rc = C.rc_strict_import(cells, 0, 0, 0)
    end
    -- Moved: the dict's copy goes. A value that is no integer is not
    -- this library's (nor imported): it stays.
    if rc == 1 and value then
        dict:delete(dkey)
    end
end


-- The dict keys of the records this worker keeps (then the cache starts
-- afresh: records stay in the engine).
local MAX_CELLS = 10000

-- Sweeps of a counter's records of deleted and expired keys, one step of
-- SWEEP_STEP index slots at a time, resuming where the last stopped, at
-- most once every SWEEP_EVERY seconds per counter object and worker when
-- it looks a key up in the engine (a key not in its cache: every new key
-- passes there, so records cannot pile up unswept), and once as often
-- when a new key is refused for room (then tried again).
local SWEEP_STEP = 16384
local SWEEP_EVERY = 1

-- How many times an update looks up again a key whose record was removed
-- under it before it gives up (each time another worker's sweep or delete
-- removed the record between the look-up and the update: rare twice).
local MAX_GONE = 100


-- One sweep step: how many records it removed (0 when the engine could
-- not: the next step tries again).
local function sweep(self)
    local prefix = self.prefix
    local n = C.rc_strict_expire(self.handle.ptr, prefix, #prefix,
                                 self.cursor, SWEEP_STEP)
    if n > 0 then
        self.swept = self.swept + n
        return n
    end
    return 0
end


-- Removes `key`'s record if it is deleted, expired or GONE (a removal
-- under way, or one whose worker died halfway), and drops its cells from
-- the cache.
local function reclaim(self, key)
    local dkey = self.prefix .. key
    if C.rc_strict_reclaim(self.handle.ptr, dkey, #dkey) == 1 then
        self.swept = self.swept + 1
    end
    if self.cells[key] then
        self.cells[key] = nil
        self.cached = self.cached - 1
    end
end


-- The cells of `key`'s record; nil, nil when the key has none and
-- `create` is false (nor a value from an older version in the dict);
-- nil, err when the engine refuses it (full).
local function cells_of(self, key, create)
    -- A removed record's kept cells are dropped first.
    check_epoch(self)
    local cells = self.cells[key]
    if cells then
        return cells
    end

    local now = ngx_now()
    if now >= self.next_sweep then
        self.next_sweep = now + SWEEP_EVERY
        sweep(self)
    end
    local dkey = self.prefix .. key
    local err, code
    cells, err, code = engine_record(self.handle, STRICT_KIND, dkey,
                                     STRICT_WIDTH, false)
    local raw
    if not cells then
        if code ~= NOT_FOUND then
            return nil, err
        end
        raw = self.dict:get(dkey)
        if raw == nil and not create then
            return nil
        end
        cells, err, code = engine_record(self.handle, STRICT_KIND, dkey,
                                         STRICT_WIDTH, true)
        -- Full: records of deleted and expired keys may hold the room.
        if not cells and code == FULL and now >= self.next_refused_sweep
        then
            self.next_refused_sweep = now + SWEEP_EVERY
            if sweep(self) > 0 then
                cells, err = engine_record(self.handle, STRICT_KIND, dkey,
                                           STRICT_WIDTH, true)
            end
        end
        if not cells then
            return nil, err
        end
    end
    if C.rc_strict_untouched(cells) == 1 then
        import(self, cells, dkey, raw)
    end

    if self.cached >= MAX_CELLS then
        self.cells = {}
        self.cached = 0
    end
    self.cells[key] = cells
    self.cached = self.cached + 1
    return cells
end


local function try_update(cells, op, cmp, operand, n, ms)
    return C.rc_strict_update(cells, op, cmp, operand, n, ms, result)
end


-- An update of `key` that rc_strict_update refused with `rc`: waits while
-- a batch holds the key; looks the key up again when its record was
-- removed (GONE: nothing changed), then again. Returns the update's code
-- (>= 0) or nil, err.
local function refused(self, key, cells, rc, op, cmp, operand, n, ms)
    for _ = 1, MAX_GONE do
        if rc == BUSY then
            rc = wait_busy(self, try_update, cells, op, cmp, operand, n, ms)
        end
        if rc ~= GONE then
            break
        end
        reclaim(self, key)
        local err
        cells, err = cells_of(self, key, true)
        if not cells then
            return nil, err
        end
        rc = try_update(cells, op, cmp, operand, n, ms)
    end
    if rc >= 0 then
        return rc
    end
    if rc == OVERFLOW then
        return nil, OVERFLOW_MSG
    end
    if rc == BUSY then
        return nil, "timeout"
    end
    return nil, abi.failure(rc)
end


-- One update of one key: one compare-and-swap in the engine. Returns new,
-- old (as Lua users get them) or nil, err.
local function update(self, key, op, cmp, operand, n, ttl)
    local redis = self.engine
    if redis then
        local news, olds = strict_redis.update_all(redis, op, 1, { key },
                                                   { cmp }, { operand },
                                                   { n }, { ttl or false })
        if not news then
            return nil, olds
        end
        return news[1], olds[1]
    end

    local cells, err = cells_of(self, key, true)
    if not cells then
        return nil, err
    end
    local ms = ttl_ms(ttl)
    operand = operand or 0
    local rc = C.rc_strict_update(cells, op, cmp, operand, n, ms, result)
    if rc < 0 then
        rc, err = refused(self, key, cells, rc, op, cmp, operand, n, ms)
        if not rc then
            return nil, err
        end
    end
    return lua_value(result.new_value), lua_value(result.old_value)
end


-- What inc and dec share: `op` is OP_ADD or OP_SUB; misuse raises at
-- `level` as error() would count it from the public method (2: its caller).
local function step(self, op, key, n, ttl, level)
    check_key(key, level + 1, self.max_key_len)
    if n == nil then
        n = 1
    else
        n = int_integer(n, "n", level + 1)
    end
    check_ttl(ttl, level + 1)

    local new, err = update(self, key, op, CMP_ALWAYS, 0, n, ttl)
    if new == nil then
        return nil, err
    end
    return new
end


-- syntax: new, err = c:inc(key, n?, ttl?)
--
-- context: any phase
--
-- Adds `n` (default 1) to `key` (missing: 0) and returns the new value.
-- With `ttl` (seconds), a key this call creates expires after `ttl`, in the
-- same atomic step; an existing key keeps the expiry it has (or none).
-- `nil, "increment or decrement would overflow"` leaves the value as it
-- was; `nil, "value is not an integer"` for a key holding something else;
-- `nil, "timeout"` when the key stayed locked for `timeout`; `nil, "no
-- memory"` when the dict is full (nothing else is evicted).
function _M.inc(self, key, n, ttl)
    if type(self) ~= "table" then
        dot_call("c", "inc", 2)
    end
    local new, err = step(self, OP_ADD, key, n, ttl, 2)
    return new, err
end


-- syntax: new, err = c:dec(key, n?, ttl?)
--
-- context: any phase
--
-- Subtracts `n` (default 1); otherwise as `inc`.
function _M.dec(self, key, n, ttl)
    if type(self) ~= "table" then
        dot_call("c", "dec", 2)
    end
    local new, err = step(self, OP_SUB, key, n, ttl, 2)
    return new, err
end


local function try_get(cells)
    return C.rc_strict_get(cells, value_out)
end


local function try_del(cells)
    return C.rc_strict_del(cells, value_out)
end


-- A read (`try_get`) or delete (`try_del`) of one key: its value (before
-- a delete), 0 when absent; nil, err.
local function read(self, key, try)
    local cells, err = cells_of(self, key, false)
    if not cells then
        if err then
            return nil, err
        end
        return 0
    end
    local rc = try(cells)
    if rc == BUSY then
        rc = wait_busy(self, try, cells)
    end
    if rc == BUSY then
        return nil, "timeout"
    end
    if rc < 0 then
        return nil, abi.failure(rc)
    end
    if rc == 0 then
        return 0
    end
    return lua_value(value_out[0])
end


-- syntax: value, err = c:get(key)
--
-- context: any phase
--
-- The value of `key`, 0 when missing. No lock: one atomic read.
function _M.get(self, key)
    if type(self) ~= "table" then
        dot_call("c", "get", 2)
    end
    check_key(key, 2, self.max_key_len)
    if self.engine then
        return strict_redis.get(self.engine, key)
    end
    return read(self, key, try_get)
end


-- syntax: value, err = c:set(key, n, ttl?)
--
-- context: any phase
--
-- Sets `key` to `n` and returns `n`, whatever the key held (as Redis SET:
-- this is how a key holding a non-integer is repaired). With `ttl` the key
-- expires after `ttl` seconds; without, it has no expiry.
function _M.set(self, key, n, ttl)
    if type(self) ~= "table" then
        dot_call("c", "set", 2)
    end
    check_key(key, 2, self.max_key_len)
    n = int_integer(n, "n", 2)
    check_ttl(ttl, 2)

    local new, err = update(self, key, OP_SET, CMP_ALWAYS, 0, n, ttl)
    if new == nil then
        return nil, err
    end
    return new
end


-- syntax: old, err = c:del(key)
--
-- context: any phase
--
-- Removes `key` and returns the value it had (0 when missing).
function _M.del(self, key)
    if type(self) ~= "table" then
        dot_call("c", "del", 2)
    end
    check_key(key, 2, self.max_key_len)
    if self.engine then
        return strict_redis.del(self.engine, key)
    end

    local old, err = read(self, key, try_del)
    if old and self.cells[key] then
        -- Its record goes at once (kept if an update made it live since).
        reclaim(self, key)
    end
    return old, err
end


-- The comparison of a conditional update: `cmp` by name (as a core code)
-- and `operand`, which may be nil with "always". Raises at `level` as
-- error() would count it from the caller.
local function check_condition(cmp, operand, level)
    cmp = int_cmp(cmp, level + 1)
    if cmp ~= CMP_ALWAYS or operand ~= nil then
        operand = int_integer(operand, "operand", level + 1)
    end
    return cmp, operand
end


-- syntax: new, old = c:inc_if(key, cmp, operand, n?, ttl?)
-- syntax: nil, err = c:inc_if(key, cmp, operand, n?, ttl?)
--
-- context: any phase
--
-- Adds `n` (default 1) when the value `cmp` `operand` holds (`cmp` is one
-- of "eq", "ne", "lt", "le", "gt", "ge", "always"; `operand` may be nil
-- for "always"). Returns `new, old`; `old, old` when the comparison fails.
-- `ttl` as for `inc`.
function _M.inc_if(self, key, cmp, operand, n, ttl)
    if type(self) ~= "table" then
        dot_call("c", "inc_if", 2)
    end
    check_key(key, 2, self.max_key_len)
    cmp, operand = check_condition(cmp, operand, 2)
    if n == nil then
        n = 1
    else
        n = int_integer(n, "n", 2)
    end
    check_ttl(ttl, 2)

    return update(self, key, OP_ADD, cmp, operand, n, ttl)
end


-- syntax: new, old = c:set_if(key, cmp, operand, n, ttl?)
-- syntax: nil, err = c:set_if(key, cmp, operand, n, ttl?)
--
-- context: any phase
--
-- Sets `key` to `n` when the value `cmp` `operand` holds; returns as
-- `inc_if`. `ttl` as for `set`.
function _M.set_if(self, key, cmp, operand, n, ttl)
    if type(self) ~= "table" then
        dot_call("c", "set_if", 2)
    end
    check_key(key, 2, self.max_key_len)
    cmp, operand = check_condition(cmp, operand, 2)
    n = int_integer(n, "n", 2)
    check_ttl(ttl, 2)

    return update(self, key, OP_SET, cmp, operand, n, ttl)
end


-- The distinct records of a batch's keys: how many, their cells, per
-- entry the index (from 0) of its record, and per record (from 1) the
-- index of its first entry; nil, err, i when the i-th key has no room in
-- the engine.
local function batch_records(self, keys, count)
    local index = new_tab(0, count)
    local cells = ffi_new("const uint64_t *[?]", count)
    local record_of = ffi_new("uint32_t[?]", count)
    local first = new_tab(count, 0)
    local records = 0
    for i = 1, count do
        local key = keys[i]
        local r = index[key]
        if not r then
            local key_cells, err = cells_of(self, key, true)
            if not key_cells then
                return nil, err, i
            end
            r = records
            cells[r] = key_cells
            index[key] = r
            records = records + 1
            first[records] = i
        end
        record_of[i - 1] = r
    end
    return records, cells, record_of, first
end


local function try_batch(b)
    return C.rc_strict_batch(b.ptr, b.records, b.cells, b.updates, b.op,
                             b.record_of, b.cmps, b.operands, b.ns, b.ttls,
                             b.news, b.olds, failed_out)
end


-- The arguments of rc_strict_batch for `count` keys and `updates` updates
-- (0: a snapshot); nil, err, i when the i-th key has no room.
local function new_batch(self, keys, count, updates, op)
    local records, cells, record_of, first = batch_records(self, keys,
                                                           count)
    if not records then
        return nil, cells, record_of
    end
    local b = {
        ptr = self.handle.ptr, records = records, cells = cells,
        updates = updates, op = op, record_of = record_of,
        keys = keys, first = first,
        news = ffi_new("int64_t[?]", records > count and records or count),
    }
    if updates > 0 then
        b.cmps = ffi_new("int32_t[?]", count)
        b.operands = ffi_new("int64_t[?]", count)
        b.ns = ffi_new("int64_t[?]", count)
        b.ttls = ffi_new("int64_t[?]", count)
        b.olds = ffi_new("int64_t[?]", count)
    end
    return b
end


-- A batch met a removed record (GONE, nothing changed): its key is
-- looked up again, and every record's cells with it (the removal dropped
-- the cache). Returns true or nil, err, i.
local function batch_gone(self, b)
    local keys, first = b.keys, b.first
    reclaim(self, keys[first[failed_out[0] + 1]])
    for r = 1, b.records do
        local i = first[r]
        local cells, err = cells_of(self, keys[i], true)
        if not cells then
            return nil, err, i
        end
        b.cells[r - 1] = cells
    end
    return true
end


-- Runs a batch (`b`, the arguments of rc_strict_batch), waiting while
-- another runs. Returns true or nil, err, i.
local function run_batch(self, b)
    local rc = try_batch(b)
    for _ = 1, MAX_GONE do
        if rc == BUSY then
            rc = wait_busy(self, try_batch, b)
        end
        if rc ~= GONE then
            break
        end
        local ok, err, i = batch_gone(self, b)
        if not ok then
            return nil, err, i
        end
        rc = try_batch(b)
    end
    if rc >= 0 then
        return true
    end
    if rc == OVERFLOW then
        return nil, OVERFLOW_MSG, tonumber(failed_out[0]) + 1
    end
    if rc == BUSY then
        return nil, "timeout"
    end
    return nil, engine.last_error()
end


local function check_list(list, name, level)
    if type(list) ~= "table" then
        check.expected(name, "table", list, level + 1)
    end
    return #list
end


-- Validates a batch of updates, each `{ key, [cmp, operand,] n, ttl? }`.
-- Returns the keys, cmps, operands, ns and ttls as parallel arrays.
local function check_updates(self, updates, conditional, op, level)
    local count = check_list(updates, "updates", level + 1)
    local keys = new_tab(count, 0)
    local cmps = new_tab(count, 0)
    local operands = new_tab(count, 0)
    local ns = new_tab(count, 0)
    local ttls = new_tab(count, 0)
    for i = 1, count do
        local u = updates[i]
        if type(u) ~= "table" then
            check.expected("updates", fmt("entry %d: table", i), u,
                           level + 1)
        end
        check_key(u[1], level + 1, self.max_key_len)
        keys[i] = u[1]
        local j = 2
        if conditional then
            local cmp, operand = check_condition(u[2], u[3], level + 1)
            cmps[i], operands[i] = cmp, operand or 0
            j = 4
        else
            cmps[i] = CMP_ALWAYS
            operands[i] = 0
        end
        local n = u[j]
        if n == nil and op == OP_ADD then
            n = 1
        end
        ns[i] = int_integer(n, "n", level + 1)
        ttls[i] = check_ttl(u[j + 1], level + 1) or false
    end
    return count, keys, cmps, operands, ns, ttls
end


-- Applies a validated batch under the locks of all its keys, in input
-- order (a key named twice sees the first update's result), all or
-- nothing: an error in any update writes none. Returns news, olds or
-- nil, err, index.
local function update_all(self, op, count, keys, cmps, operands, ns, ttls)
    if self.engine then
        return strict_redis.update_all(self.engine, op, count, keys, cmps,
                                       operands, ns, ttls)
    end

    if count == 0 then
        return {}, {}
    end
    local b, err, i = new_batch(self, keys, count, count, op)
    if not b then
        return nil, err, i
    end
    for j = 1, count do
        b.cmps[j - 1] = cmps[j]
        b.operands[j - 1] = operands[j]
        b.ns[j - 1] = ns[j]
        b.ttls[j - 1] = ttl_ms(ttls[j] or nil)
    end
    local ok
    ok, err, i = run_batch(self, b)
    if not ok then
        return nil, err, i
    end

    local news, olds = new_tab(count, 0), new_tab(count, 0)
    for j = 1, count do
        news[j] = lua_value(b.news[j - 1])
        olds[j] = lua_value(b.olds[j - 1])
    end
    return news, olds
end


-- syntax: values, err = c:get_all(keys)
--
-- context: any phase
--
-- The values of `keys` (an array), in the same order, read together (a
-- consistent snapshot: the batch lock, the records frozen for the read).
-- `nil, "timeout"` when batches kept the lock for `timeout`; `nil, err, i`
-- when the engine has no room for the i-th key's record.
function _M.get_all(self, keys)
    check.self(self, mt, "c", "get_all", 2)
    local count = check_list(keys, "keys", 2)
    for i = 1, count do
        check_key(keys[i], 2, self.max_key_len)
    end
    if self.engine then
        return strict_redis.get_all(self.engine, keys, count)
    end

    if count == 0 then
        return {}
    end
    local b, err, i = new_batch(self, keys, count, 0, OP_ADD)
    if not b then
        return nil, err, i
    end
    local ok
    ok, err = run_batch(self, b)
    if not ok then
        return nil, err
    end

    local values = new_tab(count, 0)
    for j = 1, count do
        values[j] = lua_value(b.news[b.record_of[j - 1]])
    end
    return values
end


-- syntax: news, err = c:inc_all(updates)
--
-- context: any phase
--
-- `updates` is an array of `{ key, n?, ttl? }`. Applies them atomically
-- (all or none) in order; returns the new values in the same order, or
-- `nil, err, i` naming the first update that failed.
function _M.inc_all(self, updates)
    check.self(self, mt, "c", "inc_all", 2)
    local news, err, i = update_all(self, OP_ADD,
                                    check_updates(self, updates, false,
                                                  OP_ADD, 2))
    return news, err, i
end


-- syntax: values, err = c:set_all(updates)
--
-- context: any phase
--
-- `updates` is an array of `{ key, n, ttl? }`; as `inc_all`, setting.
function _M.set_all(self, updates)
    check.self(self, mt, "c", "set_all", 2)
    local news, err, i = update_all(self, OP_SET,
                                    check_updates(self, updates, false,
                                                  OP_SET, 2))
    return news, err, i
end


-- syntax: news, olds = c:inc_all_if(updates)
-- syntax: nil, err, i = c:inc_all_if(updates)
--
-- context: any phase
--
-- `updates` is an array of `{ key, cmp, operand, n?, ttl? }`; each applies
-- as `inc_if`, all in one atomic step. Returns two arrays in input order:
-- the new values and the old ones (equal where the comparison failed).
function _M.inc_all_if(self, updates)
    check.self(self, mt, "c", "inc_all_if", 2)
    return update_all(self, OP_ADD,
                      check_updates(self, updates, true, OP_ADD, 2))
end


-- syntax: news, olds = c:set_all_if(updates)
-- syntax: nil, err, i = c:set_all_if(updates)
--
-- context: any phase
--
-- `updates` is an array of `{ key, cmp, operand, n, ttl? }`; as
-- `inc_all_if`, setting.
function _M.set_all_if(self, updates)
    check.self(self, mt, "c", "set_all_if", 2)
    return update_all(self, OP_SET,
                      check_updates(self, updates, true, OP_SET, 2))
end


local key_out = ffi_new("const unsigned char *[1]")
local key_len_out = ffi_new("size_t[1]")
local cells_out = ffi_new("const uint64_t *[1]")
local cursor = ffi_new("uint32_t[1]")


-- for key, cells, value in each_key(self): every present key of this
-- counter in the engine (a walk of its index, no snapshot).
local function each_key(self)
    local prefix = self.prefix
    local ptr = self.handle.ptr
    local plen = #prefix
    cursor[0] = 0
    return function()
        local rc = C.rc_strict_next(ptr, prefix, plen, cursor, key_out,
                                    key_len_out, value_out, cells_out)
        if rc ~= 1 then
            return nil
        end
        local key = ffi_string(key_out[0] + plen,
                               tonumber(key_len_out[0]) - plen)
        return key, cells_out[0], lua_value(value_out[0])
    end
end


-- syntax: ok, err = c:clear()
--
-- context: any phase
--
-- Removes every key of this counter (its `name`) and nothing else, one
-- by one: a walk of the engine's index and a listing of the dict's keys
-- (left by an older version), which locks the whole dict for the
-- listing: a cold path. A key another worker creates while clear runs may
-- survive it.
function _M.clear(self)
    if type(self) ~= "table" then
        dot_call("c", "clear", 2)
    end
    if self.engine then
        return strict_redis.clear(self.engine)
    end

    -- Keys an older version left in the dict, not moved yet.
    local dict = self.dict
    local prefix = self.prefix
    local plen = #prefix
    for _, dkey in ipairs(dict:get_keys(0)) do
        if sub(dkey, 1, plen) == prefix then
            dict:delete(dkey)
        end
    end

    local first_err
    for key, cells in each_key(self) do
        local rc = try_del(cells)
        if rc == BUSY then
            rc = wait_busy(self, try_del, cells)
        end
        if rc == BUSY then
            first_err = first_err or "timeout"
        else
            reclaim(self, key)
        end
    end

    if first_err then
        return nil, first_err
    end
    return true
end


-- syntax: metrics = c:self_metrics()
--
-- context: any phase
--
-- This worker's figures for this counter: `waits` (calls that found a
-- key's lock taken and waited for it: how contended the keys are; 0 on
-- Redis, where there are no locks); `swept` (records of deleted and
-- expired keys this worker removed from the engine for this counter, by
-- its sweep and its deletes; 0 on Redis, where Redis expires keys).
function _M.self_metrics(self)
    if type(self) ~= "table" then
        dot_call("c", "self_metrics", 2)
    end
    return { waits = self.waits, swept = self.swept or 0 }
end


-- syntax: values = c:_values()
--
-- For resty.counter.metrics: every present key of this counter in the
-- engine and its value, { [key] = number or base-10 string }; nil on
-- Redis (the values are not listed there). Walks the engine's index: a
-- cold path.
function _M._values(self)
    if self.engine then
        return nil
    end
    local values = {}
    for key, _, value in each_key(self) do
        if type(value) ~= "number" then
            value = int_text(value)
        end
        values[key] = value
    end
    return values
end


-- For resty.counter.lax, which takes the same batches.
_M._check_updates = check_updates
_M._check_list = check_list
_M._check_ttl = check_ttl
_M._check_condition = check_condition
_M._new = construct
_M._OPTIONS = OPTIONS


return _M
