-- What the make bench runners share: start nginx with a benchmark config
-- whose workers each write `case \t value` lines and then "done" to
-- result.<worker id>, wait for them all, and average each case over the
-- workers.

local nginx = require "helpers.nginx"

local _M = {}


-- syntax: conf = harness.timer_conf(http, code)
--
-- A benchmark config: the `http` lines (shared dicts), then `code` run in
-- a timer of each worker, and a server answering "up" on / (nginx.start
-- waits for it). ${dir}, ${port} and ${workers} are filled by nginx.start.
function _M.timer_conf(http, code)
    return http .. [[

init_worker_by_lua_block {
    local ok, err = ngx.timer.at(0, function()
        ]] .. code .. [[

    end)
    if not ok then
        ngx.log(ngx.ERR, "cannot start the benchmark: ", err)
    end
}

server {
    listen 127.0.0.1:${port};
    location = / {
        return 200 "up\n";
    }
}
]]
end


-- syntax: means = harness.run(conf, workers, max_seconds?)
--
-- Raises with the error log when a worker does not finish, or when the
-- log has errors.
function _M.run(conf, workers, max_seconds)
    local srv = nginx.start({
        workers = workers,
        http = conf,
        log_level = "warn",
        lua_path = nginx.root .. "/lua/?.lua;" .. nginx.root .. "/bench/?.lua",
    })
    local results = {}
    for id = 0, workers - 1 do
        local text
        for _ = 1, (max_seconds or 600) * 10 do
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
        for case, value in text:gmatch("([^\t\n]+)\t([%-%d.]+)\n") do
            results[case] = results[case] or {}
            table.insert(results[case], tonumber(value))
        end
    end
    local errors = srv:errors()
    srv:cleanup()
    if #errors > 0 then
        error("errors in the benchmark's log:\n" .. table.concat(errors, "\n"))
    end

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


return _M
