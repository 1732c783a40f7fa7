-- A checkout that nginx's workers cannot read (a mode-700 home or
-- mktemp -d, the master root and the workers nobody): nginx still counts
-- from it, and when a worker cannot load its code the spec runner stops
-- at once and says why, instead of waiting for its watchdog.

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"

local quote = nginx.quote
local AS_ROOT = nginx.read("id -u"):match("%d+") == "0"
local it_root = AS_ROOT and it or function(name)
    pending(name .. " (needs root: then the workers run as nobody)")
end


-- A mode-700 folder holding a copy of the checkout's lua/, spec/ and
-- target/lua/ (what nginx's workers load).
local function private_checkout()
    local dir = nginx.read("mktemp -d /tmp/resty-counter-private.XXXXXX")
                :gsub("%s+$", "")
    assert(nginx.sh("chmod 700 " .. dir .. " && mkdir " .. dir .. "/target"
                    .. " && cp -r lua spec " .. dir .. " && cp -r target/lua "
                    .. dir .. "/target"))
    return dir
end


-- Runs `cmd` in `dir` with COUNTER_ROOT=dir; its output (stdout and
-- stderr), whether it exited 0, and the seconds it took.
local function run_in(dir, cmd)
    local out = nginx.read("cd " .. dir .. " && start=$(date +%s%N);"
                           .. " COUNTER_ROOT=" .. dir .. " " .. cmd
                           .. " 2>&1; echo \"exit $? took $((($(date +%s%N)"
                           .. " - start) / 1000000))\"")
    local code, ms = out:match("exit (%d+) took (%d+)%s*$")
    local took = tonumber(ms) / 1000
    return out, code == "0", tonumber(took)
end


describe("a checkout nginx's workers cannot read", function()
    local dir

    after_each(function()
        if dir then
            nginx.sh("rm -rf " .. quote(dir))
        end
    end)

    it_root("still counts: the workers load a copy", function()
        dir = private_checkout()
        local out = run_in(dir, "luajit -e " .. quote([[
            package.path = "spec/?.lua;" .. package.path
            local nginx = require "helpers.nginx"
            local srv = nginx.start({ workers = 2, http = assert(
                nginx.read_file("spec/scenario/counting.conf")) })
            for _ = 1, 20 do
                io.write("status ", srv:get("/fast"), "\n")
            end
            srv:cleanup()]]))
        assert.matches("who cannot read " .. dir, out, 1, true)
        local _, ok200 = out:gsub("status 200\n", "")
        assert.equal(20, ok200, out)
    end)

    it("stops the spec runner at once, saying why", function()
        dir = private_checkout()
        assert(nginx.sh("rm " .. dir .. "/spec/helpers/busted_entry.lua"))
        local out, ok, took = run_in(dir, "luajit spec/run-in-nginx.lua")
        assert.is_false(ok, out)
        assert.matches("module 'helpers.busted_entry' not found", out, 1,
                       true)
        -- Redis and its cluster take some 10 s to start; the watchdog
        -- for silence would take 40 s more.
        assert.is_true(took < 40, "took " .. took .. " s:\n" .. out)
    end)
end)
