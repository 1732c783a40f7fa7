-- The Makefile a newcomer meets first: a bare `make` lists the targets and
-- runs nothing; `make run` installs only what the demo needs, `make test`
-- everything the tests use. Dry runs (`make -n`): nothing is installed,
-- built or started here.

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"

local quote = nginx.quote


local function make(args)
    return nginx.read("cd " .. quote(nginx.root) .. " && timeout 60 make "
                      .. "--no-print-directory " .. args .. " 2>&1")
end


-- The Debian packages a dry run of `target` would check for (the list of
-- the `for p in ...; do` loop of the Makefile's install_packages), as a
-- set.
local function packages(target)
    local out = make("-n " .. target)
    local list = assert(out:match("for p in ([^;]*); do"),
                        "no package list in `make -n " .. target .. "`:\n"
                        .. out)
    local set = {}
    for name in list:gmatch("%S+") do
        set[name] = true
    end
    return set
end


local DEMO = { "nginx", "libnginx-mod-http-lua", "libnginx-mod-http-ndk",
               "lua-resty-core", "luajit2", "curl", "gcc" }
local TESTS_ONLY = { "redis-server", "wrk", "lua-busted", "lua-nginx-redis",
                     "luarocks", "lua-check", "dnsmasq-base" }


describe("the Makefile", function()
    it("lists the targets on a bare `make`, and runs nothing", function()
        local dry = make("-n")
        assert.is_nil(dry:find("cargo", 1, true), dry)
        assert.is_nil(dry:find("apt-get", 1, true), dry)

        local out = make("")
        assert.matches("^make TARGET, one of:\n", out)
        for _, target in ipairs({ "run", "test", "bench", "chaos", "lint",
                                  "spec", "scenario", "build", "clean" }) do
            assert.matches("\n  " .. target .. " +%S[^\n]*", out)
        end
        for line in out:gmatch("[^\n]+") do
            assert.is_true(#line <= 80, line)
        end
    end)

    it("installs for `make run` only what the demo needs", function()
        local run = packages("run")
        for _, name in ipairs(DEMO) do
            assert.is_true(run[name], name .. " is not installed by make run")
        end
        for _, name in ipairs(TESTS_ONLY) do
            assert.is_nil(run[name], name .. " is installed by make run")
        end
    end)

    it("installs for `make test` everything the tests use", function()
        local test = packages("test")
        for _, list in ipairs({ DEMO, TESTS_ONLY }) do
            for _, name in ipairs(list) do
                assert.is_true(test[name],
                               name .. " is not installed by make test")
            end
        end
    end)
end)
