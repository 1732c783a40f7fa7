-- Copyright (C) lua-resty-counter-rs authors. Apache License 2.0.
--
-- The periodic work of every module, in one place: the only code in lua/
-- that makes nginx timers. A module registers a job per worker (a name, an
-- interval, a handler and its argument); this module runs it, never twice
-- at once, retries it with a backoff after a failure, logs what it raised,
-- counts its runs, and runs its final work when the worker goes:
--
-- * A tick that finds the job's previous run still running (it yielded
--   longer than the interval) is skipped and counted as an overrun: missed
--   ticks are not made up, the next run is the next tick after the running
--   one ends (at most one interval later).
-- * Registering a name again keeps one job: the new handler and argument
--   replace the old ones, and a shorter interval (or the first one, for a
--   job registered without) replaces its timer; the old timer, retired,
--   does nothing from then on.
-- * On reload and graceful shutdown (HUP, QUIT) nginx runs every timer
--   once more, `premature`: the first such tick runs the final work of
--   every job of the worker, once each, in the jobs' `order` (resty.counter
--   syncs, then lax flushes, then metrics publish what they counted; jobs
--   of one order at once, each in a light thread); a job still running is
--   waited for first (up to FINAL_WAIT seconds). No tick runs after it.
-- * `lifecycle.exit()` in exit_worker_by_lua* runs the same final work
--   again, in the same order, for what requests in flight counted after
--   the premature tick (or for all of it after a fast shutdown, TERM,
--   which runs no premature tick). There nginx has no timers and no
--   cosockets, and no run can be in progress any more: a run that a fast
--   shutdown cut in the middle never resumes. Each job runs protected:
--   one that fails or raises never stops the others.
--
-- A handler is called as `handler(arg, reason)`, reason "tick",
-- "premature" or "exit", and returns true, or nil and an error (which it
-- has logged: the modules word their own, through resty.counter.log); one
-- that raises is logged here, once per cause per log.interval with a
-- count. Each job's figures (`lifecycle.jobs()`) are exported by
-- resty.counter.metrics as the library's own. See docs/lifecycle.md.


local backoff = require "resty.counter.backoff"
local check = require "resty.counter.check"
local log = require "resty.counter.log"


local ngx = ngx
local ngx_now = ngx.now
local ngx_sleep = ngx.sleep
local spawn = ngx.thread.spawn
local wait = ngx.thread.wait
local ngx_log = ngx.log
local ngx_WARN = ngx.WARN
local get_phase = ngx.get_phase
local timer_every = ngx.timer.every
local timer_at = ngx.timer.at
local log_failure = log.failure
local expected = check.expected
local pcall = pcall
local tostring = tostring
local type = type
local sort = table.sort
local fmt = string.format


local SOURCE = "resty.counter.lifecycle"

-- How long the final work waits for a run of the same job in progress.
local FINAL_WAIT = 10

-- The options of lifecycle.every.
local OPTIONS = { order = true, retry = true }


local _M = {
    _VERSION = "0.1.0",
    -- The orders of the library's jobs: counts are synced and flushed
    -- before the figures about them are published.
    ORDER_SYNC = 100,
    ORDER_FLUSH = 200,
    ORDER_DEFAULT = 500,
    ORDER_PUBLISH = 900,
}


-- This worker's jobs: { list = { job... } in registration order, by_name,
-- finalizing = true once a premature tick began the final work }. One
-- table, so that the specs can run on one of their own (_M._swap).
local function new_registry()
    return { list = {}, by_name = {}, finalizing = false, seq = 0 }
end
local registry = new_registry()


-- The jobs in the order their final work runs.
local function in_order(reg)
    local list = {}
    for i = 1, #reg.list do
        list[i] = reg.list[i]
    end
    sort(list, function(a, b)
        if a.order ~= b.order then
            return a.order < b.order
        end
        return a.seq < b.seq
    end)
    return list
end


-- Runs a job's handler once, protected, and counts it. True when it
-- succeeded. Its duration is read on nginx's cached clock, which the
-- event loop updates: a run that never yields lasts 0 there. (Not
-- ngx.update_time(): called around every run of every job, the Redis
-- Cluster specs, whose timeouts are 100 ms, failed in 3 of 7 runs after
-- lax_redis_spec's counters on a busy machine; 0 of 5 without it.)
local function run(job, reason)
    job.running = true
    local started = ngx_now()
    local fine, ok, err = pcall(job.handler, job.arg, reason)
    job.running = false
    job.last_duration = ngx_now() - started
    job.runs = job.runs + 1

    if not fine then
        err = "raised: " .. tostring(ok)
        ok = nil
        log_failure(SOURCE, fmt('job "%s" %s', job.name, err))
    end
    if ok then
        job.last_error = nil
        return true
    end
    job.failures = job.failures + 1
    job.last_error = tostring(err or "failed")
    return nil
end


-- A job's final run at the premature tick, after its run in progress if
-- any.
local function final_run(job)
    if job.running then
        local deadline = ngx_now() + FINAL_WAIT
        repeat
            ngx_sleep(0.001)
        until not job.running or ngx_now() > deadline
    end
    if job.running then
        job.failures = job.failures + 1
        job.last_error = "its run took more than " .. FINAL_WAIT
                         .. " s: no final run"
        ngx_log(ngx_WARN, SOURCE, ": ", fmt('job "%s": %s', job.name,
                                            job.last_error))
        return
    end
    run(job, "premature")
end


-- The final work of every job, after the first premature tick: once
-- each, in order. Jobs of one order run at once, each in a light thread
-- (a lax counter on a Redis that is down retries for its exit_timeout:
-- ten of them one after the other kept an exiting worker alive ten
-- times as long); the next order starts when they all ended.
local function finalize(reg)
    reg.finalizing = true
    local jobs = in_order(reg)
    local i = 1
    while jobs[i] do
        local threads = {}
        local order = jobs[i].order
        while jobs[i] and jobs[i].order == order do
            local thread = spawn(final_run, jobs[i])
            if thread then
                threads[#threads + 1] = thread
            else
                final_run(jobs[i])
            end
            i = i + 1
        end
        for t = 1, #threads do
            wait(threads[t])
        end
    end
end


-- A job's timer callback. `generation` retires the timers a shorter
-- interval replaced.
local function tick(premature, job, generation)
    if generation ~= job.generation then
        return
    end
    local reg = job.registry
    if premature then
        -- Every timer of the worker comes here once: the first does it all.
        if not reg.finalizing then
            finalize(reg)
        end
        return
    end
    if reg.finalizing then
        -- (nginx gives no tick after the premature one; a spec's might)
        return
    end
    if job.running then
        job.overruns = job.overruns + 1
        return
    end
    local retry = job.retry
    if retry and not retry:due() then
        job.deferred = job.deferred + 1
        return
    end
    local ok = run(job, "tick")
    if retry then
        retry:result(ok)
    end
end
_M._tick = tick


-- Makes the job's timer for `interval`, retiring the one before.
local function start_timer(job, interval)
    if get_phase() == "init" then
        return nil, "cannot create a timer in init_by_lua*: register the "
                    .. "job in init_worker_by_lua*"
    end
    local generation = job.generation + 1
    local ok, err = timer_every(interval, tick, job, generation)
    if not ok then
        return nil, err
    end
    job.generation = generation
    job.interval = interval
    return true
end


-- syntax: job, err = lifecycle.every(name, interval, handler, arg?, opts?)
--
-- context: init_worker_by_lua* and later phases; init_by_lua* too without
-- an interval
--
-- Registers this worker's job `name` (a non-empty string): `handler(arg,
-- reason)` every `interval` seconds (a positive number; nil for a job
-- with final work only, run at exit), and its final work (see the top of
-- this file). opts.order (an integer, default lifecycle.ORDER_DEFAULT):
-- lower runs first at exit. opts.retry (seconds): after a failed tick the
-- next waits `interval`, then twice as long each failure in a row, up to
-- opts.retry (resty.counter.backoff); without it every tick runs.
-- Registering a name again updates the job (see the top). Returns the job
-- (its figures: see lifecycle.jobs), or nil and an error when nginx would
-- not make the timer. Misuse raises.
function _M.every(name, interval, handler, arg, opts)
    check.text(name, "name", 2)
    check.seconds(interval, "interval", 2, false)
    check.func(handler, "handler", 2)
    opts = check.table(opts, "opts", 2)
    check.options(opts, OPTIONS, "opts", 2)
    local order = check.integer(opts.order, "opts.order", 0, 1000, 2,
                                _M.ORDER_DEFAULT)
    local retry = check.seconds(opts.retry, "opts.retry", 2, false)

    local reg = registry
    local job = reg.by_name[name]
    local made = false
    if not job then
        reg.seq = reg.seq + 1
        job = {
            name = name, seq = reg.seq, registry = reg, generation = 0,
            interval = nil, running = false,
            runs = 0, failures = 0, overruns = 0, deferred = 0,
            last_duration = nil, last_error = nil,
        }
        made = true
    end

    if interval and (not job.interval or interval < job.interval) then
        local ok, err = start_timer(job, interval)
        if not ok then
            return nil, err
        end
    end

    job.handler, job.arg, job.order = handler, arg, order
    if retry then
        job.retry = backoff.new(job.interval or retry, retry)
    else
        job.retry = nil
    end
    if made then
        reg.by_name[name] = job
        reg.list[#reg.list + 1] = job
    end
    return job
end


-- syntax: ok, err = lifecycle.later(handler, arg?)
--
-- context: where timers can be made (not init_by_lua*, not
-- exit_worker_by_lua*; in an exiting worker too)
--
-- Runs `handler(arg)` once, as soon as the event loop turns (a zero-delay
-- timer: cosockets and ngx.sleep work there, and an exiting worker waits
-- for it). Returns true, or nil and an error where it cannot; never
-- raises for that. What the handler raises is logged.
local function later_run(premature, handler, arg) -- luacheck: ignore
    local fine, err = pcall(handler, arg)
    if not fine then
        log_failure(SOURCE, "a run by lifecycle.later raised: "
                            .. tostring(err))
    end
end


function _M.later(handler, arg)
    check.func(handler, "handler", 2)
    local fine, ok, err = pcall(timer_at, 0, later_run, handler, arg)
    if not fine then
        return nil, tostring(ok)
    end
    if not ok then
        return nil, err
    end
    return true
end


-- syntax: ok = lifecycle.exit()
--
-- context: exit_worker_by_lua* (anywhere, but meant for there)
--
-- Runs the final work of every job of this worker, once per exit, in
-- order, each protected: one job failing or raising never stops the
-- others. Never raises; nil when a job failed (each failure is logged by
-- its job, a raise here). The line for exit_worker_by_lua_block:
--
--     require("resty.counter.lifecycle").exit()
--
-- (counter.sync_all(), lax.flush_all() and metrics.publish_all() call it
-- there too: the lines written for them keep working, whatever their
-- order.)
function _M.exit()
    local ok = true
    local jobs = in_order(registry)
    for i = 1, #jobs do
        local job = jobs[i]
        if not job.exited then
            job.exited = true
            -- No run is in progress any more (see the top of this file).
            job.running = false
            if not run(job, "exit") then
                ok = nil
            end
        end
    end
    return ok
end


-- syntax: list = lifecycle.jobs()
--
-- context: any phase
--
-- This worker's jobs in registration order, each a table: name, interval
-- (nil for final work only), order, runs, failures (runs that returned an
-- error or raised), overruns (ticks skipped because the previous run still
-- ran), deferred (ticks skipped while a retry waited), last_duration
-- (seconds, nil before the first run), last_error (of the last run; nil
-- when it succeeded), running.
function _M.jobs()
    local out = {}
    local list = registry.list
    for i = 1, #list do
        local job = list[i]
        out[i] = {
            name = job.name, interval = job.interval, order = job.order,
            runs = job.runs, failures = job.failures,
            overruns = job.overruns, deferred = job.deferred,
            last_duration = job.last_duration, last_error = job.last_error,
            running = job.running,
        }
    end
    return out
end


-- For the specs: puts `reg` (a fresh registry when nil) in place of this
-- worker's jobs and returns the one it replaces.
function _M._swap(reg)
    if reg ~= nil and type(reg) ~= "table" then
        expected("reg", "table", reg, 2)
    end
    local old = registry
    registry = reg or new_registry()
    return old
end


return _M
