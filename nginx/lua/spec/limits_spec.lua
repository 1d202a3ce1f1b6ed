-- gw.limits: a key's tokens per minute and budget, checked and counted in a shared dict
-- (nginx/lua/gw/limits.lua).
local limits = require("gw.limits")

-- A stand-in for ngx.shared.DICT's get/incr (with init and init_ttl, as lua-nginx-module 0.10.23 has).
local function dict()
    local d = { v = {}, ttl = {} }
    function d:get(k) return self.v[k] end
    function d:incr(k, n, init, init_ttl)
        if self.v[k] == nil then
            if init == nil then return nil, "not found" end
            self.v[k] = init
            self.ttl[k] = init_ttl
        end
        self.v[k] = self.v[k] + n
        return self.v[k]
    end
    return d
end

local T = 1764547200  -- 2025-12-01T00:00:00Z

local function lim(keys, prices)
    return limits.new({ keys = keys, prices = prices or { a = { 1, 2 } } })
end

describe("gw.limits", function()
    describe("calendar", function()
        it("converts civil dates and days both ways", function()
            assert.equal(0, limits.days_from_civil(1970, 1, 1))
            assert.equal(T / 86400, limits.days_from_civil(2025, 12, 1))
            assert.same({ 2000, 2, 29 }, { limits.civil_from_days(limits.days_from_civil(2000, 2, 29)) })
            -- Every day of 1900..2400 round-trips and follows the previous one.
            local z = limits.days_from_civil(1900, 1, 1)
            for day = z, limits.days_from_civil(2400, 12, 31) do
                local y, m, d = limits.civil_from_days(day)
                assert(limits.days_from_civil(y, m, d) == day)
            end
        end)

        it("gives each period's start and end in UTC", function()
            assert.same({ T, T + 86400 }, { limits.period("day", T + 3600) })
            assert.same({ T - 86400, T }, { limits.period("day", T - 1) })
            local jan = limits.days_from_civil(2026, 1, 1) * 86400
            local feb = limits.days_from_civil(2024, 2, 1) * 86400
            assert.same({ T, jan }, { limits.period("month", T + 10) })
            local mar = limits.days_from_civil(2024, 3, 1) * 86400
            assert.same({ feb, mar }, { limits.period("month", feb + 28 * 86400) })  -- a leap year's 29th
            assert.same({ 0, nil }, { limits.period("total", T) })
            assert.equal("2025-12-01T00:00:00Z", limits.iso(T))
        end)
    end)

    describe("tokens per minute", function()
        it("weights the previous minute by its part still in the last 60 s", function()
            assert.equal(100, limits.tokens_used(0, 100, 30))
            assert.equal(150, limits.tokens_used(100, 100, 30))
            assert.equal(200, limits.tokens_used(100, 100, 0))
        end)

        it("waits until the sliding minute holds fewer tokens than the limit", function()
            assert.equal(0, limits.tokens_wait(0, 999, 10, 1000))
            -- This minute alone spent it: the wait ends in the next minute, once enough of this one is out.
            assert.equal(51, limits.tokens_wait(0, 1000, 10, 1000))    -- 50 s to the turn, then just past it
            assert.equal(81, limits.tokens_wait(0, 2000, 10, 1000))    -- and 30 s more for half of 2,000
            -- The previous minute's weight: 500 + 1000 * (60 - 30 - w) / 60 < 1000 from w = 0 on.
            assert.equal(1, limits.tokens_wait(1000, 500, 30, 1000))
            assert.equal(26, limits.tokens_wait(1200, 500, 10, 1000))  -- 1200 * (50 - w) / 60 < 500: w > 25
        end)

        it("never answers a wait after which the limit is still spent", function()
            for prev = 0, 3000, 250 do
                for cur = 0, 3000, 250 do
                    for elapsed = 0, 59.5, 6.5 do
                        local wait = limits.tokens_wait(prev, cur, elapsed, 1000)
                        if wait > 0 then
                            local at = elapsed + wait
                            local used = at < 60 and limits.tokens_used(prev, cur, at)
                                or limits.tokens_used(cur, 0, at - 60)
                            local case = ("prev %d cur %d at %g waits %d"):format(prev, cur, elapsed, wait)
                            assert(used < 1000, case)
                            -- and no longer than needed: a second less is not enough
                            local before = at - 1
                            if wait > 1 then
                                local earlier = before < 60 and limits.tokens_used(prev, cur, before)
                                    or limits.tokens_used(cur, 0, before - 60)
                                assert(earlier >= 1000, case)
                            end
                        end
                    end
                end
            end
        end)
    end)

    describe("check and spend", function()
        it("has nothing to do without keys", function()
            assert.is_nil(limits.new(nil))
            assert.is_nil(limits.new({ keys = {} }))
        end)

        it("refuses a key once its tokens per minute are spent, until the window frees", function()
            local l, d = lim({ k1 = { tpm = 1000 } }), dict()
            assert.is_nil(limits.check(l, d, "k1", T + 5))
            limits.spend(l, d, "k1", "a", 600, 300, T + 5)
            assert.is_nil(limits.check(l, d, "k1", T + 6))
            limits.spend(l, d, "k1", "a", 100, 50, T + 7)       -- 1,050: spent
            local refusal = limits.check(l, d, "k1", T + 8)
            assert.equal("tpm", refusal.kind)
            assert.equal(52 + 3, refusal.wait)  -- 52 s to the turn, 60 * 50/1050 = 2.9 s more
            assert.matches("1000 tokens per minute", refusal.message)
            assert.is_nil(limits.check(l, d, "k1", T + 8 + refusal.wait))
            assert.is_nil(limits.check(l, d, "k2", T + 8))      -- another key: no limit
            assert.equal(130, d.ttl["t|k1|" .. T])
        end)

        it("counts no tokens for a key without a tpm_limit, no cost for one without a budget", function()
            local l, d = lim({ k1 = { budget = 1, period = "day" }, k2 = { tpm = 10 } }), dict()
            limits.spend(l, d, "k1", "a", 100, 100, T)
            limits.spend(l, d, "k2", "a", 100, 100, T)
            limits.spend(l, d, "k3", "a", 100, 100, T)
            assert.is_nil(d.v["t|k1|" .. T])
            assert.equal(200, d.v["t|k2|" .. T])
            assert.is_nil(d.v[limits.budget_key("k2", "day", T)])
            assert.near(0.3, d.v[limits.budget_key("k1", "day", T)], 1e-12)
        end)

        it("refuses a key over its budget until the period resets, with the reset time", function()
            local l, d = lim({ k1 = { budget = 0.5, period = "day" } }), dict()
            limits.spend(l, d, "k1", "a", 100, 150, T + 100)     -- $0.1 + $0.3
            assert.is_nil(limits.check(l, d, "k1", T + 101))
            limits.spend(l, d, "k1", "a", 100, 0, T + 102)       -- $0.5: spent
            local refusal = limits.check(l, d, "k1", T + 103.5)
            assert.equal("budget", refusal.kind)
            assert.equal(86400 - 103, refusal.wait)
            assert.equal(T + 86400, refusal.reset)
            assert.matches("budget of %$0.5 per day", refusal.message)
            assert.matches("resets at 2025%-12%-02T00:00:00Z", refusal.message)
            assert.is_nil(limits.check(l, d, "k1", T + 86400))   -- the next day
            assert.equal(86400 - 100 + 86400, d.ttl[limits.budget_key("k1", "day", T)])
        end)

        it("has no reset for a total budget; an instance without prices costs nothing", function()
            local l, d = lim({ k1 = { budget = 1, period = "total" } }), dict()
            limits.spend(l, d, "k1", "unpriced", 10000, 10000, T)
            assert.is_nil(limits.check(l, d, "k1", T))
            limits.spend(l, d, "k1", "a", 1000, 0, T)
            local refusal = limits.check(l, d, "k1", T + 365 * 86400)
            assert.is_nil(refusal.wait)
            assert.matches("does not reset", refusal.message)
            assert.equal(0, d.ttl[limits.budget_key("k1", "total", 0)])
        end)

        it("checks the budget of the month the request is in", function()
            local l, d = lim({ k1 = { budget = 1, period = "month" } }), dict()
            local dec31 = T + 30 * 86400 + 86399
            limits.spend(l, d, "k1", "a", 1000, 0, dec31)
            assert.equal(1, limits.check(l, d, "k1", dec31).wait)
            assert.is_nil(limits.check(l, d, "k1", dec31 + 1))  -- January
        end)
    end)

    describe("seeds", function()
        it("raises a counter to the registry's figure, never beyond, never twice", function()
            local l = lim({ k1 = { budget = 1, period = "day" }, k2 = { budget = 1, period = "month" } })
            local d = dict()
            limits.spend(l, d, "k1", "a", 125, 0, T + 10)  -- this nginx counted $0.125
            local seeds = {
                k1 = { period = "day", start = T, spent = 0.5 },  -- the registry ($0.125 of it seen here)
                k2 = { period = "day", start = T, spent = 9 },     -- another period than the key's now
                k3 = { period = "day", start = T, spent = 9 },     -- no such key
            }
            assert.equal(1, limits.seed_counters(l, d, seeds, T + 20))
            assert.equal(0.5, d.v[limits.budget_key("k1", "day", T)])
            assert.equal(0, limits.seed_counters(l, d, seeds, T + 30))  -- a reload with the same seed
            assert.equal(0.5, d.v[limits.budget_key("k1", "day", T)])
            limits.spend(l, d, "k1", "a", 250, 0, T + 40)
            assert.equal(0, limits.seed_counters(l, d, seeds, T + 50))   -- this nginx counted more
            assert.equal(0.75, d.v[limits.budget_key("k1", "day", T)])
            assert.is_nil(d.v[limits.budget_key("k2", "month", T)])
        end)

        it("leaves out a seed of a period that has ended, and bad seeds", function()
            local l, d = lim({ k1 = { budget = 1, period = "day" } }), dict()
            local yesterday = { k1 = { period = "day", start = T - 86400, spent = 5 } }
            assert.equal(0, limits.seed_counters(l, d, yesterday, T))
            local bad = { k1 = { period = "day", start = T, spent = "x" } }
            assert.equal(0, limits.seed_counters(l, d, bad, T))
            assert.equal(0, limits.seed_counters(l, d, { k1 = 3 }, T))
            assert.equal(0, limits.seed_counters(l, d, nil, T))
        end)
    end)
end)
