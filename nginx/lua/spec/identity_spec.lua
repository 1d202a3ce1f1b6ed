-- gw.identity: API keys and JWTs to verdicts (nginx/lua/gw/identity.lua).
local cjson = require("cjson")
local crypto = require("gw.crypto")
local identity = require("gw.identity")
local fx = require("spec.fixtures.jwt")
local helpers = require("spec.helpers")
local b64url, hs256, unsigned, split = helpers.b64url, helpers.hs256, helpers.unsigned, helpers.split

local NOW = 1700000000
local FAR = 4102444800
local SECRET = "s3cret-s3cret-s3cret"
local ISS = fx.iss

local MSG = {
    missing = "No API key: send it as Authorization: Bearer <key>, x-api-key or api-key",
    key_invalid = "The API key is not valid",
    key_disabled = "The API key is disabled",
    key_expired = "The API key has expired",
    not_jwt = "The bearer token is not a valid JWT",
    signature = "The token signature is not valid",
    algorithm = "The token algorithm is not accepted here",
    no_exp = "The token has no expiry (exp)",
    expired = "The token has expired",
    nbf = "The token is not valid yet (nbf)",
    audience = "The token is not meant for this audience",
    issuer = "The token comes from an issuer not accepted here",
}

local function refused(reason, what)
    return { ok = false, reason = reason, message = MSG[what] }
end

local function sha(s)
    return crypto.sha256_hex(s)
end

local function accepted(id, rpm, models)
    return { ok = true, id = id, rpm = rpm, models = models }
end

local ANONYMOUS = { ok = true, id = "", rpm = "" }

-- crypto with its calls counted.
local function counting_crypto()
    local c = setmetatable({ calls = { verify = 0, hmac_sha256 = 0, sha256_hex = 0 } }, { __index = crypto })
    c.verify = function(...)
        c.calls.verify = c.calls.verify + 1
        return crypto.verify(...)
    end
    c.hmac_sha256 = function(...)
        c.calls.hmac_sha256 = c.calls.hmac_sha256 + 1
        return crypto.hmac_sha256(...)
    end
    c.sha256_hex = function(...)
        c.calls.sha256_hex = c.calls.sha256_hex + 1
        return crypto.sha256_hex(...)
    end
    return c
end

-- A cache like resty.lrucache's, recording what it was given (ttl in seconds).
local function fake_cache()
    local cache = { store = {}, ttls = {}, sets = 0, gets = 0 }
    function cache:get(key)
        self.gets = self.gets + 1
        return self.store[key]
    end
    function cache:set(key, value, ttl)
        self.sets = self.sets + 1
        self.store[key] = value
        self.ttls[key] = ttl
    end
    return cache
end

-- clients.json as the renderer writes it (decoded with cjson, so JSON null is cjson.null), with changes.
local KEY_OK, KEY_OFF, KEY_OLD, KEY_SOON, KEY_BARE = "sk-ok", "sk-off", "sk-old", "sk-soon", "sk-bare"

local function clients_json(change)
    local doc = {
        required = true,
        keys = {
            [sha(KEY_OK)] = { id = "key_ok", rpm = 600, expires = 0, enabled = true,
                              models = { "gpt-4o", "llama*" } },
            [sha(KEY_OFF)] = { id = "key_off", rpm = 600, expires = 0, enabled = false, models = {} },
            [sha(KEY_OLD)] = { id = "key_old", rpm = 0, expires = NOW, enabled = true, models = {} },
            [sha(KEY_SOON)] = { id = "key_soon", rpm = 0, expires = NOW + 1, enabled = true, models = {} },
            [sha(KEY_BARE)] = { id = "key_bare", rpm = 0, expires = 0, enabled = true, models = {} },
        },
        jwt = {
            hs256 = SECRET,
            keys = {
                { alg = "RS256", spki = fx.spki.r1, kid = "r1" },
                { alg = "RS256", spki = fx.spki.r2, kid = "r2" },
                { alg = "ES256", spki = fx.spki.e1, kid = "e1" },
                { alg = "ES256", spki = fx.spki.e2 },
            },
            audience = "", issuer = "", leeway = 30, default_rpm = 600, tiers = { 60, 600, 6000 },
        },
        retry = { ip = 60 },
    }
    if change then
        change(doc)
    end
    return cjson.decode(cjson.encode(doc))
end

local function new(change, opts)
    opts = opts or {}
    local id, problems = identity.new(clients_json(change), {
        now = opts.now or function() return NOW end,
        crypto = opts.crypto or crypto,
        cache = opts.cache,
    })
    return id, problems
end

local function jwt_id(iss, sub)
    return "jwt_" .. sha(iss .. "|" .. sub):sub(1, 16)
end

describe("gw.identity", function()
    describe("presented", function()
        local p = identity.presented

        it("takes the token of Authorization: Bearer, whatever the case of Bearer", function()
            assert.equal("abc", p("Bearer abc"))
            assert.equal("abc", p("bearer abc"))
            assert.equal("abc", p("BEARER abc"))
            assert.equal("a.b-c_d=", p("bEaReR a.b-c_d="))
        end)

        it("with whitespace around and between", function()
            assert.equal("abc", p("  Bearer   abc  "))
            assert.equal("abc", p("\tBearer\tabc\t"))
            assert.equal("abc", p("Bearer \v\fabc \r"))
        end)

        it("before x-api-key and api-key", function()
            assert.equal("tok", p("Bearer tok", "x", "y"))
        end)

        it("with NUL bytes in the token (nginx refuses them; the scan does not stop at one)", function()
            assert.equal("a\0b", p("Bearer a\0b "))
            assert.equal("x", p("Bearer a\0b c", "x"))
            assert.equal("x", p("Bearer \0 c", "x"))
        end)

        it("falls through an Authorization header that is not one Bearer token", function()
            assert.equal("x", p("Basic dXNlcjpwYXNz", "x", "y"))
            assert.equal("x", p("Bearer a b", "x"))
            assert.equal("x", p("Bearerabc", "x"))
            assert.equal("x", p("Bearer", "x"))
            assert.equal("x", p("Bearer   ", "x"))
            assert.equal("x", p("", "x"))
            assert.equal("x", p("Token Bearer abc", "x"))
            assert.is_nil(p("Bearer a b"))
        end)

        it("takes x-api-key, else api-key, trimmed", function()
            assert.equal("k1", p(nil, "k1", "k2"))
            assert.equal("k2", p(nil, nil, "k2"))
            assert.equal("k2", p(nil, "", "k2"))
            assert.equal("k 1", p(nil, " \tk 1 \t"))
            assert.equal("k2", p(nil, nil, "  k2\t"))
        end)

        it("as auth.js: a blank x-api-key is chosen over api-key, and trims to nothing", function()
            assert.is_nil(p(nil, "   ", "k2"))
        end)

        it("gives nil for no credential", function()
            assert.is_nil(p())
            assert.is_nil(p(nil, nil, nil))
            assert.is_nil(p("", "", ""))
            assert.is_nil(p(nil, nil, " "))
        end)

        it("takes the first value of a repeated header (a table from ngx.req.get_headers)", function()
            assert.equal("a", p({ "Bearer a", "Bearer b" }))
            assert.equal("k1", p(nil, { "k1", "k2" }))
            assert.equal("k3", p({ "Basic x", "Bearer b" }, nil, { " k3 ", "k4" }))
            assert.is_nil(p({}, {}, {}))
        end)
    end)

    describe("API keys", function()
        local id = new()

        it("no credential: missing", function()
            assert.same(refused("missing", "missing"), id:check(nil))
            assert.same(refused("missing", "missing"), id:check(""))
        end)

        it("accepts a key with its id, rpm as a string and models", function()
            assert.same(accepted("key_ok", "600", { "gpt-4o", "llama*" }), id:check(KEY_OK))
        end)

        it("rpm 0 is no rate, and no models is no restriction", function()
            assert.same(accepted("key_bare", ""), id:check(KEY_BARE))
        end)

        it("refuses an unknown key", function()
            assert.same(refused("invalid", "key_invalid"), id:check("sk-nope"))
            assert.same(refused("invalid", "key_invalid"), id:check(sha(KEY_OK)))  -- the hash is not the key
        end)

        it("refuses a disabled key", function()
            assert.same(refused("disabled", "key_disabled"), id:check(KEY_OFF))
        end)

        it("refuses a key from its expiry on (expires <= now), never with 0", function()
            assert.same(refused("expired", "key_expired"), id:check(KEY_OLD))
            assert.same(accepted("key_soon", ""), id:check(KEY_SOON))
            local later = new(nil, { now = function() return NOW + 1 end })
            assert.same(refused("expired", "key_expired"), later:check(KEY_SOON))
            assert.same(accepted("key_bare", ""), later:check(KEY_BARE))
        end)

        it("hashes each presented key once, and still checks it on every request", function()
            local hashed, clock = 0, NOW
            local counting = setmetatable({ sha256 = function(s)
                hashed = hashed + 1
                return crypto.sha256(s)
            end }, { __index = crypto })
            local id2 = new(nil, { crypto = counting, now = function() return clock end })
            for _ = 1, 3 do
                assert.same(accepted("key_soon", ""), id2:check(KEY_SOON))
                assert.same(refused("invalid", "key_invalid"), id2:check("sk-nope"))
            end
            assert.equal(4, hashed)  -- KEY_SOON once, each unknown key every time (nothing kept of it)
            clock = NOW + 1
            assert.same(refused("expired", "key_expired"), id2:check(KEY_SOON))
            assert.same(refused("disabled", "key_disabled"), id2:check(KEY_OFF))
            assert.same(refused("disabled", "key_disabled"), id2:check(KEY_OFF))
        end)

        it("checks disabled before expired", function()
            local id2 = new(function(doc) doc.keys[sha(KEY_OFF)].expires = 1 end)
            assert.same(refused("disabled", "key_disabled"), id2:check(KEY_OFF))
        end)

        it("is exact: no trimming or case folding of the key itself", function()
            assert.same(refused("invalid", "key_invalid"), id:check("SK-OK"))
            assert.same(refused("invalid", "key_invalid"), id:check(KEY_OK .. " "))
        end)

        it("takes hashes in upper case too, and JSON nulls for optional fields", function()
            local id2 = identity.new(cjson.decode(([[{"required": true, "keys": {"%s":
                {"id": "k", "rpm": null, "expires": null, "enabled": true, "models": null}}}]]):format(
                sha(KEY_OK):upper())), { crypto = crypto })
            assert.same(accepted("k", ""), id2:check(KEY_OK))
        end)

        it("says whether a verdict can limit the models (restricts)", function()
            assert.is_true(new().restricts)
            assert.is_true(new(function(doc) doc.keys = {} end).restricts)  -- a JWT's claims may
            assert.is_true(new(function(doc) doc.jwt = nil end).restricts)  -- key_ok has models
            assert.is_false(new(function(doc)
                doc.jwt = nil
                doc.keys[sha(KEY_OK)].models = {}
            end).restricts)
            assert.is_false(identity.new(cjson.decode('{"required": true}'), { crypto = crypto }).restricts)
        end)

        it("works with no keys at all ({} as cjson decodes it) or no keys field", function()
            local id2, problems = identity.new(cjson.decode('{"required": true, "keys": {}}'),
                { crypto = crypto })
            assert.same({}, problems)
            assert.same(refused("invalid", "key_invalid"), id2:check(KEY_OK))
            local id3 = identity.new(cjson.decode('{"required": true}'), { crypto = crypto })
            assert.same(refused("invalid", "key_invalid"), id3:check(KEY_OK))
        end)

        it("skips malformed entries and says so", function()
            local id2, problems = identity.new(cjson.decode(([[{"required": true, "keys": {
                "nothex": {"id": "a", "enabled": true},
                "%s": {"enabled": true},
                "%s": {"id": "ok", "enabled": true}}}]]):format(sha("x"), sha(KEY_OK))), { crypto = crypto })
            assert.equal(2, #problems)
            assert.same(accepted("ok", ""), id2:check(KEY_OK))
            assert.same(refused("invalid", "key_invalid"), id2:check("x"))
        end)

        it("shares one verdict table per key (callers do not change verdicts)", function()
            assert.equal(id:check(KEY_OK), id:check(KEY_OK))
        end)

        it("treats a JWT-shaped token as an API key when no JWT is configured", function()
            local nojwt = new(function(doc) doc.jwt = nil end)
            local token = hs256(SECRET, { exp = FAR })
            assert.same(refused("invalid", "key_invalid"), nojwt:check(token))
            local null_jwt = identity.new(cjson.decode(
                ('{"required": true, "jwt": null, "keys": {"%s": {"id": "t", "enabled": true}}}')
                    :format(sha(token))),
                { crypto = crypto })
            assert.same(accepted("t", ""), null_jwt:check(token))
        end)

        it("treats a token with dots but characters outside base64url as an API key", function()
            local key = "sk.live.abc$def"
            local id2 = new(function(doc)
                doc.keys[sha(key)] = { id = "dotted", enabled = true, expires = 0 }
            end)
            assert.same(accepted("dotted", ""), id2:check(key))
            assert.same(refused("invalid", "key_invalid"), id2:check("a.b.c d"))
            assert.same(refused("invalid", "key_invalid"), id2:check("a.b"))
            assert.same(refused("invalid", "key_invalid"), id2:check("a..b"))
            assert.same(refused("invalid", "key_invalid"), id2:check(".a.b"))
            assert.same(refused("invalid", "key_invalid"), id2:check("a.b."))
            assert.same(refused("invalid", "key_invalid"), id2:check("a.b.c.d"))
            assert.same(refused("invalid", "key_invalid"), id2:check("e30.e30.e30=")) -- '=' is not base64url
        end)
    end)

    describe("JWT structure", function()
        local id = new()

        it("refuses parts that are not base64url of a JSON object", function()
            local sig = b64url("sig")
            local cases = {
                "Zm9vY.e30." .. sig,                                      -- length 1 mod 4
                b64url("{") .. "." .. b64url("{}") .. "." .. sig,         -- not JSON
                b64url("[1]") .. "." .. b64url("{}") .. "." .. sig,       -- an array
                b64url("[]") .. "." .. b64url('{"exp":1}') .. "." .. sig,
                b64url('{"alg":"HS256"}') .. "." .. b64url("[]") .. "." .. sig,
                b64url('{"alg":"HS256"}') .. "." .. b64url('"x"') .. "." .. sig,
                b64url('{"alg":"HS256"}') .. "." .. b64url("1") .. "." .. sig,
                b64url('{"alg":"HS256"}') .. "." .. b64url("null") .. "." .. sig,
                b64url('{"alg":"HS256"}') .. "." .. b64url('{"exp":NaN}') .. "." .. sig,
                b64url('{"alg":"HS256"}') .. "." .. b64url('{"exp":1} x') .. "." .. sig,
            }
            for _, token in ipairs(cases) do
                assert.same(refused("invalid", "not_jwt"), id:check(token), token)
            end
        end)

        it("takes objects with whitespace before them", function()
            local token = hs256(SECRET, ' \n{"exp":' .. FAR .. ',"sub":"u"}', ' {"alg":"HS256"}')
            assert.same(accepted(jwt_id("", "u"), "600"), id:check(token))
        end)

        it("refuses a header without a known alg", function()
            assert.same(refused("invalid", "algorithm"), id:check(unsigned({}, { exp = FAR }) .. ".c2ln"))
            for _, alg in ipairs({ "none", "hs256", "HS384", "RS384", "PS256", "EdDSA", "" }) do
                local token = unsigned({ alg = alg }, { exp = FAR }) .. ".c2ln"
                assert.same(refused("invalid", "algorithm"), id:check(token), alg)
            end
            local numeric = unsigned('{"alg":256}', { exp = FAR }) .. ".c2ln"
            assert.same(refused("invalid", "algorithm"), id:check(numeric))
        end)
    end)

    describe("HS256", function()
        local id = new()

        it("accepts a token signed with the secret, limited per iss and sub", function()
            local token = hs256(SECRET, { sub = "u1", iss = "me", exp = FAR })
            assert.same(accepted(jwt_id("me", "u1"), "600"), id:check(token))
            local other = hs256(SECRET, { sub = "u1", iss = "me", exp = FAR, n = 2 })
            assert.equal(id:check(token).id, id:check(other).id)
        end)

        it("refuses a token signed with another secret", function()
            assert.same(refused("invalid", "signature"), id:check(hs256("wrong", { sub = "u", exp = FAR })))
        end)

        it("refuses a signature changed, cut, padded or not base64url", function()
            local token = hs256(SECRET, { sub = "u", exp = FAR })
            local h, c, s = split(token)
            local flipped = s:sub(1, 5) .. (s:sub(6, 6) == "A" and "B" or "A") .. s:sub(7)
            for _, bad in ipairs({ flipped, s:sub(1, -2), s:sub(1, -3), s .. "AA", "c2ln" }) do
                assert.same(refused("invalid", "signature"), id:check(h .. "." .. c .. "." .. bad), bad)
            end
            -- unused bits set in the last character: another spelling of the same bytes is refused
            local last = s:sub(-1)
            local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
            local v = alphabet:find(last, 1, true) - 1
            local twin = alphabet:sub(v + 2, v + 2)       -- 43 characters: the last carries 4 bits, 2 unused
            local respelled = h .. "." .. c .. "." .. s:sub(1, -2) .. twin
            assert.same(refused("invalid", "signature"), id:check(respelled))
        end)

        it("refuses HS256 when no secret is configured (the algorithm, not the signature)", function()
            local nosecret = new(function(doc) doc.jwt.hs256 = "" end)
            assert.same(refused("invalid", "algorithm"), nosecret:check(hs256(SECRET, { exp = FAR })))
            local null_secret = new(function(doc) doc.jwt.hs256 = cjson.null end)
            assert.same(refused("invalid", "algorithm"), null_secret:check(hs256(SECRET, { exp = FAR })))
        end)

        it("refuses a token signed with the secret but claiming another alg", function()
            local input = unsigned({ alg = "RS256", kid = "r1" }, { exp = FAR })
            local token = input .. "." .. b64url(crypto.hmac_sha256(SECRET, input))
            assert.same(refused("invalid", "signature"), id:check(token))
            local es = unsigned({ alg = "ES256", kid = "zz" }, { exp = FAR })
            local only_rsa = new(function(doc) doc.jwt.keys = { doc.jwt.keys[1] } end)
            assert.same(refused("invalid", "algorithm"),
                only_rsa:check(es .. "." .. b64url(crypto.hmac_sha256(SECRET, es))))
        end)

        it("refuses alg none with an empty signature (an empty part is no JWT at all)", function()
            local token = unsigned({ alg = "none" }, { exp = FAR }) .. "."
            assert.same(refused("invalid", "key_invalid"), id:check(token))
            assert.same(refused("invalid", "algorithm"),
                id:check(unsigned({ alg = "none" }, { exp = FAR }) .. ".AA"))
        end)
    end)

    describe("RS256 and ES256", function()
        local t = fx.tokens

        it("accepts a token of a configured key, limited per verified iss and sub", function()
            local id = new()
            assert.same(accepted(jwt_id(ISS, "alice"), "600", { "gpt-4o", "llama*" }), id:check(t.rs_r1))
            assert.same(accepted(jwt_id(ISS, "bob"), "600", { "m1", "m2" }), id:check(t.es_e1))
            assert.same(accepted(jwt_id("", "carol"), "600"), id:check(t.rs_r2_nokid))
            assert.same(accepted(jwt_id("", "dave"), "600"), id:check(t.es_e2_nokid))
        end)

        it("accepts ES256 signatures whose r needs a zero byte added or removed in DER", function()
            local id = new()
            assert.is_true(id:check(t.es_e1_r_high).ok)
            assert.is_true(id:check(t.es_e1_r_zero).ok)
        end)

        it("names a token without sub by its hash", function()
            local id = new()
            assert.same(accepted("jwt_t" .. sha(t.rs_r1_nosub):sub(1, 16), "600"), id:check(t.rs_r1_nosub))
        end)

        it("refuses a forged signature", function()
            local id = new()
            local h, c, s = split(t.rs_r1)
            local forged = s:sub(1, 100) .. (s:sub(101, 101) == "A" and "B" or "A") .. s:sub(102)
            assert.same(refused("invalid", "signature"), id:check(h .. "." .. c .. "." .. forged))
            h, c, s = split(t.es_e1)
            forged = s:sub(1, 10) .. (s:sub(11, 11) == "A" and "B" or "A") .. s:sub(12)
            assert.same(refused("invalid", "signature"), id:check(h .. "." .. c .. "." .. forged))
        end)

        it("refuses changed claims under a real signature", function()
            local id = new()
            local h, _, s = split(t.rs_r1)
            local claims = b64url(cjson.encode({ sub = "admin", iss = ISS, exp = FAR, rpm = 6000 }))
            assert.same(refused("invalid", "signature"), id:check(h .. "." .. claims .. "." .. s))
        end)

        it("checks the signature before the claims", function()
            local id = new()
            local h, _, s = split(t.rs_r1)
            local expired = b64url(cjson.encode({ sub = "alice", exp = 1 }))
            assert.same(refused("invalid", "signature"), id:check(h .. "." .. expired .. "." .. s))
            local no_exp = b64url(cjson.encode({ sub = "alice" }))
            assert.same(refused("invalid", "signature"), id:check(h .. "." .. no_exp .. "." .. s))
        end)

        it("refuses ES256 signatures of 63 or 65 bytes and signatures that are not base64url", function()
            local id = new()
            local h, c, s = split(t.es_e1)
            local raw = crypto.b64url_decode(s)
            for _, bad in ipairs({ raw:sub(1, 63), raw .. "\0", crypto.es256_der(raw) }) do
                assert.same(refused("invalid", "signature"), id:check(h .. "." .. c .. "." .. b64url(bad)))
            end
            assert.same(refused("invalid", "signature"), id:check(h .. "." .. c .. "." .. s .. "A"))
        end)

        it("refuses an RS256 signature presented as ES256 and the reverse (swapped alg)", function()
            local id = new()
            local _, c, s = split(t.rs_r1)
            local as_es = b64url(cjson.encode({ alg = "ES256", kid = "e1" }))
            assert.same(refused("invalid", "signature"), id:check(as_es .. "." .. c .. "." .. s))
            local _, c2, s2 = split(t.es_e1)
            local as_rs = b64url(cjson.encode({ alg = "RS256", kid = "r1" }))
            assert.same(refused("invalid", "signature"), id:check(as_rs .. "." .. c2 .. "." .. s2))
        end)

        it("refuses an alg with no configured key (the algorithm)", function()
            local only_es = new(function(doc) doc.jwt.keys = { doc.jwt.keys[3] } end)
            assert.same(refused("invalid", "algorithm"), only_es:check(t.rs_r1))
            local only_hs = new(function(doc) doc.jwt.keys = {} end)
            assert.same(refused("invalid", "algorithm"), only_hs:check(t.rs_r1))
            assert.same(refused("invalid", "algorithm"), only_hs:check(t.es_e1))
        end)

        describe("kid", function()
            it("tries only the keys with the token's kid, and those without one", function()
                local c = counting_crypto()
                local id = new(nil, { crypto = c })
                -- kid r2, signed by r1
                assert.same(refused("invalid", "signature"), id:check(t.rs_r1_claims_kid_r2))
                assert.equal(1, c.calls.verify)
                assert.is_true(id:check(t.rs_r1).ok)
                assert.equal(2, c.calls.verify)
            end)

            it("tries every key of the alg for a token without kid, until one verifies", function()
                local c = counting_crypto()
                local id = new(nil, { crypto = c })
                assert.is_true(id:check(t.rs_r2_nokid).ok)              -- r1 first, then r2
                assert.equal(2, c.calls.verify)
                assert.is_true(id:check(t.es_e2_nokid).ok)              -- e1, then e2 (no kid)
                assert.equal(4, c.calls.verify)
            end)

            it("lets a key without kid verify a token with any kid", function()
                local id = new(function(doc)
                    doc.jwt.keys = { { alg = "RS256", spki = fx.spki.r1, kid = cjson.null } }
                end)
                assert.is_true(id:check(t.rs_r1).ok)                   -- token kid r1
                assert.same(refused("invalid", "signature"), id:check(t.rs_r2_nokid))
                local blank = new(function(doc)
                    doc.jwt.keys = { { alg = "RS256", spki = fx.spki.r1, kid = "" } }
                end)
                assert.is_true(blank:check(t.rs_r1_claims_kid_r2).ok)  -- kid r2, the kid-less key signed it
            end)

            it("refuses a kid no key has when every key has a kid (the algorithm)", function()
                local id = new(function(doc) doc.jwt.keys = { doc.jwt.keys[1], doc.jwt.keys[2] } end)
                local _, c, s = split(t.rs_r1)
                local zz = b64url(cjson.encode({ alg = "RS256", kid = "zz" }))
                assert.same(refused("invalid", "algorithm"), id:check(zz .. "." .. c .. "." .. s))
                local numeric = b64url('{"alg":"RS256","kid":1}')
                assert.same(refused("invalid", "algorithm"), id:check(numeric .. "." .. c .. "." .. s))
            end)

            it("treats a null or empty kid in the token as none", function()
                local id = new(function(doc) doc.jwt.keys = { doc.jwt.keys[1] } end)
                local _, c, s = split(t.rs_r1)
                for _, header in ipairs({ '{"alg":"RS256","kid":null}', '{"alg":"RS256","kid":""}' }) do
                    -- the header changed, so the signature no longer matches: but r1 was tried
                    local token = b64url(header) .. "." .. c .. "." .. s
                    assert.same(refused("invalid", "signature"), id:check(token))
                end
            end)
        end)

        it("refuses an expired token signed by a configured key", function()
            assert.same(refused("expired", "expired"), new():check(t.rs_r1_expired))
        end)
    end)

    describe("claims", function()
        local function check(claims, change, now)
            return new(change, { now = now and function() return now end }):check(hs256(SECRET, claims))
        end

        it("need a numeric exp", function()
            assert.same(refused("invalid", "no_exp"), check({ sub = "u" }))
            assert.same(refused("invalid", "no_exp"), check({ sub = "u", exp = tostring(FAR) }))
            assert.same(refused("invalid", "no_exp"), check('{"sub":"u","exp":null}'))
        end)

        it("expire at exp + leeway", function()
            assert.same(refused("expired", "expired"), check({ exp = NOW - 30 }))
            assert.is_true(check({ exp = NOW - 29 }).ok)
            local strict = function(doc) doc.jwt.leeway = 0 end
            assert.same(refused("expired", "expired"), check({ exp = NOW }, strict))
            assert.is_true(check({ exp = NOW + 1 }, strict).ok)
        end)

        it("are valid from nbf - leeway", function()
            assert.is_true(check({ exp = FAR, nbf = NOW + 30 }).ok)
            assert.same(refused("invalid", "nbf"), check({ exp = FAR, nbf = NOW + 31 }))
            assert.is_true(check({ exp = FAR, nbf = 0 }).ok)
        end)

        it("refuse an nbf that is not a number, null included (as auth.js)", function()
            assert.same(refused("invalid", "nbf"), check({ exp = FAR, nbf = "0" }))
            assert.same(refused("invalid", "nbf"), check('{"exp":' .. FAR .. ',"nbf":null}'))
        end)

        it("name the configured audience, as a string or in an array", function()
            local aud = function(doc) doc.jwt.audience = "gw" end
            assert.is_true(check({ exp = FAR, aud = "gw" }, aud).ok)
            assert.is_true(check({ exp = FAR, aud = { "other", "gw" } }, aud).ok)
            assert.same(refused("invalid", "audience"), check({ exp = FAR, aud = "other" }, aud))
            assert.same(refused("invalid", "audience"), check({ exp = FAR, aud = { "other" } }, aud))
            assert.same(refused("invalid", "audience"), check({ exp = FAR, aud = {} }, aud))
            assert.same(refused("invalid", "audience"), check({ exp = FAR }, aud))
            assert.same(refused("invalid", "audience"), check({ exp = FAR, aud = { gw = "gw" } }, aud))
            assert.is_true(check({ exp = FAR, aud = "anything" }).ok)     -- no audience configured
        end)

        it("come from the configured issuer", function()
            local iss = function(doc) doc.jwt.issuer = ISS end
            assert.same(accepted(jwt_id(ISS, "u"), "600"), check({ exp = FAR, iss = ISS, sub = "u" }, iss))
            assert.same(refused("invalid", "issuer"), check({ exp = FAR, iss = "https://evil.example" }, iss))
            assert.same(refused("invalid", "issuer"), check({ exp = FAR }, iss))
        end)

        it("are checked in order: exp, expiry, nbf, audience, issuer", function()
            local both = function(doc)
                doc.jwt.audience = "gw"
                doc.jwt.issuer = ISS
            end
            assert.same(refused("invalid", "no_exp"), check({ nbf = FAR, aud = "x", iss = "x" }, both))
            assert.same(refused("expired", "expired"),
                check({ exp = 1, nbf = FAR, aud = "x", iss = "x" }, both))
            assert.same(refused("invalid", "nbf"),
                check({ exp = FAR, nbf = FAR, aud = "x", iss = "x" }, both))
            assert.same(refused("invalid", "audience"), check({ exp = FAR, aud = "x", iss = "x" }, both))
            assert.same(refused("invalid", "issuer"), check({ exp = FAR, aud = "gw", iss = "x" }, both))
        end)

        describe("id", function()
            it("is per iss and sub", function()
                assert.equal(jwt_id("a", "u"), check({ exp = FAR, iss = "a", sub = "u" }).id)
                assert.equal(jwt_id("", "u"), check({ exp = FAR, sub = "u" }).id)
                assert.not_equal(check({ exp = FAR, iss = "a", sub = "u" }).id,
                    check({ exp = FAR, iss = "b", sub = "u" }).id)
            end)

            it("is per token without a string sub", function()
                for _, claims in ipairs({ { exp = FAR }, { exp = FAR, sub = 42 } }) do
                    local token = hs256(SECRET, claims)
                    assert.equal("jwt_t" .. sha(token):sub(1, 16), new():check(token).id)
                end
            end)
        end)

        describe("rpm", function()
            local cases = {
                { 59, "60" }, { 1, "60" }, { 0.5, "60" }, { 60, "60" }, { 599, "60" }, { 600, "600" },
                { 600.5, "600" }, { 5999, "600" }, { 6000, "6000" }, { 1e9, "6000" },
                { 0, "600" }, { -5, "600" }, { "6000", "600" }, { false, "600" },
            }
            for _, case in ipairs(cases) do
                it(("a claim of %s gives %s"):format(tostring(case[1]), case[2]), function()
                    assert.equal(case[2], check({ exp = FAR, rpm = case[1] }).rpm)
                end)
            end

            it("is the default without a claim, and none for a default of 0", function()
                assert.equal("600", check({ exp = FAR }).rpm)
                local none = function(doc) doc.jwt.default_rpm = 0 end
                assert.equal("", check({ exp = FAR }, none).rpm)
                assert.equal("60", check({ exp = FAR, rpm = 100 }, none).rpm)
            end)

            it("takes tiers in any order", function()
                local shuffled = function(doc) doc.jwt.tiers = { 6000, 60, 600 } end
                assert.equal("600", check({ exp = FAR, rpm = 700 }, shuffled).rpm)
            end)

            it("without tiers, is the default (and new() says so)", function()
                local id, problems = new(function(doc) doc.jwt.tiers = {} end)
                assert.equal("600", id:check(hs256(SECRET, { exp = FAR, rpm = 7000 })).rpm)
                assert.equal(1, #problems)
            end)
        end)

        describe("models", function()
            it("split a string on whitespace and commas", function()
                local claims = { exp = FAR, models = " a, b\tc:latest ," }
                assert.same({ "a", "b", "c:latest" }, check(claims).models)
            end)

            it("keep the non-empty strings of an array", function()
                assert.same({ "a", "b" }, check({ exp = FAR, models = { "a", "", 1, "b" } }).models)
            end)

            it("are no restriction when empty or of another type", function()
                for _, m in ipairs({ "", " , ", {}, { "" }, 5, { x = "a" } }) do
                    assert.is_nil(check({ exp = FAR, models = m }).models)
                end
                assert.is_nil(check({ exp = FAR }).models)
            end)
        end)
    end)

    describe("clients.required", function()
        it("false: a refused credential is anonymous, a valid one keeps its limits", function()
            local open = new(function(doc) doc.required = false end)
            assert.same(ANONYMOUS, open:check(nil))
            assert.same(ANONYMOUS, open:check("sk-nope"))
            assert.same(ANONYMOUS, open:check(KEY_OFF))
            assert.same(ANONYMOUS, open:check(hs256("wrong", { exp = FAR })))
            assert.same(ANONYMOUS, open:check(fx.tokens.rs_r1_expired))
            assert.same(accepted("key_ok", "600", { "gpt-4o", "llama*" }), open:check(KEY_OK))
            assert.equal(jwt_id(ISS, "alice"), open:check(fx.tokens.rs_r1).id)
            assert.equal(identity.ANONYMOUS, open:check(nil))
        end)

        it("absent or null: required (only an explicit false opens the gateway)", function()
            for _, value in ipairs({ cjson.null, "no" }) do
                local id = new(function(doc) doc.required = value end)
                assert.same(refused("missing", "missing"), id:check(nil))
            end
            local id = identity.new({ keys = {} }, { crypto = crypto })
            assert.same(refused("missing", "missing"), id:check(nil))
        end)
    end)

    describe("the verdict cache", function()
        local function setup(change)
            local c, cache = counting_crypto(), fake_cache()
            local id = new(change, { crypto = c, cache = cache })
            return id, c, cache
        end

        it("keeps an accepted verdict until exp + leeway, and serves it without verifying again", function()
            local id, c, cache = setup()
            local first = id:check(fx.tokens.rs_r1)
            assert.is_true(first.ok)
            assert.equal(1, c.calls.verify)
            local key = "jwt:" .. sha(fx.tokens.rs_r1)
            assert.equal(first, cache.store[key])
            assert.equal(FAR + 30 - NOW, cache.ttls[key])
            assert.equal(first, id:check(fx.tokens.rs_r1))
            assert.equal(1, c.calls.verify)
            assert.equal(1, cache.sets)
        end)

        it("keeps a refused verdict 60 s: a forged token repeated costs one verify", function()
            local id, c, cache = setup()
            local h, cl, s = split(fx.tokens.rs_r1)
            local forged = h .. "." .. cl .. "." .. s:sub(1, 100) .. (s:sub(101, 101) == "A" and "B" or "A")
                .. s:sub(102)
            for _ = 1, 5 do
                assert.same(refused("invalid", "signature"), id:check(forged))
            end
            assert.equal(1, c.calls.verify)
            assert.equal(60, cache.ttls["jwt:" .. sha(forged)])
        end)

        it("keeps HS256 verdicts too (one HMAC)", function()
            local id, c, cache = setup()
            local token = hs256(SECRET, { sub = "u", exp = NOW + 100 })
            id:check(token)
            id:check(token)
            assert.equal(1, c.calls.hmac_sha256)
            assert.equal(130, cache.ttls["jwt:" .. sha(token)])
        end)

        it("keeps an expired token's refusal 60 s", function()
            local id, _, cache = setup()
            assert.same(refused("expired", "expired"), id:check(fx.tokens.rs_r1_expired))
            assert.equal(60, cache.ttls["jwt:" .. sha(fx.tokens.rs_r1_expired)])
        end)

        it("keeps a not-yet-valid token's refusal until it becomes valid, when sooner", function()
            local id, _, cache = setup()
            local soon = hs256(SECRET, { exp = FAR, nbf = NOW + 40 })  -- valid from NOW + 10 (leeway 30)
            assert.same(refused("invalid", "nbf"), id:check(soon))
            assert.equal(10, cache.ttls["jwt:" .. sha(soon)])
            local later = hs256(SECRET, { exp = FAR, nbf = NOW + 1000 })
            id:check(later)
            assert.equal(60, cache.ttls["jwt:" .. sha(later)])
        end)

        it("keeps a token about to expire at least 1 s", function()
            local _, _, cache = setup()
            local id = new(nil, { cache = cache, now = function() return NOW + 0.5 end })
            local token = hs256(SECRET, { exp = NOW - 29 })           -- valid until NOW + 1
            assert.is_true(id:check(token).ok)
            assert.equal(1, cache.ttls["jwt:" .. sha(token)])
        end)

        it("keeps the anonymous verdict when not required", function()
            local id, c, cache = setup(function(doc) doc.required = false end)
            local token = hs256("wrong", { exp = FAR })
            assert.equal(identity.ANONYMOUS, id:check(token))
            assert.equal(identity.ANONYMOUS, cache.store["jwt:" .. sha(token)])
            assert.equal(identity.ANONYMOUS, id:check(token))
            assert.equal(1, c.calls.hmac_sha256)
        end)

        it("is not used for API keys", function()
            local id, _, cache = setup()
            id:check(KEY_OK)
            id:check("sk.with.dollar$")
            assert.equal(0, cache.sets)
        end)

        it("hashes a token once, for the cache key, its id and an API-key lookup alike", function()
            local id, c = setup()
            id:check(fx.tokens.rs_r1_nosub)
            assert.equal(1, c.calls.sha256_hex)
            id:check("sk.with.dollar$")
            assert.equal(2, c.calls.sha256_hex)
        end)

        it("absent: every check verifies", function()
            local c = counting_crypto()
            local id = new(nil, { crypto = c })
            id:check(fx.tokens.rs_r1)
            id:check(fx.tokens.rs_r1)
            assert.equal(2, c.calls.verify)
        end)
    end)

    describe("new", function()
        it("parses each public key once, not per check", function()
            local c = counting_crypto()
            local parsed = 0
            c.public_key = function(der)
                parsed = parsed + 1
                return crypto.public_key(der)
            end
            local id = new(nil, { crypto = c })
            assert.equal(4, parsed)
            for _ = 1, 3 do
                id:check(fx.tokens.rs_r1)
                id:check(fx.tokens.es_e1)
            end
            assert.equal(4, parsed)
        end)

        it("skips keys it cannot use, lists why, and uses the others", function()
            local id, problems = new(function(doc)
                local keys = doc.jwt.keys
                table.insert(keys, 1, { alg = "RS256", spki = fx.spki.ed25519, kid = "ed" })
                table.insert(keys, 1, { alg = "RS256", spki = "not base64!", kid = "bad" })
                table.insert(keys, 1, { alg = "RS256", spki = "AAAA", kid = "junk" })
                table.insert(keys, 1, { alg = "RS256", spki = fx.spki.e1, kid = "mixed" })
                table.insert(keys, 1, { alg = "ES256", spki = fx.spki.p384, kid = "p384" })
                table.insert(keys, 1, { alg = "HS512", spki = fx.spki.r1, kid = "hs" })
                table.insert(keys, 1, { alg = "RS256", spki = fx.spki.r1, kid = 7 })
                table.insert(keys, 1, "not an object")
            end)
            assert.equal(8, #problems)
            for _, text in ipairs(problems) do
                assert.matches("^jwt%.keys%[%d%]", text)
                assert.matches("skipped$", text)
            end
            assert.is_true(id:check(fx.tokens.rs_r1).ok)
            assert.is_true(id:check(fx.tokens.es_e1).ok)
        end)

        it("returns no problems for a good configuration", function()
            local _, problems = new()
            assert.same({}, problems)
        end)

        it("needs a crypto module", function()
            assert.has_error(function() identity.new({}, {}) end)
        end)
    end)

    describe("allows", function()
        local allows = identity.allows
        local function v(models)
            return { ok = true, id = "k", rpm = "", models = models }
        end

        it("lets a client without models use any model", function()
            assert.is_true(allows(v(nil), "anything"))
            assert.is_true(allows(identity.ANONYMOUS, "anything", "alias"))
        end)

        it("'*' allows every model", function()
            assert.is_true(allows(v({ "x", "*" }), "anything"))
        end)

        it("names a model exactly, :latest or not", function()
            local verdict = v({ "gpt-4o", "llama3:latest" })
            assert.is_true(allows(verdict, "gpt-4o"))
            assert.is_true(allows(verdict, "gpt-4o:latest"))
            assert.is_true(allows(verdict, "llama3"))
            assert.is_true(allows(verdict, "llama3:latest"))
            assert.is_false(allows(verdict, "gpt-4o-mini"))
            assert.is_false(allows(verdict, "gpt-4"))
            assert.is_false(allows(verdict, "llama3:8b"))
            assert.is_false(allows(verdict, ":latest"))
        end)

        it("matches 'prefix*' by plain prefix of the model without :latest", function()
            local verdict = v({ "llama*" })
            assert.is_true(allows(verdict, "llama3"))
            assert.is_true(allows(verdict, "llama"))
            assert.is_true(allows(verdict, "llama3:latest"))
            assert.is_true(allows(verdict, "llama3:8b"))
            assert.is_false(allows(verdict, "llam"))
            assert.is_false(allows(verdict, "codellama"))
        end)

        it("a ':latest' suffix of a prefix pattern is text of the prefix", function()
            assert.is_false(allows(v({ "llama3:latest*" }), "llama3:latest"))  -- bare model: llama3
            assert.is_true(allows(v({ "llama3:latest*" }), "llama3:latest-x"))
        end)

        it("treats Lua pattern characters in patterns as text", function()
            local verdict = v({ "gpt-4.1*", "a%b*", "x[y*", "(m)" })
            assert.is_true(allows(verdict, "gpt-4.1-mini"))
            assert.is_false(allows(verdict, "gpt-4x1-mini"))
            assert.is_false(allows(verdict, "gpt4.1"))
            assert.is_true(allows(verdict, "a%bc"))
            assert.is_false(allows(verdict, "abc"))
            assert.is_true(allows(verdict, "x[yz"))
            assert.is_true(allows(verdict, "(m)"))
            assert.is_false(allows(verdict, "m"))
        end)

        it("counts the name asked for (an alias) when listed without '*'", function()
            local verdict = v({ "fast", "fa*" })
            assert.is_true(allows(verdict, "llama3", "fast"))
            assert.is_true(allows(verdict, "llama3", "fast:latest"))
            assert.is_false(allows(v({ "fa*" }), "llama3", "fast"))  -- wildcards match the model only
            assert.is_false(allows(v({ "fast" }), "llama3", "slow"))
            assert.is_false(allows(v({ "fast" }), "llama3"))
            assert.is_true(allows(v({ "fa*" }), "fast-model", "alias"))
        end)

        it("refuses when no pattern matches", function()
            assert.is_false(allows(v({ "a", "b*" }), "c"))
        end)
    end)
end)
