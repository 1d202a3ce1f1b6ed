-- Usage counters in shared memory and their drain into batches (issue 12).
--
-- Counters: one number per (minute, key id, instance, model, field) in lua_shared_dict gw_usage, under
-- "u|<minute>|<key id>|<instance>|<model>|<field>" (no name may hold '|': registry validators), field
--   r  requests answered through a pool location (any status)
--   p  prompt tokens, c completion tokens (reported, or estimated: bytes / 4)
--   e  requests whose tokens are estimated (the answer reported no usage)
-- Every worker adds with incr (atomic), a second's worth at a time (accumulate, flush); nothing is ever set.
--
-- Drain (the controller, every few seconds, over the loopback-only usage server):
--   batch(dict, now, new_id)  the pending batch as JSON text: when none is pending, the counters move
--       into a new one (each counter's value read is subtracted from it, so a request counted meanwhile
--       stays for the next batch); the same text is answered until ack(id). The registry stores each
--       batch id once, in the transaction of its rows: a controller that dies between reading and
--       writing, or between writing and ack, reads the same batch again and counts it once.
--   ack(dict, id)   forgets the pending batch when it is this one.
-- Counters left at 0 are deleted once their minute is over by GRACE seconds (no worker adds to a
-- minute that old: a request's minute is taken when its answer ends, and its worker's flush follows within
-- a second).
--
-- Pure: the dict is anything with ngx.shared.DICT's get/set/incr/add/delete/get_keys.
local cjson = require("cjson.safe")

local find, sub, format, floor = string.find, string.sub, string.format, math.floor
local concat, pairs, tonumber = table.concat, pairs, tonumber

local _M = {}

local PENDING = "pending"
local LOCK = "lock"
local LOCK_TTL = 10       -- seconds: a drain that died holding the lock does not block the next one
local GRACE = 120         -- seconds after its minute before a zero counter is deleted
_M.GRACE = GRACE

local FIELDS = { r = 1, p = 2, c = 3, e = 4 }

-- The start of the minute of time t (seconds).
function _M.minute(t)
    return floor(t / 60) * 60
end

-- The counter prefix of a bucket; the caller appends the field letter.
function _M.bucket(minute, key_id, instance, model)
    return "u|" .. minute .. "|" .. key_id .. "|" .. instance .. "|" .. model .. "|"
end

-- Tokens estimated from bytes (a quarter, rounded up: a non-empty body is never 0 tokens).
function _M.estimate(bytes)
    return floor((bytes + 3) / 4)
end

-- Add one answered request to its bucket. u: gw.usage's result, or nil when no tokens count (not 2xx);
-- request_bytes: the request body's length (the estimate's prompt). Answers whether an add had to evict
-- older entries (the zone is too small: ISHGW_LUA_SHM_USAGE_MB).
function _M.add(dict, prefix, u, request_bytes)
    local _, _, forced = dict:incr(prefix .. "r", 1, 0)
    if not u then
        return forced
    end
    local prompt, completion
    if u.source == "reported" then
        prompt, completion = u.prompt_tokens, u.completion_tokens
    else
        prompt, completion = _M.estimate(request_bytes or 0), _M.estimate(u.bytes or 0)
        local _, _, f = dict:incr(prefix .. "e", 1, 0)
        forced = forced or f
    end
    if prompt > 0 then
        local _, _, f = dict:incr(prefix .. "p", prompt, 0)
        forced = forced or f
    end
    if completion > 0 then
        local _, _, f = dict:incr(prefix .. "c", completion, 0)
        forced = forced or f
    end
    return forced
end

-- Per-worker accumulation: a worker adds each answered request to a table of its own, acc =
-- {[minute] = {[bucket] = {r, p, c, e}}} (bucket: "<key id>|<instance>|<model>"), and moves it into the
-- shared counters with flush, a few times a second at most (gw.gateway: one timer armed by the first
-- request after a flush, and a flush when the worker exits). A table update per request instead of three
-- or four shared-dict incr (lock, hash, key string each); the drain sees a request once its worker flushed.

-- Add one answered request to acc (u, request_bytes: as add's).
function _M.accumulate(acc, minute, bucket, u, request_bytes)
    local per_minute = acc[minute]
    if not per_minute then
        per_minute = {}
        acc[minute] = per_minute
    end
    local row = per_minute[bucket]
    if not row then
        row = { 0, 0, 0, 0 }
        per_minute[bucket] = row
    end
    row[1] = row[1] + 1
    if not u then
        return
    end
    if u.source == "reported" then
        row[2] = row[2] + u.prompt_tokens
        row[3] = row[3] + u.completion_tokens
    else
        row[2] = row[2] + _M.estimate(request_bytes or 0)
        row[3] = row[3] + _M.estimate(u.bytes or 0)
        row[4] = row[4] + 1
    end
end

local LETTERS = { "r", "p", "c", "e" }

-- Move acc into the dict's counters (each non-zero count one incr) and empty it. Answers whether an incr
-- had to evict older entries (as add).
function _M.flush(dict, acc)
    local forced = false
    for minute, per_minute in pairs(acc) do
        for bucket, row in pairs(per_minute) do
            local prefix = "u|" .. minute .. "|" .. bucket .. "|"
            for k = 1, 4 do
                local n = row[k]
                if n > 0 then
                    local _, _, f = dict:incr(prefix .. LETTERS[k], n, 0)
                    forced = forced or f
                end
            end
        end
        acc[minute] = nil
    end
    return forced
end

-- "u|<minute>|<key>|<instance>|<model>|<field>" -> minute, key, instance, model, field; nil otherwise.
local function parse(name)
    if sub(name, 1, 2) ~= "u|" then
        return nil
    end
    local parts, from = {}, 3
    for i = 1, 4 do
        local bar = find(name, "|", from, true)
        if not bar then
            return nil
        end
        parts[i] = sub(name, from, bar - 1)
        from = bar + 1
    end
    local field = sub(name, from)
    if not FIELDS[field] then
        return nil
    end
    return tonumber(parts[1]), parts[2], parts[3], parts[4], field
end
_M.parse = parse

-- Move the counters into rows; answers the rows and the (name, value) pairs read.
local function collect(dict, now)
    local rows, index, taken = {}, {}, {}
    for _, name in ipairs(dict:get_keys(0)) do
        local minute, key, instance, model, field = parse(name)
        if minute then
            local value = dict:get(name)
            if value and value ~= 0 then
                local id = minute .. "|" .. key .. "|" .. instance .. "|" .. model
                local row = index[id]
                if not row then
                    row = { minute, key, instance, model, 0, 0, 0, 0 }
                    index[id] = row
                    rows[#rows + 1] = row
                end
                row[4 + FIELDS[field]] = row[4 + FIELDS[field]] + value
                taken[#taken + 1] = { name, value }
            elseif value == 0 and minute + 60 + GRACE < now then
                dict:delete(name)
            end
        end
    end
    return rows, taken
end

local function row_json(row)
    return format("[%d,%s,%s,%s,%d,%d,%d,%d]", row[1], cjson.encode(row[2]), cjson.encode(row[3]),
        cjson.encode(row[4]), row[5], row[6], row[7], row[8])
end

-- The pending batch's JSON text (made from the counters when none is pending), or nil and an error:
-- "busy" (another drain runs), "no memory" (the zone cannot hold the batch; nothing was moved).
-- An empty batch is not kept: {"id":null,"rows":[]}.
function _M.batch(dict, now, new_id)
    local pending = dict:get(PENDING)
    if pending then
        return pending
    end
    if not dict:add(LOCK, 1, LOCK_TTL) then
        return nil, "busy"
    end
    pending = dict:get(PENDING)  -- made by a drain that ended between the first get and the lock
    if pending then
        dict:delete(LOCK)
        return pending
    end
    local rows, taken = collect(dict, now)
    if #rows == 0 then
        dict:delete(LOCK)
        return '{"id":null,"rows":[]}'
    end
    local parts = {}
    for i = 1, #rows do
        parts[i] = row_json(rows[i])
    end
    local id = new_id()
    local text = '{"id":' .. cjson.encode(id) .. ',"rows":[' .. concat(parts, ",") .. "]}"
    local ok, err = dict:safe_set(PENDING, text)
    if not ok then
        dict:delete(LOCK)
        return nil, err
    end
    for i = 1, #taken do
        dict:incr(taken[i][1], -taken[i][2])
    end
    dict:delete(LOCK)
    return text
end

-- Forget the pending batch when its id is `id`: true; false when another (or none) is pending.
function _M.ack(dict, id)
    local pending = dict:get(PENDING)
    if not pending then
        return false
    end
    local decoded = cjson.decode(pending)
    if type(decoded) ~= "table" or decoded.id ~= id then
        return false
    end
    dict:delete(PENDING)
    return true
end

return _M
