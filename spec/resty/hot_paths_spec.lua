-- The hot paths of resty.counter.strict, .lax and .limit compile in the
-- JIT: no trace abort in the library's own code (NYI and the like).

local strict = require "resty.counter.strict"
local lax = require "resty.counter.lax"
local limit = require "resty.counter.limit"


local function aborts_in(fn)
    -- (see spec/helpers/jit.lua for why unroll-limit aborts are left out)
    return require("helpers.jit").aborts_in(fn, true)
end


describe("hot paths", function()
    before_each(function()
        ngx.shared.strict:flush_all()
        ngx.shared.limit:flush_all()
    end)

    it("strict inc, inc_if and get compile", function()
        local c = strict.new("strict", { name = "hot" })
        local aborts, compiled, loops = aborts_in(function()
            -- One loop per call site, as in production (one loop with all
            -- three can hit the unroll limit while it forms).
            for _ = 1, 20000 do
                c:inc("a")
            end
            for _ = 1, 20000 do
                c:inc_if("b", "lt", 1000000, 2)
            end
            for _ = 1, 20000 do
                c:get("a")
            end
        end)
        assert.same({}, aborts)
        assert.is_true(compiled > 0)
        assert.equal(3, loops, "not every loop compiled")
        assert.equal(20000, c:get("a"))
        assert.equal(40000, c:get("b"))
    end)

    it("lax inc compiles", function()
        local c = lax.new("strict", { name = "hotlax", allowed_lag = 3600 })
        local aborts, compiled, loops = aborts_in(function()
            for _ = 1, 100000 do
                c:inc("a")
                c:inc("b", 3)
            end
        end)
        assert.same({}, aborts)
        assert.is_true(compiled > 0)
        assert.equal(1, loops, "the loop did not compile")
        assert.is_true(c:flush())
        assert.same({ 100000, 300000 }, strict.new("strict", { name = "hotlax" })
                                              :get_all({ "a", "b" }))
    end)

    it("lax inc on Redis in the shared engine compiles", function()
        local c = lax.new("lax_engine", {
            name = "hotlax" .. ngx.worker.pid(), allowed_lag = 3600,
            redis = require("helpers.redis_backend").options() })
        local aborts, compiled, loops = aborts_in(function()
            for _ = 1, 100000 do
                c:inc("a")
                c:inc("b", 3, 60)
            end
        end)
        assert.same({}, aborts)
        assert.is_true(compiled > 0)
        assert.equal(1, loops, "the loop did not compile")
        assert.same({ 100000, 300000 }, c:get_all({ "a", "b" }))
        assert(c:clear())
    end)

    it("limit incoming compiles, fixed and sliding", function()
        local fixed = limit.new("limit", { limit = 1e9, window = 3600, name = "f" })
        local sliding = limit.new("limit", { limit = 1e9, window = 3600, name = "s",
                                             algorithm = "sliding" })
        local aborts, compiled, loops = aborts_in(function()
            for _ = 1, 50000 do
                fixed:incoming("k", true)
                sliding:incoming("k", true)
            end
        end)
        assert.same({}, aborts)
        assert.is_true(compiled > 0)
        assert.equal(1, loops, "the loop did not compile")
    end)
end)
