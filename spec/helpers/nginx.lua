-- Starts and drives a real nginx (Debian's, with the lua module) on a free
-- loopback port, for specs run from the host with `luajit /usr/bin/busted`
-- and for spec/run-in-nginx.lua. Everything it starts it also stops, and
-- every wait is bounded.

local _M = {}

local ROOT = os.getenv("COUNTER_ROOT")
             or assert(io.popen("pwd")):read("*l")
_M.root = ROOT

local MODULES = {
    "/usr/lib/nginx/modules/ndk_http_module.so",
    "/usr/lib/nginx/modules/ngx_http_lua_module.so",
}

local NGINX = os.getenv("NGINX") or "/usr/sbin/nginx"
_M.binary = NGINX


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

    local vars = {
        root = ROOT,
        dir = dir,
        port = _M.free_port(),
        workers = opts.workers or 2,
        lua_path = opts.lua_path or (ROOT .. "/lua/?.lua;" .. ROOT .. "/spec/?.lua"),
        lua_cpath = opts.lua_cpath or (ROOT .. "/target/lua/?.so"),
    }
    for k, v in pairs(opts.vars or {}) do
        vars[k] = v
    end

    local lines = {
        "worker_processes ${workers};",
        "pid ${dir}/nginx.pid;",
        "error_log ${dir}/error.log " .. (opts.log_level or "info") .. ";",
    }
    for _, module in ipairs(MODULES) do
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
-- placeholders), main (extra main-level directives), workers (default 2),
-- env (a table of environment variables for nginx), lua_path and
-- lua_cpath (default: the repo's lua/ and the built module).
function _M.start(opts)
    local self = _M.prepare(opts)
    local dir = self.dir
    local env = {}
    for k, v in pairs(opts.env or {}) do
        env[#env + 1] = k .. "='" .. tostring(v):gsub("'", "'\\''") .. "'"
    end

    local cmd = table.concat(env, " ") .. " " .. NGINX .. " -p " .. dir
                .. " -c " .. dir .. "/nginx.conf"
                .. " > " .. dir .. "/stdout.log 2>&1"
    if not sh(cmd) then
        error("nginx did not start: " .. (_M.read_file(dir .. "/stdout.log") or "")
              .. (_M.read_file(dir .. "/error.log") or ""))
    end
    return self:wait_up(10)
end


-- Returns the server once it answers on its port (any status), within
-- `seconds`; otherwise stops it and raises with its error log.
function server:wait_up(seconds)
    for _ = 1, seconds * 10 do
        if self:pid() and sh("curl -s -o /dev/null --max-time 1 http://127.0.0.1:"
                             .. self.port .. "/") then
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


function server:cleanup()
    self:stop()
    if os.getenv("KEEP_SPEC_DIRS") ~= "1" then
        sh("rm -rf " .. self.dir)
    end
end


return _M
