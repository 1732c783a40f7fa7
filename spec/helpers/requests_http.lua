-- What the request counter scenarios read over HTTP and from disk: the
-- access log of keys (one a line: the ground truth), the Prometheus text
-- of /metrics per key, the engine's figures from /engine ("name value"
-- lines: cjson is not in every stack).

local _M = {}


-- { [key] = requests } and their total, from the access log.
function _M.logged(srv)
    local per_key, total = {}, 0
    for line in io.lines(srv.dir .. "/access.log") do
        per_key[line] = (per_key[line] or 0) + 1
        total = total + 1
    end
    return per_key, total
end


-- { [key] = total } from the Prometheus text of /metrics for dict `dict`
-- (a scrape: it also expires idle keys), and the text.
function _M.scraped(srv, dict)
    local status, text = srv:get("/metrics")
    assert(status == 200, "GET /metrics failed: " .. tostring(status))
    local per_key = {}
    for key, n in text:gmatch('resty_requests_total{dict="' .. dict
                              .. '",key="([^"]+)"} (%d+)') do
        per_key[key] = tonumber(n)
    end
    return per_key, text
end


-- { [name] = value } from /engine.
function _M.engine_stats(srv)
    local status, body = srv:get("/engine")
    assert(status == 200, "GET /engine failed: " .. tostring(status))
    local stats = {}
    for name, value in body:gmatch("(%S+) (%S+)") do
        stats[name] = tonumber(value)
    end
    return stats
end


return _M
