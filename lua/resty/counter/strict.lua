-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- Strict counters: every call is atomic and immediately consistent across
-- all workers of the node, with Redis' int64 semantics.
--
-- Values live in a shared dict under "<name>/<key>", as numbers within
-- +-(2^53 - 1) and base-10 strings beyond (exact int64, see
-- resty.counter.int). A shared dict has no compare-and-set, so every
-- update runs under a per-key lock: a lock key "<name>!<key>" made with
-- `safe_add` (atomic: one worker wins), with an expiry (`lock_ttl`) so that
-- a worker that dies holding it cannot block the key for longer. The
-- section under the lock is two dict calls and one FFI call into the Rust
-- core: it never yields and never raises, so a lock is held for well under
-- a microsecond. A caller that finds the key locked
-- retries, spinning, then sleeping 1 ms where the phase can yield; in
-- phases that cannot (log, header_filter, ...) it keeps spinning. Either
-- way it gives up after `timeout` seconds with `nil, "timeout"`. A batch
-- takes the locks of all its keys, all or none (it never waits holding a
-- lock, so batches cannot deadlock), in sorted order.
--
-- Reads of one key (`get`) need no lock: a dict read is atomic, and a
-- value is always written whole by one `safe_set`.


local check = require "resty.counter.check"
local int = require "resty.counter.int"
local strict_redis = require "resty.counter.strict_redis"
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
local int_apply = int.apply
local int_decode = int.decode
local lua_value = int.lua_value
local ipairs = ipairs
local pairs = pairs
local setmetatable = setmetatable
local type = type
local sort = table.sort
local sub = string.sub
local fmt = string.format


local OP_ADD = int.OP_ADD
local OP_SUB = int.OP_SUB
local OP_SET = int.OP_SET
local CMP_ALWAYS = int.CMP.always

-- The dict flag of a value that has an expiry, so that an update knows
-- when it must read the time left and keep it.
local FLAG_TTL = 1

-- Tries before a waiting caller starts sleeping (where it can).
local SPINS = 64

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

    return setmetatable({
        dict = dict,
        dict_name = shdict_name,
        name = name,
        prefix = name .. "/",
        lock_prefix = name .. "!",
        max_key_len = check.max_key_len - #name - 1,
        timeout = timeout,
        lock_ttl = lock_ttl,
        -- Calls of this object (in this worker) that found a lock taken
        -- and had to wait: how contended the keys are.
        waits = 0,
        named = {},
        named_count = 0,
    }, mt)
end


-- syntax: c, err = strict.new(shdict_name, opts?)
--
-- context: any phase
--
-- opts: name (namespace of the keys, default "counter": [%w_.-]+, at most
-- 64 bytes), timeout (the longest wait for a lock, default 0.1 s),
-- lock_ttl (how long a dead worker's lock can block a key, default 1 s).
-- With redis (the options of resty.counter.redis.new) the values live in
-- Redis instead, under `<prefix>{<name>}:<key>` (prefix default "rc:"),
-- each call one atomic script (resty.counter.strict_redis); the dict is
-- not used and `shdict_name` may be nil. An unknown option raises.
function _M.new(shdict_name, opts)
    -- Not a tail call: the level counts this frame.
    local c, err = construct(shdict_name, opts, OPTIONS, 2)
    return c, err
end


-- Waits for the lock `lkey` after a first try found it taken.
local function wait_lock(self, lkey)
    self.waits = self.waits + 1
    local dict, lock_ttl = self.dict, self.lock_ttl
    local can_yield = YIELDABLE[get_phase()]
    update_time()
    local deadline = ngx_now() + self.timeout
    local tries = 0
    while true do
        tries = tries + 1
        if can_yield and tries > SPINS then
            ngx_sleep(0.001)
        end

        local ok, err = dict:safe_add(lkey, true, lock_ttl)
        if ok then
            return true
        end
        if err ~= "exists" then
            return nil, err
        end

        update_time()
        if ngx_now() >= deadline then
            return nil, "timeout"
        end
    end
end


local function lock(self, lkey)
    local ok, err = self.dict:safe_add(lkey, true, self.lock_ttl)
    if ok then
        return true
    end
    if err ~= "exists" then
        return nil, err
    end
    return wait_lock(self, lkey)
end


-- Takes every lock of `lkeys` (sorted, distinct), all or none.
local function lock_all(self, lkeys)
    local dict, lock_ttl = self.dict, self.lock_ttl
    local n = #lkeys
    local can_yield, deadline
    local tries = 0
    while true do
        local taken = 0
        local err
        for i = 1, n do
            local ok
            ok, err = dict:safe_add(lkeys[i], true, lock_ttl)
            if not ok then
                break
            end
            taken = i
        end
        if taken == n then
            return true
        end

        for i = 1, taken do
            dict:delete(lkeys[i])
        end
        if err ~= "exists" then
            return nil, err
        end

        if not deadline then
            self.waits = self.waits + 1
            can_yield = YIELDABLE[get_phase()]
            update_time()
            deadline = ngx_now() + self.timeout
        end
        tries = tries + 1
        if can_yield and tries > SPINS then
            ngx_sleep(0.001)
        end
        update_time()
        if ngx_now() >= deadline then
            return nil, "timeout"
        end
    end
end


local function unlock_all(dict, lkeys)
    for i = 1, #lkeys do
        dict:delete(lkeys[i])
    end
end


-- The expiry a write gives a key. A key created by the write (or set by
-- `set`) gets `ttl`, or none; a key updated by an increment keeps the time
-- it had left.
local function expiry(dict, dkey, existed, flags, op, ttl)
    if not existed or op == OP_SET then
        if ttl then
            return ttl, FLAG_TTL
        end
        return 0, 0
    end

    if flags ~= FLAG_TTL then
        return 0, 0
    end

    local left = dict:ttl(dkey)
    if not left or left <= 0 then
        -- Less than a millisecond left (0 would mean "never").
        left = 0.001
    end
    return left, FLAG_TTL
end


-- The dict keys of `key`: its value's and its lock's. Making the two
-- strings costs more than a dict call, so they are kept per key, up to
-- MAX_NAMED keys (then the table starts afresh).
local MAX_NAMED = 10000

local function names(self, key)
    local named = self.named[key]
    if named then
        return named[1], named[2]
    end

    local dkey, lkey = self.prefix .. key, self.lock_prefix .. key
    if self.named_count >= MAX_NAMED then
        self.named = {}
        self.named_count = 0
    end
    self.named[key] = { dkey, lkey }
    self.named_count = self.named_count + 1
    return dkey, lkey
end


-- One update of one key, under its lock. Returns new, old (as Lua users
-- get them) or nil, err.
local function update(self, key, op, cmp, operand, n, ttl)
    local engine = self.engine
    if engine then
        local news, olds = strict_redis.update_all(engine, op, 1, { key },
                                                   { cmp }, { operand },
                                                   { n }, { ttl or false })
        if not news then
            return nil, olds
        end
        return news[1], olds[1]
    end

    local dict = self.dict
    local dkey, lkey = names(self, key)
    local ok, err = lock(self, lkey)
    if not ok then
        return nil, err
    end

    local raw, flags = dict:get(dkey)
    local applied, new, old, value = int_apply(raw, op, cmp, operand, n)
    if applied == nil and op == OP_SET and cmp == CMP_ALWAYS then
        -- A plain set overwrites whatever the key held, as Redis SET.
        applied, new, old, value = int_apply(nil, op, cmp, operand, n)
    end
    if applied then
        local exptime, new_flags = expiry(dict, dkey, raw ~= nil, flags, op,
                                          ttl)
        ok, err = dict:safe_set(dkey, value, exptime, new_flags)
        if not ok then
            applied, new = nil, err
        end
    end

    dict:delete(lkey)

    if applied == nil then
        return nil, new
    end
    return lua_value(new), lua_value(old)
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


-- syntax: value, err = c:get(key)
--
-- context: any phase
--
-- The value of `key`, 0 when missing. No lock: one atomic dict read.
function _M.get(self, key)
    if type(self) ~= "table" then
        dot_call("c", "get", 2)
    end
    check_key(key, 2, self.max_key_len)
    if self.engine then
        return strict_redis.get(self.engine, key)
    end
    return int_decode(self.dict:get((names(self, key))))
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
-- Removes `key` and returns the value it had (0 when missing). A key
-- holding a non-integer is left as it is: `nil, "value is not an
-- integer"`.
function _M.del(self, key)
    if type(self) ~= "table" then
        dot_call("c", "del", 2)
    end
    check_key(key, 2, self.max_key_len)
    if self.engine then
        return strict_redis.del(self.engine, key)
    end

    local dict = self.dict
    local dkey, lkey = names(self, key)
    local ok, err = lock(self, lkey)
    if not ok then
        return nil, err
    end

    local old
    old, err = int_decode(dict:get(dkey))
    if old then
        dict:delete(dkey)
    end

    dict:delete(lkey)
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


-- The distinct lock keys of a batch, sorted.
local function batch_locks(self, keys, count)
    local seen = new_tab(0, count)
    local lkeys = new_tab(count, 0)
    local lock_prefix = self.lock_prefix
    for i = 1, count do
        local key = keys[i]
        if not seen[key] then
            seen[key] = true
            lkeys[#lkeys + 1] = lock_prefix .. key
        end
    end
    sort(lkeys)
    return lkeys
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

    local dict = self.dict
    local lkeys = batch_locks(self, keys, count)
    local ok, err = lock_all(self, lkeys)
    if not ok then
        return nil, err
    end

    local prefix = self.prefix
    -- Per dict key: its value now, whether it was read, its flags then,
    -- whether the batch changed it and the expiry the batch gave it.
    local values, read, flags_of, dirty, exptimes = {}, {}, {}, {}, {}
    local news, olds = new_tab(count, 0), new_tab(count, 0)
    for i = 1, count do
        local dkey = prefix .. keys[i]
        local raw
        if not read[dkey] then
            local flags
            raw, flags = dict:get(dkey)
            read[dkey] = true
            values[dkey] = raw
            flags_of[dkey] = flags or 0
        else
            raw = values[dkey]
        end

        local applied, new, old, value = int_apply(raw, op, cmps[i],
                                                  operands[i], ns[i])
        if applied == nil and op == OP_SET and cmps[i] == CMP_ALWAYS then
            applied, new, old, value = int_apply(nil, op, CMP_ALWAYS, 0,
                                                 ns[i])
        end
        if applied == nil then
            unlock_all(dict, lkeys)
            return nil, new, i
        end

        if applied then
            local ttl = ttls[i] or nil
            if raw == nil or op == OP_SET then
                exptimes[dkey] = ttl and { ttl, FLAG_TTL } or { 0, 0 }
            end
            values[dkey] = value
            dirty[dkey] = true
        end
        news[i], olds[i] = lua_value(new), lua_value(old)
    end

    for dkey in pairs(dirty) do
        local value = values[dkey]
        local e = exptimes[dkey]
        local exptime, flags
        if e then
            exptime, flags = e[1], e[2]
        else
            exptime, flags = expiry(dict, dkey, true, flags_of[dkey], OP_ADD)
        end
        ok, err = dict:safe_set(dkey, value, exptime, flags)
        if not ok then
            unlock_all(dict, lkeys)
            return nil, err
        end
    end

    unlock_all(dict, lkeys)
    return news, olds
end


-- syntax: values, err = c:get_all(keys)
--
-- context: any phase
--
-- The values of `keys` (an array), in the same order, read together under
-- their locks (a consistent snapshot). `nil, err, i` when the i-th key
-- holds a non-integer or a lock timed out.
function _M.get_all(self, keys)
    check.self(self, mt, "c", "get_all", 2)
    local count = check_list(keys, "keys", 2)
    for i = 1, count do
        check_key(keys[i], 2, self.max_key_len)
    end
    if self.engine then
        return strict_redis.get_all(self.engine, keys, count)
    end

    local dict = self.dict
    local lkeys = batch_locks(self, keys, count)
    local ok, err = lock_all(self, lkeys)
    if not ok then
        return nil, err
    end

    local raws = new_tab(count, 0)
    local prefix = self.prefix
    for i = 1, count do
        raws[i] = dict:get(prefix .. keys[i]) or false
    end
    unlock_all(dict, lkeys)

    local values = new_tab(count, 0)
    for i = 1, count do
        local value
        value, err = int_decode(raws[i] or nil)
        if not value then
            return nil, err, i
        end
        values[i] = value
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


-- syntax: ok, err = c:clear()
--
-- context: any phase
--
-- Removes every key of this counter (its `name`) from the dict and nothing
-- else, each under its lock. Lists the dict's keys, which locks the whole
-- dict for the listing: a cold path. A key another worker creates while
-- clear runs may survive it.
function _M.clear(self)
    if type(self) ~= "table" then
        dot_call("c", "clear", 2)
    end
    if self.engine then
        return strict_redis.clear(self.engine)
    end

    local dict = self.dict
    local prefix = self.prefix
    local plen = #prefix
    local first_err
    for _, dkey in ipairs(dict:get_keys(0)) do
        if sub(dkey, 1, plen) == prefix then
            local lkey = self.lock_prefix .. sub(dkey, plen + 1)
            local ok, err = lock(self, lkey)
            if ok then
                dict:delete(dkey)
                dict:delete(lkey)
            else
                first_err = first_err or err
            end
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
-- Redis, where there are no locks).
function _M.self_metrics(self)
    if type(self) ~= "table" then
        dot_call("c", "self_metrics", 2)
    end
    return { waits = self.waits }
end


-- syntax: values = c:_values()
--
-- For resty.counter.metrics: every key of this counter in the dict and its
-- value, { [key] = number or base-10 string }; nil on Redis (the values
-- are not listed there). Lists the dict's keys, which locks the whole dict
-- for the listing: a cold path.
function _M._values(self)
    if self.engine then
        return nil
    end
    local dict = self.dict
    local prefix = self.prefix
    local plen = #prefix
    local values = {}
    for _, dkey in ipairs(dict:get_keys(0)) do
        if sub(dkey, 1, plen) == prefix then
            local value = dict:get(dkey)
            if value ~= nil then
                values[sub(dkey, plen + 1)] = value
            end
        end
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
