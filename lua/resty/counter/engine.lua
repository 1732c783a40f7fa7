-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- The shared engine (docs/engine.md) as the Lua modules reach it: in each
-- worker, one handle per shared dict on the engine that lives in that
-- dict's zone, and the records of keys in it. Its C declarations and codes
-- are in resty.counter.abi.


local ffi = require "ffi"
local abi = require "resty.counter.abi"
require "resty.core.shdict"


local C = abi.C
local NOT_FOUND = abi.NOT_FOUND
local ngx_shared = ngx.shared
local ffi_new = ffi.new
local ffi_string = ffi.string
local tonumber = tonumber
local tostring = tostring


-- The share of a dict's zone the engine takes when the first worker
-- attaches; the dict keeps the rest for its own keys.
local SHARE = 0.5


local _M = {
    -- The longest key a kind may use (the kind byte takes one).
    max_key_len = abi.core.max_key_len - 1,
    -- lua-resty-core's store function (behind dict:set), for a sync to
    -- write values into the dict from the engine itself.
    shdict_store = ffi.cast("rc_shdict_store_t",
                            ffi.C.ngx_http_lua_ffi_shdict_store),
}


local len_out = ffi_new("size_t[1]")
local engine_out = ffi_new("rc_engine_t *[1]")
local bytes_out = ffi_new("uint64_t[1]")
local cells_out = ffi_new("const uint64_t *[1]")
local stats_out = ffi_new("rc_engine_stats_t")


-- syntax: text = engine.last_error()
local function last_error()
    local ptr = C.rc_engine_error(len_out)
    return ffi_string(ptr, len_out[0])
end
_M.last_error = last_error


-- This worker's handles, by dict name.
local handles = {}


-- syntax: handle, err = engine.attach(shdict_name)
--
-- context: init_by_lua* (the master makes the engine before forking) and
-- every later phase.
--
-- The handle of the dict's engine: { ptr = rc_engine_t *, dict = the dict,
-- zone = its ngx_shm_zone_t *, name = its name, bytes = the engine's size },
-- the same table for every
-- caller in this worker. Fields named by kind hold what the modules of that
-- kind keep per worker (their key-to-cells caches).
function _M.attach(shdict_name)
    local handle = handles[shdict_name]
    if handle then
        return handle
    end

    local dict = ngx_shared[shdict_name]
    if not dict then
        return nil, 'shared dict "' .. tostring(shdict_name) .. '" not found'
    end

    local zone = ffi.C.ngx_http_lua_ffi_shdict_udata_to_zone(dict[1])
    local rc = C.rc_engine_attach(zone, SHARE, engine_out, bytes_out)
    if rc < 0 then
        return nil, 'no shared engine in dict "' .. shdict_name .. '": '
                    .. last_error()
    end

    handle = {
        ptr = engine_out[0],
        dict = dict,
        zone = zone,
        name = shdict_name,
        bytes = tonumber(bytes_out[0]),
        created = rc == 1,
    }
    handles[shdict_name] = handle
    return handle
end


-- syntax: cells, made = engine.record(handle, kind, key, width, create)
-- syntax: nil, err, code = engine.record(handle, kind, key, width, create)
--
-- The cells of the key's record (a `const uint64_t *` valid for the
-- worker's life), and whether this call made it. Absent and not to be
-- made: nil, nil, NOT_FOUND.
function _M.record(handle, kind, key, width, create)
    local rc = C.rc_engine_record(handle.ptr, kind, key, #key, width,
                                  create and 1 or 0, cells_out)
    if rc < 0 then
        if rc == NOT_FOUND then
            return nil, nil, rc
        end
        return nil, last_error(), rc
    end

    return cells_out[0], rc == 1
end


-- syntax: engine.check_epoch(cache)
--
-- For a module that keeps records' cells per key: `cache` holds them in
-- `cells` (how many in `cached`), `epoch` (rc_engine_epoch's pointer) and
-- `seen_epoch` (the epoch when `cells` was last known good). When the
-- epoch moved (a record was removed), any kept cells may be the removed
-- record's: all are dropped, to be looked up again. Call it before any
-- use of kept cells; a removal after its load of the epoch is seen at the
-- next call, and a write that loaded the epoch just before a removal (or,
-- on aarch64, whose plain load the CPU performed after the write) lands in
-- the removed record, whose space is not reused for 10 s (docs/engine.md,
-- "Removal and reuse").
function _M.check_epoch(cache)
    local epoch = cache.epoch[0]
    if epoch ~= cache.seen_epoch then
        cache.seen_epoch = epoch
        cache.cells = {}
        cache.cached = 0
    end
end


-- syntax: stats = engine.stats(handle)
--
-- The engine's size and use: bytes, keys, max_keys, refused (keys refused
-- because it was full, since it was made), used_bytes, arena_bytes;
-- removed (records removed), reused (records made in a removed one's
-- space), free and free_bytes (removed records waiting for reuse),
-- leaked_bytes (removed records no free list took).
function _M.stats(handle)
    C.rc_engine_stats(handle.ptr, stats_out)
    return {
        bytes = tonumber(stats_out.bytes),
        keys = tonumber(stats_out.records),
        max_keys = tonumber(stats_out.max_records),
        refused = tonumber(stats_out.refused),
        used_bytes = tonumber(stats_out.arena_used),
        arena_bytes = tonumber(stats_out.arena_total),
        removed = tonumber(stats_out.removed),
        reused = tonumber(stats_out.reused),
        free = tonumber(stats_out.free),
        free_bytes = tonumber(stats_out.free_bytes),
        leaked_bytes = tonumber(stats_out.leaked_bytes),
    }
end


return _M
