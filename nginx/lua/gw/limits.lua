-- Key limits enforced in nginx (issue 12): tokens per minute (a key's tpm_limit) and a budget in USD per
-- period (max_budget_usd, budget_period: day, month or total; UTC), checked from shared memory before a
-- request reaches a provider (gw.gateway.route) and counted once its answer ended (gw.gateway.counted).
-- No call to the controller on the request path.
--
-- State in lua_shared_dict gw_state (ISHGW_LUA_SHM_STATE_MB), kept across reloads:
--   "t|<key id>|<minute>"          tokens (prompt + completion) of the key's requests answered that minute
--   "b|<key id>|<period>|<start>"  USD the key spent in the period starting at <start> (0 for total)
-- Tokens per minute use the two-bucket approximation of a sliding minute: the tokens of this minute plus
-- the previous minute's, weighted by the part of it still inside the last 60 s.
--
-- Spending survives a restart of nginx through a seed: before every (re)load the controller writes each
-- budgeted key's spend of its current period as the registry holds it (the drained usage) into the seed
-- file; the master's init (init_by_lua) raises the key's counter to that figure when it holds less
-- (seed_counters). A counter and the registry each hold a part of what the key truly spent (the counter:
-- what this nginx counted since its shared memory was made; the registry: what was drained, from any
-- nginx), so the larger of the two never counts a request twice.
--
-- Pure: no ngx.* use; the dict is anything with ngx.shared.DICT's get/incr, time is passed in.
local floor, max, format, next, pairs, tonumber = math.floor, math.max, string.format, next, pairs, tonumber
local date = os.date

local _M = {}

local MINUTE = 60
local DAY = 86400
local TPM_TTL = 2 * MINUTE + 10      -- a minute's tokens are read during the next minute only
local BUDGET_TTL_AFTER = DAY          -- a period's spend is kept a day past its end

-- Days since 1970-01-01 of a civil date (proleptic Gregorian), and back (H. Hinnant's algorithms).
local function days_from_civil(y, m, d)
    y = m <= 2 and y - 1 or y
    local era = floor(y / 400)
    local yoe = y - era * 400
    local mp = (m + 9) % 12
    local doy = floor((153 * mp + 2) / 5) + d - 1
    local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
    return era * 146097 + doe - 719468
end
_M.days_from_civil = days_from_civil

local function civil_from_days(z)
    z = z + 719468
    local era = floor(z / 146097)
    local doe = z - era * 146097
    local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
    local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
    local mp = floor((5 * doy + 2) / 153)
    local d = doy - floor((153 * mp + 2) / 5) + 1
    local m = mp < 10 and mp + 3 or mp - 9
    return yoe + era * 400 + (m <= 2 and 1 or 0), m, d
end
_M.civil_from_days = civil_from_days

-- The period of time t (seconds, UTC): its start and its end (nil: "total" never ends).
function _M.period(kind, t)
    if kind == "day" then
        local start = floor(t / DAY) * DAY
        return start, start + DAY
    elseif kind == "month" then
        local y, m = civil_from_days(floor(t / DAY))
        local ny, nm = m == 12 and y + 1 or y, m == 12 and 1 or m + 1
        return days_from_civil(y, m, 1) * DAY, days_from_civil(ny, nm, 1) * DAY
    end
    return 0, nil
end

-- Tokens of the sliding minute at `elapsed` seconds into the current minute: the current minute's
-- tokens plus the previous minute's in proportion to its part still inside the last 60 s.
function _M.tokens_used(prev, cur, elapsed)
    return cur + prev * (MINUTE - elapsed) / MINUTE
end

-- Whole seconds (at least 1) until the sliding minute holds fewer than `limit` tokens, given no new
-- tokens meanwhile; 0 when it already does.
function _M.tokens_wait(prev, cur, elapsed, limit)
    if _M.tokens_used(prev, cur, elapsed) < limit then
        return 0
    end
    local wait
    if cur < limit then
        -- Within this minute: prev * (60 - elapsed - w) / 60 < limit - cur.
        wait = MINUTE - elapsed - MINUTE * (limit - cur) / prev
    else
        -- In the next minute, when this one is the previous one: cur * (60 - x) / 60 < limit.
        wait = (MINUTE - elapsed) + MINUTE * (1 - limit / cur)
    end
    return max(1, floor(wait + 1e-9) + 1)  -- past the exact figure (it is one a division may round down)
end

-- A request's cost in USD at an instance's prices ({prompt, completion} per 1,000 tokens).
function _M.cost(prices, prompt, completion)
    if not prices then
        return 0
    end
    return (prompt * prices[1] + completion * prices[2]) / 1000
end

-- The limits of a configuration: clients.json's "limits" ({keys = {id -> {tpm, budget, period}},
-- prices = {instance -> {prompt, completion}}}), or nil when no key has one.
function _M.new(data)
    if type(data) ~= "table" or type(data.keys) ~= "table" or next(data.keys) == nil then
        return nil
    end
    return { keys = data.keys, prices = data.prices or {}, bounds = {} }
end

-- The current period's start and end for a kind, worked out once per period per worker.
local function bounds(lim, kind, now)
    local b = lim.bounds[kind]
    if not b or (b[2] and now >= b[2]) then
        local start, stop = _M.period(kind, now)
        b = { start, stop }
        lim.bounds[kind] = b
    end
    return b[1], b[2]
end

-- Seconds a period's counter is kept: until a day past the period's end (0: for ever, "total").
local function budget_ttl(stop, now)
    return stop and (stop - floor(now) + BUDGET_TTL_AFTER) or 0
end

local function budget_key(id, kind, start)
    return "b|" .. id .. "|" .. kind .. "|" .. start
end
_M.budget_key = budget_key

local function iso(t)
    return date("!%Y-%m-%dT%H:%M:%SZ", t)
end
_M.iso = iso

local function usd(x)
    return (format("%.6f", x):gsub("0+$", ""):gsub("%.$", ""))
end
_M.usd = usd

-- Whether the key may send another request now: nil, or a refusal {kind = "tpm" | "budget", wait =
-- seconds (nil: the budget never resets), message}.
function _M.check(lim, dict, id, now)
    local key = lim.keys[id]
    if not key then
        return nil
    end
    local budget = key.budget
    if budget and budget > 0 then
        local start, stop = bounds(lim, key.period, now)
        local spent = dict:get(budget_key(id, key.period, start)) or 0
        if spent >= budget then
            local when = stop and ("; it resets at " .. iso(stop))
                or "; it does not reset (budget_period total)"
            return {
                kind = "budget",
                wait = stop and max(1, stop - floor(now)) or nil,
                reset = stop,
                message = "This API key has spent its budget of $" .. usd(budget) .. " per "
                    .. (key.period == "total" and "lifetime" or key.period) .. " (max_budget_usd)" .. when,
            }
        end
    end
    local tpm = key.tpm
    if tpm and tpm > 0 then
        local minute = floor(now / MINUTE) * MINUTE
        local cur = dict:get("t|" .. id .. "|" .. minute) or 0
        local prev = dict:get("t|" .. id .. "|" .. (minute - MINUTE)) or 0
        local wait = _M.tokens_wait(prev, cur, now - minute, tpm)
        if wait > 0 then
            return {
                kind = "tpm",
                wait = wait,
                message = "Too many tokens: this API key's limit of " .. tpm .. " tokens per minute "
                    .. "(its tpm_limit) is spent; retry in " .. wait .. " s",
            }
        end
    end
    return nil
end

-- Count an answered request's tokens and cost for its key (a key with no limit: nothing).
function _M.spend(lim, dict, id, instance, prompt, completion, now)
    local key = lim.keys[id]
    if not key then
        return
    end
    local tokens = prompt + completion
    if key.tpm and key.tpm > 0 and tokens > 0 then
        dict:incr("t|" .. id .. "|" .. floor(now / MINUTE) * MINUTE, tokens, 0, TPM_TTL)
    end
    if key.budget and key.budget > 0 then
        local cost = _M.cost(lim.prices[instance], prompt, completion)
        if cost > 0 then
            local start, stop = bounds(lim, key.period, now)
            dict:incr(budget_key(id, key.period, start), cost, 0, budget_ttl(stop, now))
        end
    end
end

-- Raise each budgeted key's counter of its current period to the registry's figure when it holds less.
-- seeds: {key id -> {period = kind, start = period start, spent = USD}} (the controller's seed file);
-- a seed of another period than the current one (it was written before the period turned) is left out.
-- Answers how many counters were raised.
function _M.seed_counters(lim, dict, seeds, now)
    local raised = 0
    for id, seed in pairs(seeds or {}) do
        local key = lim.keys[id]
        local spent = type(seed) == "table" and tonumber(seed.spent)
        if key and key.budget and key.budget > 0 and spent and seed.period == key.period then
            local start, stop = _M.period(key.period, now)
            if seed.start == start then
                local name = budget_key(id, key.period, start)
                local held = dict:get(name) or 0
                if spent > held then
                    dict:incr(name, spent - held, 0, budget_ttl(stop, now))
                    raised = raised + 1
                end
            end
        end
    end
    return raised
end

return _M
