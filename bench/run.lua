-- make bench: costs measured inside nginx workers, with 1 and then 2
-- workers, printed as ns/op and as ratios taken in the same run (absolute
-- times drift on a shared machine; ratios taken side by side do not).

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"

local CONF = assert(nginx.read_file("bench/bench.conf"))


local function run(workers)
    local srv = nginx.start({
        workers = workers,
        http = CONF,
        log_level = "warn",
        lua_path = nginx.root .. "/lua/?.lua;" .. nginx.root .. "/bench/?.lua",
    })
    local results = {}
    for id = 0, workers - 1 do
        local text
        for _ = 1, 3000 do         -- 300 s at most
            text = nginx.read_file(srv.dir .. "/result." .. id)
            if text and text:find("done\n", 1, true) then
                break
            end
            nginx.sleep(0.1)
        end
        if not (text and text:find("done\n", 1, true)) then
            local log = srv:error_log()
            srv:cleanup()
            error("worker " .. id .. " did not finish: " .. (log or ""))
        end
        for case, value in text:gmatch("([^\t\n]+)\t([%d.]+)\n") do
            results[case] = results[case] or {}
            table.insert(results[case], tonumber(value))
        end
    end
    srv:cleanup()
    -- Each case: the mean over workers.
    local mean = {}
    for case, values in pairs(results) do
        local sum = 0
        for _, v in ipairs(values) do
            sum = sum + v
        end
        mean[case] = sum / #values
    end
    return mean
end


local one = run(1)
local two = run(2)

local function row(...)
    io.write(string.format("| %-24s | %10s | %10s | %10s | %10s |\n", ...))
end

print("ns per call, inside nginx workers (2 workers: each, running at once),")
print("best of 5 interleaved rounds per case")
print()
row("case", "1 worker", "x table", "2 workers", "x table")
row("---", "---:", "---:", "---:", "---:")
local failed = {}
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
            failed[#failed + 1] = string.format(
                "ours is %.1fx a Lua table (%s, %s): target 3x", ours / table_ns,
                keys, label)
        end
        if shdict < 10 * ours then
            failed[#failed + 1] = string.format(
                "ours is only %.1fx cheaper than shdict:incr (%s, %s): target 10x",
                shdict / ours, keys, label)
        end
    end
end

print()
print("ngx.shared.DICT:incr ns / ours ns (how many times cheaper ours is)")
print()
io.write(string.format("| %-24s | %10s | %10s |\n", "case", "1 worker", "2 workers"))
io.write("| --- | ---: | ---: |\n")
for _, keys in ipairs({ "1 key", "8 keys" }) do
    for _, case in ipairs({ "ours", "ours step 3" }) do
        local name = case .. ", " .. keys
        io.write(string.format("| %-24s | %9.1fx | %9.1fx |\n", name,
                               one["shdict, " .. keys] / one[name],
                               two["shdict, " .. keys] / two[name]))
    end
end

print()
print("sync of N dirty keys (delta 5 each, keys already in the dict), best of 5, ms")
print()
io.write(string.format("| %-10s | %9s | %8s | %11s | %9s | %11s |\n", "dirty keys",
                       "1 worker", "ns/key", "plain flush", "2 workers", "plain flush"))
io.write("| --- | ---: | ---: | ---: | ---: | ---: |\n")
for _, n in ipairs({ 100, 1000, 10000 }) do
    local sync, plain = "sync ms, " .. n .. " keys", "plain flush ms, " .. n .. " keys"
    io.write(string.format("| %-10d | %9.3f | %8.1f | %11.3f | %9.3f | %11.3f |\n", n,
                           one[sync], one[sync] * 1e6 / n, one[plain], two[sync], two[plain]))
end
print()
print("request counter: ns per record_request() (8 keys), best of 5")
print()
io.write(string.format("| %-30s | %10s | %10s |\n", "case", "1 worker", "2 workers"))
io.write("| --- | ---: | ---: |\n")
for _, case in ipairs({ "record_request plain, 8 keys", "record_request ours, 8 keys" }) do
    io.write(string.format("| %-30s | %10.1f | %10.1f |\n", case, one[case], two[case]))
end
local plain, ours = "record_request plain, 8 keys", "record_request ours, 8 keys"
io.write(string.format("| %-30s | %9.1fx | %9.1fx |\n", "plain / ours",
                       one[plain] / one[ours], two[plain] / two[ours]))
print()
print("request counter growth, 1 worker: ms for a flush, stats() and prometheus()")
print()
io.write(string.format("| %-6s | %14s | %16s | %10s | %15s | %14s |\n", "keys",
                       "flush new keys", "flush known keys", "stats()", "prometheus()",
                       "dict bytes/key"))
io.write("| ---: | ---: | ---: | ---: | ---: | ---: |\n")
for _, n in ipairs({ 100, 1000, 10000 }) do
    local function v(name)
        return one[name .. ", " .. n .. " keys"] or one[name .. ", " .. n .. " new keys"]
    end
    io.write(string.format("| %-6d | %14.3f | %16.3f | %10.3f | %15.3f | %14.0f |\n", n,
                           v("flush ms"), one["flush ms, " .. n .. " known keys"],
                           v("stats ms"), v("prometheus ms"), v("dict bytes per key")))
end

print()
print("x table: the cost relative to a plain Lua table increment in the same run.")
print("lua buffered: the predecessors' per-worker table (lua-resty-counter).")
print("plain flush: dict:incr of the same deltas from a Lua table (no range check).")
print("record_request plain: 4 dict:incr per request (requests and latency, for")
print("the key and for \"all\"), as a straightforward Lua module does.")

if #failed > 0 then
    print()
    for _, f in ipairs(failed) do
        print("MISSED: " .. f)
    end
    print("(targets: within 3x of a Lua table, at least 10x cheaper than shdict:incr)")
end
