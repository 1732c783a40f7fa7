-- resty.counter.lifecycle inside a real nginx worker (spec/run-in-nginx.lua):
-- jobs run on their timers, never twice at once, back off after failures,
-- and run their final work once, in order, protected, at the premature
-- tick and at exit. Each spec runs on a registry of its own (the worker's
-- real jobs, the counters' of the other specs, are left alone), and
-- retires its jobs' timers after it.

local lifecycle = require "resty.counter.lifecycle"
local log = require "resty.counter.log"
local metrics = require "resty.counter.metrics"
local error_log = require "helpers.error_log"

local it_log = require("helpers.it_http")(function(name, fn)
    if error_log.available() then
        return it(name, fn)
    end
    return pending(name .. " (needs <prefix>/error.log)")
end, pending)


local function raised(fn, ...)
    local ok, err = pcall(fn, ...)
    assert(not ok, "expected an error")
    return err
end


local function now()
    ngx.update_time()
    return ngx.now()
end


-- Waits until cond() is true (up to `timeout` seconds: the machine may be
-- busy); returns what cond() last returned.
local function wait_for(cond, timeout)
    local deadline = now() + (timeout or 5)
    repeat
        local ok = cond()
        if ok then
            return ok
        end
        ngx.sleep(0.005)
    until now() > deadline
    return cond()
end


local function job_named(name)
    for _, job in ipairs(lifecycle.jobs()) do
        if job.name == name then
            return job
        end
    end
end


describe("resty.counter.lifecycle", function()
    local saved

    before_each(function()
        saved = lifecycle._swap()
        log.forget()
    end)

    after_each(function()
        local mine = lifecycle._swap(saved)
        -- Retire this spec's timers (nginx cannot cancel ngx.timer.every).
        for _, job in ipairs(mine.list) do
            job.generation = job.generation + 1
        end
    end)

    describe("every()", function()
        it("raises on bad arguments and unknown options, naming them", function()
            local f = function() end
            local cases = {
                { { nil, 1, f }, 'bad "name" argument: a non-empty string '
                                 .. "expected, got nil" },
                { { "", 1, f }, 'bad "name" argument: a non-empty string '
                                .. 'expected, got "" (a string)' },
                { { "j", 0, f }, 'bad "interval" argument: a positive finite '
                                 .. "number of seconds expected, got 0 (a "
                                 .. "number)" },
                { { "j", "1", f }, 'bad "interval" argument: a positive '
                                   .. 'finite number of seconds expected, got '
                                   .. '"1" (a string)' },
                { { "j", 1, "f" }, 'bad "handler" argument: function '
                                   .. 'expected, got "f" (a string)' },
                { { "j", 1, f, nil, 5 }, 'bad "opts" argument: table '
                                         .. "expected, got 5 (a number)" },
                { { "j", 1, f, nil, { ordre = 1 } },
                  'bad "opts" argument: unknown option "ordre" (did you mean '
                  .. '"order"?)' },
                { { "j", 1, f, nil, { when = 1 } },
                  'bad "opts" argument: unknown option "when" (known: order, '
                  .. "retry)" },
                { { "j", 1, f, nil, { order = 1.5 } },
                  'bad "opts.order" argument: an integer from 0 to 1000 '
                  .. "expected, got 1.5 (a number)" },
                { { "j", 1, f, nil, { retry = -1 } },
                  'bad "opts.retry" argument: a positive finite number of '
                  .. "seconds expected, got -1 (a number)" },
            }
            for _, case in ipairs(cases) do
                local err = raised(function()
                    -- a Lua caller, for the position error() blames
                    local job = lifecycle.every(unpack(case[1], 1, 5))
                    return job
                end)
                assert.matches(case[2], err, 1, true)
                -- blames the caller (this file), not lifecycle.lua
                assert.matches("lifecycle_spec.lua", err, 1, true)
            end
            assert.same({}, lifecycle.jobs(), "no job made by a raise")
            assert.matches('bad "handler" argument: function expected, got nil',
                           raised(lifecycle.later), 1, true)
        end)

        it("runs a job every interval with its argument", function()
            local seen = {}
            local arg = {}
            assert(lifecycle.every("spec runs", 0.01, function(a, reason)
                seen[#seen + 1] = { a, reason }
                return true
            end, arg))
            assert.is_true(wait_for(function() return #seen >= 3 end))
            assert.equal(arg, seen[1][1])
            assert.equal("tick", seen[1][2])

            local job = job_named("spec runs")
            assert.equal(0.01, job.interval)
            assert.equal(lifecycle.ORDER_DEFAULT, job.order)
            assert.is_true(job.runs >= 3)
            assert.equal(0, job.failures)
            assert.equal(0, job.overruns)
            assert.is_number(job.last_duration)
            assert.is_nil(job.last_error)
        end)

        it("keeps one job per name: a shorter interval replaces the timer", function()
            local first, second = 0, 0
            local before = ngx.timer.pending_count()
            assert(lifecycle.every("spec replaced", 3600, function()
                first = first + 1
                return true
            end))
            assert.equal(before + 1, ngx.timer.pending_count())

            -- A longer or equal interval makes no timer, but the handler
            -- and argument are the new ones.
            assert(lifecycle.every("spec replaced", 7200, function()
                first = first + 1
                return true
            end))
            assert.equal(before + 1, ngx.timer.pending_count())
            assert.equal(3600, job_named("spec replaced").interval)

            assert(lifecycle.every("spec replaced", 0.01, function()
                second = second + 1
                return true
            end))
            assert.equal(0.01, job_named("spec replaced").interval)
            assert.is_true(wait_for(function() return second >= 3 end))
            assert.equal(0, first)
            assert.equal(1, #lifecycle.jobs())
        end)

        it("never runs a job twice at once: a tick during a run is an overrun", function()
            local active, most, runs = 0, 0, 0
            assert(lifecycle.every("spec slow", 0.01, function()
                active = active + 1
                if active > most then
                    most = active
                end
                ngx.sleep(0.05)     -- yields past five intervals
                active = active - 1
                runs = runs + 1
                return true
            end))
            assert.is_true(wait_for(function() return runs >= 3 end))
            assert.equal(1, most)
            assert.is_true(job_named("spec slow").overruns >= 3,
                           "overruns: " .. job_named("spec slow").overruns)
        end)

        it("(the same handler on a bare ngx.timer.every overlaps)", function()
            -- What the guard prevents: nginx itself starts the next run
            -- while the last one still sleeps.
            local active, most, runs, stop = 0, 0, 0, false
            assert(ngx.timer.every(0.01, function()
                if stop then
                    return
                end
                active = active + 1
                if active > most then
                    most = active
                end
                ngx.sleep(0.05)
                active = active - 1
                runs = runs + 1
            end))
            assert.is_true(wait_for(function() return runs >= 3 end))
            stop = true
            assert.is_true(most > 1, "most at once: " .. most)
        end)

        it("backs off after failures with opts.retry, and not after a success", function()
            local fail, runs = true, 0
            assert(lifecycle.every("spec retry", 0.01, function()
                runs = runs + 1
                if fail then
                    return nil, "down"
                end
                return true
            end, nil, { retry = 0.1 }))
            local started = now()
            ngx.sleep(0.5)
            local elapsed = now() - started
            local job = job_named("spec retry")
            -- Waits of 0.01, 0.02, 0.04, 0.08, then 0.1 s: runs at about
            -- 0.01, 0.02, 0.04, 0.08, 0.16, 0.26, 0.36, 0.46 s: 8 in 0.5 s,
            -- where 50 ticks came.
            assert.is_true(runs >= 2, "runs: " .. runs)
            assert.is_true(runs <= 5 + elapsed / 0.1,
                           "runs: " .. runs .. " in " .. elapsed .. " s")
            assert.equal(runs, job.failures)
            assert.equal("down", job.last_error)
            assert.is_true(job.deferred > runs, "deferred: " .. job.deferred)

            -- A success ends the backoff: no tick is deferred after it.
            fail = false
            local before = runs
            assert.is_true(wait_for(function() return runs > before end))
            local deferred = job_named("spec retry").deferred
            local at = runs
            assert.is_true(wait_for(function() return runs >= at + 5 end))
            job = job_named("spec retry")
            assert.equal(deferred, job.deferred)
            assert.is_nil(job.last_error)
        end)

        it_log("logs a job that raises once per cause per interval, with a count", function()
            local interval = log.interval
            log.interval = 0.3
            local mark = error_log.mark()
            local runs = 0
            assert(lifecycle.every("spec raises", 0.01, function()
                runs = runs + 1
                error("spec job broke")
            end))
            assert.is_true(wait_for(function() return runs >= 10 end))
            local lines = error_log.since(mark, "spec job broke")
            assert.equal(1, #lines)
            assert.matches('resty.counter.lifecycle: job "spec raises" raised: '
                           .. ".*spec job broke", lines[1])
            assert.is_true(wait_for(function()
                return #error_log.since(mark, "spec job broke") == 2
            end))
            lines = error_log.since(mark, "spec job broke")
            assert.matches("failures in the last 0.%d s: job \"spec raises\"",
                           lines[2])
            log.interval = interval
            local job = job_named("spec raises")
            assert.equal(job.runs, job.failures)
            assert.matches("spec job broke", job.last_error, 1, true)
        end)
    end)

    describe("the premature tick", function()
        it("runs every job's final work once, in order, after a run in progress", function()
            local order = {}
            local slow_running = false
            local jobs = {}
            -- Registered in the wrong order on purpose.
            jobs.publish = assert(lifecycle.every("spec publish", 3600,
                function(_, reason)
                    order[#order + 1] = "publish " .. reason
                    return true
                end, nil, { order = lifecycle.ORDER_PUBLISH }))
            jobs.flush = assert(lifecycle.every("spec flush", 0.01,
                function(_, reason)
                    if reason == "tick" and #order == 0 then
                        slow_running = true
                        ngx.sleep(0.1)
                        slow_running = false
                    end
                    order[#order + 1] = "flush " .. reason
                    return true
                end, nil, { order = lifecycle.ORDER_FLUSH }))
            jobs.sync = assert(lifecycle.every("spec sync", 3600,
                function(_, reason)
                    order[#order + 1] = "sync " .. reason
                    return true
                end, nil, { order = lifecycle.ORDER_SYNC }))

            -- The flush job's tick is in its run (sleeping) when nginx
            -- would give the timers their premature tick.
            assert.is_true(wait_for(function() return slow_running end))
            local tick = lifecycle._tick
            tick(true, jobs.publish, jobs.publish.generation)
            assert.same({ "sync premature", "flush tick", "flush premature",
                          "publish premature" }, order)
            -- The other timers' premature ticks find it done.
            tick(true, jobs.sync, jobs.sync.generation)
            tick(true, jobs.flush, jobs.flush.generation)
            assert.equal(4, #order)
            for _, job in ipairs(lifecycle.jobs()) do
                assert.equal(0, job.failures)
            end
        end)
    end)

    describe("the premature tick (one order)", function()
        it("runs the final work of jobs of one order at once", function()
            -- Each takes 0.3 s (a lax counter retrying a Redis that is
            -- down): three of them one after the other would take 0.9 s.
            local ended = {}
            local jobs = {}
            for i = 1, 3 do
                jobs[i] = assert(lifecycle.every("spec slow final " .. i,
                    3600, function(_, reason)
                        if reason == "premature" then
                            ngx.sleep(0.3)
                            ended[#ended + 1] = i
                        end
                        return true
                    end, nil, { order = lifecycle.ORDER_FLUSH }))
            end
            local last_ran = false
            assert(lifecycle.every("spec after them", 3600, function()
                last_ran = #ended == 3
                return true
            end, nil, { order = lifecycle.ORDER_PUBLISH }))
            local started = now()
            lifecycle._tick(true, jobs[1], jobs[1].generation)
            local took = now() - started
            assert.equal(3, #ended)
            assert.is_true(last_ran, "the next order ran before they ended")
            assert.is_true(took < 0.6, "took " .. took .. " s")
        end)
    end)

    describe("exit()", function()
        it("runs every job once, in order, one failing or raising not "
           .. "stopping the others", function()
            local ran = {}
            local function job(name, order, outcome)
                assert(lifecycle.every(name, 3600, function(_, reason)
                    ran[#ran + 1] = name .. " " .. reason
                    if outcome == "raise" then
                        error("spec exit raised")
                    end
                    if outcome == "fail" then
                        return nil, "spec exit failed"
                    end
                    return true
                end, nil, { order = order }))
            end
            job("spec third", 300, "ok")
            job("spec first", 100, "raise")
            job("spec second", 200, "fail")
            -- A job with final work only (no interval, no timer).
            local before = ngx.timer.pending_count()
            assert(lifecycle.every("spec final only", nil, function(_, reason)
                ran[#ran + 1] = "spec final only " .. reason
                return true
            end, nil, { order = 400 }))
            assert.equal(before, ngx.timer.pending_count())
            assert.is_nil(job_named("spec final only").interval)

            assert.is_nil(lifecycle.exit())
            assert.same({ "spec first exit", "spec second exit",
                          "spec third exit", "spec final only exit" }, ran)
            assert.matches("spec exit raised",
                           job_named("spec first").last_error, 1, true)
            assert.equal("spec exit failed", job_named("spec second").last_error)
            assert.equal(1, job_named("spec first").failures)
            assert.equal(0, job_named("spec third").failures)

            -- Called again (counter.sync_all(), lax.flush_all() and
            -- metrics.publish_all() all call it in exit_worker_by_lua*),
            -- it runs nothing twice.
            assert.is_true(lifecycle.exit())
            assert.equal(4, #ran)
        end)
    end)

    describe("later()", function()
        it("runs a handler once from a zero-delay timer", function()
            local got
            assert.is_true(lifecycle.later(function(a)
                got = a
            end, "spec later"))
            assert.is_true(wait_for(function() return got ~= nil end))
            assert.equal("spec later", got)
        end)
    end)

    describe("resty.counter.metrics", function()
        it("exports each job's runs, failures, overruns and last duration", function()
            local runs = 0
            assert(lifecycle.every("spec metrics", 0.01, function()
                runs = runs + 1
                if runs % 2 == 0 then
                    return nil, "even"
                end
                return true
            end))
            local m = assert(metrics.new("metrics", { name = "spec_lifecycle" }))
            assert.is_true(wait_for(function() return runs >= 4 end))
            local job = job_named("spec metrics")
            local text = m:render()
            local function value(family)
                local v = text:match(family .. '{job="spec metrics"} (%S+)')
                return tonumber(v)
            end
            -- render() publishes first: the figures are this worker's now
            -- (another worker runs no such job).
            local rendered_runs = value("resty_lifecycle_runs_total")
            assert.is_true(rendered_runs >= job.runs, text)
            assert.is_true(value("resty_lifecycle_failures_total") >= 1, text)
            assert.equal(0, value("resty_lifecycle_overruns_total"))
            assert.is_number(value("resty_lifecycle_last_duration_seconds"))
            assert.matches("# TYPE resty_lifecycle_runs_total counter", text,
                           1, true)

            local doc = require("dkjson").decode(m:json())
            local found
            for _, j in ipairs(doc.jobs) do
                if j.job == "spec metrics" then
                    found = j
                end
            end
            assert.is_table(found)
            assert.equal(0.01, found.interval)
            assert.is_true(found.runs >= 4)
        end)
    end)
end)
