-- For bench/callgrind_run.lua: counts LuaJIT's trace events in the nginx
-- it measures, by where each trace started, as `luajit -jv` would print
-- them, so that the runner can tell whether a log handler compiled.
--
--   init_worker_by_lua_block { require("callgrind_jit").attach() }
--   location = /jit { content_by_lua_block {
--       ngx.print(require("callgrind_jit").report()) } }

local jit = require "jit"
local jutil = require "jit.util"
local vmdef = require "jit.vmdef"


local concat = table.concat
local fmt = string.format
local pairs = pairs
local sort = table.sort
local tostring = tostring
local type = type


local _M = {}


-- event line ("stop\t<where>\t<how>") -> count
local counts = {}
-- events of every kind, for the runner to see whether any came late
local total = 0
-- where the trace being recorded started
local start_loc = "?"


-- As jit/v.lua names a place: source:line, a builtin's name, or C code.
local function where(func, pc)
    local info = jutil.funcinfo(func, pc)
    if info.loc then
        return info.loc
    elseif info.ffid then
        return vmdef.ffnames[info.ffid]
    end
    return "C:" .. tostring(info.addr)
end


-- An abort's reason, as jit/v.lua formats it (a bytecode or a builtin as
-- its number).
local function reason(code, info)
    local text = vmdef.traceerr[code]
    if not text then
        return "error " .. tostring(code)
    end
    if type(info) == "function" then
        info = where(info, 0)
    end
    return fmt((text:gsub("%%d", "%%s")), tostring(info))
end


local function count(line)
    counts[line] = (counts[line] or 0) + 1
    total = total + 1
end


local function on_trace(what, tr, func, pc, otr, oex)
    if what == "start" then
        start_loc = where(func, pc)
        count("start\t" .. start_loc .. "\t")
    elseif what == "stop" then
        count("stop\t" .. start_loc .. "\t" .. jutil.traceinfo(tr).linktype)
    elseif what == "abort" then
        count("abort\t" .. start_loc .. "\t" .. reason(otr, oex) .. " at "
              .. where(func, pc))
    else
        count(what .. "\t" .. start_loc .. "\t")
    end
end


-- syntax: callgrind_jit.attach()
--
-- context: init_worker_by_lua*
function _M.attach()
    jit.attach(on_trace, "trace")
end


-- syntax: text = callgrind_jit.report()
--
-- The number of events so far on the first line, then one line per kind
-- of event: count, event, where its trace started, how it ended (the link
-- type of a stop, the reason and the place of an abort), tab-separated.
function _M.report()
    local lines = {}
    for line, n in pairs(counts) do
        lines[#lines + 1] = n .. "\t" .. line
    end
    sort(lines)
    return "events\t" .. total .. "\n" .. concat(lines, "\n") .. "\n"
end


return _M
