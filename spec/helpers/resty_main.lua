-- The script `resty` runs for spec/run-in-nginx.lua when OpenResty is the
-- stack: `arg` holds a folder, then busted's command line. busted's
-- report goes to folder/busted.out as it runs, then "0" (all passed) or
-- "1" to folder/result.
local dir = table.remove(arg, 1)
local passed = require("helpers.busted_entry").run(arg, dir .. "/busted.out")
local f = assert(io.open(dir .. "/result", "w"))
f:write(passed and "0" or "1")
f:close()
os.exit(passed and 0 or 1)
