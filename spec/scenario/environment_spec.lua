-- What the tests start does not depend on the environment they are run
-- from: nginx reads NGINX itself (sockets inherited in a binary upgrade)
-- and, with it set, stays in the foreground, so the helper that starts it
-- waited forever.

package.path = "spec/?.lua;" .. package.path
local nginx = require "helpers.nginx"

local quote = nginx.quote


describe("an NGINX variable in the environment", function()
    it("does not keep the helper's nginx from starting", function()
        local out = nginx.read("NGINX=" .. quote(nginx.stack.nginx)
                               .. " timeout 30 luajit -e " .. quote([[
            package.path = "spec/?.lua;" .. package.path
            local nginx = require "helpers.nginx"
            local srv = nginx.start({ workers = 1, http = [=[
                server {
                    listen 127.0.0.1:${port};
                    location / { return 200 "up\n"; }
                }]=] })
            io.write("status ", srv:get("/"), "\n")
            srv:cleanup()]]) .. " 2>&1; echo \"exit $?\"")
        assert.matches("status 200\nexit 0", out, 1, true)
    end)
end)
