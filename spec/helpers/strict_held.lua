-- Strict counters' batches held from a spec: what a batch of another
-- process leaves in the engine (docs/engine.md, "Strict records").

local engine = require "resty.counter.engine"
local abi = require "resty.counter.abi"
local ffi = require "ffi"
local bit = require "bit"

local _M = {}


-- What a batch of another process leaves in the engine while it runs (or
-- after it was killed): the batch lock held by `pid`, its journal listing
-- `key`'s record, the record frozen. Returns a function that ends it as
-- the batch would (nothing written).
function _M.hold(dict_name, key, pid, name)
    local handle = assert(engine.attach(dict_name))
    local function cells(k, width)
        local ptr = assert(engine.record(handle, abi.STRICT_KIND, k, width,
                                         true))
        return ffi.cast("uint64_t *", ptr)
    end
    local record = cells((name or "counter") .. "/" .. key,
                         abi.STRICT_WIDTH)
    local control = cells("\0batch", 4)
    local journal = cells("\0journal\3", 24)
    -- The 16-byte aligned pair of the record's three words.
    local address = tonumber(ffi.cast("uintptr_t", record))
    local pair = record + (address % 16 == 0 and 0 or 1)
    control[0] = ffi.new("uint64_t", 2) * 2^32 + pid
    journal[0] = ffi.cast("uintptr_t", pair)
    control[2] = 1
    control[3] = ffi.cast("uintptr_t", journal)
    control[1] = 1 -- FREEZING
    pair[1] = bit.bor(pair[1], 2) -- FROZEN
    return function()
        pair[1] = bit.band(pair[1], bit.bnot(2))
        control[1] = 0
        control[0] = 0
    end
end


-- nginx's master: a live process of this nginx, other than this worker.
function _M.master_pid()
    local f = assert(io.open("/proc/self/stat"))
    local stat = f:read("*a")
    f:close()
    return tonumber(stat:match("%) %S+ (%d+)"))
end


return _M
