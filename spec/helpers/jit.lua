-- Runs a function with LuaJIT's trace events watched: the trace aborts in
-- the library's own files (NYI and the like), and how many traces
-- compiled. For the specs that a hot path compiles.

local _M = {}


-- syntax: aborts, compiled = jit_check.aborts_in(fn, ignore_unroll?)
--
-- With `ignore_unroll`, a "loop unroll limit" abort is not counted: a
-- trace that starts at one of our returns runs on into the caller's loop
-- and may hit that limit there before a loop trace forms; it is retried
-- and says nothing of our code.
function _M.aborts_in(fn, ignore_unroll)
    local traceerr = require("jit.vmdef").traceerr
    local funcinfo = require("jit.util").funcinfo
    local aborts, compiled = {}, 0
    local function on_trace(what, _, func, pc, code, info)
        if what == "stop" then
            compiled = compiled + 1
        elseif what == "abort" then
            local at = funcinfo(func, pc)
            local src = at.source or ""
            local why = traceerr[code] or "?"
            if (src:find("/resty/counter%.lua$")
                or src:find("/resty/counter/[%w_]+%.lua$")
                or src:find("/resty/greencheek/"))
               and not (ignore_unroll
                        and why:find("loop unroll limit", 1, true))
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
    return aborts, compiled
end


return _M
