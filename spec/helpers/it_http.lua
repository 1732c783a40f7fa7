-- syntax: it_http = require("helpers.it_http")(it, pending)
--
-- For the specs that send requests to the nginx running them: they need
-- the locations of spec/nginx/unit.conf and its two workers. They are
-- tagged #http: spec/run-in-nginx.lua runs them in that nginx, and leaves
-- them out under OpenResty's `resty` (one process, no such locations);
-- anywhere else without that nginx they are pending.
return function(it, pending)
    return function(name, fn)
        if package.loaded["spec.port"] then
            return it(name .. " #http", fn)
        end
        return pending(name .. " #http (needs spec/nginx/unit.conf)")
    end
end
