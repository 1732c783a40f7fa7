-- For spec/resty/metrics_spec.lua, in each worker of spec/nginx/unit.conf:
-- a counter synced by hand only (no timer syncs it) and a registry "http"
-- that renders it, made at the worker's first request.

local counter = require "resty.counter"
local metrics = require "resty.counter.metrics"

local _M = {}

local registry, c


-- syntax: m, c = metrics_http.get()
function _M.get()
    if not registry then
        c = assert(counter.new("metrics_http"))
        registry = assert(metrics.new("metrics", { name = "http",
                                                   interval = 0.1 }))
        registry:add(c)
    end
    return registry, c
end


return _M
