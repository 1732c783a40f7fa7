-- spec/resty/limit_spec.lua's key churn: each worker's limiter "churn"
-- (one event a 1 s window, the real clock) on dict limit_churn, kept for
-- the worker's life, so that its sweeps and its kept cells are those of a
-- long-lived limiter.
local limit = require "resty.counter.limit"

local ngx = ngx
local assert = assert

local _M = {}

local lim


-- syntax: allowed, refused, err = churn.run(from, n)
--
-- One event for each of the `n` keys from number `from` (new keys):
-- how many were allowed, how many were not (and the last reason).
function _M.run(from, n)
    if not lim then
        lim = assert(limit.new("limit_churn", { limit = 1, window = 1,
                                                name = "churn" }))
    end
    ngx.update_time()
    local allowed, refused, last_err = 0, 0, nil
    for i = from, from + n - 1 do
        local delay, err = lim:incoming("k" .. i, true)
        if delay == 0 then
            allowed = allowed + 1
        else
            refused = refused + 1
            last_err = err
        end
    end
    return allowed, refused, last_err
end


return _M
