-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- The Rust pending store, reached through LuaJIT's FFI. A store holds one
-- counter's per-worker deltas; LuaJIT adds to its slots directly through
-- the `slots` pointer (no call at all on the hot path), and a sync drains
-- them. The C declarations mirror src/ffi.rs: change both together and
-- bump FFI_ABI there and here.


local ffi = require "ffi"
local core = require "resty_counter_core"


local ffi_gc = ffi.gc
local ffi_new = ffi.new
local ffi_load = ffi.load
local error = error
local setmetatable = setmetatable
local tostring = tostring


local FFI_ABI = 2


ffi.cdef[[
typedef struct rc_store_s rc_store_t;

typedef struct {
    int64_t integer;
    double  fractional;
} rc_slot_t;

typedef struct {
    uint32_t slot;
    int32_t  status;
    int64_t  integer;
    double   fractional;
    double   value;
} rc_delta_t;

rc_store_t *rc_store_new(void);
void rc_store_free(rc_store_t *store);
int32_t rc_store_alloc(rc_store_t *store, rc_slot_t **slots);
int32_t rc_store_add(rc_store_t *store, uint32_t slot, int64_t integer,
    double fractional);
const rc_delta_t *rc_store_drain(rc_store_t *store, uint32_t *count);
uint32_t rc_store_pending_keys(const rc_store_t *store);
]]


if core.ffi_abi ~= FFI_ABI then
    error("resty_counter_core has FFI ABI " .. tostring(core.ffi_abi)
          .. ", resty.counter.store expects " .. FFI_ABI
          .. ": the Lua files and the library come from different builds")
end


-- `require` above loaded the library; loading the same path again through
-- the FFI gives the same instance, so both halves share its statics.
local lib_path = package.searchpath("resty_counter_core", package.cpath)
if not lib_path then
    error("resty_counter_core was loaded but is not on package.cpath")
end
local C = ffi_load(lib_path)


local _M = {
    _VERSION = core._VERSION,
    core = core,
    max_safe_integer = core.max_safe_integer,
    max_key_len = core.max_key_len,
    -- A drained delta whose status is not this must stay pending.
    DELTA_OK = 0,
    -- The library, for modules that declare more of its functions.
    lib = C,
}
local mt = { __index = _M }


-- A null pointer from the library means it caught a panic.
local INTERNAL_ERROR = core.internal_error_code


local slots_out = ffi_new("rc_slot_t *[1]")
local count_out = ffi_new("uint32_t[1]")


-- The message for a negative code from the library. A caught panic also
-- carries the panic's own text, which the hook kept instead of printing.
local function failure(code)
    local msg = core.error_message(code)
    local panic_msg = core.take_panic_message()
    if panic_msg then
        msg = msg .. ": " .. panic_msg
    end
    return msg
end


_M.failure = failure


-- syntax: st, err = store.new()
function _M.new()
    local ptr = C.rc_store_new()
    if ptr == nil then
        return nil, failure(INTERNAL_ERROR)
    end

    return setmetatable({ ptr = ffi_gc(ptr, C.rc_store_free) }, mt)
end


-- syntax: slot, slots = st:alloc()
-- syntax: nil, err = st:alloc()
--
-- A zeroed slot for a key first touched in this interval, and the base of
-- the slot array, which may have moved: callers must use the new one.
function _M.alloc(self)
    local slot = C.rc_store_alloc(self.ptr, slots_out)
    if slot < 0 then
        return nil, failure(slot)
    end

    return slot, slots_out[0]
end


-- syntax: ok, err = st:add(slot, integer, fractional)
function _M.add(self, slot, integer, fractional)
    local rc = C.rc_store_add(self.ptr, slot, integer, fractional)
    if rc ~= 0 then
        return nil, failure(rc)
    end

    return true
end


-- syntax: deltas, count = st:drain()
-- syntax: nil, err = st:drain()
--
-- Every pending delta (a `const rc_delta_t *` indexed from 0), its slot
-- freed. The array stays valid until the next drain of this store.
function _M.drain(self)
    local deltas = C.rc_store_drain(self.ptr, count_out)
    if deltas == nil then
        return nil, failure(INTERNAL_ERROR)
    end

    return deltas, count_out[0]
end


-- syntax: n = st:pending_keys()
function _M.pending_keys(self)
    return C.rc_store_pending_keys(self.ptr)
end


return _M
