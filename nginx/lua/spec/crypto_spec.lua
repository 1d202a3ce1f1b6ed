-- gw.crypto: hashes, HMAC, base64 and JWT signatures through libcrypto (nginx/lua/gw/crypto.lua).
local crypto = require("gw.crypto")
local fx = require("spec.fixtures.jwt")
local ffi = require("ffi")

ffi.cdef([[
unsigned long ERR_peek_error(void);
]])

local helpers = require("spec.helpers")
local hex, unhex, b64url = helpers.hex, helpers.unhex, helpers.b64url

local function errors_left()
    return tonumber(crypto.lib.ERR_peek_error())
end

local function parts(token)
    local a, b, c = token:match("^([^.]+)%.([^.]+)%.([^.]+)$")
    return a .. "." .. b, crypto.b64url_decode(c), a, b, c
end

local keys = {}
for name, spki in pairs(fx.spki) do
    keys[name] = crypto.public_key(crypto.b64_decode(spki))
end

describe("gw.crypto", function()
    it("loads the libcrypto of OpenSSL 3 (ffi.load under plain LuaJIT)", function()
        assert.is_not_nil(crypto.lib)
        assert.equal(0, errors_left())
    end)

    describe("sha256_hex", function()
        it("matches FIPS 180-2's vectors", function()
            assert.equal("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                crypto.sha256_hex(""))
            assert.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
                crypto.sha256_hex("abc"))
            assert.equal("248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
                crypto.sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"))
            assert.equal("cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0",
                crypto.sha256_hex(string.rep("a", 1000000)))
        end)

        it("hashes bytes, NULs and high bytes included, as 64 lowercase hex characters", function()
            local h = crypto.sha256_hex("\0\255\128 x")
            assert.matches("^[0-9a-f]+$", h)
            assert.equal(64, #h)
            assert.equal(crypto.sha256_hex("\0\255\128 x"), h)
            assert.not_equal(crypto.sha256_hex("\0\255\128 y"), h)
        end)

        it("returns a fresh string each call although the buffer is shared", function()
            local a = crypto.sha256_hex("a")
            local b = crypto.sha256_hex("b")
            assert.equal("ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb", a)
            assert.equal("3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d", b)
        end)
    end)

    describe("random_hex16", function()
        it("gives 32 lowercase hex characters, never the same twice, across batches", function()
            local seen = {}
            for _ = 1, 600 do                 -- more than two 4 KB batches of 16 bytes
                local id = crypto.random_hex16()
                assert.matches("^[0-9a-f]+$", id)
                assert.equal(32, #id)
                assert.is_nil(seen[id])
                seen[id] = true
            end
            assert.equal(0, errors_left())
        end)
    end)

    describe("sha256", function()
        it("is the same digest as 32 raw bytes", function()
            for _, s in ipairs({ "", "abc", "\0\255\128 x", string.rep("a", 1000000) }) do
                local raw = crypto.sha256(s)
                assert.equal(32, #raw)
                assert.equal(crypto.sha256_hex(s), (raw:gsub(".", function(c)
                    return string.format("%02x", c:byte())
                end)))
            end
            assert.equal(0, errors_left())
        end)
    end)

    describe("hmac_sha256", function()
        -- RFC 4231 section 4
        it("case 1 (20-byte key)", function()
            assert.equal("b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
                hex(crypto.hmac_sha256(string.rep("\11", 20), "Hi There")))
        end)

        it("case 2 (key shorter than the output)", function()
            assert.equal("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
                hex(crypto.hmac_sha256("Jefe", "what do ya want for nothing?")))
        end)

        it("case 3 (binary key and data)", function()
            assert.equal("773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
                hex(crypto.hmac_sha256(string.rep("\170", 20), string.rep("\221", 50))))
        end)

        it("case 6 (key longer than the block: hashed first)", function()
            assert.equal("60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
                hex(crypto.hmac_sha256(string.rep("\170", 131),
                    "Test Using Larger Than Block-Size Key - Hash Key First")))
        end)

        it("returns 32 raw bytes, an empty key and message included", function()
            local mac = crypto.hmac_sha256("", "")
            assert.equal(32, #mac)
            assert.equal("b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad", hex(mac))
        end)
    end)

    describe("b64url_decode", function()
        local vectors = {  -- RFC 4648 section 10, padding removed
            { "", "" }, { "Zg", "f" }, { "Zm8", "fo" }, { "Zm9v", "foo" }, { "Zm9vYg", "foob" },
            { "Zm9vYmE", "fooba" }, { "Zm9vYmFy", "foobar" },
        }
        for _, v in ipairs(vectors) do
            it(("decodes %q (length %d mod 4 = %d)"):format(v[1], #v[1], #v[1] % 4), function()
                assert.equal(v[2], crypto.b64url_decode(v[1]))
            end)
        end

        it("uses the URL alphabet: - and _ for 62 and 63", function()
            assert.equal("\251\255\191", crypto.b64url_decode("-_-_"))
            assert.equal("\0\0\0", crypto.b64url_decode("AAAA"))
            assert.equal("\255\255\255", crypto.b64url_decode("____"))
        end)

        it("decodes every byte value", function()
            local all = {}
            for i = 0, 255 do
                all[#all + 1] = string.char(i)
            end
            all = table.concat(all)
            for cut = 0, 3 do
                local s = all:sub(1, 256 - cut)
                assert.equal(s, crypto.b64url_decode(b64url(s)))
            end
        end)

        it("decodes inputs longer than its first buffer", function()
            local s = string.rep("\1\2\3\250", 3000)
            assert.equal(s, crypto.b64url_decode(b64url(s)))
            assert.equal("foo", crypto.b64url_decode("Zm9v"))
        end)

        it("decodes a JWT's parts", function()
            local _, sig, h = parts(fx.tokens.rs_r1)
            assert.equal(256, #sig)
            assert.matches('^{"alg":"RS256"', crypto.b64url_decode(h))
        end)

        local invalid = {
            ["a length of 1 mod 4"] = "Zm9vY",
            ["a single character"] = "Z",
            ["padding"] = "Zm8=",
            ["double padding"] = "Zg==",
            ["the standard alphabet's +"] = "a+bc",
            ["the standard alphabet's /"] = "ab/c",
            ["a space"] = "Zm9v Zg",
            ["a dot"] = "Zm9v.Zg",
            ["a NUL byte"] = "Zm\0v",
            ["a high byte"] = "Zm\200v",
            ["a newline"] = "Zm9v\nZm9v",
            ["unused bits set (2 characters)"] = "Zh",
            ["unused bits set (3 characters)"] = "Zm9",
            ["a bad character in the last group"] = "Zm9vZ!",
        }
        for name, s in pairs(invalid) do
            it("refuses " .. name, function()
                assert.is_nil(crypto.b64url_decode(s))
            end)
        end
    end)

    describe("b64_decode", function()
        it("decodes RFC 4648's vectors, padded or not", function()
            local vectors = { { "", "" }, { "Zg==", "f" }, { "Zm8=", "fo" }, { "Zm9v", "foo" },
                { "Zm9vYg==", "foob" }, { "Zm9vYmE=", "fooba" }, { "Zm9vYmFy", "foobar" }, { "Zg", "f" } }
            for _, v in ipairs(vectors) do
                assert.equal(v[2], crypto.b64_decode(v[1]))
            end
        end)

        it("uses the standard alphabet", function()
            assert.equal("\251\255\191", crypto.b64_decode("+/+/"))
            assert.is_nil(crypto.b64_decode("-_-_"))
        end)

        it("refuses bad padding and lengths", function()
            for _, s in ipairs({ "Zg=", "Z===", "=", "====", "Zm9vY", "Zg=a", "Z=g=" }) do
                assert.is_nil(crypto.b64_decode(s), s)
            end
        end)

        it("decodes the fixtures' SPKI keys", function()
            local der = crypto.b64_decode(fx.spki.r1)
            assert.equal(294, #der)       -- RSA 2048, e = 65537
            assert.equal(0x30, der:byte(1))
            assert.equal(91, #crypto.b64_decode(fx.spki.e1))
        end)
    end)

    describe("constant_eq", function()
        it("compares strings", function()
            assert.is_true(crypto.constant_eq("", ""))
            assert.is_true(crypto.constant_eq("abc\0", "abc\0"))
            assert.is_false(crypto.constant_eq("abc", "abd"))
            assert.is_false(crypto.constant_eq("abc", "ab"))
            assert.is_false(crypto.constant_eq("bbc", "abc"))
            assert.is_false(crypto.constant_eq("\0", ""))
            assert.is_false(crypto.constant_eq("\128", "\0"))
        end)
    end)

    describe("public_key", function()
        it("reads RSA 2048 and EC P-256 keys", function()
            assert.same({ "RSA", 2048 }, { keys.r1.type, keys.r1.bits })
            assert.same({ "EC", 256, "prime256v1" }, { keys.e1.type, keys.e1.bits, keys.e1.curve })
        end)

        it("reads an EC key on another curve (ES256 then refuses it)", function()
            assert.same({ "EC", "secp384r1" }, { keys.p384.type, keys.p384.curve })
        end)

        it("refuses a key that is neither RSA nor EC", function()
            assert.is_nil(keys.ed25519)
            local key, err = crypto.public_key(crypto.b64_decode(fx.spki.ed25519))
            assert.is_nil(key)
            assert.matches("neither an RSA nor an EC key", err)
            assert.equal(0, errors_left())
        end)

        it("refuses bytes that are not a key, and leaves OpenSSL's error queue empty", function()
            local der = crypto.b64_decode(fx.spki.r1)
            for _, bad in ipairs({ "", "\48\0", "garbage", der:sub(1, 100), der:sub(2) }) do
                local key, err = crypto.public_key(bad)
                assert.is_nil(key)
                assert.is_string(err)
                assert.equal(0, errors_left())
            end
            assert.same({ nil, "no key bytes" }, { crypto.public_key(nil) })
        end)

        it("refuses bytes after the key", function()
            local key, err = crypto.public_key(crypto.b64_decode(fx.spki.r1) .. "\0")
            assert.is_nil(key)
            assert.equal("bytes after the key", err)
            assert.equal(0, errors_left())
        end)
    end)

    describe("es256_der", function()
        local function der(r_hex, s_hex)
            return hex(crypto.es256_der(unhex(r_hex) .. unhex(s_hex)))
        end
        local R = string.rep("11", 32)

        it("encodes SEQUENCE { INTEGER r, INTEGER s }", function()
            assert.equal("3044" .. "0220" .. R .. "0220" .. R, der(R, R))
        end)

        it("puts a zero byte before a value with its high bit set", function()
            local H = "80" .. string.rep("00", 31)
            assert.equal("3045" .. "022100" .. H .. "0220" .. R, der(H, R))
            assert.equal("3046" .. "022100" .. H .. "022100" .. H, der(H, H))
            local F = string.rep("ff", 32)
            assert.equal("3046" .. "022100" .. F .. "022100" .. F, der(F, F))
        end)

        it("strips leading zero bytes", function()
            local z = "0000" .. string.rep("7f", 30)
            local seven_f = string.rep("7f", 30)
            assert.equal("3040" .. "021e" .. seven_f .. "021e" .. seven_f, der(z, z))
            local one = string.rep("00", 31) .. "01"
            assert.equal("3006" .. "020101" .. "020101", der(one, one))
        end)

        it("strips zeros, then adds one back for a high bit below them", function()
            local v = "00" .. "80" .. string.rep("00", 30)
            assert.equal("3044" .. "0220" .. v .. "0220" .. R, der(v, R))
        end)

        it("keeps one zero byte for zero", function()
            local zero = string.rep("00", 32)
            assert.equal("3006" .. "020100" .. "020100", der(zero, zero))
        end)

        it("takes exactly 64 bytes", function()
            assert.is_nil(crypto.es256_der(string.rep("\1", 63)))
            assert.is_nil(crypto.es256_der(string.rep("\1", 65)))
            assert.is_nil(crypto.es256_der(""))
            assert.is_nil(crypto.es256_der(nil))
        end)
    end)

    describe("verify", function()
        local function check(key, alg, token)
            local input, sig = parts(token)
            return crypto.verify(key, alg, input, sig)
        end

        it("accepts RS256 tokens signed with the key", function()
            assert.is_true(check(keys.r1, "RS256", fx.tokens.rs_r1))
            assert.is_true(check(keys.r1, "RS256", fx.tokens.rs_r1_nosub))
            assert.is_true(check(keys.r2, "RS256", fx.tokens.rs_r2_nokid))
        end)

        it("accepts ES256 tokens signed with the key, whatever the shape of r", function()
            assert.is_true(check(keys.e1, "ES256", fx.tokens.es_e1))
            assert.is_true(check(keys.e2, "ES256", fx.tokens.es_e2_nokid))
            local _, sig = parts(fx.tokens.es_e1_r_high)
            assert.is_true(sig:byte(1) >= 0x80)
            assert.is_true(check(keys.e1, "ES256", fx.tokens.es_e1_r_high))
            _, sig = parts(fx.tokens.es_e1_r_zero)
            assert.equal(0, sig:byte(1))
            assert.is_true(check(keys.e1, "ES256", fx.tokens.es_e1_r_zero))
        end)

        it("refuses another key's signature, and leaves the error queue empty", function()
            assert.is_false(check(keys.r2, "RS256", fx.tokens.rs_r1))
            assert.equal(0, errors_left())
            assert.is_false(check(keys.e2, "ES256", fx.tokens.es_e1))
            assert.equal(0, errors_left())
        end)

        it("refuses a forged signature or changed input", function()
            local input, sig = parts(fx.tokens.rs_r1)
            local forged = sig:sub(1, 100) .. string.char((sig:byte(101) + 1) % 256) .. sig:sub(102)
            assert.is_false(crypto.verify(keys.r1, "RS256", input, forged))
            assert.equal(0, errors_left())
            assert.is_false(crypto.verify(keys.r1, "RS256", input .. "x", sig))
            assert.is_false(crypto.verify(keys.r1, "RS256", input, sig:sub(2)))
            assert.is_false(crypto.verify(keys.r1, "RS256", input, ""))
            assert.equal(0, errors_left())
            local es_input, es_sig = parts(fx.tokens.es_e1)
            assert.is_false(crypto.verify(keys.e1, "ES256", es_input .. "x", es_sig))
            assert.is_false(crypto.verify(keys.e1, "ES256", es_input, string.rep("\0", 64)))
            assert.is_false(crypto.verify(keys.e1, "ES256", es_input, string.rep("\255", 64)))
            assert.equal(0, errors_left())
        end)

        it("refuses ES256 signatures that are not 64 bytes", function()
            local input, sig = parts(fx.tokens.es_e1)
            assert.equal(64, #sig)
            assert.is_false(crypto.verify(keys.e1, "ES256", input, sig:sub(1, 63)))
            assert.is_false(crypto.verify(keys.e1, "ES256", input, sig .. "\0"))
            -- DER is not the JWT's form
            assert.is_false(crypto.verify(keys.e1, "ES256", input, crypto.es256_der(sig)))
            assert.equal(0, errors_left())
        end)

        it("refuses a key of the wrong type for the algorithm (swapped alg)", function()
            local input, sig = parts(fx.tokens.rs_r1)
            assert.is_false(crypto.verify(keys.e1, "RS256", input, sig))
            local es_input, es_sig = parts(fx.tokens.es_e1)
            assert.is_false(crypto.verify(keys.r1, "ES256", es_input, es_sig))
            assert.is_false(crypto.verify(keys.e1, "RS256", es_input, es_sig))
            assert.is_false(crypto.verify(keys.p384, "ES256", es_input, es_sig))
            assert.equal(0, errors_left())
        end)

        it("refuses other algorithms and bad arguments", function()
            local input, sig = parts(fx.tokens.rs_r1)
            for _, alg in ipairs({ "HS256", "none", "RS384", "PS256", "rs256", "", false }) do
                assert.is_false(crypto.verify(keys.r1, alg, input, sig))
            end
            assert.is_false(crypto.verify(nil, "RS256", input, sig))
            assert.is_false(crypto.verify(keys.r1, "RS256", input, nil))
            assert.is_false(crypto.verify(keys.r1, "RS256", nil, sig))
        end)

        it("clears an error another caller left in the queue when it fails", function()
            local pp = ffi.new("const unsigned char *[1]", ffi.cast("const unsigned char *", "bad"))
            assert.is_true(crypto.lib.d2i_PUBKEY(nil, pp, 3) == nil)  -- leaves its error queued
            assert.not_equal(0, errors_left())
            assert.is_false(check(keys.r2, "RS256", fx.tokens.rs_r1))
            assert.equal(0, errors_left())
        end)

        it("verifies again after failures (the shared EVP_MD_CTX is reset)", function()
            for _ = 1, 3 do
                assert.is_false(check(keys.r2, "RS256", fx.tokens.rs_r1))
                assert.is_true(check(keys.r1, "RS256", fx.tokens.rs_r1))
                assert.is_false(check(keys.e2, "ES256", fx.tokens.es_e1))
                assert.is_true(check(keys.e1, "ES256", fx.tokens.es_e1))
            end
        end)

        it("matches what an HMAC signed (HS256 is compared by the caller)", function()
            local input = b64url('{"alg":"HS256"}') .. "." .. b64url('{"exp":1}')
            local mac = crypto.hmac_sha256("secret", input)
            assert.equal(mac, crypto.b64url_decode(b64url(mac)))
        end)
    end)
end)
