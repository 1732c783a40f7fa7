-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- The Rust pending store, reached through LuaJIT's FFI. A store holds one
-- counter's per-worker deltas; LuaJIT adds to its slots directly through
-- the `slots` pointer (no call at all on the hot path), and a sync drains
-- them. Its C declarations are in resty.counter.abi.


local ffi = require "ffi"
local abi = require "resty.counter.abi"


local C = abi.C
local core = abi.core
local ffi_gc = ffi.gc
local ffi_new = ffi.new
local setmetatable = setmetatable


local _M = {
    _VERSION = core._VERSION,
    core = core,
    max_safe_integer = core.max_safe_integer,
    max_key_len = core.max_key_len,
    -- A drained delta whose status is not this must stay pending.
    DELTA_OK = abi.DELTA_OK,
}
local mt = { __index = _M }


-- A null pointer from the library means it caught a panic.
local INTERNAL_ERROR = abi.INTERNAL


local slots_out = ffi_new("rc_slot_t *[1]")
local count_out = ffi_new("uint32_t[1]")


local failure = abi.failure
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
