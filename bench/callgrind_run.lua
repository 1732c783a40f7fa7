-- make bench, last part: what counting costs per request, in instructions
-- (valgrind's callgrind: deterministic, unlike wall-clock figures on a
-- shared machine). Printed, and appended to bench/RESULTS.md.
--
-- Each run is one nginx process (master_process off) under callgrind, with
-- instrumentation off while it starts and while one variant's location
-- takes WARMUP requests (enough for LuaJIT to compile what its log
-- handler calls);
-- then instrumentation on, counts zeroed, REQUESTS sequential requests on
-- one keep-alive connection from curl (not under valgrind), a dump, and
-- its total instructions (Ir) divided by REQUESTS. Every variant runs in an
-- nginx of its own, RUNS times, interleaved; a variant's figure is its
-- median run, over the reference's median run.
--
--   luajit bench/callgrind_run.lua                      (make bench)
--   CALLGRIND_RUNS=3 CALLGRIND_REQUESTS=10000 CALLGRIND_WARMUP=3000 \
--   CALLGRIND_ONLY=a,e CALLGRIND_KEEP=1 luajit bench/callgrind_run.lua
--
-- CALLGRIND_KEEP=1 keeps each run's directory (its dump, callgrind.out.1,
-- for callgrind_annotate); CALLGRIND_ONLY runs only the named variants
-- and writes no RESULTS.md. PEER_DIR is where the predecessors' files are
-- (default ../shared/peer from the repo); without them their rows are
-- skipped, and said so.

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"

local CONF = assert(nginx.read_file("bench/callgrind.conf"))
local RUNS = tonumber(os.getenv("CALLGRIND_RUNS")) or 3
local REQUESTS = tonumber(os.getenv("CALLGRIND_REQUESTS")) or 10000
local WARMUP = tonumber(os.getenv("CALLGRIND_WARMUP")) or 3000
local KEEP = os.getenv("CALLGRIND_KEEP") == "1"
local ONLY = os.getenv("CALLGRIND_ONLY")
local PEER = os.getenv("PEER_DIR") or (nginx.root .. "/../shared/peer")
local PEER_FILES = { "/kong/lib/resty/counter.lua",
                     "/greencheek/lib/resty/greencheek/request/counter.lua" }

-- The log phase of /count in each variant's runs. `target`: the issue's
-- bound, in instructions per request over the reference; `peer`: needs
-- the predecessors' files.
local VARIANTS = {
    { id = "a", name = "`local x = 1` (the reference)",
      code = "local x = 1" },
    { id = "b", name = "a raw Lua table increment",
      code = 'local t = package.loaded.cg_table t["/"] = t["/"] + 1' },
    { id = "c", name = "`ngx.shared.DICT:incr(key, 1, 0)`",
      code = 'ngx.shared.plain:incr("/", 1, 0)' },
    { id = "d", name = "`incr`, Kong's lua-resty-counter 0.2.1", peer = true,
      code = 'package.loaded.cg_kong:incr("/")' },
    { id = "e", name = "`incr`, resty.counter (ours)", target = 350,
      code = 'package.loaded.cg_ours:incr("/")' },
    { id = "f", name = "`record_request`, greencheek's original",
      peer = true,
      code = 'package.loaded.cg_greencheek.record_request("greencheek", '
             .. '"/", 0.005)' },
    { id = "g", name = "`record_request`, ours", target = 800,
      code = 'package.loaded.cg_requests.record_request("requests", "/", '
             .. '0.005)' },
}


local function have_peer()
    for _, file in ipairs(PEER_FILES) do
        if not nginx.read_file(PEER .. file) then
            return false
        end
    end
    return true
end


-- valgrind's gdbserver pipes (callgrind_control talks through them) are
-- made in the run's directory, and go with it.
local function vgdb_prefix(srv)
    return "--vgdb-prefix=" .. srv.dir .. "/vgdb"
end


local function callgrind_control(srv, option)
    local out = nginx.read("callgrind_control " .. vgdb_prefix(srv) .. " "
                           .. option .. " " .. srv:pid() .. " 2>&1")
    assert(out:find("OK", 1, true),
           "callgrind_control " .. option .. " failed: " .. out)
end


-- `n` sequential requests to `path` on one keep-alive connection; raises
-- unless every one answered 200 on that one connection.
local function requests(srv, path, n)
    local out = nginx.read(string.format(
        "curl -s -o /dev/null -w '%%{http_code} %%{num_connects}\\n' "
        .. "'%s?[1-%d]' 2>&1", srv:url(path), n))
    local ok, connects = 0, 0
    for status, connected in out:gmatch("(%d+) (%d+)\n") do
        if status == "200" then
            ok = ok + 1
        end
        connects = connects + tonumber(connected)
    end
    assert(ok == n and connects == 1, string.format(
        "%s: %d of %d requests answered 200, on %d connections", path, ok,
        n, connects))
end


-- The trace events nginx's LuaJIT reported so far (bench/callgrind_jit.lua):
-- count by "<event>\t<where its trace started>\t<how it ended>".
local function trace_events(srv)
    local status, body = srv:get("/jit")
    assert(status == 200, "GET /jit: " .. tostring(status))
    local events = {}
    for n, event in body:gmatch("\n(%d+)\t([^\n]*)") do
        events[event] = tonumber(n)
    end
    return events
end


-- The events of `after` not yet in `before`: stops as "<where> <link
-- type>", aborts as "<where>: <reason>", and how many events in all.
local function new_events(before, after)
    local stops, aborts, all = {}, {}, 0
    for event, n in pairs(after) do
        n = n - (before[event] or 0)
        if n > 0 then
            all = all + n
            local what, from, how = event:match("^(%a+)\t([^\t]*)\t(.*)$")
            from = from:match("([^/]+:%d+)$") or from
            if what == "stop" then
                stops[#stops + 1] = from .. " " .. how
            elseif what == "abort" then
                aborts[#aborts + 1] = from .. ": " .. how
            end
        end
    end
    table.sort(stops)
    table.sort(aborts)
    return { stops = stops, aborts = aborts, all = all }
end


-- One run of one variant: instructions per request and trace events.
local function measure(variant, peer)
    local srv = nginx.prepare({
        main = "master_process off;\ndaemon off;",
        http = CONF,
        log_level = "warn",
        vars = { handler = variant.code, peer = peer },
        lua_path = nginx.root .. "/lua/?.lua;" .. nginx.root .. "/bench/?.lua",
    })
    local dir = srv.dir
    -- A child of this process (exec), reaped the moment it exits.
    local valgrind = assert(io.popen(
        "exec valgrind --tool=callgrind --instr-atstart=no "
        .. vgdb_prefix(srv) .. " --callgrind-out-file=" .. dir
        .. "/callgrind.out " .. nginx.binary
        .. " -p " .. dir .. " -c " .. dir .. "/nginx.conf > " .. dir
        .. "/stdout.log 2>&1"))
    local ok, result = pcall(function()
        srv:wait_up(60)
        local path = "/count"
        local started = trace_events(srv)
        requests(srv, path, WARMUP)
        local warm = trace_events(srv)
        callgrind_control(srv, "-i on")
        callgrind_control(srv, "-z")
        requests(srv, path, REQUESTS)
        callgrind_control(srv, "-d")
        local counted = trace_events(srv)
        local dump = assert(nginx.read_file(dir .. "/callgrind.out.1"),
                            "no callgrind dump")
        local total = tonumber(dump:match("\ntotals: (%d+)")
                               or dump:match("\nsummary: (%d+)"))
        assert(total, "no totals in the callgrind dump")
        return { ir = total / REQUESTS,
                 warmup = new_events(started, warm),
                 late = new_events(warm, counted) }
    end)
    local errors = srv:errors()
    -- Its dump is read: KILL spares it the final one. (Once
    -- callgrind_control has talked to it through vgdb, valgrind leaves a
    -- SIGQUIT pending until the next event: a graceful stop would hang.)
    local pid = srv:pid()
    if pid then
        nginx.sh("kill -KILL " .. pid)
    end
    valgrind:close()                    -- waits for it to exit
    os.remove(dir .. "/nginx.pid")      -- a stale pid must never be signalled
    if KEEP then
        io.stderr:write("kept " .. dir .. "\n")
    else
        srv:cleanup()
    end
    if not ok then
        error(result, 0)
    end
    assert(#errors == 0, "errors in nginx: " .. tostring(errors[1]))
    return result
end


local function median(values)
    local sorted = { unpack(values) }
    table.sort(sorted)
    return sorted[math.ceil(#sorted / 2)]
end


local peer = have_peer() and PEER or ""
local chosen = {}
for _, v in ipairs(VARIANTS) do
    if (not ONLY or ("," .. ONLY .. ","):find("," .. v.id .. ",", 1, true))
       and (peer ~= "" or not v.peer)
    then
        chosen[#chosen + 1] = v
    end
end

local started = os.time()
local runs = {}
for round = 1, RUNS do
    io.stderr:write(string.format("callgrind: round %d of %d, %d variants, "
                                  .. "%d requests each...\n", round, RUNS,
                                  #chosen, REQUESTS))
    for _, v in ipairs(chosen) do
        runs[v.id] = runs[v.id] or {}
        table.insert(runs[v.id], measure(v, peer))
    end
end
local seconds = os.time() - started


-- Printed, and appended to the bench/RESULTS.md that bench/run.lua wrote.
local out = {}
local function say(fmt, ...)
    local text = select("#", ...) > 0 and string.format(fmt, ...) or fmt
    io.write(text, "\n")
    out[#out + 1] = text
end

local function first_line(cmd)
    return nginx.read(cmd .. " 2>&1"):match("[^\n]+") or "?"
end

-- The Ir of each run of a variant, and their median.
local function irs_of(id)
    local irs = {}
    for _, r in ipairs(runs[id]) do
        irs[#irs + 1] = r.ir
    end
    return irs, median(irs)
end


-- Appends to `list` the items of `items` it does not have yet.
local function add_new(list, items)
    for _, item in ipairs(items) do
        if not list[item] then
            list[item] = true
            list[#list + 1] = item
        end
    end
end


-- The traces a variant's warm-up made (where they started, link type),
-- its trace aborts, and the trace events during its counted requests.
local function jit_of(id)
    local traces, aborts, late = {}, {}, 0
    for _, r in ipairs(runs[id]) do
        add_new(traces, r.warmup.stops)
        add_new(aborts, r.warmup.aborts)
        late = late + r.late.all
    end
    return traces, aborts, late
end


local reference = runs.a and select(2, irs_of("a"))

say("")
say("## Per request, in instructions (callgrind)")
say("")
say("`luajit bench/callgrind_run.lua` on %s (%s, %d s): one nginx",
    first_line("date -u '+%Y-%m-%d %H:%M UTC'"),
    first_line("valgrind --version"), seconds)
say("process (master_process off) under callgrind per run, each variant in")
say("its own, %d runs each, interleaved; %d warm-up requests, then %d", RUNS,
    WARMUP, REQUESTS)
say("counted, sequential on one keep-alive connection from curl (not under")
say("valgrind). Each variant is the code in `location = /count { return 200;")
say("log_by_lua_block { ... } }`, key \"/\", latency 0.005; no timers run")
say("(their work is per second, not per request). `Ir/req`: all of nginx's")
say("user-space instructions per request, median run; `over (a)`: that minus")
say("the reference's median, with the range of the runs; `traces`: the LuaJIT")
say("traces the warm-up made (where each started, its link type).")
say("")
say("| %-44s | %7s | %8s | %-11s | %-30s |", "log phase", "Ir/req", "over (a)",
    "runs", "traces")
say("| --- | ---: | ---: | --- | --- |")
local missed, notes, untraced = {}, {}, false
for _, v in ipairs(chosen) do
    local irs, ir = irs_of(v.id)
    local traces, aborts, late = jit_of(v.id)
    untraced = untraced or #traces == 0
    local over, range = "?", "?"
    if reference then
        over = string.format("%.0f", ir - reference)
        range = string.format("%.0f to %.0f", math.min(unpack(irs)) - reference,
                              math.max(unpack(irs)) - reference)
    end
    say("| (%s) %-40s | %7.0f | %8s | %-11s | %-30s |", v.id, v.name, ir, over,
        range, #traces > 0 and table.concat(traces, ", ") or "none")
    if #aborts > 0 then
        notes[#notes + 1] = string.format("(%s) trace aborts: %s", v.id,
                                          table.concat(aborts, "; "))
    end
    if late > 0 then
        notes[#notes + 1] = string.format(
            "(%s) %d trace events during the counted requests (%d runs)",
            v.id, late, RUNS)
    end
    if v.target and reference and ir - reference > v.target then
        missed[#missed + 1] = string.format(
            "(%s) %s: %.0f instructions per request over (a), target %d",
            v.id, v.name, ir - reference, v.target)
    end
end
say("")
if untraced then
    say("`none`: the log handler ran in LuaJIT's interpreter only. A log_by_lua")
    say("chunk is a vararg main chunk, which LuaJIT does not compile; what")
    say("compiles is the functions it calls, each a trace that returns to the")
    say("interpreter (`return`).")
end
if #notes == 0 then
    say("No trace aborts, and no trace events during the counted requests.")
end
say("")
for _, note in ipairs(notes) do
    say("- " .. note .. ".")
end
if peer == "" then
    say("- Skipped (d) and (f): the predecessors' files are not in %s.", PEER)
end
for _, m in ipairs(missed) do
    say("- MISSED: " .. m)
end

if not ONLY then
    local results = io.open("bench/RESULTS.md", "a")
    if results then
        results:write(table.concat(out, "\n"), "\n")
        results:close()
    end
end
