-- Scrapes that never stall (issue 12): with 2 workers, the p99 latency of a
-- cheap location under wrk stays within 2x of its p99 without scraping
-- while another client scrapes stats() of 100,000 request keys in a loop
-- (spec/scenario/scrape.conf). A scrape reads and renders a step of keys,
-- then pauses for 1 ms: the worker serves its other requests meanwhile.

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"
local load = require "helpers.load"

local CONF = assert(nginx.read_file("spec/scenario/scrape.conf"))

local KEYS = 100000
local ROUNDS = 3
local SECONDS = 4


local p99_ms = load.p99_ms
local requests_done = load.requests_done


-- The p99 of /cheap over SECONDS, with a client scraping /scrape in a
-- loop meanwhile when `scraping`; and how many scrapes finished.
local function measure(srv, scraping)
    local scraper
    if scraping then
        scraper = load.start(srv, "/scrape", { threads = 1, connections = 1,
                                               seconds = SECONDS + 1 })
        -- The first scrape is under way.
        nginx.sleep(0.5)
    end
    local cheap = load.wait(load.start(srv, "/cheap", {
        threads = 1, connections = 16, seconds = SECONDS, latency = true }))
    local scrapes = scraper and requests_done(load.wait(scraper)) or 0
    assert(requests_done(cheap) > 1000, "wrk sent too little: " .. cheap)
    return p99_ms(cheap), scrapes
end


local function median(values)
    table.sort(values)
    return values[math.ceil(#values / 2)]
end


describe("a scrape of 100,000 request keys", function()
    local srv

    setup(function()
        srv = nginx.start({ workers = 2, http = CONF, log_level = "warn" })
        for from = 1, KEYS, 25000 do
            local status, body = srv:get("/fill?from=" .. from .. "&to="
                                         .. (from + 24999))
            assert(status == 200, "fill failed: " .. tostring(body))
        end
    end)

    teardown(function()
        if srv then
            srv:cleanup()
        end
    end)

    it("returns every key", function()
        local status, body = srv:get("/scrape")
        assert.equal(200, status)
        local _, keys = body:gsub('"/key/%d+":{"current"', "")
        assert.equal(KEYS, keys)
    end)

    it("keeps the p99 of other requests within 2x", function()
        local without, with, scrapes = {}, {}, 0
        for _ = 1, ROUNDS do
            without[#without + 1] = measure(srv, false)
            local p99, done = measure(srv, true)
            with[#with + 1] = p99
            scrapes = scrapes + done
        end
        local base, scraped = median(without), median(with)
        print(string.format("p99 ms without scraping %s, with %s; %d scrapes",
                            table.concat(without, " "),
                            table.concat(with, " "), scrapes))
        assert.is_true(scrapes >= ROUNDS * 2, "too few scrapes: " .. scrapes)
        assert.is_true(scraped <= 2 * base,
                       string.format("p99 %.2f ms with scraping, %.2f without",
                                     scraped, base))
        assert.same({}, srv:unexpected_errors())
    end)
end)
