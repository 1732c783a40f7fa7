-- The script `resty` runs for spec/run-in-nginx.lua when OpenResty is on
-- PATH: `arg` holds busted's command line.
os.exit(require("helpers.busted_entry").run(arg) and 0 or 1)
