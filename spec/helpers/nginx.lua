-- Starts and drives a real nginx on a free loopback port, for specs run
-- from the host with `luajit /usr/bin/busted` and for spec/run-in-nginx.lua:
-- Debian's nginx with its lua module, or an OpenResty's (see `stack`
-- below). Everything it starts it also stops, and every wait is bounded.

local _M = {}

local ROOT = os.getenv("COUNTER_ROOT")
             or assert(io.popen("pwd")):read("*l")
_M.root = ROOT

-- Debian's lua module and the kit it needs, ndk first. An nginx with the
-- lua module built in (OpenResty's) refuses them ("already loaded").
local DEBIAN_MODULES = {
    "/usr/lib/nginx/modules/ndk_http_module.so",
    "/usr/lib/nginx/modules/ngx_http_lua_module.so",
}


local function sh(cmd)
    local ok = os.execute(cmd)
    return ok == true or ok == 0
end
_M.sh = sh


local function read(cmd)
    local p = assert(io.popen(cmd))
    local out = p:read("*a")
    p:close()
    return out
end
_M.read = read


local function trim(s)
    return (s:gsub("^%s+", ""):gsub("%s+$", ""))
end


local function quote(s)
    return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end
_M.quote = quote


-- The stack under test: an OpenResty when OPENRESTY_PREFIX names one or,
-- when that variable is unset, when `resty` is on PATH (its prefix);
-- otherwise (or with OPENRESTY_PREFIX empty) Debian's packages.
-- stack.nginx is the nginx binary, stack.resty resty-cli (or nil),
-- stack.modules the load_module lines it needs, stack.user the user its
-- workers run as when the master is root.
local function find_stack()
    local prefix = os.getenv("OPENRESTY_PREFIX")
    if prefix == nil then
        local resty = trim(read("command -v resty 2>/dev/null"))
        if resty ~= "" then
            prefix = trim(read("dirname \"$(dirname \"$(readlink -f "
                               .. quote(resty) .. ")\")\""))
        end
    end
    local stack = { name = "debian", nginx = "/usr/sbin/nginx" }
    if prefix and prefix ~= "" then
        stack = { name = "openresty", prefix = prefix,
                  nginx = prefix .. "/nginx/sbin/nginx",
                  resty = prefix .. "/bin/resty" }
        if not sh("test -x " .. quote(stack.nginx) .. " -a -x "
                  .. quote(stack.resty)) then
            error("OPENRESTY_PREFIX=" .. prefix .. " holds no nginx/sbin/nginx"
                  .. " and bin/resty (build one with make openresty)", 0)
        end
    end
    local version = read(quote(stack.nginx) .. " -V 2>&1")
    stack.modules = version:find("lua-nginx-module", 1, true) and {}
                    or DEBIAN_MODULES
    stack.user = version:match("%-%-user=(%S+)") or "nobody"
    stack.version = version:match("nginx/(%S+)")
    return stack
end
_M.stack = find_stack()
-- The nginx binary of the stack in use, for runners that start it their
-- own way (bench/callgrind_run.lua).
_M.binary = _M.stack.nginx


-- The start of every command that starts nginx (or resty): nginx reads
-- NGINX itself (sockets inherited in a binary upgrade) and, when it is
-- set, logs "invalid socket number" and does not daemonize.
_M.ENV = "env -u NGINX "


-- Are we root? Then nginx's workers run as stack.user, not as us.
local AS_ROOT = trim(read("id -u")) == "0"

-- What the workers load: the library, the module and the spec helpers.
local WORKER_FILES = { "lua/resty/counter.lua",
                       "target/lua/resty_counter_core.so",
                       "spec/helpers/busted_entry.lua" }


-- true when nginx's workers can read what they load from `root`: always
-- when we are not root (they run as us), otherwise when stack.user can.
local function workers_can_read(root)
    if not AS_ROOT then
        return true
    end
    local tests = {}
    for _, file in ipairs(WORKER_FILES) do
        tests[#tests + 1] = "-r " .. quote(root .. "/" .. file)
    end
    return sh("runuser -u " .. _M.stack.user .. " -- test "
              .. table.concat(tests, " -a ") .. " 2>/dev/null")
end
local WORKERS_READ_ROOT = workers_can_read(ROOT)

-- OpenResty's lualib (resty.redis and others) is loaded by the workers at
-- run time: it cannot be copied the way the checkout is.
if AS_ROOT and _M.stack.prefix
   and not sh("runuser -u " .. _M.stack.user .. " -- test -r "
              .. quote(_M.stack.prefix .. "/lualib/resty/core.lua")
              .. " 2>/dev/null")
then
    error("nginx's workers run as " .. _M.stack.user .. " and cannot read "
          .. _M.stack.prefix .. "/lualib: install or build OpenResty where"
          .. " they can (make openresty OPENRESTY_BUILD=/a/readable/folder)",
          0)
end


-- syntax: root = nginx.worker_root(dir)
--
-- The folder nginx's workers load lua/, spec/ and target/lua/ from: the
-- checkout when they can read it; otherwise (a mode-700 home or mktemp -d,
-- with the master root and the workers nobody) a copy made in `dir`, which
-- must be readable by them, said once on stderr.
function _M.worker_root(dir)
    if WORKERS_READ_ROOT then
        return ROOT
    end
    local copy = dir .. "/code"
    assert(sh("mkdir -p " .. quote(copy .. "/target") .. " && cp -r "
              .. quote(ROOT .. "/lua") .. " " .. quote(ROOT .. "/spec") .. " "
              .. quote(copy) .. " && { ! test -d " .. quote(ROOT .. "/target/lua")
              .. " || cp -r " .. quote(ROOT .. "/target/lua") .. " "
              .. quote(copy .. "/target") .. "; } && chmod -R a+rX "
              .. quote(copy)), "cannot copy the code for nginx's workers")
    -- Once a process: busted loads this module afresh for each spec
    -- file, but keeps the registry.
    local registry = debug.getregistry()
    if not registry.resty_counter_told then
        registry.resty_counter_told = true
        io.stderr:write("note: nginx's workers run as ", _M.stack.user,
                        ", who cannot read ", ROOT, ": they load a copy",
                        " of lua/, spec/ and target/lua/ made for each",
                        " nginx (", copy, ")\n")
    end
    return copy
end


-- The lines of an error log that say a worker could not load or run its
-- start-up code, with what to check when the cause may be file access.
function _M.load_failures(log)
    local found = {}
    for line in ((log or "") .. "\n"):gmatch("([^\n]*)\n") do
        if line:find("init_worker_by_lua error", 1, true)
           or line:find("module '[^']+' not found")
        then
            found[#found + 1] = line
        end
    end
    if #found == 0 then
        return nil
    end
    local msg = "nginx's workers could not load their code:\n"
                .. table.concat(found, "\n")
    if AS_ROOT then
        msg = msg .. "\n(they run as " .. _M.stack.user
              .. ": every folder above the code must be searchable and its"
              .. " files readable by that user)"
    end
    return msg
end


function _M.read_file(path)
    local f = io.open(path)
    if not f then
        return nil
    end
    local s = f:read("*a")
    f:close()
    return s
end


function _M.sleep(seconds)
    sh("sleep " .. seconds)
end


local function listening_ports()
    local used = {}
    for _, table_file in ipairs({ "/proc/net/tcp", "/proc/net/tcp6" }) do
        local f = io.open(table_file)
        if f then
            for line in f:lines() do
                local port, state = line:match(":(%x%x%x%x) %S+ (%x%x) ")
                if port and state == "0A" then
                    used[tonumber(port, 16)] = true
                end
            end
            f:close()
        end
    end
    return used
end


-- A loopback port nothing listens on now and that this process has not
-- handed out before; with `also`, one whose port + also is free too (a
-- Redis Cluster node's bus port is its port + 10000). Below the kernel's
-- ephemeral range (32768 on), where client connections under load take
-- their local ports and would make a bind fail.
local handed_out = {}
function _M.free_port(also)
    local used = listening_ports()
    math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)"), 16))
    for _ = 1, 1000 do
        local port = math.random(10000, 32767 - (also or 0))
        local other = also and port + also
        if not used[port] and not handed_out[port]
           and not (other and (used[other] or handed_out[other]))
        then
            handed_out[port] = true
            if other then
                handed_out[other] = true
            end
            return port
        end
    end
    error("no free port found")
end


local function expand(template, vars)
    return (template:gsub("%${([%w_]+)}", function(name)
        local value = vars[name]
        if value == nil then
            error("no value for ${" .. name .. "} in an nginx config")
        end
        return tostring(value)
    end))
end
_M.expand = expand


local server = {}
server.__index = server


-- The config of `opts` (see start) written to a new directory, as a
-- server object not started yet: for a runner that starts nginx its own
-- way (under valgrind, in the foreground), then calls wait_up.
function _M.prepare(opts)
    local dir = read("mktemp -d /tmp/resty-counter-spec.XXXXXX"):gsub("%s+$", "")
    -- Workers run as nobody when the master is root: let them write here.
    assert(sh("chmod 1777 " .. dir))
    -- The prefix's logs/, as in a prefix of its own (README: standalone),
    -- where lax counters on Redis spool by default.
    assert(sh("mkdir -m 1777 " .. dir .. "/logs"))
    local root = _M.worker_root(dir)

    local vars = {
        root = root,
        dir = dir,
        port = _M.free_port(),
        workers = opts.workers or 2,
        lua_path = opts.lua_path or (root .. "/lua/?.lua;" .. root .. "/spec/?.lua"),
        lua_cpath = opts.lua_cpath or (root .. "/target/lua/?.so"),
    }
    for k, v in pairs(opts.vars or {}) do
        vars[k] = v
    end
    vars.lua_path = expand(vars.lua_path, vars)
    vars.lua_cpath = expand(vars.lua_cpath, vars)

    local lines = {
        "worker_processes ${workers};",
        "pid ${dir}/nginx.pid;",
        "error_log ${dir}/error.log " .. (opts.log_level or "info") .. ";",
    }
    for _, module in ipairs(_M.stack.modules) do
        lines[#lines + 1] = "load_module " .. module .. ";"
    end
    lines[#lines + 1] = opts.main or ""
    lines[#lines + 1] = "events { worker_connections 1024; }"
    lines[#lines + 1] = "http {"
    lines[#lines + 1] = "    access_log ${dir}/access.log;"
    lines[#lines + 1] = '    lua_package_path "${lua_path};;";'
    lines[#lines + 1] = '    lua_package_cpath "${lua_cpath};;";'
    lines[#lines + 1] = opts.http or ""
    lines[#lines + 1] = "}"

    local conf = expand(table.concat(lines, "\n"), vars)
    local f = assert(io.open(dir .. "/nginx.conf", "w"))
    f:write(conf, "\n")
    f:close()

    return setmetatable({ dir = dir, port = vars.port, vars = vars }, server)
end


-- opts: http (the body of the http block, with ${port}, ${dir}, ${root}
-- placeholders: ${root} is what the workers load from, see worker_root),
-- main (extra main-level directives), workers (default 2), env (a table of
-- environment variables for nginx, whose values may hold the same
-- placeholders), lua_path and lua_cpath (default: the repo's lua/ and
-- spec/, and the built module).
-- Raises when nginx does not start, does not answer within 10 s, or its
-- workers could not load their start-up code.
function _M.start(opts)
    local self = _M.prepare(opts)
    local env = {}
    for k, v in pairs(opts.env or {}) do
        env[#env + 1] = k .. "=" .. quote(expand(tostring(v), self.vars))
    end
    self.env = table.concat(env, " ")
    return self:start_again()
end


-- (Re)starts nginx in its directory with its config (after a stop: the
-- same prefix, logs and port) and waits until it answers.
function server:start_again()
    local dir = self.dir
    -- nginx runs from its own directory: its workers (nobody, when the
    -- master is root) inherit the working directory, and busted's runner
    -- changes into "./", which fails in a checkout they cannot enter.
    local cmd = "cd " .. quote(dir) .. " && " .. _M.ENV .. self.env
                .. " " .. quote(_M.stack.nginx) .. " -p " .. dir
                .. " -c " .. dir .. "/nginx.conf"
                .. " > " .. dir .. "/stdout.log 2>&1"
    if not sh(cmd) then
        error("nginx did not start: " .. (_M.read_file(dir .. "/stdout.log") or "")
              .. (_M.read_file(dir .. "/error.log") or ""))
    end
    return self:wait_up(10)
end


-- Returns the server once it answers on its port (any status) with no
-- worker that failed to load its code, within `seconds`; otherwise stops
-- it and raises with its error log.
function server:wait_up(seconds)
    for _ = 1, seconds * 10 do
        if self:pid() and sh("curl -s -o /dev/null --max-time 1 http://127.0.0.1:"
                             .. self.port .. "/") then
            local failed = _M.load_failures(self:error_log())
            if failed then
                self:cleanup()
                error(failed, 2)
            end
            return self
        end
        _M.sleep(0.1)
    end
    self:stop()
    error("nginx did not answer on port " .. self.port .. ": "
          .. (self:error_log() or "")
          .. (_M.read_file(self.dir .. "/stdout.log") or ""))
end


function server:pid()
    local s = _M.read_file(self.dir .. "/nginx.pid")
    return s and tonumber(s:match("%d+"))
end


function server:url(path)
    return "http://127.0.0.1:" .. self.port .. path
end


-- status, body
function server:get(path)
    local out = read("curl -s --max-time 10 -w '\\n%{http_code}' '"
                     .. self:url(path) .. "'")
    local body, status = out:match("^(.*)\n(%d+)$")
    return tonumber(status), body
end


function server:signal(name)
    local pid = self:pid()
    assert(pid, "no nginx pid")
    assert(sh("kill -" .. name .. " " .. pid), "kill -" .. name .. " failed")
end


local function alive(pid)
    return sh("kill -0 " .. pid .. " 2>/dev/null")
end


-- Waits up to `timeout` seconds for the master to exit; true if it did.
function server:wait_exit(timeout)
    local pid = self.last_pid or self:pid()
    for _ = 1, math.ceil((timeout or 10) * 10) do
        if not pid or not alive(pid) then
            return true
        end
        _M.sleep(0.1)
    end
    return false
end


-- Graceful stop (QUIT), then TERM and KILL if it hangs. Idempotent.
function server:stop()
    local pid = self:pid()
    if not pid or not alive(pid) then
        return
    end
    self.last_pid = pid
    sh("kill -QUIT " .. pid)
    if self:wait_exit(10) then
        return
    end
    sh("kill -TERM " .. pid)
    if self:wait_exit(5) then
        return
    end
    sh("kill -KILL " .. pid)
end


function server:error_log()
    return _M.read_file(self.dir .. "/error.log")
end


function server:access_count(pattern)
    local n = 0
    local f = io.open(self.dir .. "/access.log")
    if not f then
        return 0
    end
    for line in f:lines() do
        if not pattern or line:find(pattern, 1, true) then
            n = n + 1
        end
    end
    f:close()
    return n
end


-- Lines of the error log at [error] level or worse, or mentioning a crash.
function server:errors()
    local found = {}
    for line in ((self:error_log() or "") .. "\n"):gmatch("([^\n]*)\n") do
        if line:find("%[error%]") or line:find("%[crit%]")
           or line:find("%[alert%]") or line:find("%[emerg%]")
           or line:find("exited on signal") or line:find("panicked")
        then
            found[#found + 1] = line
        end
    end
    return found
end


-- The lines of errors() that the test did not expect: `allowed` is a list
-- of { pattern, reason }, a Lua pattern for an [error] line the test
-- provokes on purpose and why (e.g. Redis stopped on purpose). Lines at
-- [crit] or worse and crashes are never allowed. Call it after stop(),
-- so that the workers' exit paths have logged too.
function server:unexpected_errors(allowed)
    local found = {}
    for _, line in ipairs(self:errors()) do
        local expected = false
        if line:find("%[error%]") and not line:find("panicked")
           and not line:find("exited on signal")
        then
            for _, allow in ipairs(allowed or {}) do
                if line:find(allow[1]) then
                    expected = true
                    break
                end
            end
        end
        if not expected then
            found[#found + 1] = line
        end
    end
    return found
end


-- unexpected_errors(allowed), but the master's report of the workers the
-- test killed with SIGKILL.
function server:errors_but_kills(allowed)
    local found = {}
    for _, line in ipairs(self:unexpected_errors(allowed)) do
        if not line:find("exited on signal 9", 1, true) then
            found[#found + 1] = line
        end
    end
    return found
end


-- `times` HUPs, `pause` seconds apart (reloads in quick succession: old
-- and new workers side by side).
function server:reloads(times, pause)
    for _ = 1, times do
        self:signal("HUP")
        _M.sleep(pause)
    end
end


-- kill -9 of a worker `times` times, `pause` seconds apart (before each),
-- the two first workers in turn.
function server:kill_workers(times, pause)
    for i = 1, times do
        _M.sleep(pause)
        sh("kill -9 " .. self:worker_pids()[i % 2 + 1])
    end
end


-- The pids of the master's children (its workers, old ones included), as
-- strings.
function server:worker_pids()
    local pids = {}
    for pid in read("pgrep -P " .. self:pid()):gmatch("%d+") do
        pids[#pids + 1] = pid
    end
    return pids
end


function server:cleanup()
    self:stop()
    if os.getenv("KEEP_SPEC_DIRS") ~= "1" then
        sh("rm -rf " .. self.dir)
    end
end


return _M
