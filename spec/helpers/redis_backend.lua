-- What the in-nginx specs on Redis share: the options of the redis-server
-- that spec/run-in-nginx.lua started, and a reply lost to a timeout.

local redis = require "resty.counter.redis"

local _M = {}


-- syntax: opts = backend.options(extra?)
--
-- resty.counter.redis options for the specs' Redis, with `extra` on top.
function _M.options(extra)
    local opts = { port = tonumber(os.getenv("REDIS_PORT")),
                   password = os.getenv("REDIS_PASSWORD") }
    for k, v in pairs(extra or {}) do
        opts[k] = v
    end
    return opts
end


local serial = 0


-- syntax: name, shared = backend.fresh(base)
--
-- A counter name of its own for each spec (an engine cannot be emptied),
-- and the strict view of its Redis values, cleared.
function _M.fresh(base)
    serial = serial + 1
    local name = base .. serial .. "_" .. ngx.worker.pid()
    local shared = assert(require("resty.counter.strict").new(nil, {
        name = name, redis = _M.options() }))
    assert(shared:clear())
    return name, shared
end


local SPIN = redis.script([[
local t0 = redis.call("TIME")
repeat
    local t = redis.call("TIME")
until (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > 300000
return 1
]])


-- syntax: ... = backend.while_busy(raw, fn)
--
-- Runs `fn` while another client keeps Redis busy for 300 ms (a flush
-- with a 50 ms read timeout then times out, yet Redis runs its script
-- when it gets to it), and returns what `fn` returned once Redis is free.
-- `raw` is a client of the specs' Redis.
function _M.while_busy(raw, fn)
    local busy = redis.new(_M.options({ read_timeout = 2 }))
    assert(busy:eval(SPIN, 0))                 -- loads the script
    -- Idle, authenticated connections in the pool, so that the flush
    -- sends its script at once (a fresh one would wait on AUTH).
    local pings = {}
    for i = 1, 4 do
        pings[i] = ngx.thread.spawn(function()
            return raw:command("ping")
        end)
    end
    for i = 1, 4 do
        assert(ngx.thread.wait(pings[i]))
    end
    local thread = ngx.thread.spawn(function()
        return busy:eval(SPIN, 0)
    end)
    ngx.sleep(0.05)
    local results = { fn() }
    assert(ngx.thread.wait(thread))
    return unpack(results)
end


-- syntax: value = backend.settled(read)
--
-- `read()` once it is no longer 0 (a script Redis ran late), within a
-- second; its last value otherwise.
function _M.settled(read)
    local value
    for _ = 1, 100 do
        value = read()
        if value ~= 0 then
            return value
        end
        ngx.sleep(0.01)
    end
    return value
end


-- syntax: backend.watch_scripts(client, stats)
--
-- Counts in `stats` the scripts `client` sends (`scripts`) and the most
-- that ran at once (`most`: 1 when flushes never overlap).
function _M.watch_scripts(client, stats)
    stats.running, stats.most, stats.scripts = 0, 0, 0
    client.eval = function(...)
        stats.running = stats.running + 1
        stats.scripts = stats.scripts + 1
        stats.most = math.max(stats.most, stats.running)
        local res, err = redis.eval(...)
        stats.running = stats.running - 1
        return res, err
    end
end


return _M
