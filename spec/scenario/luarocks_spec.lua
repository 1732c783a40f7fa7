-- The rockspec installs a working library into any tree: nginx, given only
-- that tree on its paths, counts with require "resty.counter" and records
-- requests with require "resty.greencheek.request.counter".

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"

local ROCKSPEC = "rockspec/lua-resty-counter-rs-0.1.0-1.rockspec"

local CONF = [[
lua_shared_dict counters 1m;
lua_shared_dict request_stats 1m;
init_worker_by_lua_block {
    package.loaded.c = assert(require("resty.counter").new("counters", 0.05))
}
server {
    listen 127.0.0.1:${port};
    location = / {
        return 200 "up\n";
    }
    location = /hit {
        content_by_lua_block {
            ngx.say(package.searchpath("resty.counter", package.path))
        }
        log_by_lua_block {
            package.loaded.c:incr("hits")
            require("resty.greencheek.request.counter").record_request(
                "request_stats", "hit", ngx.var.request_time)
        }
    }
    location = /stats {
        content_by_lua_block {
            local rc = require "resty.greencheek.request.counter"
            rc.flush("request_stats")
            ngx.say(rc.single_stats("request_stats", "all"))
        }
    }
    location = /hits {
        content_by_lua_block { ngx.say(ngx.shared.counters:get("hits")) }
    }
}
]]


describe("the rockspec", function()
    local tree, srv

    after_each(function()
        if srv then
            srv:cleanup()
        end
        if tree then
            nginx.sh("rm -rf " .. tree)
        end
    end)

    it("installs every Lua module of the library", function()
        local rockspec = nginx.read_file(ROCKSPEC):gsub("%s+", " ")
        local files = nginx.read("cd " .. nginx.root .. " && find lua -name '*.lua'")
        local count = 0
        for file in files:gmatch("%S+") do
            local module = file:gsub("^lua/", ""):gsub("%.lua$", ""):gsub("/", ".")
            assert.truthy(rockspec:find('["' .. module .. '"] = "' .. file .. '"',
                                        1, true), file .. " is not installed")
            count = count + 1
        end
        assert.is_true(count > 10)
    end)

    it("builds offline with luarocks make and installs into a tree", function()
        tree = nginx.read("mktemp -d /tmp/resty-counter-tree.XXXXXX"):gsub("%s+$", "")
        assert.is_true(nginx.sh("luarocks --lua-version 5.1 make " .. ROCKSPEC
                                .. " --tree " .. tree .. " > " .. tree
                                .. "/install.log 2>&1"),
                       nginx.read_file(tree .. "/install.log"))
        assert.is_true(nginx.sh("chmod -R a+rX " .. tree))

        srv = nginx.start({
            workers = 2,
            http = CONF,
            lua_path = tree .. "/share/lua/5.1/?.lua",
            lua_cpath = tree .. "/lib/lua/5.1/?.so",
        })
        local status, where = srv:get("/hit")
        assert.equal(200, status)
        assert.equal(tree .. "/share/lua/5.1/resty/counter.lua", where:gsub("%s+$", ""))
        for _ = 1, 9 do
            srv:get("/hit")
        end
        local hits
        for _ = 1, 50 do
            local _, body = srv:get("/hits")
            hits = tonumber(body)
            if hits == 10 then
                break
            end
            nginx.sleep(0.1)
        end
        assert.equal(10, hits)

        local requests
        for _ = 1, 50 do
            local _, body = srv:get("/stats")
            requests = tonumber(body:match('"current":{"requests":(%d+)'))
            if requests == 10 then
                break
            end
            nginx.sleep(0.1)
        end
        assert.equal(10, requests)
        srv:stop()          -- QUIT: the exit paths log too
        assert.same({}, srv:unexpected_errors())
    end)
end)
