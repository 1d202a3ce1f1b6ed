-- Who a request comes from: its API key or JWT, checked in the rewrite phase (issue 11; the port of the
-- first request path's njs auth module, same verdicts and messages, with RS256/ES256 now verified
-- synchronously here).
--
-- Pure: no ngx.* use. The settings (clients.json, decoded by the caller), the clock, the crypto module
-- and the verdict cache are handed in, so busted runs it under plain LuaJIT
-- (nginx/lua/spec/identity_spec.lua).
--
--   local identity = require("gw.identity")
--   local id, problems = identity.new(clients, { now = ngx.time, crypto = require("gw.crypto"),
--                                                cache = require("resty.lrucache").new(10000) })
--   -- problems: what in clients was skipped (keys that do not parse...), one string each, for the log
--   local token = identity.presented(authorization, x_api_key, api_key)   -- string or nil
--   local verdict = id:check(token)
--   id.restricts                                                          -- can a verdict carry models?
--   identity.allows(verdict, model, asked)                                -- boolean
--
-- Verdicts are shared tables (constants, cached ones, one per API key): callers must not change them.
--   accepted: {ok = true, id = "<id>" ("" anonymous), rpm = "<rpm>" or "", models = {patterns} or nil}
--   refused:  {ok = false, reason = "missing" | "invalid" | "expired" | "disabled", message = "..."}
--
-- new() does all the per-(re)load work (public keys parsed, indexed by alg and kid, settings copied into
-- upvalues); check() only looks things up. Give each new() a cache of its own: cached verdicts were
-- reached with that new()'s settings.

local cjson = require("cjson.safe")
local bit = require("bit")
local ffi = require("ffi")

local byte, char, find, format, gmatch, gsub, lower, sub = string.byte, string.char, string.find,
    string.format, string.gmatch, string.gsub, string.lower, string.sub
local bor, floor, huge, max, min = bit.bor, math.floor, math.huge, math.max, math.min
local ipairs, pairs, tonumber, type = ipairs, pairs, tonumber, type
local sort = table.sort

local function hex_byte(h)
    return char(tonumber(h, 16))
end

local null = cjson.null                   -- JSON null as cjson decodes it (a lightuserdata)

-- A decoder of our own: refuses NaN, Infinity and hex numbers (a token with "exp": NaN never expires).
local json = cjson.new()
json.decode_invalid_numbers(false)
local decode_json = json.decode

local _M = {}

local function refusal(reason, message)
    return { ok = false, reason = reason, message = message }
end

-- The refusals, one shared table each; their messages are the njs request path's, unchanged.
local REFUSED = {
    missing = refusal("missing", "No API key: send it as Authorization: Bearer <key>, x-api-key or api-key"),
    key_invalid = refusal("invalid", "The API key is not valid"),
    key_disabled = refusal("disabled", "The API key is disabled"),
    key_expired = refusal("expired", "The API key has expired"),
    not_jwt = refusal("invalid", "The bearer token is not a valid JWT"),
    signature = refusal("invalid", "The token signature is not valid"),
    algorithm = refusal("invalid", "The token algorithm is not accepted here"),
    no_exp = refusal("invalid", "The token has no expiry (exp)"),
    expired = refusal("expired", "The token has expired"),
    nbf = refusal("invalid", "The token is not valid yet (nbf)"),
    audience = refusal("invalid", "The token is not meant for this audience"),
    issuer = refusal("invalid", "The token comes from an issuer not accepted here"),
}
_M.REFUSED = REFUSED

-- No credential (or a refused one) while clients.required is false.
local ANONYMOUS = { ok = true, id = "", rpm = "", models = nil }
_M.ANONYMOUS = ANONYMOUS

local REFUSED_TTL = 60                    -- seconds a refused JWT's verdict is cached

-- An optional field: nil for absent and for JSON null.
local function opt(v)
    if v == null then
        return nil
    end
    return v
end

-- A rate as the limit zones take it: "600", or "" for none (0, absent, not a number).
local function rpm_string(n)
    if type(n) == "number" and n >= 1 and n < huge then
        return format("%d", floor(n))
    end
    return ""
end

-- A list of model patterns: the non-empty strings of an array, or nil when there are none.
local function model_list(v)
    if type(v) ~= "table" then
        return nil
    end
    local out = {}
    for _, m in ipairs(v) do
        if type(m) == "string" and m ~= "" then
            out[#out + 1] = m
        end
    end
    return out[1] and out or nil
end

-- Header values --------------------------------------------------------------------------------------

-- Whitespace as JavaScript's \s knows it in ASCII (and Lua's %s): space, \t \n \v \f \r.
local function is_space(c)
    return c == 32 or (c >= 9 and c <= 13)
end

local WHITESPACE = { " ", "\t", "\n", "\v", "\f", "\r" }

ffi.cdef("size_t strcspn(const char *s, const char *reject);")
local C = ffi.C
local SPACES = " \t\n\v\f\r"

-- first_space past a NUL byte: plain finds, memchr speed, where a pattern class would match a byte at
-- a time.
local function first_space_finds(s, i)
    local at
    for k = 1, #WHITESPACE do
        local j = find(s, WHITESPACE[k], i, true)
        if j and (not at or j < at) then
            at = j
        end
    end
    return at
end

-- Index of the first whitespace byte of s at or after i, or nil: libc's strcspn (one call; a Lua
-- string ends in a NUL), unless a NUL inside s stopped it (nginx refuses those in header values).
local function first_space(s, i)
    local k = i + tonumber(C.strcspn(ffi.cast("const char *", s) + (i - 1), SPACES))
    if k > #s then
        return nil
    elseif byte(s, k) ~= 0 then
        return k
    end
    return first_space_finds(s, i)
end

-- The token of "Bearer <token>" (as /^\s*Bearer\s+(\S+)\s*$/i), or nil.
local function bearer(h)
    local i = 1
    local c = byte(h, i)
    while c and is_space(c) do
        i = i + 1
        c = byte(h, i)
    end
    local b1, e, a, r1, e2, r2 = byte(h, i, i + 5)
    -- b|32 is 'b' for 'B' and 'b' only (and so on): a case-insensitive compare of letters.
    if not r2 or bor(b1, 32) ~= 98 or bor(e, 32) ~= 101 or bor(a, 32) ~= 97 or bor(r1, 32) ~= 114
        or bor(e2, 32) ~= 101 or bor(r2, 32) ~= 114 then
        return nil
    end
    i = i + 6
    local j = i
    c = byte(h, j)
    while c and is_space(c) do
        j = j + 1
        c = byte(h, j)
    end
    if j == i or not c then
        return nil                        -- no space after Bearer, or nothing after the space
    end
    local stop = first_space(h, j)
    if not stop then
        return sub(h, j)
    end
    for k = stop + 1, #h do
        if not is_space(byte(h, k)) then
            return nil                    -- two words after Bearer
        end
    end
    return sub(h, j, stop - 1)
end

local function trim(s)
    local i, j = 1, #s
    while i <= j and is_space(byte(s, i)) do
        i = i + 1
    end
    while j >= i and is_space(byte(s, j)) do
        j = j - 1
    end
    return sub(s, i, j)
end

-- A header's value: a repeated header (a Lua table from ngx.req.get_headers) counts by its first.
local function first(v)
    if type(v) == "table" then
        return v[1]
    end
    return v
end

-- The credential a request presents: Authorization: Bearer <token>, else x-api-key, else api-key
-- (trimmed), else nil. A non-Bearer Authorization header falls through to the others.
function _M.presented(authorization, x_api_key, api_key)
    authorization = first(authorization)
    if type(authorization) == "string" then
        local token = bearer(authorization)
        if token then
            return token
        end
    end
    local key = first(x_api_key)
    if type(key) ~= "string" or key == "" then
        key = first(api_key)
    end
    if type(key) ~= "string" then
        return nil
    end
    key = trim(key)
    if key == "" then
        return nil
    end
    return key
end

-- JWT shape -------------------------------------------------------------------------------------------

-- Bytes of a JWT's compact form: base64url's alphabet and the dots between its parts.
local JWT_BYTE = ffi.new("uint8_t[256]")
for _, range in ipairs({ { 65, 90 }, { 97, 122 }, { 48, 57 } }) do
    for c = range[1], range[2] do
        JWT_BYTE[c] = 1
    end
end
JWT_BYTE[45], JWT_BYTE[95], JWT_BYTE[46] = 1, 1, 1  -- - _ .

-- Where a token's two dots are when it has three non-empty parts, else nil. Its bytes are checked
-- apart (jwt_bytes), after the verdict cache: a cached token had them checked once.
local function jwt_dots(token)
    local d1 = find(token, ".", 1, true)
    if not d1 or d1 == 1 then
        return nil
    end
    local d2 = find(token, ".", d1 + 1, true)
    if not d2 or d2 == d1 + 1 or d2 == #token or find(token, ".", d2 + 1, true) then
        return nil
    end
    return d1, d2
end

-- With jwt_dots: does the token match ^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$ ?
local function jwt_bytes(token)
    local p = ffi.cast("const uint8_t *", token)
    for i = 0, #token - 1 do
        if JWT_BYTE[p[i]] == 0 then
            return false
        end
    end
    return true
end

-- A JWT part's JSON, which must be an object (cjson decodes [] and {} alike, so the text is looked at).
local function decode_object(text)
    if not text or not find(text, "^[ \t\r\n]*{") then
        return nil
    end
    local value = decode_json(text)
    if type(value) ~= "table" then
        return nil
    end
    return value
end

-- The verdict -----------------------------------------------------------------------------------------

-- The checker for one loaded clients.json. Returns it and a list of problems (strings; empty when none).
function _M.new(clients, opts)
    opts = opts or {}
    local crypto = assert(opts.crypto, "identity.new: opts.crypto is required")
    local now = opts.now or os.time
    local cache = opts.cache
    local problems = {}
    local function problem(text)
        problems[#problems + 1] = text
    end
    if type(clients) ~= "table" then
        clients = {}
        problem("clients: not an object; every credential is refused")
    end
    local sha256, sha256_hex, b64url_decode = crypto.sha256, crypto.sha256_hex, crypto.b64url_decode
    local hmac_sha256, constant_eq, verify = crypto.hmac_sha256, crypto.constant_eq, crypto.verify

    local required = opt(clients.required) ~= false  -- only an explicit false lets anyone in

    -- API keys by the sha256 of the key, raw (a plain key's lookup skips the hex) and in hex (a token
    -- already hashed for the JWT cache): what check() needs, the accepted verdict made once.
    local keys = {}
    local listed = opt(clients.keys)
    if listed ~= nil and type(listed) ~= "table" then
        problem("keys: not an object")
        listed = nil
    end
    local restricts = false           -- a key limited to some models
    for hash, e in pairs(listed or {}) do
        if type(hash) ~= "string" or not find(hash, "^%x+$") or #hash ~= 64 then
            problem(format("keys: %q is not a sha256 in hex; skipped", tostring(hash)))
        elseif type(e) ~= "table" or type(e.id) ~= "string" or e.id == "" then
            problem(format("keys: the entry of %s has no id; skipped", hash))
        else
            local expires = tonumber(opt(e.expires)) or 0
            local entry = {
                enabled = e.enabled == true,
                expires = expires,
                verdict = { ok = true, id = e.id, rpm = rpm_string(opt(e.rpm)),
                            models = model_list(opt(e.models)) },
            }
            keys[lower(hash)] = entry
            keys[gsub(hash, "%x%x", hex_byte)] = entry
            restricts = restricts or entry.verdict.models ~= nil
        end
    end

    -- The entry of each key a client presented, by the key itself: hashed once per worker, not per
    -- request (sha256 through the FFI ~2,300 instructions). Only listed keys get in, so it holds at most
    -- one entry per key of this configuration (a reload makes a new one).
    local known = {}

    -- hash: the token's sha256 in hex when already known.
    local function check_key(token, hash)
        local e = known[token]
        if not e then
            e = keys[hash or sha256(token)]
            if not e then
                return REFUSED.key_invalid
            end
            known[token] = e
        end
        if not e.enabled then
            return REFUSED.key_disabled
        end
        local expires = e.expires
        if expires ~= 0 and expires <= now() then
            return REFUSED.key_expired
        end
        return e.verdict
    end

    local function finish(verdict)
        if verdict.ok or required then
            return verdict
        end
        return ANONYMOUS
    end

    local jwt = opt(clients.jwt)
    if jwt ~= nil and type(jwt) ~= "table" then
        problem("jwt: not an object; JWTs are not accepted")
        jwt = nil
    end

    if not jwt then
        return {
            check = function(_, token)
                if token == nil or token == "" then
                    return finish(REFUSED.missing)
                end
                return finish(check_key(token))
            end,
            restricts = restricts,
        }, problems
    end

    local hs256 = opt(jwt.hs256)
    if type(hs256) ~= "string" then
        hs256 = ""
    end
    local leeway = tonumber(opt(jwt.leeway)) or 0
    local audience = type(jwt.audience) == "string" and jwt.audience or ""
    local issuer = type(jwt.issuer) == "string" and jwt.issuer or ""
    local default_rpm = rpm_string(opt(jwt.default_rpm))

    -- Rate tiers, ascending, with the strings verdicts carry.
    local tiers, tier_rpm = {}, {}
    for _, t in ipairs(type(jwt.tiers) == "table" and jwt.tiers or {}) do
        if type(t) == "number" and t >= 1 then
            tiers[#tiers + 1] = floor(t)
        else
            problem(format("jwt.tiers: %s is not a rate; skipped", tostring(t)))
        end
    end
    sort(tiers)
    for i, t in ipairs(tiers) do
        tier_rpm[i] = rpm_string(t)
    end
    if not tiers[1] then
        problem("jwt.tiers: none; tokens with an rpm claim get jwt.default_rpm")
    end

    -- The rate for an rpm claim: rounded down to a tier (the lowest tier below it), or the default.
    local function token_rpm(claim)
        if type(claim) ~= "number" or claim ~= claim or claim <= 0 or not tiers[1] then
            return default_rpm
        end
        local pick = tier_rpm[1]
        for i = 2, #tiers do
            if tiers[i] > claim then
                break
            end
            pick = tier_rpm[i]
        end
        return pick
    end

    -- Public keys per alg: all of them (a token without kid), those without kid (a token whose kid no
    -- key has), and per kid the keys with that kid or none, in the order configured.
    local by_alg = {}
    for _, alg in ipairs({ "RS256", "ES256" }) do
        by_alg[alg] = { all = {}, no_kid = {}, kid = {} }
    end
    local listed_keys = opt(jwt.keys)
    for i, k in ipairs(type(listed_keys) == "table" and listed_keys or {}) do
        local kid = type(k) == "table" and opt(k.kid) or nil
        local name = format("jwt.keys[%d]%s", i, type(kid) == "string" and " (kid " .. kid .. ")" or "")
        local alg = type(k) == "table" and k.alg
        local entry = by_alg[alg]
        local der = entry and type(k.spki) == "string" and crypto.b64_decode(k.spki)
        if not entry then
            problem(format("%s: alg %s is not RS256 or ES256; skipped", name, tostring(alg)))
        elseif kid ~= nil and type(kid) ~= "string" then
            problem(format("%s: kid is not a string; skipped", name))
        elseif not der then
            problem(format("%s: spki is not base64; skipped", name))
        else
            local key, err = crypto.public_key(der)
            if not key then
                problem(format("%s: %s; skipped", name, tostring(err)))
            elseif (alg == "RS256" and key.type ~= "RSA")
                or (alg == "ES256" and (key.type ~= "EC" or key.curve ~= "prime256v1")) then
                problem(format("%s: not a key for %s; skipped", name, alg))
            else
                if kid == "" then
                    kid = nil
                end
                local all = entry.all
                all[#all + 1] = { key = key, kid = kid }
            end
        end
    end
    for _, entry in pairs(by_alg) do
        for _, k in ipairs(entry.all) do
            if k.kid == nil then
                entry.no_kid[#entry.no_kid + 1] = k.key
            elseif not entry.kid[k.kid] then
                local list = {}
                for _, other in ipairs(entry.all) do
                    if other.kid == nil or other.kid == k.kid then
                        list[#list + 1] = other.key
                    end
                end
                entry.kid[k.kid] = list
            end
        end
        local all = {}
        for i, k in ipairs(entry.all) do
            all[i] = k.key
        end
        entry.all = all
    end

    -- The keys a token's signature is tried with (empty: none may sign it).
    local function candidates(alg, kid)
        local entry = by_alg[alg]
        if kid == nil or kid == null or kid == "" then
            return entry.all
        end
        return entry.kid[kid] or entry.no_kid
    end

    -- A JWT's verdict and how long it may be cached. hash: sha256_hex(token) when already known.
    local function check_jwt(token, d1, d2, hash)
        local header = decode_object(b64url_decode(sub(token, 1, d1 - 1)))
        local claims = header and decode_object(b64url_decode(sub(token, d1 + 1, d2 - 1)))
        if not claims then
            return REFUSED.not_jwt, REFUSED_TTL
        end

        local alg = header.alg
        local signed = sub(token, 1, d2 - 1)
        if alg == "HS256" and hs256 ~= "" then
            local sig = b64url_decode(sub(token, d2 + 1))
            if not sig or not constant_eq(hmac_sha256(hs256, signed), sig) then
                return REFUSED.signature, REFUSED_TTL
            end
        elseif alg == "RS256" or alg == "ES256" then
            local keys_for = candidates(alg, header.kid)
            if not keys_for[1] then
                return REFUSED.algorithm, REFUSED_TTL
            end
            local sig = b64url_decode(sub(token, d2 + 1))
            local verified = false
            if sig then
                for i = 1, #keys_for do
                    if verify(keys_for[i], alg, signed, sig) then
                        verified = true
                        break
                    end
                end
            end
            if not verified then
                return REFUSED.signature, REFUSED_TTL
            end
        else
            return REFUSED.algorithm, REFUSED_TTL
        end

        local t = now()
        local exp = claims.exp
        if type(exp) ~= "number" then
            return REFUSED.no_exp, REFUSED_TTL
        end
        if exp + leeway <= t then
            return REFUSED.expired, REFUSED_TTL
        end
        local nbf = claims.nbf
        if nbf ~= nil and (type(nbf) ~= "number" or nbf - leeway > t) then
            -- cached until it becomes valid, when sooner than REFUSED_TTL
            local ttl = type(nbf) == "number" and max(1, min(REFUSED_TTL, nbf - leeway - t)) or REFUSED_TTL
            return REFUSED.nbf, ttl
        end
        if audience ~= "" then
            local aud = claims.aud
            local found = aud == audience
            if not found and type(aud) == "table" then
                for _, a in ipairs(aud) do
                    if a == audience then
                        found = true
                        break
                    end
                end
            end
            if not found then
                return REFUSED.audience, REFUSED_TTL
            end
        end
        local iss = claims.iss
        if issuer ~= "" and iss ~= issuer then
            return REFUSED.issuer, REFUSED_TTL
        end

        -- Every token is verified now, so a subject shares one bucket across its tokens.
        local id
        local subject = claims.sub
        if type(subject) == "string" then
            id = "jwt_" .. sub(sha256_hex((type(iss) == "string" and iss or "") .. "|" .. subject), 1, 16)
        else
            id = "jwt_t" .. sub(hash or sha256_hex(token), 1, 16)
        end
        local models = claims.models
        if type(models) == "string" then
            local list = {}
            for m in gmatch(models, "[^%s,]+") do
                list[#list + 1] = m
            end
            models = list
        end
        return { ok = true, id = id, rpm = token_rpm(claims.rpm), models = model_list(models) },
            max(1, exp + leeway - t)
    end

    return {
        check = function(_, token)
            if token == nil or token == "" then
                return finish(REFUSED.missing)
            end
            local d1, d2 = jwt_dots(token)
            if not d1 then
                return finish(check_key(token))
            end
            local hash, cache_key
            if cache then
                hash = sha256_hex(token)
                cache_key = "jwt:" .. hash
                local cached = cache:get(cache_key)
                if cached ~= nil then
                    return cached
                end
            end
            if not jwt_bytes(token) then
                return finish(check_key(token, hash))
            end
            local verdict, ttl = check_jwt(token, d1, d2, hash)
            verdict = finish(verdict)
            if cache then
                cache:set(cache_key, verdict, ttl)
            end
            return verdict
        end,
        restricts = true,                 -- a token's claims may name models
    }, problems
end

-- Model patterns ---------------------------------------------------------------------------------------

local LATEST = ":latest"

local function bare(model)
    local n = #model
    if n >= 7 and sub(model, n - 6) == LATEST then
        return sub(model, 1, n - 7)
    end
    return model
end

-- May this client use model? asked (the name the client sent, an alias say) counts when a pattern
-- without '*' names it. Patterns: "*" any model; "prefix*" a model (":latest" stripped) starting with
-- prefix, compared as plain text; else the model or asked by name, ":latest" or not.
function _M.allows(verdict, model, asked)
    local models = verdict.models
    if not models then
        return true
    end
    local bare_model = type(model) == "string" and bare(model) or nil
    local bare_asked = type(asked) == "string" and bare(asked) or nil
    for i = 1, #models do
        local p = models[i]
        if p == "*" then
            return true
        end
        local n = #p
        if byte(p, n) == 42 then              -- '*'
            if bare_model and sub(bare_model, 1, n - 1) == sub(p, 1, n - 1) then
                return true
            end
        else
            local bp = bare(p)
            if bp == bare_model or bp == bare_asked then
                return true
            end
        end
    end
    return false
end

return _M
