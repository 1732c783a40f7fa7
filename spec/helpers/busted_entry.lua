-- Runs busted inside an nginx worker (our runner's timer, or OpenResty's
-- `resty`). busted's runner exits the process itself unless it is called
-- with standalone = false from a function defined in a file, and not as a
-- tail call: run_busted below is that function.

local _M = {}


local function run_busted()
    require "busted.runner"({ standalone = false })
    return true
end


-- Returns true when every spec passed. `args` are busted's command line;
-- its report goes to `output_path` when given (a worker has no terminal),
-- unbuffered, so that spec/run-in-nginx.lua can show it as it is written.
function _M.run(args, output_path)
    _G.arg = args
    local out
    if output_path then
        out = assert(io.open(output_path, "w"))
        out:setvbuf("no")
        io.output(out)
    end

    -- On failures busted raises a nil error (Lua 5.1 has no other way to
    -- say "failed" without exiting); anything else is a crash of the run.
    local ok, err = pcall(run_busted)
    if not ok and err ~= nil then
        io.write("busted crashed: ", tostring(err), "\n")
    end

    if out then
        out:close()
        io.output(io.stdout)
    end
    return ok == true
end


return _M
