-- The body of the multi-worker races (spec/resty/strict_spec.lua): run by
-- requests to /race/content and /race/log of spec/nginx/unit.conf (in
-- whichever worker the kernel gives the connection), and by the spec
-- itself in worker 0. Each run adds what it saw to tallies in the "strict"
-- dict, kept with plain dict:incr (small numbers, exact as doubles).
--
-- Invariants the spec checks afterwards:
--   capped: inc_if(lt cap) applied exactly `cap` times in all, and the
--           value is exactly `cap`;
--   cas:    set_if(eq seen, seen + 1) succeeded exactly as many times as
--           the value says (no lost update);
--   pair:   inc_all of two keys is seen by get_all as equal, always.

local strict = require "resty.counter.strict"

local _M = {}


-- This worker's lax counter (one per worker: it owns a flush timer).
local lax_counter


-- Lax: every increment arrives, exactly, within a flush or two.
local function run_lax(opts)
    ngx.shared.lax:incr("tally:started:" .. ngx.worker.id(), 1, 0)
    if not lax_counter then
        lax_counter = assert(require("resty.counter.lax").new("lax",
                             { name = "race" }))
    end
    for i = 1, opts.n do
        lax_counter:inc("hits")
        lax_counter:inc("spread" .. (i % 7), 2)
    end
    local tally = ngx.shared.lax
    tally:incr("tally:sent", opts.n, 0)
    tally:incr("tally:worker:" .. ngx.worker.id(), 1, 0)
    tally:incr("tally:done", 1, 0)
end


function _M.run(opts)
    if not opts then
        local args = ngx.req.get_uri_args()
        opts = { n = tonumber(args.n), cap = tonumber(args.cap),
                 flavour = args.flavour }
    end
    if opts.flavour == "lax" then
        return run_lax(opts)
    end

    local tally = ngx.shared.strict
    tally:incr("tally:started:" .. ngx.worker.id(), 1, 0)

    local c = assert(strict.new("strict", { name = "race", timeout = 5 }))
    local applied, cas, errors, torn = 0, 0, 0, 0
    local first_err
    local pair = { { "pair_a", 1 }, { "pair_b", 1 } }
    local pair_keys = { "pair_a", "pair_b" }
    for _ = 1, opts.n do
        local new, old = c:inc_if("capped", "lt", opts.cap, 1)
        if not new then
            errors = errors + 1
            first_err = first_err or old
        elseif new ~= old then
            applied = applied + 1
        end

        local seen = c:get("cas")
        new, old = c:set_if("cas", "eq", seen, seen + 1)
        if not new then
            errors = errors + 1
            first_err = first_err or old
        elseif new ~= old then
            cas = cas + 1
        end

        local news, err = c:inc_all(pair)
        if not news then
            errors = errors + 1
            first_err = first_err or err
        end
        local values
        values, err = c:get_all(pair_keys)
        if not values then
            errors = errors + 1
            first_err = first_err or err
        elseif values[1] ~= values[2] then
            torn = torn + 1
        end
    end

    tally:incr("tally:waits:" .. ngx.get_phase(), c.waits, 0)
    tally:incr("tally:applied", applied, 0)
    tally:incr("tally:cas", cas, 0)
    tally:incr("tally:errors", errors, 0)
    tally:incr("tally:torn", torn, 0)
    tally:incr("tally:worker:" .. ngx.worker.id(), 1, 0)
    if first_err then
        tally:set("tally:first_err", first_err)
    end
    tally:incr("tally:done", 1, 0)
end


-- Sends `GET path` to this nginx from a light thread; the response body.
function _M.get(path)
    local sock = ngx.socket.tcp()
    sock:settimeout(30000)
    local ok, err = sock:connect("127.0.0.1", package.loaded["spec.port"])
    if not ok then
        return nil, err
    end
    sock:send("GET " .. path .. " HTTP/1.0\r\nHost: localhost\r\n\r\n")
    local body
    body, err = sock:receive("*a")
    sock:close()
    return body, err
end


return _M
