-- Headless Chromium (Debian's `chromium`) for scenario specs: one run per
-- call, as root too (--no-sandbox), with a new empty profile, no network
-- of its own (no updates, sync, QUIC or background requests), bounded by
-- `timeout`. Pages run in virtual time: the clock jumps to the next timer
-- whenever nothing is loading, so a page that refreshes every second
-- refreshes several times within a short real time.

local nginx = require "helpers.nginx"

local quote = nginx.quote

local _M = { binary = "/usr/bin/chromium" }

local FLAGS = {
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
    "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--mute-audio",
}

local runs = 0


-- syntax: ok, out = chromium.run(dir, url, args)
--
-- Runs Chromium on `url` with the extra `args` (a list), its profile and
-- its messages in `dir`, for at most 60 s; true when it exited 0, and its
-- standard output.
function _M.run(dir, url, args)
    assert(nginx.sh("test -x " .. _M.binary),
           "no " .. _M.binary .. " (make deps installs Debian's chromium)")
    runs = runs + 1
    local profile = dir .. "/chromium-profile-" .. runs
    local out = dir .. "/chromium-" .. runs .. ".out"
    local cmd = { "timeout", "60", quote(_M.binary) }
    for _, flag in ipairs(FLAGS) do
        cmd[#cmd + 1] = flag
    end
    cmd[#cmd + 1] = "--user-data-dir=" .. quote(profile)
    for _, arg in ipairs(args or {}) do
        cmd[#cmd + 1] = quote(arg)
    end
    cmd[#cmd + 1] = quote(url)
    cmd[#cmd + 1] = "> " .. quote(out) .. " 2> " .. quote(out .. ".err")
    local ok = nginx.sh("mkdir -p " .. quote(profile) .. " && "
                        .. table.concat(cmd, " "))
    nginx.sh("rm -rf " .. quote(profile))
    return ok, nginx.read_file(out) or ""
end


-- syntax: dom = chromium.dump_dom(dir, url, virtual_ms)
--
-- The page's DOM as HTML after `virtual_ms` milliseconds of virtual time.
function _M.dump_dom(dir, url, virtual_ms)
    local ok, dom = _M.run(dir, url, { "--virtual-time-budget="
                                       .. virtual_ms, "--dump-dom" })
    assert(ok and dom:find("</html>"), "chromium --dump-dom " .. url
           .. " failed:\n" .. dom)
    return dom
end


-- syntax: chromium.screenshot(dir, url, file, virtual_ms)
function _M.screenshot(dir, url, file, virtual_ms)
    local ok = _M.run(dir, url, { "--virtual-time-budget=" .. virtual_ms,
                                  "--window-size=1280,1024",
                                  "--hide-scrollbars",
                                  "--screenshot=" .. file })
    assert(ok and (nginx.read_file(file) or ""):sub(2, 4) == "PNG",
           "chromium --screenshot " .. url .. " made no PNG")
end


return _M
