-- Runs a function with LuaJIT's trace events watched: the trace aborts in
-- the library's own files (NYI and the like), how many traces compiled,
-- and which of the function's own loops compiled. For the specs that a
-- hot path compiles.

local _M = {}


-- The bytecode a trace started at ("FORL", "LOOP", "FUNCF", ...).
local function start_op(func, pc)
    local ins = require("jit.util").funcbc(func, pc)
    if not ins then
        return "?"
    end
    local op = bit.band(ins, 0xff)
    return (require("jit.vmdef").bcnames:sub(op * 6 + 1, op * 6 + 6)
            :gsub("%s+$", ""))
end


-- syntax: aborts, compiled, loops = jit_check.aborts_in(fn, ignore_unroll?)
--
-- `loops` is how many of `fn`'s own loops (distinct lines of its file)
-- compiled into a looping trace: the hot loop itself, not only pieces.
--
-- With `ignore_unroll`, a "loop unroll limit" abort is not counted: a
-- trace that starts at one of our returns runs on into the caller's loop
-- and may hit that limit there before a loop trace forms; it is retried
-- and says nothing of our code.
--
-- Never counted: "symbol not in cache", a trace that reached the first
-- call ever made to a C function of a library just loaded (busted loads
-- our modules afresh for each spec file): the interpreter resolves the
-- symbol right after and it stays cached, so it happens once.
-- Nor "error thrown or hook called during recording": so LuaJIT aborts a
-- trace when the GC runs a finalizer (an ffi.gc'd object of an earlier
-- spec) in the middle of recording, which depends on GC timing only; an
-- error thrown by our hot path would fail the call itself.
-- Nor "leaving loop in root trace" in a trace that started at
-- a function's entry (FUNCF: a function made hot by calls from the
-- interpreter, before the caller's loop compiled). OpenResty's LuaJIT
-- v2.1-20240314 gives up such a trace when it returns to a lower frame
-- in a way it does not link (e.g. from a builtin that our function
-- tail-called: resty.counter.int's lua_value ends in `return
-- tonumber(v)`), and blacklists that start; lua-resty-core's own
-- shdict.lua hits the same. The loop around the call compiles regardless
-- (`loops` says so), with the function inlined. Whether such a trace
-- starts at all depends on hot counters that collide by address, so it
-- comes and goes from run to run; Debian's LuaJIT 2.1-20230119 never
-- starts it.
function _M.aborts_in(fn, ignore_unroll)
    local traceerr = require("jit.vmdef").traceerr
    local util = require("jit.util")
    local own = util.funcinfo(fn).source
    local aborts, compiled, loop_lines, starts = {}, 0, {}, {}
    local function on_trace(what, tr, func, pc, code, info)
        if what == "start" then
            local at = util.funcinfo(func, pc)
            starts[tr] = { op = start_op(func, pc), source = at.source,
                           line = at.currentline }
        elseif what == "stop" then
            compiled = compiled + 1
            local start = starts[tr]
            if start and start.source == own
               and util.traceinfo(tr).linktype == "loop"
            then
                loop_lines[start.line] = true
            end
        elseif what == "abort" then
            local at = util.funcinfo(func, pc)
            local src = at.source or ""
            local why = traceerr[code] or "?"
            local start = starts[tr] or {}
            if (src:find("/resty/counter%.lua$")
                or src:find("/resty/counter/[%w_]+%.lua$")
                or src:find("/resty/greencheek/"))
               and not (ignore_unroll
                        and why:find("loop unroll limit", 1, true))
               and not why:find("symbol not in cache", 1, true)
               and not why:find("hook called during recording", 1, true)
               and not (start.op == "FUNCF"
                        and why:find("leaving loop in root trace", 1, true))
            then
                aborts[#aborts + 1] = string.format("%s %s", at.loc,
                    string.format(why, info))
            end
        end
    end
    jit.flush()
    jit.attach(on_trace, "trace")
    local ok, err = pcall(fn)
    jit.attach(on_trace)
    assert(ok, err)
    local loops = 0
    for _ in pairs(loop_lines) do
        loops = loops + 1
    end
    return aborts, compiled, loops
end


return _M
