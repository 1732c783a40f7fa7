-- A real Prometheus server (Debian's `prometheus` package) for scenario
-- specs: started on a free loopback port with its data in the given
-- folder, scraping one nginx's /metrics every second; queried through its
-- HTTP API; stopped by its PID. Every wait is bounded.

local nginx = require "helpers.nginx"
local json = require "dkjson"

local quote = nginx.quote

local _M = { binary = "/usr/bin/prometheus", promtool = "/usr/bin/promtool" }

local server = {}
server.__index = server


-- syntax: prom = prometheus.start(dir, target_port)
--
-- Raises when Prometheus does not say it is ready within 30 s.
function _M.start(dir, target_port)
    assert(nginx.sh("test -x " .. _M.binary),
           "no " .. _M.binary .. " (make deps installs Debian's prometheus)")
    local self = setmetatable({ dir = dir, port = nginx.free_port() },
                              server)
    local f = assert(io.open(dir .. "/prometheus.yml", "w"))
    f:write(([[
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: nginx
    metrics_path: /metrics
    static_configs:
      - targets: ["127.0.0.1:%d"]
]]):format(target_port))
    f:close()

    local log = dir .. "/prometheus.log"
    assert(nginx.sh(table.concat({
        quote(_M.binary),
        "--config.file=" .. quote(dir .. "/prometheus.yml"),
        "--storage.tsdb.path=" .. quote(dir .. "/prometheus-data"),
        "--web.listen-address=127.0.0.1:" .. self.port,
        "> " .. quote(log) .. " 2>&1 & echo $! > " .. quote(dir .. "/prom.pid"),
    }, " ")))
    self.pid = tonumber(nginx.read_file(dir .. "/prom.pid"))
    for _ = 1, 300 do
        if nginx.sh("curl -sf -o /dev/null --max-time 1 http://127.0.0.1:"
                    .. self.port .. "/-/ready") then
            return self
        end
        nginx.sleep(0.1)
    end
    self:stop()
    error("prometheus was not ready within 30 s:\n"
          .. (nginx.read_file(log) or ""))
end


-- syntax: result = prom:query(promql, time?)
--
-- The result of an instant query (/api/v1/query), at `time` (Unix
-- seconds; default now): a list of { metric = {labels}, value = number
-- (nil for NaN) }. Raises on an error.
function server:query(promql, time)
    local at = time and (" --data-urlencode " .. quote("time=" .. time))
               or ""
    local out = nginx.read("curl -s --max-time 10 http://127.0.0.1:"
                           .. self.port .. "/api/v1/query --data-urlencode "
                           .. quote("query=" .. promql) .. at)
    local doc = json.decode(out)
    assert(doc and doc.status == "success",
           "query " .. promql .. " failed: " .. out)
    local result = {}
    for i, r in ipairs(doc.data.result) do
        result[i] = { metric = r.metric, value = tonumber(r.value[2]) }
    end
    return result
end


-- syntax: value = prom:value(promql)
--
-- The value of a query with one result; nil when it has none.
function server:value(promql)
    local result = self:query(promql)
    assert(#result <= 1, promql .. " has " .. #result .. " results")
    return result[1] and result[1].value
end


-- syntax: ok, out = prometheus.check_metrics(text)
--
-- `promtool check metrics` on a rendering: true when it passes (no
-- error, no lint problem), and what promtool said.
function _M.check_metrics(dir, text)
    local file = dir .. "/rendered.prom"
    local f = assert(io.open(file, "w"))
    f:write(text)
    f:close()
    local out = file .. ".promtool"
    local ok = nginx.sh(quote(_M.promtool) .. " check metrics < "
                        .. quote(file) .. " > " .. quote(out) .. " 2>&1")
    return ok, nginx.read_file(out) or ""
end


-- Stops Prometheus (TERM, then KILL after 10 s). Idempotent.
function server:stop()
    local pid = self.pid
    if not pid then
        return
    end
    self.pid = nil
    nginx.sh("kill -TERM " .. pid .. " 2>/dev/null")
    for _ = 1, 100 do
        if not nginx.sh("kill -0 " .. pid .. " 2>/dev/null") then
            return
        end
        nginx.sleep(0.1)
    end
    nginx.sh("kill -KILL " .. pid .. " 2>/dev/null")
end


function server:log()
    return nginx.read_file(self.dir .. "/prometheus.log") or ""
end


return _M
