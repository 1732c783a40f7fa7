-- `make run`: serves examples/nginx.conf on 127.0.0.1:PORT until Ctrl-C.
--
--   luajit examples/serve.lua PORT RUN_DIR
--
-- On the stack spec/helpers/nginx.lua finds (Debian's nginx, or an
-- OpenResty's: OPENRESTY_PREFIX or `resty` on PATH). nginx's logs and
-- pid go to RUN_DIR. When the workers (nobody, under a root master)
-- cannot read this checkout, they load a copy of lua/ and the module
-- made in a folder of /tmp, removed on exit. When a worker cannot load
-- the library, this says so and stops, instead of serving 500s.

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"

local port, run_dir = assert(tonumber(arg[1]), "PORT"), assert(arg[2])
local quote = nginx.quote


local function fail(msg)
    io.stderr:write(msg, "\n")
    os.exit(1)
end


local copy_dir = nginx.read("mktemp -d /tmp/resty-counter-run.XXXXXX")
                 :gsub("%s+$", "")
assert(nginx.sh("chmod 755 " .. copy_dir))
local root = nginx.worker_root(copy_dir)

-- examples/nginx.conf, for this stack: an nginx with the lua module
-- built in refuses Debian's load_module lines.
local conf = assert(nginx.read_file(nginx.root .. "/examples/nginx.conf"))
if #nginx.stack.modules == 0 then
    conf = conf:gsub("\nload_module [^\n]*", "")
end
conf = conf:gsub("@ROOT@", root):gsub("@PORT@", port):gsub("@DIR@", run_dir)
assert(nginx.sh("mkdir -p " .. quote(run_dir .. "/logs")))
local f = assert(io.open(run_dir .. "/nginx.conf", "w"))
f:write(conf)
f:close()
local error_log = run_dir .. "/logs/error.log"
local log_start = #(nginx.read_file(error_log) or "")


local function stop()
    local pid = tonumber(nginx.read_file(run_dir .. "/nginx.pid") or "")
    if pid and nginx.sh("kill -QUIT " .. pid .. " 2>/dev/null") then
        nginx.sh("for _ in $(seq 100); do kill -0 " .. pid
                 .. " 2>/dev/null || break; sleep 0.1; done")
    end
    nginx.sh("rm -rf " .. quote(copy_dir))
end


io.write("starting ", nginx.stack.name, "'s nginx ",
         nginx.stack.version or "", " (", nginx.stack.nginx, ")\n")
if not nginx.sh(nginx.ENV .. quote(nginx.stack.nginx) .. " -p "
                .. quote(run_dir) .. " -c " .. quote(run_dir .. "/nginx.conf"))
then
    nginx.sh("rm -rf " .. quote(copy_dir))
    fail("nginx did not start (its messages are above)")
end

-- Up when / answers 200 within 10 s, and no worker failed to load.
local up
for _ = 1, 100 do
    up = nginx.sh("curl -sf -o /dev/null --max-time 1 http://127.0.0.1:"
                  .. port .. "/")
    if up then
        break
    end
    nginx.sleep(0.1)
end
local log = (nginx.read_file(error_log) or ""):sub(log_start + 1)
local failed = nginx.load_failures(log)
if failed or not up then
    stop()
    fail((failed or ("nginx does not answer 200 on port " .. port .. ":\n"
                     .. log)) .. "\nnginx stopped; its log: " .. error_log)
end

local base = "http://127.0.0.1:" .. port
io.write("counting requests on ", base, "/\n",
         "  status page: ", base, "/status (its JSON: /status.json)\n",
         "  counts: ", base, "/counts, request stats: ", base, "/stats,",
         " Prometheus: ", base, "/metrics\n",
         "nginx's warnings follow (", error_log, "); Ctrl-C stops\n")
io.flush()
-- Until Ctrl-C (or TERM, HUP). The shell stops nginx itself: this
-- process ignores Ctrl-C while it waits, but not a TERM sent to the group.
local pid_file = quote(run_dir .. "/nginx.pid")
nginx.sh("tail -n 0 -f " .. quote(error_log) .. " & t=$!; trap 'kill $t;"
         .. " kill -QUIT $(cat " .. pid_file .. "); rm -rf " .. quote(copy_dir)
         .. "' INT TERM HUP; wait $t")
stop()
io.write("\nnginx stopped\n")
