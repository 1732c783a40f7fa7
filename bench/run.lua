-- make bench: costs measured inside nginx workers, with 1 and then 2
-- workers, printed as ns/op and as ratios taken in the same run (absolute
-- times drift on a shared machine; ratios taken side by side do not); then
-- requests per second over HTTP with wrk, counting against not counting.
-- Everything printed also goes to bench/RESULTS.md, with the machine, the
-- versions and the date, and bench/overhead.png when gnuplot is there.
--
--   luajit bench/run.lua          (make bench)
--   HTTP_ROUNDS=5 HTTP_SECONDS=5 luajit bench/run.lua

package.path = "spec/?.lua;bench/?.lua;" .. package.path
local nginx = require "helpers.nginx"
local harness = require "harness"
local http = require "http"

local CONF = assert(nginx.read_file("bench/bench.conf"))
local HTTP_ROUNDS = tonumber(os.getenv("HTTP_ROUNDS")) or 5
local HTTP_SECONDS = tonumber(os.getenv("HTTP_SECONDS")) or 3

local lines = {}


local function say(fmt, ...)
    local text = select("#", ...) > 0 and string.format(fmt, ...) or fmt
    io.write(text, "\n")
    io.flush()
    lines[#lines + 1] = text
end


local function run(workers)
    return harness.run(CONF, workers)
end


io.stderr:write("in-worker benchmarks, 1 worker then 2...\n")
local one = run(1)
local two = run(2)

local function row(...)
    say("| %-24s | %10s | %10s | %10s | %10s |", ...)
end

say("## Hot path: ns per call inside nginx workers")
say("")
say("2 workers: each, running at once. Best of 5 interleaved rounds per case.")
say("")
row("case", "1 worker", "x table", "2 workers", "x table")
row("---", "---:", "---:", "---:", "---:")
local missed = {}
for _, keys in ipairs({ "1 key", "8 keys" }) do
    local base1, base2 = one["lua table, " .. keys], two["lua table, " .. keys]
    for _, case in ipairs({ "lua table", "lua buffered", "ours", "ours step 3",
                            "shdict" }) do
        local name = case .. ", " .. keys
        row(name, string.format("%.2f", one[name]),
            string.format("%.2f", one[name] / base1),
            string.format("%.2f", two[name]),
            string.format("%.2f", two[name] / base2))
    end
    for label, r in pairs({ ["1 worker"] = one, ["2 workers"] = two }) do
        local ours, table_ns = r["ours, " .. keys], r["lua table, " .. keys]
        local shdict = r["shdict, " .. keys]
        if ours > 3 * table_ns then
            missed[#missed + 1] = string.format(
                "ours is %.1fx a Lua table (%s, %s): target 3x", ours / table_ns,
                keys, label)
        end
        if shdict < 10 * ours then
            missed[#missed + 1] = string.format(
                "ours is %.1fx cheaper than shdict:incr (%s, %s): target 10x",
                shdict / ours, keys, label)
        end
    end
end

say("")
say("`ngx.shared.DICT:incr` ns / ours ns (how many times cheaper ours is):")
say("")
say("| %-24s | %10s | %10s |", "case", "1 worker", "2 workers")
say("| --- | ---: | ---: |")
for _, keys in ipairs({ "1 key", "8 keys" }) do
    for _, case in ipairs({ "ours", "ours step 3" }) do
        local name = case .. ", " .. keys
        say("| %-24s | %9.1fx | %9.1fx |", name,
            one["shdict, " .. keys] / one[name], two["shdict, " .. keys] / two[name])
    end
end
say("")
say("JIT trace aborts in the library's code during these loops: %d (1 worker), "
    .. "%d (2 workers)", one["trace aborts"] or -1, two["trace aborts"] or -1)

say("")
require("sync_run").table(one, two, say)

say("")
say("## Request counter: ns per record_request() (8 keys), best of 5")
say("")
say("`plain`: 4 dict:incr per request (requests and latency, for the key and for")
say("\"all\"), as a straightforward Lua request counter does.")
say("")
local plain, ours = "record_request plain, 8 keys", "record_request ours, 8 keys"
say("| %-30s | %10s | %10s |", "case", "1 worker", "2 workers")
say("| --- | ---: | ---: |")
for _, case in ipairs({ plain, ours }) do
    say("| %-30s | %10.1f | %10.1f |", case, one[case], two[case])
end
say("| %-30s | %9.1fx | %9.1fx |", "plain / ours", one[plain] / one[ours],
    two[plain] / two[ours])

say("")
say("## Request counter growth (1 worker): ms and bytes per key")
say("")
say("One request recorded per key, in the shared engine (nothing to flush);")
say("`stats()` and `prometheus()` walk the engine's records; bytes per key are")
say("the engine's, three windows with their histograms. The target: 10 ms at")
say("10,000 keys and 100 ms at 100,000, as one call (the phases that cannot")
say("yield); `to write`: as one call, the text handed to a write function")
say("in pieces of about 32 KB; `in steps`: wall time from a timer, 500 keys")
say("a step, 1 ms pauses.")
say("Alone: `luajit bench/requests_run.lua`.")
say("")
say(require("requests_table")(one))

io.stderr:write("resty.counter's keys in the Prometheus text format...\n")
say("")
for _, line in ipairs(require("counter_prom_run").table_lines()) do
    say(line)
end

io.stderr:write(string.format("HTTP with wrk: %d rounds of %d variants, %d s each...\n",
                              HTTP_ROUNDS, #http.VARIANTS, HTTP_SECONDS))
local rows = http.run(HTTP_ROUNDS, HTTP_SECONDS)
say("")
say("## Over HTTP: requests/s and latency, counting in log_by_lua")
say("")
say("wrk -t1 -c16 on loopback, pinned to CPU 1; one nginx worker pinned to CPU 0;")
say("8 URIs; of %d interleaved rounds of %d s, the one with the median CPU per",
    HTTP_ROUNDS, HTTP_SECONDS)
say("request. `CPU us/req`: the worker's CPU time (from /proc) per request served;")
say("`overhead`: how much more of it than the same nginx without counting. On this")
say("shared VM requests/s swing with other tenants; CPU per request holds steadier.")
say("")
say("| %-50s | %9s | %8s | %8s | %8s | %11s | %9s |", "log phase", "req/s", "p50 us",
    "p90 us", "p99 us", "CPU us/req", "overhead")
say("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for _, r in ipairs(rows) do
    say("| %-50s | %9.0f | %8.0f | %8.0f | %8.0f | %11.2f | %8.1f%% |", r.name, r.rps,
        r.p50 or -1, r.p90 or -1, r.p99 or -1, r.cpu_us, r.overhead)
end

if #missed > 0 then
    say("")
    for _, m in ipairs(missed) do
        say("MISSED: " .. m)
    end
    say("(targets: within 3x of a Lua table, at least 10x cheaper than shdict:incr)")
end


-- bench/RESULTS.md: the machine, versions, command and date, then the
-- tables above; bench/overhead.png from the HTTP table.
local function first_line(cmd)
    return (nginx.read(cmd .. " 2>&1"):match("[^\n]+") or "?")
end

local chart = "bench/overhead.png"
local data = os.tmpname()
local f = assert(io.open(data, "w"))
for i, r in ipairs(rows) do
    f:write(string.format("%d \"%s\" %.2f\n", i - 1, r.name:gsub('"', "'"), r.overhead))
end
f:close()
local charted = nginx.sh("command -v gnuplot >/dev/null")
              and nginx.sh(string.format("gnuplot -e \"datafile='%s'; outfile='%s'\" "
                                         .. "bench/overhead.gp", data, chart))
os.remove(data)

local header = {
    "# Benchmark results",
    "",
    "Written by `make bench` (`luajit bench/run.lua`) on "
        .. first_line("date -u '+%Y-%m-%d %H:%M UTC'") .. ".",
    "",
    "- machine: " .. first_line("uname -srm") .. ", " .. first_line("nproc")
        .. " CPUs (" .. first_line("sed -n 's/^model name[^:]*: //p' /proc/cpuinfo")
        .. "), shared with other work: absolute times drift, ratios taken in"
        .. " one run hold better",
    "- nginx: " .. first_line(nginx.quote(nginx.stack.nginx) .. " -v"),
    "- lua-nginx-module: " .. first_line("dpkg-query -W -f='${Version}' "
                                         .. "libnginx-mod-http-lua"),
    "- LuaJIT: " .. first_line("luajit -v"),
    "- rustc: " .. first_line("$HOME/.cargo/bin/rustc --version || rustc --version"),
    "- wrk: " .. first_line("wrk -v"),
    -- LuaJIT maps every string over 128 KB afresh; whether that memory
    -- gets huge pages decides the cost of a scrape's one big string (see
    -- docs/request-counter.md, "What a scrape costs").
    "- transparent huge pages: "
        .. first_line("cat /sys/kernel/mm/transparent_hugepage/enabled")
        .. " (/sys/kernel/mm/transparent_hugepage/enabled)",
    "",
}
if charted then
    header[#header + 1] = "![overhead of counting over HTTP](overhead.png)"
    header[#header + 1] = ""
end
f = assert(io.open("bench/RESULTS.md", "w"))
f:write(table.concat(header, "\n"), "\n", table.concat(lines, "\n"), "\n")
f:close()
io.stderr:write("wrote bench/RESULTS.md" .. (charted and " and " .. chart or "") .. "\n")
