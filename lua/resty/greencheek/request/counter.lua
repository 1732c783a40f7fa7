-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- A drop-in for greencheek's request-per-minute counter: the same calls
-- and the same JSON, on resty.counter.requests. Requests are recorded in
-- the dict's shared engine (no lock per request), so a read right after a
-- request, in any worker, includes it; flush() has nothing left to do.


local check = require "resty.counter.check"
local requests = require "resty.counter.requests"


local type = type


local _M = { _VERSION = requests._VERSION }


-- This worker's engine for each dict, made on first use.
local engines = {}


local function engine(dict_name, level)
    local r = engines[dict_name]
    if r then
        return r
    end

    if type(dict_name) ~= "string" then
        check.expected("dict_name", "string", dict_name, level + 1)
    end

    local err
    r, err = requests.new(dict_name)
    if not r then
        return nil, err
    end

    engines[dict_name] = r
    return r
end


-- syntax: r, err = request_counter.configure(dict_name, opts)
--
-- context: init_worker_by_lua* (before any request is recorded)
--
-- Sets a dict's options (see resty.counter.requests.new: window, previous,
-- max_keys, overflow_key, idle_timeout, clock; flush_interval and
-- lock_timeout are accepted and unused) and returns
-- its engine. Configuring a dict this worker already uses is an error; an
-- unknown option raises.
function _M.configure(dict_name, opts)
    check.string(dict_name, "dict_name", 2)
    if engines[dict_name] then
        return nil, 'dict "' .. dict_name .. '" is already in use: '
                    .. 'configure it in init_worker_by_lua*'
    end

    local r, err = requests._new(dict_name, opts, 2)
    if not r then
        return nil, err
    end

    engines[dict_name] = r
    return r
end


-- What the three record calls share. Misuse raises blaming the caller of
-- the public function (level 3 from here).
local function record(dict_name, key, latency, with_all)
    local r, err = engines[dict_name]
    if not r then
        r, err = engine(dict_name, 3)
        if not r then
            return nil, err
        end
    end

    local ok
    ok, err = r:record_from(key, latency, with_all, 3)
    return ok, err
end


-- syntax: ok, err = request_counter.record_generic_request(dict_name,
--                                                          latency)
--
-- context: any phase; meant for log_by_lua*
--
-- Records the request under the key "all". `latency` is in seconds, a
-- number or a numeric string ($request_time).
function _M.record_generic_request(dict_name, latency)
    local ok, err = record(dict_name, "all", latency, false)
    return ok, err
end


-- syntax: ok, err = request_counter.record_request(dict_name, key, latency)
--
-- Records the request under `key` and under "all".
function _M.record_request(dict_name, key, latency)
    local ok, err = record(dict_name, key, latency, true)
    return ok, err
end


-- syntax: ok, err = request_counter.record_specific_request(dict_name, key,
--                                                           latency)
--
-- Records the request under `key` only.
function _M.record_specific_request(dict_name, key, latency)
    local ok, err = record(dict_name, key, latency, false)
    return ok, err
end


-- syntax: json, err = request_counter.single_stats(dict_name, key)
--
-- context: any phase
function _M.single_stats(dict_name, key)
    local r, err = engine(dict_name, 2)
    if not r then
        return nil, err
    end
    return r:single_stats(key)
end


-- syntax: json, err = request_counter.stats(dict_name)
--
-- context: any phase
function _M.stats(dict_name)
    local r, err = engine(dict_name, 2)
    if not r then
        return nil, err
    end
    return r:stats()
end


-- syntax: text, err = request_counter.prometheus(dict_name)
--
-- context: any phase
function _M.prometheus(dict_name)
    local r, err = engine(dict_name, 2)
    if not r then
        return nil, err
    end
    return r:prometheus()
end


-- syntax: ok, err = request_counter.flush(dict_name)
--
-- context: any phase
--
-- Nothing to do: requests are in the shared engine as they are recorded.
-- Returns true (nil, err for an unknown dict), for callers of the
-- flushing versions.
function _M.flush(dict_name)
    local r, err = engine(dict_name, 2)
    if not r then
        return nil, err
    end
    return r:flush()
end


-- syntax: ok = request_counter.flush_all()
--
-- context: any phase
--
-- Nothing to do (see flush()); returns true, so that an
-- exit_worker_by_lua* written for the flushing versions keeps working.
_M.flush_all = requests.flush_all


return _M
