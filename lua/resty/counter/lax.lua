-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- Lax counters: the interface of resty.counter.strict, but increments
-- count in the worker (a Lua table, no lock, no dict call) and are flushed
-- to the shared values every `allowed_lag` seconds by a timer, through the
-- strict counter of the same dict and name (so a strict and a lax counter
-- with the same name share their values).
--
-- No loss: a flush takes the pending table and starts a new one, so
-- increments made while it runs (it may wait for a lock) go to the next
-- flush; a delta that cannot be applied (overflow, lock timeout, dict full)
-- is put back and retried by the next flush, and logged. On reload and
-- shutdown the timer runs once more (premature); requests still in flight
-- finish after that tick, and each of their increments then gets a flush
-- of its own from a zero-delay timer (the one kind nginx still runs in an
-- exiting worker, with cosockets, and waits for). `lax.flush_all()` in
-- exit_worker_by_lua flushes what is left to a dict, and says what could
-- not reach Redis.
--
-- On Redis with a dict (lax.new(dict, { redis = ... })) the counts live in
-- the shared engine in the dict's zone instead (src/engine/lax.rs): every
-- worker adds into one total per key, reads include every worker's unsent
-- counts, and any worker's flush sends them all through the counter's
-- journal, exactly once, a killed worker's included (docs/lax.md).
--
-- What each method guarantees is written above it. In short: increments
-- are eventually applied exactly; reads and comparisons see "the worker's
-- view", the shared value (as last read) plus this worker's pending delta;
-- sets and deletes are strict.


local strict = require "resty.counter.strict"
local check = require "resty.counter.check"
local int = require "resty.counter.int"
local lifecycle = require "resty.counter.lifecycle"
local log = require "resty.counter.log"
local redis = require "resty.counter.redis"
local abi = require "resty.counter.abi"
local shared_engine = require "resty.counter.engine"
local spool = require "resty.counter.spool"
local new_tab = require "table.new"
local nkeys = require "table.nkeys"
local ffi = require "ffi"


local ngx = ngx
local ngx_now = ngx.now
local ngx_sleep = ngx.sleep
local ngx_log = ngx.log
local ngx_WARN = ngx.WARN
local ngx_NOTICE = ngx.NOTICE
local ngx_update_time = ngx.update_time
local ngx_prefix = ngx.config.prefix
local worker_pid = ngx.worker.pid
local get_phase = ngx.get_phase
local run_later = lifecycle.later
local check_key = check.key
local dot_call = check.dot_call
local log_failure = log.failure
local int_integer = int.integer
local next = next
local pairs = pairs
local pcall = pcall
local setmetatable = setmetatable
local tostring = tostring
local type = type
local unpack = unpack
local fmt = string.format
local remove = table.remove
local floor = math.floor
local tonumber = tonumber
local ffi_new = ffi.new
local ffi_string = ffi.string
local C = abi.C
local sleep_ms = abi.core.sleep_ms


local MAX_SAFE = int.max_safe_integer
local int64_t = ffi.typeof("int64_t")
local CMP = int.CMP
local CMP_ALWAYS = CMP.always
local OP_ADD = int.OP_ADD
local OP_SUB = int.OP_SUB
local OP_SET = int.OP_SET

-- Lax keys on Redis in the shared engine (src/engine/lax.rs).
local LAX_KIND = ("l"):byte()
local JOURNAL_KIND = ("j"):byte()
local LAX_WIDTH = C.rc_lax_width(0)
local JOURNAL_WIDTH = C.rc_lax_width(1)
local NOT_FOUND = abi.NOT_FOUND
local FULL = abi.FULL
local LAX_NEW_BATCH = abi.LAX_NEW_BATCH
local LAX_BUSY = abi.LAX_BUSY
local LAX_LEFT_BATCH = abi.LAX_LEFT_BATCH
local LAX_NOTHING = abi.LAX_NOTHING
local LAX_APPLIED = abi.LAX_APPLIED
local LAX_UNKNOWN = abi.LAX_UNKNOWN
local LAX_NOT_SENT = abi.LAX_NOT_SENT
local unsent_out = ffi_new("int64_t[1]")
local seen_out = ffi_new("int64_t[1]")
local batch_out = ffi_new("rc_lax_batch_t")
local entry_out = ffi_new("rc_lax_entry_t")

-- Batches one flush sends at most (lax.MAX_BATCH keys each, 256): more
-- wait for the next tick.
local MAX_ENGINE_BATCHES = 64

-- The worker's last-read shared values are dropped past this many keys
-- (and read again when needed), so memory stays bounded.
local MAX_SEEN = 65536

-- While Redis cannot be reached, timed flushes back off: the wait doubles
-- from allowed_lag up to this many seconds (or allowed_lag, if longer).
local MAX_RETRY_WAIT = 1

local SOURCE = "resty.counter.lax"


local _M = { _VERSION = "0.1.0" }
local mt = { __index = _M }


-- Every lax counter of this worker, for flush_all().
local counters = {}

-- How many lax counters of this worker have a job of each name, for the
-- names of the lifecycle jobs (unique: "#2" for the second).
local job_names = {}

-- True once a premature tick has run a lax counter's final flush: the
-- worker is exiting (HUP or QUIT) and its flush timers are gone, while
-- requests in flight still count.
local draining = false

-- How long an explicit flush waits for the flush of the same counter that
-- is running (a tick's: they never overlap) before giving up.
local FLUSH_WAIT = 10


local HOLDS = {
    [CMP.always] = function() return true end,
    [CMP.eq] = function(a, b) return a == b end,
    [CMP.ne] = function(a, b) return a ~= b end,
    [CMP.lt] = function(a, b) return a < b end,
    [CMP.le] = function(a, b) return a <= b end,
    [CMP.gt] = function(a, b) return a > b end,
    [CMP.ge] = function(a, b) return a >= b end,
}


-- The flush of a lax counter on Redis: the whole batch in one script, made
-- exactly-once by its id. The script first sets the batch's key with NX:
-- a batch sent twice (a timeout left it unknown whether it ran) is applied
-- once. KEYS: the batch key, then the counter keys; ARGV: the batch key's
-- expiry (s), then per key its delta and ttl in ms ("" for none). Returns
-- { 0 } for a batch already applied, or { 1, r1, r2, ... } with each key's
-- new value as text, or "!" and Redis' error for an update that could not
-- be applied (an overflow, a non-integer: never going to succeed).
local FLUSH = redis.script([[
if not redis.call("SET", KEYS[1], "1", "NX", "EX", ARGV[1]) then
    return { 0 }
end
local out = { 1 }
for i = 2, #KEYS do
    local delta, ttl = ARGV[2 * i - 2], ARGV[2 * i - 1]
    local existed = redis.call("EXISTS", KEYS[i]) == 1
    local r = redis.pcall("INCRBY", KEYS[i], delta)
    if type(r) == "table" and r.err then
        out[i] = "!" .. r.err
    else
        if not existed and ttl ~= "" then
            redis.call("PEXPIRE", KEYS[i], ttl)
        end
        out[i] = redis.call("GET", KEYS[i])
    end
end
return out
]])


-- Puts a batch's deltas back into the pending table (a batch that surely
-- did not reach Redis).
local function merge_back(self, batch)
    local now = self.pending
    for i = 1, #batch.keys do
        local key, delta = batch.keys[i], batch.deltas[i]
        local merged = (now[key] or 0) + delta
        if type(merged) == "number"
           and (merged > MAX_SAFE or merged < -MAX_SAFE)
        then
            merged = int64_t(now[key] or 0) + delta
        end
        now[key] = merged
        if batch.ttls[i] and not self.ttls[key] then
            self.ttls[key] = batch.ttls[i]
        end
    end
end


-- Sends one batch; true when Redis has applied it (now or before), nil
-- and an error otherwise, with `sent` telling whether it may have run.
local function send(self, batch)
    local engine = self.shared.engine
    local argv = { engine.key_prefix .. "batch:" .. batch.id }
    local count = #batch.keys
    for i = 1, count do
        argv[i + 1] = engine.key_prefix .. batch.keys[i]
    end
    argv[#argv + 1] = fmt("%d", self.batch_ttl)
    for i = 1, count do
        local delta = batch.deltas[i]
        -- A spooled batch's deltas are decimal text already.
        argv[#argv + 1] = type(delta) == "string" and delta
                          or int.text(delta)
        local ttl = batch.ttls[i]
        argv[#argv + 1] = ttl and fmt("%d", floor(ttl * 1000 + 0.5)) or ""
    end

    local res, err = engine.client:eval(FLUSH, count + 1, unpack(argv))
    if not res then
        -- Only a failure before the script went out (connect, AUTH,
        -- SELECT) proves it did not run.
        local sent = not (type(err) == "string"
                          and (err:find("^redis connect to")
                               or err:find("^redis AUTH")
                               or err:find("^redis SELECT")))
        return nil, err, sent
    end

    local metrics = self.metrics
    if res[1] == 0 then
        metrics.duplicates = metrics.duplicates + 1
        return true
    end
    for i = 1, count do
        local r = res[i + 1]
        if type(r) == "string" and r:sub(1, 1) == "!" then
            -- Applying it again would fail again: dropped, counted, said.
            metrics.dropped = metrics.dropped + 1
            log_failure(SOURCE, fmt('dropped the delta %s of key "%s": %s',
                                    tostring(batch.deltas[i]), batch.keys[i],
                                    r:sub(2)))
        else
            local value = int.decode(r)
            if value ~= nil then
                if batch.cells then
                    C.rc_lax_set_seen(batch.cells[i], value)
                elseif not batch.spooled then
                    self:_see(batch.keys[i], value)
                end
            end
        end
    end
    return true
end


-- Keys per script: one call's arguments must fit LuaJIT's unpack (some
-- 8,000 values; each key takes 3).
local MAX_BATCH_KEYS = 1000


-- The keys of the batches of unknown fate.
local function unknown_keys(self)
    local n = 0
    for i = 1, #self.unknown do
        n = n + #self.unknown[i].keys
    end
    return n
end


-- While Redis cannot take them, the pending table and the batches of
-- unknown fate keep at most max_pending keys together; the pending keys
-- beyond are dropped, counted and logged (the batches are kept: they may
-- have been applied, and only their ids tell).
local function cap_pending(self)
    local count = nkeys(self.pending)
    local room = self.max_pending - unknown_keys(self)
    if room < 0 then
        room = 0
    end
    if count <= room then
        return
    end

    local drop = count - room
    for key in pairs(self.pending) do
        if drop == 0 then
            break
        end
        self.pending[key] = nil
        self.ttls[key] = nil
        drop = drop - 1
        self.metrics.dropped = self.metrics.dropped + 1
    end
    log_failure(SOURCE, (count - room) .. " pending keys dropped past "
                .. "max_pending (" .. self.max_pending .. ") while redis "
                .. "cannot take them")
end


-- The engine's batch in flight as send() takes it: its id (the journal's
-- nonce and the batch's sequence number, the same when it is sent again)
-- and its keys, deltas, TTLs and cells.
local function engine_batch(self)
    local handle, journal = self.handle, self.journal
    local count = batch_out.count
    local batch = {
        id = "e" .. tostring(batch_out.nonce):gsub("ULL$", "") .. ":"
             .. tostring(batch_out.seq):gsub("ULL$", ""),
        keys = new_tab(count, 0), deltas = new_tab(count, 0),
        ttls = new_tab(count, 0), cells = new_tab(count, 0),
    }
    local n = 0
    for i = 0, count - 1 do
        if C.rc_lax_flush_entry(handle.ptr, journal, i, self.prefix_len,
                                entry_out) == 0
        then
            n = n + 1
            batch.keys[n] = ffi_string(entry_out.key, entry_out.key_len)
            batch.deltas[n] = int.lua_value(entry_out.delta)
            local ms = tonumber(entry_out.ttl_ms)
            batch.ttls[n] = ms > 0 and ms / 1000 or false
            batch.cells[n] = entry_out.cells
        end
    end
    return batch
end


-- One flush of a lax counter on the engine: every worker's unsent counts
-- (a killed worker's too), batch by batch, each journaled in the engine
-- before it is sent and settled after (src/engine/lax.rs says the order).
-- One at a time per counter across all workers (the journal's lock): a
-- tick that finds another flush running returns; any other caller waits
-- for it (FLUSH_WAIT seconds at most).
local function flush_engine(self, is_tick)
    local handle, journal, prefix = self.handle, self.journal, self.prefix
    local deadline
    local from = 0
    self.more = false
    for _ = 1, MAX_ENGINE_BATCHES do
        local rc = C.rc_lax_flush_begin(handle.ptr, journal, prefix, #prefix,
                                        from, batch_out)
        while rc == LAX_BUSY do
            if is_tick then
                return true
            end
            deadline = deadline or ngx_now() + FLUSH_WAIT
            if ngx_now() > deadline then
                return nil, "flush to redis: the flush in progress took "
                            .. "more than " .. FLUSH_WAIT .. " s"
            end
            ngx_sleep(0.001)
            rc = C.rc_lax_flush_begin(handle.ptr, journal, prefix, #prefix,
                                      from, batch_out)
        end
        if rc == LAX_NOTHING then
            return true
        end
        if rc ~= LAX_NEW_BATCH and rc ~= LAX_LEFT_BATCH then
            return nil, "flush to redis: " .. shared_engine.last_error()
        end

        local more, next_from = batch_out.more, batch_out.next
        -- pcall: the batch is ended (the lock released) whatever happens.
        local fine, ok, err, sent = pcall(send, self, engine_batch(self))
        local outcome = LAX_APPLIED
        if not fine then
            ok, err, sent = nil, ok, true
        end
        if not ok then
            -- A batch sent again (left by an earlier flush: it may have
            -- run then) stays in flight whatever this send proves.
            outcome = (sent or rc == LAX_LEFT_BATCH) and LAX_UNKNOWN
                      or LAX_NOT_SENT
        end
        C.rc_lax_flush_end(handle.ptr, journal, outcome)
        if not ok then
            if outcome == LAX_UNKNOWN then
                return nil, "flush to redis: " .. tostring(err) .. " (the "
                            .. "batch will be sent again under its id)"
            end
            return nil, "flush to redis: " .. tostring(err)
        end
        if more == 0 then
            return true
        end
        from = next_from
    end
    self.more = true
    return true
end


-- Sends the batches an earlier run of nginx (or an exiting worker at a
-- reload) spooled for this counter (resty/counter/spool.lua), each under
-- its own id, and removes each file once Redis has it. The directory is
-- listed again only when it changed (or changed less than a second ago).
-- Workers of one start may send one file at once: Redis applies its id
-- once (a duplicate, counted). An exiting worker leaves the spool to the
-- workers that stay or come (it may be spooling itself).
local function send_spooled(self)
    if draining then
        return true
    end
    local dir = self.spool_dir
    local stamp, recent = spool.stamp(dir)
    if stamp == self.spool_stamp and not recent then
        return true
    end
    local key_prefix = self.shared.engine.key_prefix
    local names, err = spool.list(dir, key_prefix)
    if not names then
        self.spool_stamp = stamp
        log_failure(SOURCE, fmt('cannot list the spool directory "%s": %s',
                                dir, tostring(err)))
        return true
    end
    for i = 1, #names do
        local path = dir .. "/" .. names[i]
        local batch
        batch, err = spool.read(path, key_prefix)
        if batch then
            if batch.maybe_sent and batch.age >= self.batch_ttl then
                ngx_log(ngx_WARN, SOURCE, ": ", fmt('spooled batch %s was '
                        .. 'maybe sent once %d s ago, longer than its id is '
                        .. 'kept in redis (%d s): if it was, it is applied '
                        .. 'twice now', path, batch.age, self.batch_ttl))
            end
            batch.spooled = true
            local ok, send_err = send(self, batch)
            if not ok then
                return nil, "flush to redis: the spooled batch " .. path
                            .. " (sent again later): " .. tostring(send_err)
            end
            spool.remove(path)
            self.metrics.unspooled = self.metrics.unspooled + 1
            ngx_log(ngx_NOTICE, SOURCE, ": ", fmt('counter "%s" on redis: '
                    .. 'sent the spooled batch %s (%d keys)',
                    self.shared.name, path, #batch.keys))
        elseif not tostring(err):find("No such file", 1, true) then
            -- (A file gone meanwhile was sent by another worker.)
            log_failure(SOURCE, "spooled batch not sent: " .. tostring(err))
        end
    end
    self.spool_stamp = stamp
    return true
end


-- The pending table as batches of at most MAX_BATCH_KEYS keys, each with
-- its own id; the pending table starts anew.
local function take_batches(self)
    local pending, ttls = self.pending, self.ttls
    self.pending = new_tab(0, 16)
    self.ttls = {}
    local batches = {}
    local batch
    for key, delta in pairs(pending) do
        if delta ~= 0 or ttls[key] then
            if not batch or #batch.keys == MAX_BATCH_KEYS then
                self.batch_seq = self.batch_seq + 1
                batch = { id = self.batch_prefix .. self.batch_seq,
                          keys = {}, deltas = {}, ttls = {} }
                batches[#batches + 1] = batch
            end
            local n = #batch.keys + 1
            batch.keys[n], batch.deltas[n] = key, delta
            batch.ttls[n] = ttls[key] or false
        end
    end
    return batches
end


-- One flush to Redis; never two of one counter at a time (see
-- flush_to_redis), so the batches of unknown fate are only ever added to
-- and taken from by one flush. What an earlier run spooled goes first.
local function flush_redis(self, is_tick)
    local spooled, spool_err = send_spooled(self)
    if not spooled then
        return nil, spool_err
    end
    if self.journal then
        return flush_engine(self, is_tick)
    end
    -- The batches whose fate is unknown go first, in order, each under
    -- its own id, and alone: new deltas wait in the pending table.
    local unknown = self.unknown
    while unknown[1] do
        local ok, err = send(self, unknown[1])
        if not ok then
            cap_pending(self)
            return nil, "flush to redis: " .. tostring(err) .. " ("
                        .. #unknown .. " batch(es) of "
                        .. unknown_keys(self) .. " keys in all will be "
                        .. "sent again under their ids)"
        end
        remove(unknown, 1)
    end

    if next(self.pending) == nil then
        return true
    end

    local batches = take_batches(self)
    local ok, err, sent
    for i = 1, #batches do
        -- Where this flush stands, for the exit hook when nginx's fast
        -- shutdown cuts it in the send (see spool_worker).
        self.sending = { batches = batches, at = i }
        ok, err, sent = send(self, batches[i])
        self.sending = nil
        if not ok then
            -- This one may have run (kept under its id) or surely not
            -- (back to pending); the ones after it were not sent.
            if sent then
                unknown[#unknown + 1] = batches[i]
            else
                merge_back(self, batches[i])
            end
            for j = i + 1, #batches do
                merge_back(self, batches[j])
            end
            break
        end
    end
    if ok or #batches == 0 then
        return true
    end

    cap_pending(self)
    return nil, "flush to redis: " .. tostring(err)
end


-- syntax: ok, err = c:flush()
--
-- context: any phase (waits for locks by spinning where it cannot yield)
--
-- Applies this worker's pending deltas to the shared values now. Returns
-- true, or nil and an error naming how many keys failed; those stay
-- pending for the next flush.
local flush


-- Phases without cosockets: a flush to Redis from there goes through a
-- zero-delay run (lifecycle.later), which has them. exit_worker_by_lua*
-- has neither.
local NO_COSOCKET = {
    init = true, init_worker = true, set = true, header_filter = true,
    body_filter = true, log = true, balancer = true,
}


local function flush_later(self)
    flush(self)
end


-- flush_redis, and while the worker exits (no tick will come again) its
-- retries every allowed_lag for up to exit_timeout seconds, saying each
-- new reason once.
local function flush_redis_retried(self, is_tick)
    local ok, err = flush_redis(self, is_tick)
    if ok then
        self.last_error = nil
        return true
    end
    log_failure(SOURCE, err)
    self.last_error = err

    if draining then
        self.exit_deadline = self.exit_deadline
                             or ngx_now() + self.exit_timeout
        local said = err
        while ngx_now() < self.exit_deadline do
            ngx_sleep(self.allowed_lag)
            ok, err = flush_redis(self, false)
            if ok then
                self.last_error = nil
                return true
            end
            self.last_error = err
            if err ~= said then
                log_failure(SOURCE, err)
                said = err
            end
        end
    end
    return nil, err
end


-- Says in one [warn] line what an exiting worker spooled.
local function said_spooled(self, keys, batches)
    self.metrics.spooled = self.metrics.spooled + keys
    ngx_log(ngx_WARN, SOURCE, ": ", fmt('counter "%s" on redis: %d keys in '
            .. '%d batch(es) spooled to %s for the next start of nginx (%s)',
            self.shared.name, keys, batches, self.spool_dir,
            self.last_error and "last error: " .. self.last_error
            or "no flush can run at this exit"))
end


-- Spools every worker's unsent counts of a counter on the engine, batch by
-- batch under the counter's flush lock: each batch is written (its own id:
-- the journal's, so a batch of unknown fate keeps the id it was sent
-- under), then its sent totals move as if Redis had it, and the lock is
-- released, so the next exiting worker spools only what is newer. Waits
-- for the lock up to exit_timeout. Nil and an error when something stays
-- unspooled.
local function spool_engine(self)
    local handle, journal, prefix = self.handle, self.journal, self.prefix
    local key_prefix = self.shared.engine.key_prefix
    if self.flushing then
        -- A flush of this worker was cut in its send (nginx's fast
        -- shutdown: its light thread never resumes): the lock is ours and
        -- the batch may have reached Redis. Kept in flight, spooled below
        -- under its id.
        C.rc_lax_flush_end(handle.ptr, journal, LAX_UNKNOWN)
        self.flushing = false
    end
    ngx_update_time()
    local deadline = ngx_now() + self.exit_timeout
    local from, keys, batches, err = 0, 0, 0, nil
    repeat
        local rc = C.rc_lax_flush_begin(handle.ptr, journal, prefix, #prefix,
                                        from, batch_out)
        while rc == LAX_BUSY and ngx_now() < deadline do
            sleep_ms(1)
            ngx_update_time()
            rc = C.rc_lax_flush_begin(handle.ptr, journal, prefix, #prefix,
                                      from, batch_out)
        end
        if rc == LAX_NOTHING then
            break
        end
        if rc == LAX_BUSY then
            err = "another worker held its flush lock for more than "
                  .. "exit_timeout"
            break
        end
        if rc ~= LAX_NEW_BATCH and rc ~= LAX_LEFT_BATCH then
            err = shared_engine.last_error()
            break
        end

        local more, next_from = batch_out.more, batch_out.next
        local batch = engine_batch(self)
        -- pcall: the batch is ended (the lock released) whatever happens.
        local fine, name, write_err = pcall(spool.write, self.spool_dir,
                                            key_prefix, batch,
                                            rc == LAX_LEFT_BATCH)
        if not (fine and name) then
            C.rc_lax_flush_end(handle.ptr, journal, rc == LAX_LEFT_BATCH
                                                    and LAX_UNKNOWN
                                                    or LAX_NOT_SENT)
            err = "cannot write the spool: "
                  .. tostring(fine and write_err or name)
            break
        end
        C.rc_lax_flush_end(handle.ptr, journal, LAX_APPLIED)
        keys, batches = keys + #batch.keys, batches + 1
        from = next_from
    until more == 0

    if batches > 0 then
        said_spooled(self, keys, batches)
    end
    if err then
        local left = C.rc_lax_unsent_keys(handle.ptr, prefix, #prefix)
        return nil, fmt('counter "%s" on redis: %d keys unsent stay in the '
                        .. 'shared engine, lost if nginx stops now (%s)',
                        self.shared.name, left, err)
    end
    return true
end


-- Spools what a counter on Redis without a dict still holds in this
-- worker: its batches of unknown fate under their ids, the batches of a
-- flush cut in its send (the one in the send under its id), and its
-- pending deltas under new ids. Nil and an error when it could not.
local function spool_worker(self)
    local batches, maybe_sent = {}, {}
    for i = 1, #self.unknown do
        batches[i], maybe_sent[i] = self.unknown[i], true
    end
    local cut = self.sending
    if cut then
        for i = cut.at, #cut.batches do
            batches[#batches + 1] = cut.batches[i]
            maybe_sent[#batches] = i == cut.at
        end
    end
    local taken = take_batches(self)
    for i = 1, #taken do
        batches[#batches + 1] = taken[i]
    end
    if #batches == 0 then
        return true
    end

    local keys, err = 0, nil
    for i = 1, #batches do
        local fine, name, write_err = pcall(spool.write, self.spool_dir,
                                            self.shared.engine.key_prefix,
                                            batches[i], maybe_sent[i])
        if not (fine and name) then
            err = "cannot write the spool: "
                  .. tostring(fine and write_err or name)
            for j = i, #batches do
                keys = keys + #batches[j].keys
            end
            break
        end
        keys = keys + #batches[i].keys
    end
    self.unknown = {}
    self.sending = nil

    if not err then
        said_spooled(self, keys, #batches)
        return true
    end
    self.metrics.dropped = self.metrics.dropped + keys
    return nil, fmt('counter "%s" on redis: %d keys could not be sent '
                    .. 'before the worker exited and are lost (%s; last '
                    .. 'error: %s)', self.shared.name, keys, err,
                    tostring(self.last_error))
end


-- In exit_worker_by_lua* there are no cosockets and no timers: what could
-- not reach Redis before goes into the spool for the next start (and
-- whatever cannot be spooled is said in one [error] line). On the engine
-- the counts are every worker's: at a reload or a graceful stop whose
-- flushes worked the rest is for the other workers' flushes (the new
-- ones' at a reload), so this worker spools only at a fast shutdown (no
-- premature tick ran) or after a failed flush.
local function abandon(self)
    local ok, err
    if self.journal then
        if draining and not self.last_error then
            return true
        end
        ok, err = spool_engine(self)
    else
        ok, err = spool_worker(self)
    end
    if not ok then
        log_failure(SOURCE, err)
    end
    return ok, err
end


-- A flush to Redis. One at a time per counter: a tick that finds one
-- running returns (the next tick comes soon), any other caller waits for
-- it (FLUSH_WAIT seconds at most) and then flushes.
local function flush_to_redis(self, is_tick)
    local phase = get_phase()
    if phase == "exit_worker" then
        return abandon(self)
    end

    if NO_COSOCKET[phase] then
        local ok, err = run_later(flush_later, self)
        if not ok then
            err = "cannot flush to redis from the " .. phase
                  .. " phase: " .. tostring(err)
            log_failure(SOURCE, err)
            return nil, err
        end
        return true
    end

    if self.flushing then
        if is_tick then
            return true
        end
        local deadline = ngx_now() + FLUSH_WAIT
        repeat
            ngx_sleep(0.001)
            if ngx_now() > deadline then
                local err = "flush to redis: the flush in progress took "
                            .. "more than " .. FLUSH_WAIT .. " s"
                log_failure(SOURCE, err)
                return nil, err
            end
        until not self.flushing
    end

    self.flushing = true
    -- pcall: the flag is cleared whatever happens.
    local fine, ok, err = pcall(flush_redis_retried, self, is_tick)
    self.flushing = false
    self.sending = nil
    if not fine then
        ok, err = nil, "flush to redis: " .. tostring(ok)
        log_failure(SOURCE, err)
    end
    return ok, err
end


flush = function(self)
    if type(self) ~= "table" then
        dot_call("c", "flush", 2)
    end
    if self.redis then
        return flush_to_redis(self, false)
    end

    local pending = self.pending
    if next(pending) == nil then
        return true
    end

    local ttls = self.ttls
    self.pending = new_tab(0, 16)
    self.ttls = {}

    local shared = self.shared
    local failed, first_err = 0, nil
    for key, delta in pairs(pending) do
        if delta ~= 0 or ttls[key] then
            -- pcall: whatever happens, the delta is not dropped.
            local ok, new, err = pcall(shared.inc, shared, key, delta,
                                       ttls[key])
            if not ok then
                new, err = nil, new
            end
            if new ~= nil then
                self:_see(key, new)
            else
                -- Back into the current pending table: nothing is lost.
                local now = self.pending
                local merged = (now[key] or 0) + delta
                if type(merged) == "number"
                   and (merged > MAX_SAFE or merged < -MAX_SAFE)
                then
                    -- Past 2^53 a double would round: sum as int64.
                    merged = int64_t(now[key] or 0) + delta
                end
                now[key] = merged
                if ttls[key] and not self.ttls[key] then
                    self.ttls[key] = ttls[key]
                end
                failed = failed + 1
                first_err = first_err
                            or fmt('key "%s": %s', key, err)
            end
        end
    end

    if failed > 0 then
        local msg = fmt('%d keys not flushed to dict "%s", kept pending '
                        .. '(%s)', failed, self.dict_name, first_err)
        log_failure(SOURCE, msg)
        return nil, msg
    end
    return true
end
_M.flush = flush


local drain


local function has_work(self)
    if self.journal then
        return self.more
    end
    return next(self.pending) ~= nil or self.unknown[1] ~= nil
end


-- A flush from a timer. While the worker exits, deltas that came in
-- during a flush that succeeded get a flush of their own (one that failed
-- has retried already: trying again would keep the worker alive).
local function flush_from_timer(self, is_tick)
    local ok, err
    if self.redis then
        ok, err = flush_to_redis(self, is_tick)
    else
        ok, err = flush(self)
    end
    if ok and draining and has_work(self) then
        drain(self)
    end
    return ok, err
end


-- The counter's lifecycle job. A tick flushes (on Redis, after a failed
-- flush the next waits for the job's backoff); the premature run (reload,
-- shutdown) flushes too, after the flush in progress if any (no tick
-- comes after it), and from then on increments schedule flushes (see
-- drain); in exit_worker_by_lua* a flush does what it can there.
local function flush_job(self, reason)
    if reason == "tick" then
        return flush_from_timer(self, true)
    end
    if reason == "premature" then
        draining = true
        return flush_from_timer(self, false)
    end
    return flush(self)
end


-- The options of lax.new: strict's and its own.
local OPTIONS = {
    allowed_lag = true, max_pending = true, exit_timeout = true,
    spool_dir = true,
}
for name in pairs(strict._OPTIONS) do
    OPTIONS[name] = true
end


local function drain_run(self)
    self.drain_timer = false
    flush_from_timer(self, false)
end


-- While the worker exits, an increment gets a flush from a zero-delay
-- run (lifecycle.later; one pending at a time per counter): a request
-- still in flight counts after the last tick. nginx runs it normally
-- then, with cosockets, and waits for it before exit_worker_by_lua*,
-- where none can be made and lifecycle.exit() takes over.
drain = function(self)
    if not self.drain_timer then
        self.drain_timer = run_later(drain_run, self) ~= nil
    end
end


-- The spool directory of a counter on Redis: opts.spool_dir (relative to
-- nginx's prefix) or the prefix's logs/. One [warn] per worker when this
-- worker cannot write it; one too for a counter without a dict.
local function spool_directory(self, dir)
    local prefix = ngx_prefix()
    if dir == nil then
        dir = prefix .. "logs"
    elseif dir:sub(1, 1) ~= "/" then
        dir = prefix .. dir
    end
    local ok, err = spool.probe(dir)
    if not ok then
        ngx_log(ngx_WARN, SOURCE, ": ", fmt('counter "%s" on redis: cannot '
                .. 'write the spool directory "%s" (%s): what it has not sent '
                .. 'when nginx stops with TERM, or with Redis unreachable, is '
                .. 'lost; set opts.spool_dir to a directory the worker\'s '
                .. 'user can write', self.shared.name, dir, tostring(err)))
    end
    if self.dict_name == nil then
        ngx_log(ngx_WARN, SOURCE, ": ", fmt('counter "%s" on redis counts in '
                .. 'each worker: a worker killed loses what it has not sent; '
                .. 'lax.new("<dict>", { redis = ... }) counts in the shared '
                .. 'engine instead (docs/lax.md)', self.shared.name))
    end
    return dir
end


-- syntax: c, err = lax.new(shdict_name, opts?)
--
-- context: init_worker_by_lua* and later phases (it creates a timer)
--
-- On Redis, a dict name puts the counts in that dict's shared engine (see
-- the top of this file); nil keeps them in each worker.
--
-- opts: those of strict.new (name, timeout, lock_ttl), and allowed_lag
-- (seconds between flushes, default 0.02). On Redis also max_pending
-- (keys held while Redis cannot take them, default 100000) and
-- exit_timeout (seconds an exiting worker keeps retrying a flush that
-- failed, default 1).
function _M.new(shdict_name, opts)
    opts = check.table(opts, "opts", 2)
    check.options(opts, OPTIONS, "opts", 2)
    local lag = check.seconds(opts.allowed_lag, "opts.allowed_lag", 2, 0.02)
    local exit_timeout = check.seconds(opts.exit_timeout, "opts.exit_timeout",
                                       2, 1)
    local max_pending = check.integer(opts.max_pending, "opts.max_pending",
                                      1, 1 / 0, 2, 100000)
    local spool_dir = check.directory(opts.spool_dir, "opts.spool_dir", 2,
                                      false)

    local shared, err = strict._new(shdict_name, opts, OPTIONS, 2)
    if not shared then
        return nil, err
    end

    if get_phase() == "init" then
        return nil, "cannot create a flush timer in init_by_lua*: "
                    .. "create the counter in init_worker_by_lua*"
    end

    local self = setmetatable({
        shared = shared,
        dict_name = shdict_name,
        max_key_len = shared.max_key_len,
        allowed_lag = lag,
        pending = new_tab(0, 16),
        ttls = {},
        seen = {},
        seen_count = 0,
        -- On Redis: flushes go as batches with ids unique to this worker
        -- and moment; the batches of unknown fate are kept in order until
        -- Redis says it has applied them.
        redis = shared.engine ~= nil,
        max_pending = max_pending,
        exit_timeout = exit_timeout,
        batch_ttl = 3600,
        batch_prefix = worker_pid() .. ":" .. fmt("%.3f", ngx_now()) .. ":"
                       .. tostring({}):match("0x(%x+)") .. ":",
        batch_seq = 0,
        unknown = {},
        flushing = false,
        drain_timer = false,
        last_error = nil,
        exit_deadline = nil,
        metrics = { duplicates = 0, dropped = 0, refused = 0, spooled = 0,
                    unspooled = 0 },
        spool_dir = nil,
        spool_stamp = nil,
        sending = nil,
    }, mt)

    if self.redis then
        self.spool_dir = spool_directory(self, spool_dir)
    end

    -- On Redis with a dict: every worker counts into the shared engine in
    -- the dict's zone, and any worker's flush sends them all.
    if self.redis and shdict_name ~= nil then
        local handle
        handle, err = shared_engine.attach(shdict_name)
        if not handle then
            return nil, err
        end
        local prefix = shared.engine.key_prefix .. "\0"
        local journal
        journal, err = shared_engine.record(handle, JOURNAL_KIND, prefix,
                                            JOURNAL_WIDTH, true)
        if not journal then
            return nil, "lax counter in the shared engine: " .. err
        end
        self.handle = handle
        self.journal = journal
        self.prefix = prefix
        self.prefix_len = 1 + #prefix
        self.cells = {}
        self.more = false
        if shared_engine.max_key_len - #prefix < self.max_key_len then
            self.max_key_len = shared_engine.max_key_len - #prefix
        end
    end

    -- One job per counter, named after its dict and name ("#2" for the
    -- second of the same).
    local job_name = "resty.counter.lax flush " .. tostring(shdict_name)
                     .. "/" .. shared.name
    local same = (job_names[job_name] or 0) + 1
    job_names[job_name] = same
    if same > 1 then
        job_name = job_name .. " #" .. same
    end
    local ok
    ok, err = lifecycle.every(job_name, lag, flush_job, self,
                              { order = lifecycle.ORDER_FLUSH,
                                retry = self.redis and MAX_RETRY_WAIT
                                        or nil })
    if not ok then
        return nil, "failed to create the flush timer: " .. err
    end

    counters[#counters + 1] = self
    return self
end


function _M._see(self, key, value)
    local seen = self.seen
    if seen[key] == nil then
        if self.seen_count >= MAX_SEEN then
            seen = {}
            self.seen = seen
            self.seen_count = 0
        end
        self.seen_count = self.seen_count + 1
    end
    seen[key] = value
end


-- The shared value as this worker last read it (read now if never; on
-- Redis, 0 until a flush or a get tells: increments never wait for the
-- network, and log_by_lua has none).
local function base(self, key)
    local value = self.seen[key]
    if value ~= nil then
        return value
    end
    if self.redis then
        return 0
    end

    local err
    value, err = self.shared:get(key)
    if value == nil then
        return nil, err
    end
    self:_see(key, value)
    return value
end


-- Flushes `key`'s pending delta, then adds `n`, strictly and now (for
-- values past 2^53, where the worker's Lua numbers would not be exact).
local function inc_now(self, key, op, n, ttl)
    local shared = self.shared
    local delta = self.pending[key]
    if delta then
        local new, err = shared:inc(key, delta, self.ttls[key] or ttl)
        if new == nil then
            return nil, err
        end
        self.pending[key] = nil
        self.ttls[key] = nil
    end

    local new, err
    if op == OP_ADD then
        new, err = shared:inc(key, n, ttl)
    else
        new, err = shared:dec(key, n, ttl)
    end
    if new == nil then
        return nil, err
    end
    self:_see(key, new)
    return new
end


-- The engine's cells of `key` (made when `create`); nil when absent and
-- not to be made; nil, err when the engine refuses it (full: counted in
-- self_metrics().refused).
local function key_cells(self, key, create)
    local cells = self.cells[key]
    if cells then
        return cells
    end
    local err, code
    cells, err, code = shared_engine.record(self.handle, LAX_KIND,
                                            self.prefix .. key, LAX_WIDTH,
                                            create)
    if not cells then
        if code == NOT_FOUND then
            return nil
        end
        if code == FULL then
            self.metrics.refused = self.metrics.refused + 1
        end
        return nil, "lax counter: " .. err
    end
    self.cells[key] = cells
    return cells
end


-- a + b exactly (numbers or int64_t cdata), as users get values: a number
-- within +-(2^53 - 1), an int64_t beyond; nil and an error past int64.
local function exact_sum(a, b)
    local x, y = tonumber(a), tonumber(b)
    local sum = x + y
    if x <= MAX_SAFE and x >= -MAX_SAFE and y <= MAX_SAFE and y >= -MAX_SAFE
       and sum <= MAX_SAFE and sum >= -MAX_SAFE
    then
        return sum
    end
    local applied, new = int.apply(int.text(a), OP_ADD, CMP_ALWAYS, 0,
                                   int64_t(b))
    if applied == nil then
        return nil, new
    end
    return int.lua_value(new)
end


-- The Redis value last seen for the key's cells (0 before any).
local function seen_in(cells)
    if C.rc_lax_seen(cells, seen_out) == 1 then
        return seen_out[0]
    end
    return 0
end


-- inc and dec on the engine: `n` into the key's total added (every
-- worker's, shared); the view is the Redis value last seen plus what every
-- worker has added and not yet sent.
local function engine_add(self, key, n, ttl)
    local cells, err = key_cells(self, key, true)
    if not cells then
        return nil, err
    end
    if ttl then
        C.rc_lax_request_ttl(cells, floor(ttl * 1000 + 0.5))
    end
    if C.rc_lax_add(cells, n, unsent_out) ~= 0 then
        return nil, "increment or decrement would overflow"
    end
    if draining then
        drain(self)
    end
    return exact_sum(seen_in(cells), unsent_out[0])
end


-- Drops the unsent counts of one key's cells (nil: every key of the
-- counter) after a strict set, delete or clear; waits for a flush in
-- progress where the phase can (FLUSH_WAIT at most), and says when it
-- could not (the counts then still land).
local function engine_forget(self, cells)
    local deadline = ngx_now() + FLUSH_WAIT
    local yieldable = not NO_COSOCKET[get_phase()]
    while true do
        local rc = C.rc_lax_forget(self.handle.ptr, self.journal, cells,
                                   self.prefix, #self.prefix)
        if rc == 0 then
            return true
        end
        if rc ~= LAX_BUSY or not yieldable or ngx_now() > deadline then
            log_failure(SOURCE, "unsent counts kept after a set, delete or "
                        .. "clear: a flush was in progress")
            return nil
        end
        ngx_sleep(0.001)
    end
end


-- syntax: view, err = c:inc(key, n?, ttl?)
--
-- context: any phase
--
-- On one node (a dict): adds `n` (default 1) to the shared value in the
-- engine at once and returns it, as strict's inc (nothing pending). On
-- Redis: adds `n` to this worker's pending delta for `key` and
-- returns the worker's view: the shared value as last read by this worker
-- (at its last flush or get of the key) plus its pending delta. The shared
-- value gets the delta at the next flush, exactly; an overflow shows then
-- (logged, the delta kept pending), not here. `ttl` applies if the flush
-- creates the key. Where the view or the step is beyond +-(2^53 - 1) the
-- increment is applied strictly at once instead.
function _M.inc(self, key, n, ttl)
    if type(self) ~= "table" then
        dot_call("c", "inc", 2)
    end
    check_key(key, 2, self.max_key_len)
    if n == nil then
        n = 1
    else
        n = int_integer(n, "n", 2)
    end
    if ttl ~= nil then
        strict._check_ttl(ttl, 2)
    end
    if not self.redis then
        -- One node: straight into the shared engine, one compare-and-swap
        -- (docs/lax.md): nothing pending, exact at once.
        return inc_now(self, key, OP_ADD, n, ttl)
    end
    if self.journal then
        return engine_add(self, key, n, ttl)
    end

    local seen, err = base(self, key)
    if seen == nil then
        return nil, err
    end

    local pending = self.pending
    if type(n) == "number" and type(seen) == "number" then
        local sum = (pending[key] or 0) + n
        local view = seen + sum
        if sum <= MAX_SAFE and sum >= -MAX_SAFE and view <= MAX_SAFE
           and view >= -MAX_SAFE
        then
            pending[key] = sum
            if ttl and not self.ttls[key] then
                self.ttls[key] = ttl
            end
            if draining then
                drain(self)
            end
            return view
        end
    end

    return inc_now(self, key, OP_ADD, n, ttl)
end


-- syntax: view, err = c:dec(key, n?, ttl?)
--
-- context: any phase
--
-- Subtracts `n` (default 1); as `inc`.
function _M.dec(self, key, n, ttl)
    if type(self) ~= "table" then
        dot_call("c", "dec", 2)
    end
    check_key(key, 2, self.max_key_len)
    if n == nil then
        n = 1
    else
        n = int_integer(n, "n", 2)
    end
    if type(n) == "number" then
        return self:inc(key, -n, ttl)
    end
    if ttl ~= nil then
        strict._check_ttl(ttl, 2)
    end
    if self.journal then
        if n == int64_t(-2 ^ 63) then
            return nil, "increment or decrement would overflow"
        end
        return engine_add(self, key, -n, ttl)
    end
    return inc_now(self, key, OP_SUB, n, ttl)
end


-- syntax: value, err = c:get(key)
--
-- context: any phase
--
-- The shared value, read now, plus this worker's pending delta (not the
-- other workers' pending deltas). Also refreshes the worker's view.
function _M.get(self, key)
    if type(self) ~= "table" then
        dot_call("c", "get", 2)
    end
    check_key(key, 2, self.max_key_len)
    local value, err = self.shared:get(key)
    if value == nil then
        return nil, err
    end
    if self.journal then
        local cells
        cells, err = key_cells(self, key, false)
        if not cells then
            if err then
                return nil, err
            end
            return value
        end
        C.rc_lax_set_seen(cells, value)
        return exact_sum(value, C.rc_lax_unsent(cells))
    end
    self:_see(key, value)

    local delta = self.pending[key]
    if not delta then
        return value
    end
    if type(value) == "number" then
        local sum = value + delta
        if sum <= MAX_SAFE and sum >= -MAX_SAFE then
            return sum
        end
    end
    -- Exact int64 arithmetic, checked.
    local applied, new = int.apply(int.text(value), OP_ADD, CMP_ALWAYS, 0,
                                   delta)
    if applied == nil then
        return nil, new
    end
    return int.lua_value(new)
end


-- syntax: value, err = c:set(key, n, ttl?)
--
-- context: any phase
--
-- Strict: sets the shared value now and drops this worker's pending delta
-- for `key` (other workers' pending deltas still add to it later).
function _M.set(self, key, n, ttl)
    if type(self) ~= "table" then
        dot_call("c", "set", 2)
    end
    check_key(key, 2, self.max_key_len)
    n = int_integer(n, "n", 2)
    if ttl ~= nil then
        strict._check_ttl(ttl, 2)
    end

    local value, err = self.shared:set(key, n, ttl)
    if value == nil then
        return nil, err
    end
    if self.journal then
        local cells = key_cells(self, key, false)
        if cells then
            engine_forget(self, cells)
            C.rc_lax_set_seen(cells, value)
        end
        return value
    end
    self.pending[key] = nil
    self.ttls[key] = nil
    self:_see(key, value)
    return value
end


-- syntax: old, err = c:del(key)
--
-- context: any phase
--
-- Strict: removes the key now and drops this worker's pending delta;
-- returns the worker's view of the value removed.
function _M.del(self, key)
    if type(self) ~= "table" then
        dot_call("c", "del", 2)
    end
    check_key(key, 2, self.max_key_len)
    local old, err = self.shared:del(key)
    if old == nil then
        return nil, err
    end
    if self.journal then
        local cells = key_cells(self, key, false)
        if not cells then
            return old
        end
        local unsent = C.rc_lax_unsent(cells)
        engine_forget(self, cells)
        C.rc_lax_set_seen(cells, 0)
        if type(old) == "number" or type(old) == "cdata" then
            return exact_sum(old, unsent)
        end
        return old
    end

    local delta = self.pending[key]
    self.pending[key] = nil
    self.ttls[key] = nil
    self:_see(key, 0)
    if delta and type(old) == "number" then
        return old + delta
    end
    return old
end


-- syntax: new, old = c:inc_if(key, cmp, operand, n?, ttl?)
--
-- context: any phase
--
-- Compares the worker's view (`get`: the shared value read now plus this
-- worker's pending delta) with `operand`; when it holds, adds `n` to the
-- pending delta as `inc`. Returns `new, old` (`old, old` when the
-- comparison fails). Not atomic across workers: two workers may both see
-- "lt 10" and both add. Use strict for caps that must hold exactly.
function _M.inc_if(self, key, cmp, operand, n, ttl)
    if type(self) ~= "table" then
        dot_call("c", "inc_if", 2)
    end
    check_key(key, 2, self.max_key_len)
    cmp, operand = strict._check_condition(cmp, operand, 2)
    if n == nil then
        n = 1
    else
        n = int_integer(n, "n", 2)
    end

    local old, err = self:get(key)
    if old == nil then
        return nil, err
    end
    if not HOLDS[cmp](old, operand) then
        return old, old
    end

    local new
    new, err = self:inc(key, n, ttl)
    if new == nil then
        return nil, err
    end
    return new, old
end


-- syntax: new, old = c:set_if(key, cmp, operand, n, ttl?)
--
-- context: any phase
--
-- Compares the worker's view as `inc_if` does; when it holds, sets as
-- `set` (strictly, but the comparison and the set are two steps).
function _M.set_if(self, key, cmp, operand, n, ttl)
    if type(self) ~= "table" then
        dot_call("c", "set_if", 2)
    end
    check_key(key, 2, self.max_key_len)
    cmp, operand = strict._check_condition(cmp, operand, 2)
    n = int_integer(n, "n", 2)

    local old, err = self:get(key)
    if old == nil then
        return nil, err
    end
    if not HOLDS[cmp](old, operand) then
        return old, old
    end

    local new
    new, err = self:set(key, n, ttl)
    if new == nil then
        return nil, err
    end
    return new, old
end


-- syntax: values, err = c:get_all(keys)
--
-- context: any phase
--
-- `get` of each key, in order (not one snapshot).
function _M.get_all(self, keys)
    check.self(self, mt, "c", "get_all", 2)
    local count = strict._check_list(keys, "keys", 2)
    for i = 1, count do
        check_key(keys[i], 2, self.max_key_len)
    end

    local values = new_tab(count, 0)
    for i = 1, count do
        local value, err = self:get(keys[i])
        if value == nil then
            return nil, err, i
        end
        values[i] = value
    end
    return values
end


-- Validates a whole batch (so that a bad entry raises before anything is
-- applied), then applies each entry in order with `method`.
local function each(self, updates, conditional, op, method, level)
    local count, keys, cmps, operands, ns, ttls =
        strict._check_updates(self, updates, conditional, op, level + 1)
    local news, olds = new_tab(count, 0), new_tab(count, 0)
    local names = {}
    for name, code in pairs(CMP) do
        names[code] = name
    end
    for i = 1, count do
        local new, old
        if conditional then
            new, old = method(self, keys[i], names[cmps[i]], operands[i],
                              ns[i], ttls[i] or nil)
        else
            new, old = method(self, keys[i], ns[i], ttls[i] or nil)
        end
        if new == nil then
            return nil, old, i
        end
        news[i], olds[i] = new, old
    end
    return news, olds
end


-- syntax: views, err = c:inc_all(updates)
--
-- context: any phase
--
-- `inc` of each `{ key, n?, ttl? }`, in order; the views in order.
function _M.inc_all(self, updates)
    check.self(self, mt, "c", "inc_all", 2)
    local news, err, i = each(self, updates, false, OP_ADD, _M.inc, 2)
    return news, err, i
end


-- syntax: values, err = c:set_all(updates)
--
-- context: any phase
--
-- `set` of each `{ key, n, ttl? }`, in order (each strict, not together).
function _M.set_all(self, updates)
    check.self(self, mt, "c", "set_all", 2)
    local news, err, i = each(self, updates, false, OP_SET, _M.set, 2)
    return news, err, i
end


-- syntax: news, olds = c:inc_all_if(updates)
--
-- context: any phase
--
-- `inc_if` of each `{ key, cmp, operand, n?, ttl? }`, in order.
function _M.inc_all_if(self, updates)
    check.self(self, mt, "c", "inc_all_if", 2)
    return each(self, updates, true, OP_ADD, _M.inc_if, 2)
end


-- syntax: news, olds = c:set_all_if(updates)
--
-- context: any phase
--
-- `set_if` of each `{ key, cmp, operand, n, ttl? }`, in order.
function _M.set_all_if(self, updates)
    check.self(self, mt, "c", "set_all_if", 2)
    return each(self, updates, true, OP_SET, _M.set_if, 2)
end


-- syntax: ok, err = c:clear()
--
-- context: any phase
--
-- Drops this worker's pending deltas and clears the shared values (as
-- strict's clear). Other workers' pending deltas arrive afterwards.
function _M.clear(self)
    if type(self) ~= "table" then
        dot_call("c", "clear", 2)
    end
    self.pending = new_tab(0, 16)
    self.ttls = {}
    self.seen = {}
    self.seen_count = 0
    if self.journal then
        local ok, err = self.shared:clear()
        if ok then
            engine_forget(self, nil)
        end
        return ok, err
    end
    return self.shared:clear()
end


-- syntax: n = c:pending_keys()
--
-- context: any phase
function _M.pending_keys(self)
    if type(self) ~= "table" then
        dot_call("c", "pending_keys", 2)
    end
    if self.journal then
        -- Every worker's: the keys with counts not yet in Redis.
        return tonumber(C.rc_lax_unsent_keys(self.handle.ptr, self.prefix,
                                             #self.prefix))
    end
    local n = 0
    for _ in pairs(self.pending) do
        n = n + 1
    end
    -- on Redis, a batch sent but not known to be applied is pending too
    return n + unknown_keys(self)
end


-- syntax: metrics = c:self_metrics()
--
-- context: any phase
--
-- This worker's figures for a lax counter on Redis: `duplicates` (batches
-- sent again after a timeout that Redis had already applied, and so did
-- not apply twice), `dropped` (deltas given up: Redis refused them as an
-- overflow or a non-integer, or Redis stayed unreachable with more than
-- `max_pending` keys pending), `refused` (new keys the shared engine had
-- no room for), `spooled` (keys this worker wrote to the spool as it
-- exited), `unspooled` (spooled batches this worker sent), `pending_keys`
-- (in the engine: every worker's keys with unsent counts).
function _M.self_metrics(self)
    if type(self) ~= "table" then
        dot_call("c", "self_metrics", 2)
    end
    local m = self.metrics
    return { duplicates = m.duplicates, dropped = m.dropped,
             refused = m.refused, spooled = m.spooled,
             unspooled = m.unspooled, pending_keys = self:pending_keys() }
end


-- syntax: ok = lax.flush_all()
--
-- context: any phase; meant for exit_worker_by_lua*
--
-- Flushes every lax counter of this worker, each on its own: one that
-- fails or raises does not stop the others. Never raises. In
-- `exit_worker_by_lua_block` it runs the final work of every periodic job
-- of the worker (lifecycle.exit(): resty.counter's syncs, then these
-- flushes, then metrics): there it flushes what a dict counter still
-- holds, and a counter on Redis (which cannot be reached from there)
-- spools what it could not send before. Failures are logged; nil when
-- there was any.
function _M.flush_all()
    if get_phase() == "exit_worker" then
        return lifecycle.exit()
    end
    local ok = true
    for i = 1, #counters do
        local fine, flushed = pcall(flush, counters[i])
        if not fine then
            log_failure(SOURCE, fmt('flush of counter "%s" raised: %s',
                                    counters[i].shared.name,
                                    tostring(flushed)))
            ok = nil
        elseif not flushed then
            ok = nil
        end
    end
    return ok
end


return _M
