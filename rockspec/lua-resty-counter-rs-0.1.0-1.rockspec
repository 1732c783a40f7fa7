-- Install from a checkout (builds the Rust core with cargo, no download):
--   luarocks --lua-version 5.1 make rockspec/lua-resty-counter-rs-0.1.0-1.rockspec --tree <dir>
package = "lua-resty-counter-rs"
version = "0.1.0-1"
source = {
    url = "git+https://example.invalid/lua-resty-counter-rs.git",
    tag = "v0.1.0",
}
description = {
    summary = "Counting for OpenResty with a Rust core: lock-free per-worker counters and request-per-minute stats synced to shared dicts",
    detailed = [[
A drop-in for Kong's lua-resty-counter (require "resty.counter") whose
counts live in memory every worker shares, owned by a Rust core, written by
LuaJIT through its FFI without a lock. Integers stay exact, reads are exact
at once, and neither reloads nor killed workers lose a count. Also a drop-in for
greencheek's request counter (require "resty.greencheek.request.counter"):
requests per minute with latency percentiles, as JSON or Prometheus text.
]],
    license = "Apache-2.0",
}
dependencies = {
    "lua == 5.1",
}
build = {
    type = "command",
    -- The Makefile picks rustup's cargo or Debian's and copies the library
    -- to target/lua/ under its module name.
    build_command = "make build",
    install = {
        lua = {
            ["resty.counter"] = "lua/resty/counter.lua",
            ["resty.counter.abi"] = "lua/resty/counter/abi.lua",
            ["resty.counter.backoff"] = "lua/resty/counter/backoff.lua",
            ["resty.counter.check"] = "lua/resty/counter/check.lua",
            ["resty.counter.engine"] = "lua/resty/counter/engine.lua",
            ["resty.counter.lifecycle"] = "lua/resty/counter/lifecycle.lua",
            ["resty.counter.log"] = "lua/resty/counter/log.lua",
            ["resty.counter.metrics"] = "lua/resty/counter/metrics.lua",
            ["resty.counter.redis"] = "lua/resty/counter/redis.lua",
            ["resty.counter.requests"] = "lua/resty/counter/requests.lua",
            ["resty.counter.status"] = "lua/resty/counter/status.lua",
            ["resty.counter.store"] = "lua/resty/counter/store.lua",
            ["resty.greencheek.request.counter"] =
                "lua/resty/greencheek/request/counter.lua",
            ["resty.counter.int"] = "lua/resty/counter/int.lua",
            ["resty.counter.strict"] = "lua/resty/counter/strict.lua",
            ["resty.counter.strict_redis"] =
                "lua/resty/counter/strict_redis.lua",
            ["resty.counter.lax"] = "lua/resty/counter/lax.lua",
            ["resty.counter.spool"] = "lua/resty/counter/spool.lua",
            ["resty.counter.limit"] = "lua/resty/counter/limit.lua",
            ["resty.counter.limit_redis"] =
                "lua/resty/counter/limit_redis.lua",
        },
        lib = {
            resty_counter_core = "target/lua/resty_counter_core.so",
        },
    },
}
