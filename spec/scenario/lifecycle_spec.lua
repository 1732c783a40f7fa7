-- resty.counter through an nginx's lifecycle, beyond HUP, QUIT, TERM and
-- SIGKILL (engine_spec.lua, reload_spec.lua, spec/chaos): a binary upgrade
-- under load, workers running as another user than the master (a lock
-- held by a killed worker; a reload to workers of a third user), two
-- instances of one config, and what a clean stop leaves. Counts are
-- compared with the access log, which names the worker of each request.

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"
local load = require "helpers.load"

local CONF = assert(nginx.read_file("spec/scenario/lifecycle.conf"))
local NOBODY = 65534
local DAEMON = 1

local AS_ROOT = nginx.read("id -u"):match("%d+") == "0"
local it_root = AS_ROOT and it or function(name)
    pending(name .. " (needs root: the master must change user)")
end


local function alive(pid)
    return nginx.sh("kill -0 " .. pid .. " 2>/dev/null")
end


-- The pids of a process's children, as strings.
local function children(pid)
    local pids = {}
    for child in nginx.read("pgrep -P " .. pid):gmatch("%d+") do
        pids[#pids + 1] = child
    end
    return pids
end


-- The real uid a process runs as.
local function uid(pid)
    local status = nginx.read_file("/proc/" .. pid .. "/status") or ""
    return tonumber(status:match("\nUid:%s+(%d+)"))
end


-- Polls `ready` every 0.1 s for `seconds`; raises naming `what` if it never
-- returns true.
local function wait_for(what, seconds, ready)
    for _ = 1, seconds * 10 do
        if ready() then
            return
        end
        nginx.sleep(0.1)
    end
    error("no " .. what .. " within " .. seconds .. " s", 2)
end


-- From the access log: { [pid] = { [uri] = requests } }.
local function served(srv)
    local by_pid = {}
    local f = io.open(srv.dir .. "/access.log")
    if f then
        for line in f:lines() do
            local pid, uri = line:match("^(%d+) (%S+) %d+$")
            if uri then
                local per_uri = by_pid[pid] or {}
                by_pid[pid] = per_uri
                per_uri[uri] = (per_uri[uri] or 0) + 1
            end
        end
        f:close()
    end
    return by_pid
end


-- The requests of the workers in `pids` (all when nil) by URI, and their
-- total.
local function served_by(by_pid, pids)
    local per_uri, total = {}, 0
    for pid, counts in pairs(by_pid) do
        local wanted = pids == nil
        for _, p in ipairs(pids or {}) do
            wanted = wanted or p == pid
        end
        if wanted then
            for uri, n in pairs(counts) do
                per_uri[uri] = (per_uri[uri] or 0) + n
                total = total + n
            end
        end
    end
    return per_uri, total
end


-- The values nginx holds for `uris` (a set), from the engine or, with
-- from = "dict", from the dict's copy; and the pid of the master whose
-- worker answered.
local function values(srv, uris, from)
    local list = {}
    for uri in pairs(uris) do
        list[#list + 1] = (uri:gsub("&", "%%26"))
    end
    local status, body = srv:get("/values?from=" .. (from or "engine")
                                 .. "&uris=" .. table.concat(list, ","))
    assert.equal(200, status)
    local per_uri = {}
    for uri, value in body:gmatch("(/%S+) (%S+)") do
        if tonumber(value) ~= 0 then
            per_uri[uri] = tonumber(value)
        end
    end
    return per_uri, body:match("^master (%d+)")
end


-- How far two { [uri] = n } tables are apart: the sum of the differences.
local function distance(a, b)
    local off = 0
    for uri, n in pairs(a) do
        off = off + math.abs(n - (b[uri] or 0))
    end
    for uri, n in pairs(b) do
        if a[uri] == nil then
            off = off + n
        end
    end
    return off
end


local function total(per_uri)
    local sum = 0
    for _, n in pairs(per_uri) do
        sum = sum + n
    end
    return sum
end


-- Sends `signal` to `pid` and waits (15 s at most) until `done` says what
-- it meant to happen has.
local function signal_and_wait(pid, signal, what, done)
    assert(nginx.sh("kill -" .. signal .. " " .. pid))
    wait_for(what, 15, done)
end


-- Has a worker of `srv` take the dict's sync lock and keep it `seconds`
-- (the location /hold); its pid once it holds it.
local function hold(srv, seconds)
    nginx.sh("curl -s -o /dev/null --max-time 40 "
             .. nginx.quote(srv:url("/hold?s=" .. seconds)) .. " &")
    local holder
    wait_for("lock holder", 10, function()
        holder = nginx.read_file(srv.dir .. "/holder.pid")
        return holder
    end)
    return holder
end


-- The [error] lines and worse of a stopped server, but the master's report
-- of the workers the test killed with SIGKILL.
local function errors_but_kills(srv, allowed)
    return srv:errors_but_kills(allowed)
end


-- What exists of named shared memory on the host: /dev/shm's entries and
-- the ids of System V segments.
local function named_shared_memory()
    return nginx.read("ls -A /dev/shm"),
           nginx.read("ipcs -m | awk 'NR > 3 { print $2 }'")
end


-- A running nginx process maps no shared memory but nginx's anonymous
-- zones (/dev/zero: gone with the last process that maps them), and holds
-- open no file but its logs.
local function assert_holds_nothing_named(srv, pid)
    local maps = assert(nginx.read_file("/proc/" .. pid .. "/maps"))
    local zones = 0
    for perms, path in maps:gmatch("%S+ (%S+) %S+ %S+ %S+ *([^\n]*)") do
        if perms:sub(4, 4) == "s" then
            assert.equal("/dev/zero (deleted)", path, pid .. ": " .. path)
            zones = zones + 1
        end
    end
    assert.is_true(zones > 0, pid .. " maps no zone")
    for target in nginx.read("ls -l /proc/" .. pid .. "/fd")
                  :gmatch("-> (/[^\n]*)")
    do
        local log = target:find(srv.dir, 1, true) == 1
                    or target:find("^/var/log/nginx/") or target == "/dev/null"
        assert.is_truthy(log, pid .. " holds " .. target .. " open")
    end
end


-- After a stop: no process names the server's folder, and the folder holds
-- the config, the logs and what the test itself wrote (wrk's script, the
-- exit dumps, the code the workers load when they cannot read the
-- checkout), nothing else: not even the pid file. An nginx built with its
-- temporary folders in the prefix (OpenResty's) makes them at start; they
-- must be empty.
local function assert_nothing_left(srv)
    for pid in nginx.read("ls /proc"):gmatch("%d+") do
        local cmdline = nginx.read_file("/proc/" .. pid .. "/cmdline")
        assert.is_falsy(cmdline and cmdline:find(srv.dir, 1, true),
                        pid .. " names the server's folder")
    end
    for name in nginx.read("ls -A " .. srv.dir):gmatch("[^\n]+") do
        local known = name == "nginx.conf" or name == "error.log"
                      or name == "access.log" or name == "stdout.log"
                      or name == "code" or name:find("^wrk%-")
                      or name:find("^exit%.")
        -- The prefix's logs/ (the spec helper makes it, as a prefix of
        -- its own has it) and an nginx's temporary folders: empty.
        if name == "logs" or name:find("^[%l_]+_temp$") then
            local left = nginx.read("ls -A " .. srv.dir .. "/" .. name)
                              :gsub("%s+$", "")
            -- An nginx whose compiled-in error log is under its prefix
            -- (OpenResty's: logs/error.log) opens it before it reads the
            -- config's error_log.
            known = left == "" or (name == "logs" and left == "error.log")
            name = name .. " (" .. left:gsub("\n", " ") .. ")"
        end
        assert.is_truthy(known, "left behind: " .. name)
    end
end


describe("resty.counter through nginx's lifecycle", function()
    local servers = {}
    local masters = {}

    local function start(opts)
        opts.http = CONF
        opts.workers = opts.workers or 2
        local srv = nginx.start(opts)
        servers[#servers + 1] = srv
        return srv
    end

    after_each(function()
        -- A master of a binary upgrade that its test left running (the
        -- pid file names one only); a pid is signalled only while its
        -- command line still names the test's folder.
        for pid, dir in pairs(masters) do
            local cmdline = nginx.read_file("/proc/" .. pid .. "/cmdline")
            if cmdline and cmdline:find(dir, 1, true) then
                nginx.sh("kill -QUIT " .. pid)
            end
        end
        for _, srv in ipairs(servers) do
            srv:cleanup()
        end
        servers, masters = {}, {}
    end)

    -- Starts nginx and `seconds` of load, a new connection for every
    -- request (the kernel hands each to any worker listening, of either
    -- master). After 1 s, USR2 to the master: it renames its pid file and
    -- starts the same binary with the same arguments, handing the
    -- listening sockets over in the environment (NGINX); the new master
    -- maps new zones. Returns the server, the load, and both masters
    -- (numbers) and their workers (strings), once the new master has its
    -- 2 workers.
    local function upgrade_under_load(seconds)
        local srv = start({})
        local run = load.start(srv, "/fast", { seconds = seconds, keys = 10,
                                               close = true })
        nginx.sleep(1)
        local old_master = srv:pid()
        local old_workers = children(old_master)
        assert.equal(2, #old_workers)
        -- The new binary opens its built-in error log before it reads the
        -- config, and says so in the old master's error log when it cannot:
        -- <prefix>/logs/ for OpenResty's, which an installed prefix has.
        assert(nginx.sh("mkdir -p " .. srv.dir .. "/logs"))
        srv:signal("USR2")
        masters[old_master] = srv.dir
        local new_master, new_workers
        wait_for("new master with 2 workers", 10, function()
            new_master = srv:pid()
            new_workers = new_master and new_master ~= old_master
                          and children(new_master)
            return new_workers and #new_workers == 2
        end)
        masters[new_master] = srv.dir
        assert.is_truthy(nginx.read_file(srv.dir .. "/nginx.pid.oldbin"))
        return srv, run, old_master, old_workers, new_master, new_workers
    end

    it("binary upgrade: old and new workers count apart, each exact;"
       .. " the old counts end with the old master", function()
        local srv, run, old_master, old_workers, new_master, new_workers =
            upgrade_under_load(7)
        local _, old_before = served_by(served(srv), old_workers)

        -- Both instances serve for a while, then the old master stops.
        nginx.sleep(1.5)
        local by_pid = served(srv)
        local _, old_during = served_by(by_pid, old_workers)
        local _, new_during = served_by(by_pid, new_workers)
        assert.is_true(old_during > old_before, "old workers served on")
        assert.is_true(new_during > 0, "new workers served")
        signal_and_wait(old_master, "QUIT", "exit of the old master", function()
            return not alive(old_master)
        end)
        load.wait(run)

        by_pid = served(srv)
        local old, old_total = served_by(by_pid, old_workers)
        local new, new_total = served_by(by_pid, new_workers)
        local all, all_total = served_by(by_pid)
        assert.equal(all_total, old_total + new_total, "no other worker")
        assert.is_true(new_total > old_during, "the new ones served on")

        -- The new instance counted its own workers' requests, exactly,
        -- and none of the old ones'.
        local engine, master = values(srv, all)
        assert.equal(tostring(new_master), master)
        assert.same(new, engine)

        -- The old one had counted its own exactly: each old worker synced
        -- into the old dict as it exited and wrote what the dict then held
        -- (values only grow: the highest is the last).
        local last = {}
        for _, pid in ipairs(old_workers) do
            local dump = nginx.read_file(srv.dir .. "/exit." .. old_master
                                         .. "." .. pid)
            assert.is_truthy(dump, "old worker " .. pid .. " wrote no exit")
            for uri, n in dump:gmatch("(%S+) (%d+)") do
                last[uri] = math.max(last[uri] or 0, tonumber(n))
            end
        end
        assert.same(old, last)

        srv:stop()
        assert.same({}, srv:unexpected_errors())
    end)

    it("binary upgrade rolled back (USR2, WINCH, HUP of the old master,"
       .. " QUIT of the new): the old engine kept its counts", function()
        local srv, run, old_master, old_workers, new_master, new_workers =
            upgrade_under_load(8)

        -- WINCH: the old workers stop gracefully; the old master and its
        -- zones stay, and only the new workers serve.
        signal_and_wait(old_master, "WINCH", "exit of the old workers",
                        function()
            return not alive(old_workers[1]) and not alive(old_workers[2])
        end)
        nginx.sleep(1)

        -- Back: HUP starts the old master's workers again, on the zones
        -- it kept; QUIT stops the new master and its workers.
        local relaunched
        signal_and_wait(old_master, "HUP", "old master's workers again",
                        function()
            relaunched = {}
            for _, pid in ipairs(children(old_master)) do
                if pid ~= tostring(new_master) then
                    relaunched[#relaunched + 1] = pid
                end
            end
            return #relaunched == 2
        end)
        signal_and_wait(new_master, "QUIT", "exit of the new master",
                        function()
            return not alive(new_master) and srv:pid() == old_master
        end)
        load.wait(run)

        -- The old engine holds every request of the old master's workers,
        -- those before the upgrade and those after the rollback; the new
        -- workers' requests were counted in the new master's zone, gone
        -- with it.
        local by_pid = served(srv)
        local old = served_by(by_pid, { old_workers[1], old_workers[2],
                                        relaunched[1], relaunched[2] })
        local _, new_total = served_by(by_pid, new_workers)
        local all = served_by(by_pid)
        assert.is_true(new_total > 0, "new workers served")
        local engine, master = values(srv, all)
        assert.equal(tostring(old_master), master)
        assert.same(old, engine)

        srv:stop()
        assert.same({}, srv:unexpected_errors())
    end)

    it_root("workers as nobody under a root master: a sync lock held by a"
            .. " worker killed with SIGKILL is taken over, 0 lost", function()
        local srv = start({ main = "user nobody nogroup;" })
        assert.equal(0, uid(srv:pid()))
        local run = load.start(srv, "/fast", { seconds = 5, keys = 10 })
        nginx.sleep(1)

        -- One worker takes the dict's sync lock as a long sync would.
        local holder = hold(srv, 30)
        assert.equal(NOBODY, uid(holder))
        nginx.sleep(0.5)
        -- Meanwhile no sync copies anything: the dict lags the engine.
        local logged = served_by(served(srv))
        local engine = values(srv, logged)
        assert.is_true(total(values(srv, logged, "dict")) < total(engine),
                       "the dict lags while the lock is held")

        assert.is_true(nginx.sh("kill -9 " .. holder))
        load.wait(run)

        -- Another worker (nobody too) finds the holder gone and takes the
        -- lock over; the next syncs copy everything.
        local dict
        wait_for("dict synced to the engine", 10, function()
            logged = served_by(served(srv))
            engine = values(srv, logged)
            dict = values(srv, logged, "dict")
            return distance(engine, dict) == 0
        end)
        assert.is_true(total(logged) > 1000, "too little load")
        -- The request the holder served when it was killed may be in the
        -- access log or in the count, not both: one either way.
        assert.is_true(distance(logged, dict) <= 1,
                       distance(logged, dict) .. " off the access log")
        assert.matches("a worker died during a sync; this one does it again",
                       srv:error_log(), 1, true)

        srv:stop()
        assert.same({}, errors_but_kills(srv))
    end)

    it_root("a reload to workers of another user: a live old worker's"
            .. " lock is not taken over (kill(pid, 0) says EPERM)", function()
        local srv = start({ main = "user nobody nogroup;" })
        -- Long enough for the reload on a busy machine (the sync by hand
        -- below must meet the lock still held; it checks that it did).
        local holder = hold(srv, 8)
        assert.equal(NOBODY, uid(holder))

        -- HUP with the workers' user changed: the new workers (daemon)
        -- share the zone with the old ones (nobody), and may not signal
        -- them.
        local conf_file = srv.dir .. "/nginx.conf"
        local conf = nginx.read_file(conf_file)
        local f = assert(io.open(conf_file, "w"))
        f:write((conf:gsub("user nobody nogroup;", "user daemon daemon;")))
        f:close()
        srv:signal("HUP")
        wait_for("2 workers as daemon", 10, function()
            local n = 0
            for _, pid in ipairs(children(srv:pid())) do
                n = n + (uid(pid) == DAEMON and 1 or 0)
            end
            return n == 2
        end)
        for _ = 1, 50 do
            assert.equal(200, srv:get("/fast?k=1"))
        end

        -- A sync by hand in a new worker waits for the old worker's lock
        -- (1 s) and says so: it must not take it from a live process.
        local _, body = srv:get("/sync")
        local still_held = not nginx.read_file(srv.dir .. "/hold.result")
        assert.is_true(still_held, "the hold ended too early to tell")
        assert.matches("another sync is running.* took_over 0\n$", body)

        -- The old worker let its own lock go; the syncs then caught up.
        local result
        wait_for("end of the hold", 15, function()
            result = nginx.read_file(srv.dir .. "/hold.result")
            return result
        end)
        assert.equal("1", result, "the old worker's lock was taken over")
        local logged = served_by(served(srv))
        wait_for("dict synced to the access log", 10, function()
            return distance(logged, values(srv, logged, "dict")) == 0
        end)

        srv:stop()
        assert.is_nil(srv:error_log():find("a worker died during a sync",
                                           1, true))
        assert.same({}, srv:unexpected_errors({
            { "another sync is running", "the sync by hand waits on purpose" },
        }))
    end)

    it("two instances of one config count apart, each exact", function()
        local a = start({})
        local b = start({})
        -- The same keys on both, at once.
        local runs = { load.start(a, "/fast", { seconds = 3, keys = 10 }),
                       load.start(b, "/fast", { seconds = 3, keys = 10 }) }
        for _, run in ipairs(runs) do
            load.wait(run)
        end
        for _, srv in ipairs({ a, b }) do
            local logged = served_by(served(srv))
            assert.is_true(total(logged) > 500, "too little load")
            local engine, master = values(srv, logged)
            assert.equal(tostring(srv:pid()), master)
            assert.same(logged, engine)
            wait_for("dict synced", 10, function()
                return distance(logged, values(srv, logged, "dict")) == 0
            end)
        end
        for _, srv in ipairs({ a, b }) do
            srv:stop()
            assert.same({}, srv:unexpected_errors())
        end
    end)

    for _, stop in ipairs({ "QUIT", "TERM" }) do
        it("a stop (" .. stop .. ") leaves no process, file or shared"
           .. " memory", function()
            local shm_before, sysv_before = named_shared_memory()
            local srv = start({})
            load.wait(load.start(srv, "/fast", { seconds = 2, keys = 10 }))
            local master = srv:pid()
            local pids = children(master)
            pids[#pids + 1] = tostring(master)
            for _, pid in ipairs(pids) do
                assert_holds_nothing_named(srv, pid)
            end

            srv:signal(stop)
            srv.last_pid = master
            assert.is_true(srv:wait_exit(15), "nginx did not exit")
            for _, pid in ipairs(pids) do
                assert.is_false(alive(pid), pid .. " still runs")
            end
            assert_nothing_left(srv)
            local shm_after, sysv_after = named_shared_memory()
            assert.equal(shm_before, shm_after)
            assert.equal(sysv_before, sysv_after)
            assert.same({}, srv:unexpected_errors())
        end)
    end
end)
