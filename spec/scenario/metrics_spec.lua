-- resty.counter.metrics scraped by a real Prometheus server: 2 workers
-- under wrk load with a HUP reload in the middle; promtool passes the
-- rendering, and Prometheus' HTTP API answers the access log's exact
-- counts (per route, per request counter key, strict and lax values, the
-- keys refused by a full engine and the decisions of two limiters, one of
-- them in shadow mode: figures each worker counts on its own and the
-- registry sums over the node).

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"
local load = require "helpers.load"
local prometheus = require "helpers.prometheus"
local json = require "dkjson"

local CONF = assert(nginx.read_file("spec/scenario/metrics.conf"))
local DASHBOARD = "docs/grafana-dashboard.json"


-- { ["GET /a"] = n, ... }, and the requests to /new by outcome, from the
-- access log.
local function logged(srv)
    local routes, outcomes = {}, { counted = 0, refused = 0 }
    local f = io.open(srv.dir .. "/access.log")
    if f then
        for line in f:lines() do
            local method, uri, status, outcome =
                line:match("^(%u+) (%S+) (%d+) (%S+)$")
            assert(status == "200", "not served: " .. line)
            if outcome == "-" then
                local route = method .. " " .. uri
                routes[route] = (routes[route] or 0) + 1
            else
                outcomes[outcome] = (outcomes[outcome] or 0) + 1
            end
        end
        f:close()
    end
    return routes, outcomes
end


-- The samples of a rendering: { [series] = value }.
local function samples(text)
    local found = {}
    for series, value in text:gmatch("\n([^#\n][^\n]-) (%S+)") do
        found[series] = tonumber(value)
    end
    return found
end


describe("resty.counter.metrics scraped by Prometheus", function()
    local srv, prom

    after_each(function()
        if prom then
            prom:stop()
            prom = nil
        end
        if srv then
            srv:cleanup()
            srv = nil
        end
    end)

    it("answers the access log's counts through Prometheus' API", function()
        srv = nginx.start({ workers = 2, http = CONF })
        prom = prometheus.start(srv.dir, srv.port)
        -- Its first scrape (Prometheus applies new targets up to 5 s after
        -- it starts), so that it scrapes during the load.
        for _ = 1, 300 do
            if prom:value('up{job="nginx"}') == 1 then
                break
            end
            nginx.sleep(0.1)
        end
        assert.equal(1, prom:value('up{job="nginx"}'), "no scrape in 30 s")

        local runs = {
            load.start(srv, "/a", { seconds = 3 }),
            load.start(srv, "/b", { seconds = 3, threads = 1,
                                    connections = 4 }),
            load.start(srv, "/new", { seconds = 3, threads = 1,
                                      connections = 4, keys = 400 }),
            load.start(srv, "/limited?l=scenario",
                       { seconds = 3, threads = 1, connections = 2 }),
            load.start(srv, "/limited?l=shadow",
                       { seconds = 3, threads = 1, connections = 2 }),
        }
        nginx.sleep(1.5)
        srv:signal("HUP")
        for _, run in ipairs(runs) do
            load.wait(run)
        end
        local load_end = os.time()

        -- The rendering settles on the access log's counts (the counters
        -- sync every 0.1 s, the lax counter flushes every 20 ms, the
        -- workers publish every 0.2 s).
        local routes, outcomes = logged(srv)
        local a, b = routes["GET /a"] or 0, routes["GET /b"] or 0
        assert.is_true(a > 1000 and b > 100,
                       "too little load: " .. a .. ", " .. b)
        assert.is_true(outcomes.refused > 100 and outcomes.counted > 10,
                       "no full engine: " .. outcomes.refused .. " refused, "
                       .. outcomes.counted .. " counted")
        -- The limiters' decisions, as the access log has them.
        local function decided(name, outcome)
            return outcomes[name .. ":" .. outcome] or 0
        end
        local decisions = {}
        for _, name in ipairs({ "scenario", "shadow" }) do
            local labels = '{limiter="' .. name .. '"}'
            decisions["resty_limit_allowed_total" .. labels] =
                decided(name, "allowed") + decided(name, "near")
            decisions["resty_limit_near_limit_total" .. labels] =
                decided(name, "near")
            decisions["resty_limit_rejected_total" .. labels] =
                decided(name, "rejected")
            decisions["resty_limit_shadow_rejected_total" .. labels] =
                decided(name, "shadow")
        end
        for _, outcome in ipairs({ "scenario:allowed", "scenario:near",
                                   "scenario:rejected", "shadow:allowed",
                                   "shadow:near", "shadow:shadow" }) do
            assert.is_true((outcomes[outcome] or 0) > 0,
                           "no " .. outcome .. " decision")
        end
        assert.equal(0, decided("shadow", "rejected"))
        local function decisions_settled(found)
            for series, n in pairs(decisions) do
                if found[series] ~= n then
                    return false
                end
            end
            return true
        end
        local function settled(found)
            return decisions_settled(found)
               and found['scenario_hits_total{method="GET",uri="/a"}'] == a
               and found['scenario_hits_total{method="GET",uri="/b"}'] == b
               and found['resty_counts_refused_keys_total{dict="tiny"}']
                   == outcomes.refused
               and found['resty_lax_value{dict="values",key="hits",'
                         .. 'name="lax"}'] == a + b
        end
        local text, found
        for _ = 1, 100 do
            local status
            status, text = srv:get("/metrics")
            assert.equal(200, status)
            found = samples(text)
            if settled(found) then
                break
            end
            nginx.sleep(0.1)
        end
        assert.is_true(settled(found), "the rendering did not settle:\n"
                       .. text)

        local ok, out = prometheus.check_metrics(srv.dir, text)
        assert.is_true(ok, "promtool check metrics: " .. out)
        assert.equal("", out)

        -- A scrape made after the rendering settled.
        local settled_at = os.time() + 1
        local scraped
        for _ = 1, 200 do
            scraped = prom:value('timestamp(up{job="nginx"})')
            if scraped and scraped > settled_at then
                break
            end
            nginx.sleep(0.1)
        end
        assert.is_true(scraped and scraped > settled_at,
                       "no scrape after the counts settled:\n" .. prom:log())
        assert.equal(1, prom:value('up{job="nginx"}'))

        assert.equal(a, prom:value('scenario_hits_total{method="GET",'
                                   .. 'uri="/a"}'))
        assert.equal(b, prom:value('scenario_hits_total{method="GET",'
                                   .. 'uri="/b"}'))
        assert.equal(a, prom:value('resty_requests_total{dict="request_stats"'
                                   .. ',key="/a"}'))
        assert.equal(a + b, prom:value('resty_requests_total{key="all"}'))
        assert.equal(a + b, prom:value('resty_request_latency_seconds_count'
                                       .. '{key="all"}'))
        assert.equal(a + b, prom:value('resty_strict_value{key="hits"}'))
        assert.equal(a + b, prom:value('resty_lax_value{key="hits"}'))
        assert.equal(0, prom:value("sum(resty_lax_pending_keys)"))
        assert.equal(outcomes.refused,
                     prom:value('resty_counts_refused_keys_total'
                                .. '{dict="tiny"}'))
        -- The engine of dict tiny holds more keys than the dict: what the
        -- syncs could not copy is pending, and listed all the same (the
        -- engine renders its keys, each as c:get reads it).
        assert.is_true(prom:value('resty_counts_pending_keys{dict="tiny"}')
                       > 0)
        assert.equal(prom:value('resty_engine_keys{dict="tiny"}'),
                     prom:value('count(resty_counts_total{dict="tiny"})'))
        assert.equal(outcomes.refused,
                     prom:value('resty_engine_refused_keys_total'
                                .. '{dict="tiny"}'))
        assert.equal(100, prom:value('resty_limit_max_events'
                                     .. '{limiter="scenario"}'))
        for series, n in pairs(decisions) do
            assert.equal(n, prom:value(series), series)
        end
        assert.is_true(prom:value('resty_counts_syncs_total'
                                  .. '{dict="counters"}') > 0)

        -- Every query of the Grafana dashboard, its variables fixed (all
        -- instances, rates over 10 s), returns data: at the end of the
        -- load, where the rates are not 0 and the percentiles are numbers.
        local dashboard = assert(json.decode(assert(nginx.read_file(
            DASHBOARD))), DASHBOARD .. " is not JSON")
        local queries = 0
        for _, panel in ipairs(dashboard.panels) do
            if panel.type ~= "row" then
                assert.is_true(#(panel.targets or {}) > 0,
                               "no query in panel " .. panel.title)
            end
            for _, target in ipairs(panel.targets or {}) do
                local promql = target.expr
                    :gsub("%$__rate_interval", "10s")
                    :gsub("%$instance", ".*")
                assert.is_nil(promql:find("$", 1, true),
                              "a variable left in " .. promql)
                local result = prom:query(promql, load_end)
                local numbers = 0
                for _, r in ipairs(result) do
                    numbers = numbers + (r.value and 1 or 0)
                end
                assert.is_true(numbers > 0, panel.title .. ": no data for "
                               .. promql)
                queries = queries + 1
            end
        end
        assert.is_true(queries >= 20, queries .. " queries")

        srv:stop()          -- QUIT: the exit paths log too
        assert.same({}, srv:unexpected_errors({
            { 'dict "tiny": .*new keys are refused',
              "/new counts more keys than the engine of dict tiny holds" },
            { 'keys not copied to dict "tiny"',
              "and than the dict itself holds" },
        }))
    end)
end)
