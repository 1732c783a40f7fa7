-- The nginx examples of the README and the docs, as a user pastes them:
-- each ```nginx block is read from the file itself and run in a real
-- nginx with 2 workers (only the port, and the standalone block's lua
-- paths and load_module lines, which the test's own nginx sets, are
-- changed). A block that no longer runs, or answers wrong, fails here.

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"


-- The ```nginx blocks of a file, in order.
local function nginx_blocks(file)
    local text = assert(nginx.read_file(file))
    local blocks = {}
    for block in text:gmatch("```nginx\n(.-)```") do
        blocks[#blocks + 1] = block
    end
    return blocks
end


-- What goes into http {}: the block with its port made the test's.
local function as_http(block)
    local http, n = block:gsub("listen 127%.0%.0%.1:8080;", "listen 127.0.0.1:${port};")
    assert(n == 1, "the example listens on 127.0.0.1:8080 once")
    return http
end


-- The inside of a standalone nginx.conf's http {} block, without the
-- lines the test's nginx sets itself (its lua paths point at this
-- checkout, not at a luarocks tree).
local function standalone_http(block)
    local inside = assert(block:match("\nhttp {\n(.*)\n}%s*$"),
                          "a standalone nginx.conf with an http block")
    local kept = {}
    for line in inside:gmatch("[^\n]*") do
        if not line:find("lua_package_c?path") then
            kept[#kept + 1] = line
        end
    end
    return as_http(table.concat(kept, "\n"))
end


local function counts(srv)
    local status, body = srv:get("/counts")
    assert.equal(200, status, body)
    return body
end


-- Polls /counts until `pattern` matches (the sync runs each second).
local function eventually(srv, pattern)
    local body
    for _ = 1, 50 do
        body = counts(srv)
        if body:match(pattern) then
            return body
        end
        nginx.sleep(0.1)
    end
    error("/counts never matched " .. pattern .. ":\n" .. body)
end


-- nginx logs each request for a file its html folder lacks (the
-- Synopsis' server has no location for them: 404s, counted).
local NOT_FOUND = { { "No such file or directory" } }


describe("the README's Synopsis", function()
    local srv
    after_each(function()
        if srv then
            local errors = srv:unexpected_errors(NOT_FOUND)
            srv:cleanup()
            srv = nil
            assert.same({}, errors)
        end
    end)

    it("for Debian's stock nginx.conf counts requests, statuses and bytes", function()
        local block = nginx_blocks("README.md")[1]
        assert.matches("lua_shared_dict counters", block, 1, true)
        assert.is_nil(block:find("load_module", 1, true))
        srv = nginx.start({ workers = 2, http = as_http(block) })
        for _ = 1, 20 do
            srv:get("/nothing-here")
        end
        -- 20, and the test nginx's own probe for being up, a 404 too.
        local body = eventually(srv, "status:404 2[01]\n")
        -- /counts itself counts too, once each time it has answered.
        local requests = tonumber(body:match("requests (%d+)"))
        assert.is_true(requests >= 20, body)
        assert.is_true(tonumber(body:match("bytes_sent (%d+)")) > 0, body)
    end)

    it("standalone counts requests", function()
        local block = nginx_blocks("README.md")[2]
        assert.matches("load_module", block, 1, true)
        srv = nginx.start({ workers = 2, http = standalone_http(block) })
        for _ = 1, 10 do
            srv:get("/")
        end
        eventually(srv, "requests 1[0-9]\n")
    end)
end)


describe("docs/limit.md's complete example", function()
    it("answers 200 up to the limit, then 429 with the headers", function()
        local block
        for _, b in ipairs(nginx_blocks("docs/limit.md")) do
            if b:find("server {", 1, true) then
                block = b
            end
        end
        assert(block, "a complete server block in docs/limit.md")
        local srv = nginx.start({ workers = 2, http = as_http(block) })
        local statuses = {}
        for _ = 1, 101 do
            local status = srv:get("/api/x")
            statuses[status] = (statuses[status] or 0) + 1
        end
        local errors = srv:unexpected_errors(NOT_FOUND)
        srv:cleanup()
        assert.same({}, errors)
        assert.same({ [200] = 100, [429] = 1 }, statuses)
    end)
end)
