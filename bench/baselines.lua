-- What a user would otherwise put in log_by_lua, for bench/http.lua:
-- the predecessors' algorithm (a per-worker Lua table flushed by a timer,
-- as Kong's lua-resty-counter does) and a per-request shared-dict request
-- counter (as a straightforward Lua module does).

local _M = {}


local buffered = {}
local buffered_mt = { __index = buffered }


function buffered.incr(self, key, step)
    local v = self.increments[key]
    self.increments[key] = (v or 0) + (step or 1)
end


local function flush(premature, self) -- luacheck: ignore premature
    local increments = self.increments
    self.increments = {}
    for key, value in pairs(increments) do
        self.dict:incr(key, value, 0)
    end
end


-- syntax: c = baselines.buffered(dict_name, interval)
function _M.buffered(dict_name, interval)
    local self = setmetatable({ dict = ngx.shared[dict_name],
                                increments = {} }, buffered_mt)
    assert(ngx.timer.every(interval, flush, self))
    return self
end


-- Requests and latency per key and minute, and under "all": four
-- dict:incr per request.
function _M.plain_record(dict, key, latency)
    local minute = math.floor(ngx.now() / 60)
    local ms = tonumber(latency) * 1000
    local prefix = key .. "|" .. minute
    dict:incr(prefix .. "|n", 1, 0, 180)
    dict:incr(prefix .. "|ms", ms, 0, 180)
    prefix = "all|" .. minute
    dict:incr(prefix .. "|n", 1, 0, 180)
    dict:incr(prefix .. "|ms", ms, 0, 180)
end


return _M
