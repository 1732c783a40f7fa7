-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- When to try again after a failure: the wait doubles with each failure in
-- a row, from `first` up to `max` seconds, and a success ends it. A lax
-- counter on Redis asks it before each timed flush, so that a Redis that
-- is down is tried about once a second, not 50 times.


local ngx = ngx
local ngx_now = ngx.now
local setmetatable = setmetatable


local _M = { _VERSION = "0.1.0" }
local mt = { __index = _M }


-- syntax: b = backoff.new(first, max)
function _M.new(first, max)
    return setmetatable({
        first = first,
        max = max < first and first or max,
        wait = 0,           -- the last wait, 0 after a success
        next_try = 0,       -- no try before this time
        failures = 0,       -- failures in a row
    }, mt)
end


-- syntax: due = b:due()
--
-- True when a try is due now: no failure since the last success, or the
-- wait after the last failure is over.
function _M.due(self)
    return ngx_now() >= self.next_try
end


-- syntax: b:result(ok)
--
-- Records the outcome of a try: a success resets the wait; a failure sets
-- the next try `first` seconds on, then twice as far each time, at most
-- `max`.
function _M.result(self, ok)
    if ok then
        self.wait, self.next_try, self.failures = 0, 0, 0
        return
    end

    local wait = self.wait * 2
    if wait < self.first then
        wait = self.first
    elseif wait > self.max then
        wait = self.max
    end
    self.wait = wait
    self.failures = self.failures + 1
    self.next_try = ngx_now() + wait
end


return _M
