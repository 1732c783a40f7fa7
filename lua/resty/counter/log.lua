-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- Logs runtime failures (Redis down, a full dict, a value past 2^53, a
-- lock that timed out) without flooding error.log. The first failure of a
-- cause is logged at once; while the cause goes on, one line per interval
-- (`log.interval`, default 10 s) tells how many there were:
--
--     resty.counter.lax: 12,040 failures in the last 10 s: <last message>
--
-- The count of a burst that ends is told with the next line of the same
-- cause. A cause is the message with its quoted names and its numbers
-- left out (`3 keys not flushed to dict "a" (key "k": timeout)` and `5
-- keys not flushed to dict "a" (key "j": timeout)` are one cause), unless
-- the caller names one.


local ngx = ngx
local ngx_log = ngx.log
local ngx_now = ngx.now
local ngx_ERR = ngx.ERR
local fmt = string.format
local gsub = string.gsub
local reverse = string.reverse


-- Causes remembered per worker; past this many they start afresh (a cause
-- forgotten is logged at once when it comes back).
local MAX_CAUSES = 1000


local _M = {
    _VERSION = "0.1.0",
    -- seconds between two lines of one cause
    interval = 10,
}


-- cause -> { since = the time of its last line, count = failures since }
local causes = {}
local cause_count = 0


-- 12040 as "12,040".
local function thousands(n)
    local text = reverse((gsub(reverse(fmt("%d", n)), "(%d%d%d)", "%1,")))
    return (gsub(text, "^(%-?),", "%1"))
end


local function seconds(elapsed)
    if elapsed >= 10 then
        return fmt("%.0f", elapsed)
    end
    return fmt("%.1f", elapsed)
end


-- syntax: logged = log.failure(source, msg, cause?, level?)
--
-- context: any phase where ngx.log works (all of them)
--
-- Logs `source: msg` at `level` (default ngx.ERR) when it is the first
-- failure of its cause, or the first one `log.interval` seconds or more
-- after the last line of that cause (then with the count of those
-- seconds); otherwise only counts it. Returns true when a line was written.
function _M.failure(source, msg, cause, level)
    local key = source .. "\n"
                .. (cause or gsub(gsub(msg, '"[^"]*"', '""'), "%d+", "#"))
    local now = ngx_now()
    local state = causes[key]
    if not state then
        if cause_count >= MAX_CAUSES then
            causes = {}
            cause_count = 0
        end
        causes[key] = { since = now, count = 0 }
        cause_count = cause_count + 1
        ngx_log(level or ngx_ERR, source, ": ", msg)
        return true
    end

    local count = state.count + 1
    local elapsed = now - state.since
    if elapsed < _M.interval then
        state.count = count
        return false
    end

    state.since, state.count = now, 0
    if count == 1 then
        ngx_log(level or ngx_ERR, source, ": ", msg)
    else
        ngx_log(level or ngx_ERR, source, ": ", thousands(count),
                " failures in the last ", seconds(elapsed), " s: ", msg)
    end
    return true
end


-- syntax: log.forget()
--
-- Forgets every cause (the next failure of each is logged at once): for
-- tests.
function _M.forget()
    causes = {}
    cause_count = 0
end


_M.thousands = thousands


return _M
