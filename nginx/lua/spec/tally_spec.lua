-- gw.tally: usage counters in a shared dict and their drain into batches (nginx/lua/gw/tally.lua).
local tally = require("gw.tally")
local cjson = require("cjson")

-- A stand-in for ngx.shared.DICT with the calls gw.tally makes (values and expiry of `add` only).
local function dict()
    local d = { v = {}, order = {} }
    function d:get(k) return self.v[k] end
    function d:set(k, v)
        if self.v[k] == nil then self.order[#self.order + 1] = k end
        self.v[k] = v
        return true
    end
    function d:safe_set(k, v) return self:set(k, v) end
    function d:add(k, v) if self.v[k] ~= nil then return false, "exists" end return self:set(k, v) end
    function d:delete(k) self.v[k] = nil end
    function d:incr(k, n, init)
        if self.v[k] == nil then
            if init == nil then return nil, "not found" end
            self:set(k, init)
        end
        self.v[k] = self.v[k] + n
        return self.v[k], nil, false
    end
    function d:get_keys()
        local out = {}
        for _, k in ipairs(self.order) do if self.v[k] ~= nil then out[#out + 1] = k end end
        return out
    end
    return d
end

local function ids()
    local n = 0
    return function() n = n + 1 return "b" .. n end
end

describe("gw.tally", function()
    it("buckets by minute", function()
        assert.equal(120, tally.minute(179.9))
        assert.equal("u|120|k1|inst-a|gpt-4o|", tally.bucket(120, "k1", "inst-a", "gpt-4o"))
        assert.same({ 120, "", "inst-a", "llama3:8b", "r" }, { tally.parse("u|120||inst-a|llama3:8b|r") })
        assert.is_nil(tally.parse("pending"))
        assert.is_nil(tally.parse("u|120|a|b|c|x"))
    end)

    it("estimates a quarter of the bytes, rounded up", function()
        assert.equal(0, tally.estimate(0))
        assert.equal(1, tally.estimate(1))
        assert.equal(25, tally.estimate(100))
    end)

    it("adds reported, estimated and token-less requests", function()
        local d, p = dict(), tally.bucket(60, "k", "i", "m")
        tally.add(d, p, { source = "reported", prompt_tokens = 10, completion_tokens = 5, bytes = 300 }, 99)
        tally.add(d, p, { source = "estimated", bytes = 40 }, 100)
        tally.add(d, p, nil, 100)
        assert.same({ 3, 35, 15, 1 }, { d:get(p .. "r"), d:get(p .. "p"), d:get(p .. "c"), d:get(p .. "e") })
    end)

    it("accumulates a worker's requests and flushes them as the same counters add makes", function()
        local direct, flushed, acc = dict(), dict(), {}
        local requests = {
            { 60, "k|i|m", { source = "reported", prompt_tokens = 10, completion_tokens = 5 }, 99 },
            { 60, "k|i|m", { source = "estimated", bytes = 40 }, 100 },
            { 60, "k|i|m", nil, 100 },
            { 60, "|i|m", { source = "reported", prompt_tokens = 0, completion_tokens = 0 }, 0 },
            { 120, "k|i|m", { source = "estimated", bytes = 0 }, 0 },
        }
        for _, r in ipairs(requests) do
            tally.add(direct, "u|" .. r[1] .. "|" .. r[2] .. "|", r[3], r[4])
            tally.accumulate(acc, r[1], r[2], r[3], r[4])
        end
        assert.same({}, flushed.v)
        assert.is_false(tally.flush(flushed, acc))
        assert.same({}, acc)
        assert.same(direct.v, flushed.v)
        assert.same({ 3, 35, 15, 1 }, { flushed:get("u|60|k|i|m|r"), flushed:get("u|60|k|i|m|p"),
                                        flushed:get("u|60|k|i|m|c"), flushed:get("u|60|k|i|m|e") })
        -- a second flush adds what came since, and only that
        tally.accumulate(acc, 60, "k|i|m", { source = "reported", prompt_tokens = 1, completion_tokens = 2 })
        tally.flush(flushed, acc)
        assert.same({ 4, 36, 17 }, { flushed:get("u|60|k|i|m|r"), flushed:get("u|60|k|i|m|p"),
                                     flushed:get("u|60|k|i|m|c") })
        assert.is_false(tally.flush(flushed, acc))
        assert.equal(4, flushed:get("u|60|k|i|m|r"))
    end)

    it("tells when a flush evicted older entries", function()
        local d, acc = dict(), {}
        function d:incr(k, n, init) self.v[k] = (self.v[k] or init) + n return self.v[k], nil, true end
        tally.accumulate(acc, 60, "k|i|m", nil, 0)
        assert.is_true(tally.flush(d, acc))
    end)

    it("moves the counters into one pending batch, answered again until its ack", function()
        local d, new_id = dict(), ids()
        local a, b = tally.bucket(60, "k", "i", "m"), tally.bucket(60, "", "i", "m")
        tally.add(d, a, { source = "reported", prompt_tokens = 10, completion_tokens = 5 }, 0)
        tally.add(d, b, nil, 0)
        local text = tally.batch(d, 100, new_id)
        local batch = cjson.decode(text)
        assert.equal("b1", batch.id)
        assert.same({ { 60, "k", "i", "m", 1, 10, 5, 0 }, { 60, "", "i", "m", 1, 0, 0, 0 } }, batch.rows)
        -- counted meanwhile: stays for the next batch
        tally.add(d, a, { source = "reported", prompt_tokens = 1, completion_tokens = 1 }, 0)
        assert.equal(text, tally.batch(d, 100, new_id))
        assert.is_false(tally.ack(d, "other"))
        assert.is_true(tally.ack(d, "b1"))
        assert.is_false(tally.ack(d, "b1"))
        batch = cjson.decode(tally.batch(d, 100, new_id))
        assert.equal("b2", batch.id)
        assert.same({ { 60, "k", "i", "m", 1, 1, 1, 0 } }, batch.rows)
        assert.is_true(tally.ack(d, "b2"))
        assert.same({ id = cjson.null, rows = {} }, cjson.decode(tally.batch(d, 100, new_id)))
    end)

    it("deletes zero counters only once their minute is well over", function()
        local d, new_id = dict(), ids()
        local a = tally.bucket(60, "k", "i", "m")
        tally.add(d, a, nil, 0)
        tally.batch(d, 100, new_id)
        tally.ack(d, "b1")
        tally.batch(d, 100, new_id)
        assert.equal(0, d:get(a .. "r"))
        tally.batch(d, 60 + 60 + tally.GRACE + 1, new_id)
        assert.is_nil(d:get(a .. "r"))
    end)

    it("answers busy while another drain holds the lock, and moves nothing", function()
        local d = dict()
        tally.add(d, tally.bucket(60, "k", "i", "m"), nil, 0)
        d:add("lock", 1)
        assert.same({ nil, "busy" }, { tally.batch(d, 100, ids()) })
        assert.equal(1, d:get("u|60|k|i|m|r"))
    end)
end)
