-- resty.counter.spool and its use by resty.counter.lax on Redis: a spooled
-- batch is read back whole (any key bytes, int64 deltas, TTLs), a file of
-- another counter or cut short is refused, and a counter's flush sends its
-- counter's spool files once each (the batch id), removes them, and leaves
-- another counter's alone. Against the real redis-server that
-- spec/run-in-nginx.lua starts; the files go to a directory of this spec.

local lax = require "resty.counter.lax"
local spool = require "resty.counter.spool"

local backend_helper = require "helpers.redis_backend"

local backend = backend_helper.options
local DIR = "/tmp/resty-counter-spool-" .. ngx.worker.pid()


-- A counter name of its own, its Redis key prefix, and the strict view of
-- its Redis values.
local function fresh(base)
    local name, shared = backend_helper.fresh(base)
    return name, "rc:{" .. name .. "}:", shared
end


local function files(key_prefix)
    return assert(spool.list(DIR, key_prefix))
end


describe("resty.counter.spool", function()
    setup(function()
        assert(os.execute("mkdir -p -m 0700 " .. DIR))
    end)

    teardown(function()
        os.execute("rm -rf " .. DIR)
    end)

    it("reads a written batch back whole", function()
        local batch = {
            id = "e12:34", keys = { "a", "b \n\0c", ("k"):rep(300) },
            deltas = { 1, -5, 9007199254740993LL }, ttls = { false, 1.5,
                                                              false },
        }
        local name = assert(spool.write(DIR, "rc:{s}:", batch, true))
        assert.same({ name }, files("rc:{s}:"))
        assert.same({}, files("rc:{t}:"))
        local got = assert(spool.read(DIR .. "/" .. name, "rc:{s}:"))
        assert.equal("e12:34", got.id)
        assert.same(batch.keys, got.keys)
        assert.same({ "1", "-5", "9007199254740993" }, got.deltas)
        assert.same({ false, 1.5, false }, got.ttls)
        assert.is_true(got.maybe_sent)
        assert.is_true(got.age >= 0 and got.age < 5)
        assert(spool.remove(DIR .. "/" .. name))
    end)

    it("refuses a file of another counter and one cut short", function()
        local batch = { id = "n1", keys = { "x" }, deltas = { 2 },
                        ttls = { false } }
        local name = assert(spool.write(DIR, "rc:{u}:", batch, false))
        local path = DIR .. "/" .. name
        local _, err = spool.read(path, "rc:{v}:")
        assert.matches("spool file of another counter", err, 1, true)
        local f = assert(io.open(path, "rb"))
        local text = f:read("*a")
        f:close()
        f = assert(io.open(path, "wb"))
        f:write(text:sub(1, #text - 2))
        f:close()
        _, err = spool.read(path, "rc:{u}:")
        assert.matches("not a whole spool file", err, 1, true)
        assert(spool.remove(path))
    end)

    it("names a file by its counter's prefix and id, nothing but the "
       .. "name", function()
        assert.equal("lax-rc%3A%7Ba%2F..%7D%3A-",
                     spool.file_prefix("rc:{a/..}:"))
    end)

    it("is sent by a counter's flush once, then removed; another "
       .. "counter's file stays", function()
        for _, dict in ipairs({ "lax_engine", false }) do
            local name, key_prefix, shared = fresh("spooled")
            local _, other_prefix = fresh("other")
            local batch = { id = "spec:" .. name, keys = { "k", "t" },
                            deltas = { 5, 2 }, ttls = { false, 30 } }
            assert(spool.write(DIR, key_prefix, batch, false))
            assert(spool.write(DIR, other_prefix, batch, false))

            local c = assert(lax.new(dict or nil, {
                name = name, redis = backend(), allowed_lag = 3600,
                spool_dir = DIR }))
            assert(c:flush())
            assert.same({ 5, 2 }, shared:get_all({ "k", "t" }))
            assert.same({}, files(key_prefix))
            assert.equal(1, c:self_metrics().unspooled)
            -- The same batch spooled again (a crash before the removal):
            -- applied once.
            assert(spool.write(DIR, key_prefix, batch, true))
            assert(c:flush())
            assert.same({ 5, 2 }, shared:get_all({ "k", "t" }))
            assert.same({}, files(key_prefix))
            assert.equal(2, c:self_metrics().unspooled)
            assert.equal(1, c:self_metrics().duplicates)
            assert.equal(1, #files(other_prefix))
        end
    end)
end)
