-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- The shared engine (docs/engine.md) as the Lua modules reach it: in each
-- worker, one handle per shared dict on the engine that lives in that
-- dict's zone, and the records of keys in it. The C declarations mirror
-- src/ffi_engine.rs: change both together and bump ENGINE_ABI there and
-- here.


local ffi = require "ffi"
local store = require "resty.counter.store"
require "resty.core.shdict"


local C = store.lib
local ngx_shared = ngx.shared
local ffi_new = ffi.new
local ffi_string = ffi.string
local error = error
local tonumber = tonumber
local tostring = tostring


local ENGINE_ABI = 3

-- The share of a dict's zone the engine takes when the first worker
-- attaches; the dict keeps the rest for its own keys.
local SHARE = 0.5


ffi.cdef[[
typedef struct rc_engine_s rc_engine_t;

typedef struct {
    const uint64_t      *cells;
    const unsigned char *key;
    uint32_t             key_len;
    int32_t              status;
    double               value;
} rc_changed_t;

typedef struct {
    uint64_t bytes;
    uint64_t records;
    uint64_t max_records;
    uint64_t refused;
    uint64_t arena_used;
    uint64_t arena_total;
} rc_engine_stats_t;

int32_t rc_engine_abi(void);
const unsigned char *rc_engine_error(size_t *len);
int32_t rc_engine_attach(const void *zone, double share, rc_engine_t **engine,
    uint64_t *bytes);
int32_t rc_engine_record(rc_engine_t *engine, uint8_t kind,
    const unsigned char *key, size_t len, uint32_t width, int32_t create,
    const uint64_t **cells);
int32_t rc_engine_stats(const rc_engine_t *engine, rc_engine_stats_t *out);

int32_t rc_counter_add(const uint64_t *cells, int64_t step);
int32_t rc_counter_add_fractional(const uint64_t *cells, double step);
double rc_counter_value(const uint64_t *cells);
int32_t rc_counter_import_base(const uint64_t *cells, double base);
typedef int (*rc_shdict_store_t)(void *zone, int op, const unsigned char *key,
    size_t key_len, int value_type, const unsigned char *str_value_buf,
    size_t str_value_len, double num_value, long exptime, int user_flags,
    char **errmsg, int *forcible);
int32_t rc_counter_sync_begin(rc_engine_t *engine, uint32_t wait_ms,
    void *zone, rc_shdict_store_t store, const rc_changed_t **out,
    uint32_t *count, uint32_t *written);
void rc_counter_mirrored(const uint64_t *cells, double value);
int32_t rc_counter_sync_end(rc_engine_t *engine);
]]


if C.rc_engine_abi() ~= ENGINE_ABI then
    error("resty_counter_core has engine ABI " .. tostring(C.rc_engine_abi())
          .. ", resty.counter.engine expects " .. ENGINE_ABI
          .. ": the Lua files and the library come from different builds")
end


local _M = {
    lib = C,
    -- lua-resty-core's store function (behind dict:set), for a sync to
    -- write values into the dict from the engine itself.
    shdict_store = ffi.cast("rc_shdict_store_t",
                            ffi.C.ngx_http_lua_ffi_shdict_store),
    -- Codes from src/ffi_engine.rs.
    OUT_OF_EXACT_RANGE = -2,
    FULL = -20,
    NOT_FOUND = -24,
    -- rc_changed_t.status: import the dict's old value first; the same for
    -- a key whose dict value was no number (and leave it if it still is).
    NEEDS_BASE = 1,
    FOREIGN = 3,
    -- Record kinds: the first byte of every key in the engine.
    COUNTER = ("c"):byte(),
    COUNTER_WIDTH = 4,
    -- The longest key a kind may use (the kind byte takes one).
    max_key_len = store.max_key_len - 1,
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
        if rc == _M.NOT_FOUND then
            return nil, nil, rc
        end
        return nil, last_error(), rc
    end

    return cells_out[0], rc == 1
end


-- syntax: stats = engine.stats(handle)
--
-- The engine's size and use: bytes, keys, max_keys, refused (keys refused
-- because it was full, since it was made), used_bytes, arena_bytes.
function _M.stats(handle)
    C.rc_engine_stats(handle.ptr, stats_out)
    return {
        bytes = tonumber(stats_out.bytes),
        keys = tonumber(stats_out.records),
        max_keys = tonumber(stats_out.max_records),
        refused = tonumber(stats_out.refused),
        used_bytes = tonumber(stats_out.arena_used),
        arena_bytes = tonumber(stats_out.arena_total),
    }
end


return _M
