-- Starts a real redis-server on loopback (a free port, and a Unix socket
-- in its own directory) for specs, and stops it by its PID. Every wait is
-- bounded.

local nginx = require "helpers.nginx"

local _M = {}

local server = {}
server.__index = server


-- opts: password (requirepass), and extra redis.conf lines.
function _M.start(opts)
    opts = opts or {}
    local dir = nginx.read("mktemp -d /tmp/resty-counter-redis.XXXXXX")
                :gsub("%s+$", "")
    assert(nginx.sh("chmod 0777 " .. dir))
    local self = setmetatable({
        dir = dir,
        port = nginx.free_port(),
        socket = dir .. "/redis.sock",
        password = opts.password,
    }, server)

    local conf = {
        "bind 127.0.0.1",
        "port " .. self.port,
        -- workers run as nobody when nginx's master is root
        "unixsocket " .. self.socket,
        "unixsocketperm 777",
        "dir " .. dir,
        "pidfile " .. dir .. "/redis.pid",
        "logfile " .. dir .. "/redis.log",
        "daemonize yes",
        "save \"\"",
        "appendonly no",
    }
    if opts.password then
        conf[#conf + 1] = "requirepass " .. opts.password
    end
    for _, line in ipairs(opts.conf or {}) do
        conf[#conf + 1] = line
    end
    local f = assert(io.open(dir .. "/redis.conf", "w"))
    f:write(table.concat(conf, "\n"), "\n")
    f:close()

    self:start_again()
    return self
end


-- (Re)starts the server on the same port and socket, and waits (5 s at
-- most) until it answers.
function server:start_again()
    assert(nginx.sh("redis-server " .. self.dir .. "/redis.conf"),
           "redis-server did not start")
    for _ = 1, 50 do
        if self:cli("PING"):find("PONG", 1, true) then
            self.pid = tonumber(nginx.read_file(self.dir .. "/redis.pid"))
            return
        end
        nginx.sleep(0.1)
    end
    error("redis-server does not answer: "
          .. (nginx.read_file(self.dir .. "/redis.log") or ""))
end


-- One redis-cli command (its words, already quoted for the shell); the
-- reply as text.
function server:cli(command)
    local auth = self.password and (" -a " .. self.password
                                     .. " --no-auth-warning") or ""
    return nginx.read("timeout 5 redis-cli -h 127.0.0.1 -p " .. self.port
                      .. auth .. " " .. command .. " 2>&1")
end


-- SIGSTOP / SIGCONT: the server keeps its connections but answers nothing
-- (a hung server, from the clients' side).
function server:freeze()
    assert(nginx.sh("kill -STOP " .. self.pid))
end


function server:thaw()
    assert(nginx.sh("kill -CONT " .. self.pid))
end


-- Stops the server (SIGTERM, then SIGKILL), waiting 5 s at most.
function server:stop()
    if not self.pid then
        return
    end
    nginx.sh("kill -CONT " .. self.pid .. " 2>/dev/null")
    nginx.sh("kill " .. self.pid .. " 2>/dev/null")
    for _ = 1, 50 do
        if not nginx.sh("kill -0 " .. self.pid .. " 2>/dev/null") then
            self.pid = nil
            return
        end
        nginx.sleep(0.1)
    end
    nginx.sh("kill -9 " .. self.pid .. " 2>/dev/null")
    self.pid = nil
end


function server:cleanup()
    self:stop()
    if os.getenv("KEEP_SPEC_DIRS") ~= "1" then
        nginx.sh("rm -rf " .. self.dir)
    end
end


return _M
