-- spec/resty/strict_spec.lua's key churn: each worker's strict counter
-- "churn" on dict strict_churn, kept for the worker's life, so that its
-- sweeps and its kept cells are those of a long-lived counter.
local strict = require "resty.counter.strict"

local assert = assert

local _M = {}

local c


-- syntax: c = churn.counter()
function _M.counter()
    if not c then
        c = assert(strict.new("strict_churn", { name = "churn" }))
    end
    return c
end


-- syntax: new, err = churn.inc(key)
--
-- One `inc` of `key` that a new key makes with a ttl of 1 s.
function _M.inc(key)
    return _M.counter():inc(key, 1, 1)
end


return _M
