-- The status page of resty.counter.metrics in headless Chromium: 2 workers
-- under wrk load, with a request whose key is markup that would request
-- /canary if it ever ran. The page, loaded while the load runs, refreshes
-- from /status.json; the numbers in its DOM are those of the very JSON
-- body it last showed (nginx keeps each body it served), the hostile key
-- shows as text, and /canary is never requested (a control page that does
-- put the key into innerHTML shows that it would be). A screenshot is
-- taken; STATUS_SCREENSHOT=path keeps it (docs/status.png).

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"
local load = require "helpers.load"
local chromium = require "helpers.chromium"
local json = require "dkjson"

local CONF = assert(nginx.read_file("spec/scenario/status.conf"))

local HOSTILE = "<img src=x onerror=fetch('/canary')>"
local HOSTILE_PATH = "/%3Cimg%20src=x%20onerror=fetch(%27/canary%27)%3E"


local ENTITIES = { lt = "<", gt = ">", amp = "&", quot = '"', nbsp = "\194\160",
                   ["#39"] = "'" }


local function unescape(html)
    return (html:gsub("&(#?%w+);", function(name)
        return assert(ENTITIES[name], "entity &" .. name .. ";")
    end))
end


-- The rows of the table in <div id="`id`"> of a DOM: a list of rows, each
-- a list of cells { text =, value = (data-value as a number or string) }.
local function rows(dom, id)
    local box = dom:match('<div id="' .. id .. '">(.-)</div>')
    assert(box, "no #" .. id .. " in the page")
    local found = {}
    for tr in box:gmatch("<tr>(.-)</tr>") do
        local cells = {}
        for attrs, text in tr:gmatch("<td([^>]*)>(.-)</td>") do
            local value = attrs:match('data%-value="([^"]*)"')
            value = value and unescape(value)
            cells[#cells + 1] = { text = unescape(text),
                                  value = value and (tonumber(value) or value),
                                  attrs = attrs }
        end
        if #cells > 0 then
            found[#found + 1] = cells
        end
    end
    return found
end


-- The cells' texts before `from`, joined by "|", to index rows by.
local function row_id(cells, n)
    local texts = {}
    for i = 1, n do
        texts[i] = cells[i].text
    end
    return table.concat(texts, "|")
end


-- { [row id] = { values from cell `from` on } } of a table.
local function index(dom, id, n)
    local by_id = {}
    for _, cells in ipairs(rows(dom, id)) do
        local values = {}
        for i = n + 1, #cells do
            values[#values + 1] = cells[i].value
        end
        local key = row_id(cells, n)
        assert.is_nil(by_id[key], "row twice in #" .. id .. ": " .. key)
        by_id[key] = values
    end
    return by_id
end


-- What the page must show for a JSON body: the same tables, indexed the
-- same way, built from the JSON.
local function expected_tables(doc)
    local requests, limits, counters, values, figures = {}, {}, {}, {}, {}
    for _, r in ipairs(doc.requests) do
        for key, windows in pairs(r.stats.stats) do
            local w, p = windows.current, windows.prev1
            requests[r.dict .. "|" .. key] = {
                w.requests, w.rate, w.p50, w.p90, w.p99, w.max, p.requests }
        end
    end
    for _, l in ipairs(doc.limits) do
        limits[table.concat({ l.limiter, l.algorithm }, "|")] = {
            l.limit, l.window }
        limits[l.limiter] = { l.allowed, l.near_limit, l.rejected,
                              l.shadow_rejected, l.failed_open,
                              l.failed_closed }
    end
    for _, c in ipairs(doc.counters) do
        for _, kv in ipairs(c.keys) do
            counters[c.dict .. "|" .. kv.key] = { kv.value }
        end
    end
    for _, v in ipairs(doc.values) do
        for _, kv in ipairs(v.keys) do
            values[table.concat({ v.kind, v.dict, v.name, kv.key }, "|")] =
                { kv.value }
        end
    end
    for _, f in ipairs(doc.figures) do
        local names = {}
        for name in pairs(f.labels) do
            names[#names + 1] = name
        end
        table.sort(names)
        local labels = {}
        for i, name in ipairs(names) do
            labels[i] = name .. "=" .. json.encode(f.labels[name])
        end
        figures[f.name .. "|" .. table.concat(labels, ", ")] = { f.value }
    end
    return requests, limits, counters, values, figures
end


-- The limits table as expected_tables() indexes it: a row's settings
-- under "limiter|algorithm", its decisions under "limiter".
local function limit_rows(dom)
    local by_id = {}
    for _, cells in ipairs(rows(dom, "limits")) do
        by_id[cells[1].text .. "|" .. cells[2].text] = { cells[3].value,
                                                         cells[4].value }
        local decisions = {}
        for i = 6, 11 do
            decisions[#decisions + 1] = cells[i].value
        end
        by_id[cells[1].text] = decisions
    end
    return by_id
end


describe("the status page in headless Chromium", function()
    local srv

    after_each(function()
        if srv then
            srv:cleanup()
            srv = nil
        end
    end)

    it("shows the JSON it read, refreshes, and shows keys as text",
       function()
        srv = nginx.start({ workers = 2, http = CONF })
        local dir = srv.dir

        -- The control: markup put into innerHTML does request /canary in
        -- this Chromium.
        chromium.dump_dom(dir, srv:url("/control"), 2000)
        local canary = nginx.read_file(dir .. "/canary.log") or ""
        assert.matches("GET /canary%?control ", canary)

        local runs = {
            load.start(srv, "/", { seconds = 8, threads = 1,
                                   connections = 4 }),
            load.start(srv, "/api/items", { seconds = 8, threads = 1,
                                            connections = 4 }),
            load.start(srv, "/slow/x", { seconds = 8, threads = 1,
                                         connections = 4 }),
        }
        local status = srv:get(HOSTILE_PATH)
        assert.equal(200, status)
        nginx.sleep(1.5)
        srv:get("/times")       -- forget the snapshots served so far

        -- Under load: 4.5 s of the page's virtual time, a refresh every
        -- second.
        local dom = chromium.dump_dom(dir, srv:url("/status"), 4500)
        local times = {}
        for time in select(2, srv:get("/times")):gmatch("%S+") do
            times[#times + 1] = time
        end
        for _, run in ipairs(runs) do
            load.wait(run)
        end

        -- It refreshed, and shows the last JSON it was served.
        local refreshes = tonumber(dom:match('id="refreshes">(%d+)<'))
        assert.is_true(refreshes >= 3, "refreshes: " .. tostring(refreshes))
        assert.equal(refreshes, #times)
        local shown = dom:match('id="updated" data%-time="([^"]+)"')
                      or dom:match('data%-time="([^"]+)" id="updated"')
        assert.is_not_nil(shown, "no time on the page")
        assert.equal(times[#times], shown)
        local status_first, first = srv:get("/snapshot?t=" .. times[1])
        local status_last, last = srv:get("/snapshot?t=" .. shown)
        assert.equal(200, status_first)
        assert.equal(200, status_last)
        assert.are_not.equal(first, last, "the load changed nothing")
        local doc = assert(json.decode(last))

        -- The hostile key ran no script and made no element: /canary was
        -- requested by the control only.
        canary = nginx.read_file(dir .. "/canary.log") or ""
        assert.equal(1, select(2, canary:gsub("\n", "")), canary)
        assert.is_nil(dom:find("<img", 1, true))
        assert.equal("status &lt;scenario&gt;",
                     dom:match("<title>(.-)</title>"))

        -- Every number on the page is the JSON's.
        local requests, limits, counters, values, figures =
            expected_tables(doc)
        assert.same(requests, index(dom, "requests", 2))
        assert.same(limits, limit_rows(dom))
        assert.same(counters, index(dom, "counters", 2))
        assert.same(values, index(dom, "values", 4))
        assert.same(figures, index(dom, "figures", 2))
        -- ... and there was something to show.
        assert.is_true(counters["counters|GET /"][1] > 100)
        assert.is_true(requests["request_stats|/api/items"][1] > 100)
        local slow = requests["request_stats|/slow/x"]
        assert.is_true(slow[3] > 0 and slow[4] > slow[3] and slow[5] > 0,
                       "no latency: " .. table.concat(slow, " "))
        assert.is_true(limits.api[3] > 0, "nothing rejected")
        assert.is_true(limits.api_trial[4] > 0, "nothing shadow-rejected")
        -- The hostile key shows as text, in its cells.
        assert.is_not_nil(requests["request_stats|/" .. HOSTILE])
        assert.is_not_nil(counters["counters|GET /" .. HOSTILE])


        -- A screenshot of it.
        local png = dir .. "/status.png"
        chromium.screenshot(dir, srv:url("/status"), png, 1500)
        local keep = os.getenv("STATUS_SCREENSHOT")
        if keep and keep ~= "" then
            assert(nginx.sh("cp " .. nginx.quote(png) .. " "
                            .. nginx.quote(keep)))
        end
        canary = nginx.read_file(dir .. "/canary.log") or ""
        assert.equal(1, select(2, canary:gsub("\n", "")))

        srv:stop()
        assert.same({}, srv:unexpected_errors())
    end)
end)
