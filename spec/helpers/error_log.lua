-- This nginx's error.log, read from inside a worker: what was written to it
-- since a mark. For the specs of what the library logs (and how often).
-- Under a runner whose error log is not the file <prefix>/error.log
-- (OpenResty's `resty`), `available()` is false.

local _M = {}


local function path()
    return ngx.config.prefix() .. "error.log"
end


function _M.available()
    local f = io.open(path())
    if not f then
        return false
    end
    f:close()
    return true
end


-- syntax: mark = error_log.mark()
function _M.mark()
    local f = assert(io.open(path()))
    local size = f:seek("end")
    f:close()
    return size
end


-- syntax: lines = error_log.since(mark, plain)
--
-- The lines written since `mark` that contain `plain` (a plain string).
function _M.since(mark, plain)
    local f = assert(io.open(path()))
    f:seek("set", mark)
    local lines = {}
    for line in f:lines() do
        if line:find(plain, 1, true) then
            lines[#lines + 1] = line
        end
    end
    f:close()
    return lines
end


return _M
