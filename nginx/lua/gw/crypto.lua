-- Hashes, HMAC, base64 and JWT signature checks through OpenSSL 3's libcrypto (issue 11).
--
-- LuaJIT FFI to the libcrypto nginx already links (no hand-written crypto): inside nginx its symbols
-- are in the process (ffi.C); under plain LuaJIT (busted) libcrypto.so.3 is loaded. Base64 is decoded
-- here in Lua (a table lookup per character, JIT-compiled): OpenSSL's EVP_DecodeBlock knows neither the
-- URL alphabet nor unpadded input. Pure otherwise: no ngx.* use (nginx/lua/spec/crypto_spec.lua).
--
--   local crypto = require("gw.crypto")
--   crypto.sha256(s)                     -- 32 raw bytes
--   crypto.sha256_hex(s)                 -- 64 lowercase hex characters
--   crypto.random_hex16()                -- 32 random lowercase hex characters (a request id)
--   crypto.hmac_sha256(key, data)        -- 32 raw bytes
--   crypto.b64url_decode(s)              -- unpadded base64url (JWT parts) -> bytes, or nil
--   crypto.b64_decode(s)                 -- standard base64, padded or not -> bytes, or nil
--   crypto.public_key(spki_der)          -- key object, or nil and why (at (re)load, never per request)
--   crypto.verify(key, alg, input, sig)  -- alg "RS256" or "ES256" (sig: raw r||s) -> boolean
--   crypto.es256_der(raw64)              -- a JWT ES256 signature as DER ECDSA-Sig-Value, or nil
--   crypto.constant_eq(a, b)             -- equal strings, in time independent of where they differ
--
-- Scratch buffers and the EVP_MD_CTXs are module state shared by every call in a worker: nothing
-- here yields, so a worker runs one call at a time.

local ffi = require("ffi")
local bit = require("bit")

local C
local byte, char, sub = string.byte, string.char, string.sub
local band, bor, bxor, lshift, rshift = bit.band, bit.bor, bit.bxor, bit.lshift, bit.rshift
local ffi_new, ffi_string, ffi_gc, ffi_cast = ffi.new, ffi.string, ffi.gc, ffi.cast

-- Declarations identical to another module's are accepted by LuaJIT, so this cannot clash with them.
ffi.cdef([[
typedef struct evp_md_st EVP_MD;
typedef struct evp_md_ctx_st EVP_MD_CTX;
typedef struct evp_pkey_st EVP_PKEY;
typedef struct evp_pkey_ctx_st EVP_PKEY_CTX;
typedef struct engine_st ENGINE;
typedef struct ossl_lib_ctx_st OSSL_LIB_CTX;

const EVP_MD *EVP_sha256(void);
EVP_MD *EVP_MD_fetch(OSSL_LIB_CTX *ctx, const char *algorithm, const char *properties);
int EVP_DigestInit_ex2(EVP_MD_CTX *ctx, const EVP_MD *type, const void *params);
int EVP_DigestUpdate(EVP_MD_CTX *ctx, const void *d, size_t cnt);
int EVP_DigestFinal_ex(EVP_MD_CTX *ctx, unsigned char *md, unsigned int *s);
unsigned char *HMAC(const EVP_MD *evp_md, const void *key, int key_len, const unsigned char *d,
                    size_t n, unsigned char *md, unsigned int *md_len);

EVP_PKEY *d2i_PUBKEY(EVP_PKEY **a, const unsigned char **pp, long length);
void EVP_PKEY_free(EVP_PKEY *pkey);
int EVP_PKEY_get_base_id(const EVP_PKEY *pkey);
int EVP_PKEY_get_bits(const EVP_PKEY *pkey);
int EVP_PKEY_get_group_name(const EVP_PKEY *pkey, char *name, size_t name_sz, size_t *gname_len);

EVP_MD_CTX *EVP_MD_CTX_new(void);
int EVP_MD_CTX_reset(EVP_MD_CTX *ctx);
void EVP_MD_CTX_free(EVP_MD_CTX *ctx);
int EVP_DigestVerifyInit(EVP_MD_CTX *ctx, EVP_PKEY_CTX **pctx, const EVP_MD *type, ENGINE *e,
                         EVP_PKEY *pkey);
int EVP_DigestVerify(EVP_MD_CTX *ctx, const unsigned char *sigret, size_t siglen,
                     const unsigned char *tbs, size_t tbslen);

void ERR_clear_error(void);
int RAND_bytes(unsigned char *buf, int num);

int SHA256_Init(void *c);
int SHA256_Update(void *c, const void *data, size_t len);
int SHA256_Final(unsigned char *md, void *c);
]])

if pcall(function() return ffi.C.EVP_sha256 end) then
    C = ffi.C                             -- inside nginx: the libcrypto it links
else
    C = ffi.load("libcrypto.so.3")        -- plain LuaJIT (busted)
end

local _M = {}
_M.lib = C                                -- for specs that inspect OpenSSL's error queue

local EVP_PKEY_RSA, EVP_PKEY_EC = 6, 408

-- SHA-256 fetched once from the default provider: a digest from EVP_sha256() is fetched again by
-- OpenSSL 3 on every use. Falls back to EVP_sha256() should the fetch fail; never freed (module state).
local SHA256 = C.EVP_MD_fetch(nil, "SHA256", nil)
if SHA256 == nil then
    C.ERR_clear_error()
    SHA256 = C.EVP_sha256()
end

local md_buf = ffi_new("unsigned char[64]")   -- a digest or an HMAC
local md_len = ffi_new("unsigned int[1]")
local hex_buf = ffi_new("unsigned char[64]")
local HEX = ffi_new("const unsigned char[16]", { byte("0123456789abcdef", 1, 16) })

-- One context for every sha256: EVP_Digest would allocate, initialise and free one per call (~450
-- instructions more for a short key, OpenSSL 3 looking its parameters up each time).
local sha_ctx = ffi_gc(C.EVP_MD_CTX_new(), C.EVP_MD_CTX_free)

local function evp_digest(s)
    if C.EVP_DigestInit_ex2(sha_ctx, SHA256, nil) ~= 1 or C.EVP_DigestUpdate(sha_ctx, s, #s) ~= 1
            or C.EVP_DigestFinal_ex(sha_ctx, md_buf, md_len) ~= 1 then
        C.ERR_clear_error()
        error("sha256 failed")
    end
end

-- OpenSSL's own SHA-256 without EVP where this libcrypto still exports it (OpenSSL 3 deprecates the
-- low-level calls but keeps them): no provider dispatch and no allocation, ~650 instructions less than
-- the EVP context for a short key. Its context, SHA256_CTX of <openssl/sha.h> (112 bytes), is held in a
-- larger array and passed as void *, so that another module's declarations of these calls still fit.
local digest = evp_digest
if pcall(function() return C.SHA256_Init, C.SHA256_Update, C.SHA256_Final end) then
    local sha_words = ffi_new("unsigned int[64]")
    local sha_state = ffi_cast("void *", sha_words)  -- a plain pointer: sha_words is kept below
    digest = function(s)
        local _ = sha_words
        if C.SHA256_Init(sha_state) ~= 1 or C.SHA256_Update(sha_state, s, #s) ~= 1
                or C.SHA256_Final(md_buf, sha_state) ~= 1 then
            error("sha256 failed")
        end
    end
end

-- The sha256 of s, 32 raw bytes.
function _M.sha256(s)
    digest(s)
    return ffi_string(md_buf, 32)
end

-- The sha256 of s as 64 lowercase hex characters.
function _M.sha256_hex(s)
    digest(s)
    for i = 0, 31 do
        local b = md_buf[i]
        hex_buf[2 * i] = HEX[rshift(b, 4)]
        hex_buf[2 * i + 1] = HEX[band(b, 15)]
    end
    return ffi_string(hex_buf, 64)
end

-- Random bytes from OpenSSL, drawn a batch at a time: RAND_bytes costs ~6.7k instructions a call
-- whatever the size up to a few KB (OpenSSL 3 looks its parameters up each time), ~70 per 16 bytes of
-- a 4 KB batch. Filled on first use, in a worker: nginx's master never calls this, so workers forked
-- from it never share bytes (and OpenSSL reseeds after a fork).
local RANDOM_BATCH = 4096
local random_buf = ffi_new("unsigned char[?]", RANDOM_BATCH)
local random_used = RANDOM_BATCH

-- 32 random lowercase hex characters (16 bytes): the form of nginx's $request_id, which calls
-- RAND_bytes for each request.
function _M.random_hex16()
    if random_used + 16 > RANDOM_BATCH then
        if C.RAND_bytes(random_buf, RANDOM_BATCH) ~= 1 then
            C.ERR_clear_error()
            error("RAND_bytes failed")
        end
        random_used = 0
    end
    for i = 0, 15 do
        local b = random_buf[random_used + i]
        hex_buf[2 * i] = HEX[rshift(b, 4)]
        hex_buf[2 * i + 1] = HEX[band(b, 15)]
    end
    random_used = random_used + 16
    return ffi_string(hex_buf, 32)
end

-- HMAC-SHA256 of data under key, 32 raw bytes.
function _M.hmac_sha256(key, data)
    if C.HMAC(SHA256, key, #key, data, #data, md_buf, md_len) == nil then
        C.ERR_clear_error()
        error("HMAC failed")
    end
    return ffi_string(md_buf, 32)
end

-- Base64: a character's 6-bit value by byte, -1 for a byte outside the alphabet.
local function alphabet(last2)
    local t = ffi_new("int8_t[256]")
    for i = 0, 255 do
        t[i] = -1
    end
    local chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789" .. last2
    for i = 1, 64 do
        t[byte(chars, i)] = i - 1
    end
    return t
end
local URL, STD = alphabet("-_"), alphabet("+/")

local out_buf, out_size = nil, 0          -- decoded bytes, grown as needed

-- Decodes s[1..n] (no padding) with alphabet t. Refuses a length of 1 mod 4 (no whole byte) and, so
-- that each byte string has one encoding, a final character with bits set beyond the last byte.
local function decode(s, n, t)
    local rem = n % 4
    if rem == 1 then
        return nil
    end
    local size = rshift(n, 2) * 3 + (rem == 0 and 0 or rem - 1)
    if size > out_size then
        out_size = math.max(size, 1024)
        out_buf = ffi_new("unsigned char[?]", out_size)
    end
    local p = ffi_cast("const unsigned char *", s)
    local o = 0
    local whole = n - rem
    for i = 0, whole - 1, 4 do
        local a, b, c, d = t[p[i]], t[p[i + 1]], t[p[i + 2]], t[p[i + 3]]
        if bor(a, b, c, d) < 0 then
            return nil
        end
        local v = bor(lshift(a, 18), lshift(b, 12), lshift(c, 6), d)
        out_buf[o] = rshift(v, 16)
        out_buf[o + 1] = band(rshift(v, 8), 255)
        out_buf[o + 2] = band(v, 255)
        o = o + 3
    end
    if rem == 2 then
        local a, b = t[p[whole]], t[p[whole + 1]]
        if bor(a, b) < 0 or band(b, 15) ~= 0 then
            return nil
        end
        out_buf[o] = bor(lshift(a, 2), rshift(b, 4))
    elseif rem == 3 then
        local a, b, c = t[p[whole]], t[p[whole + 1]], t[p[whole + 2]]
        if bor(a, b, c) < 0 or band(c, 3) ~= 0 then
            return nil
        end
        local v = bor(lshift(a, 10), lshift(b, 4), rshift(c, 2))
        out_buf[o] = rshift(v, 8)
        out_buf[o + 1] = band(v, 255)
    end
    return ffi_string(out_buf, size)
end

-- Unpadded base64url (RFC 4648 section 5, as in JWTs) -> bytes, or nil for a character outside the
-- alphabet (padding '=' included), a length of 1 mod 4, or non-zero unused bits in the last character.
function _M.b64url_decode(s)
    return decode(s, #s, URL)
end

-- Standard base64 (RFC 4648 section 4), with its '=' padding or without -> bytes, or nil.
function _M.b64_decode(s)
    local n = #s
    if byte(s, n) == 61 then              -- '=': padded, so the length is a multiple of 4
        if n % 4 ~= 0 then
            return nil
        end
        n = byte(s, n - 1) == 61 and n - 2 or n - 1
    end
    return decode(s, n, STD)
end

-- Equal strings, compared in time that depends on their length only.
function _M.constant_eq(a, b)
    local n = #a
    if n ~= #b then
        return false
    end
    local pa, pb = ffi_cast("const uint8_t *", a), ffi_cast("const uint8_t *", b)
    local diff = 0
    for i = 0, n - 1 do
        diff = bor(diff, bxor(pa[i], pb[i]))
    end
    return diff == 0
end

local der_pp = ffi_new("const unsigned char *[1]")
local group_buf = ffi_new("char[64]")
local group_len = ffi_new("size_t[1]")

-- A public key from its SubjectPublicKeyInfo DER -> {pkey = EVP_PKEY (freed when collected),
-- type = "RSA" | "EC", bits = n, curve = "prime256v1" (EC)}, or nil and why. RSA and EC keys only.
function _M.public_key(der)
    if type(der) ~= "string" or der == "" then
        return nil, "no key bytes"
    end
    der_pp[0] = ffi_cast("const unsigned char *", der)
    local start = der_pp[0]
    local pkey = C.d2i_PUBKEY(nil, der_pp, #der)
    if pkey == nil then
        C.ERR_clear_error()
        return nil, "not a DER SubjectPublicKeyInfo OpenSSL can read"
    end
    pkey = ffi_gc(pkey, C.EVP_PKEY_free)
    if der_pp[0] - start ~= #der then
        return nil, "bytes after the key"
    end
    local id = C.EVP_PKEY_get_base_id(pkey)
    local key = { pkey = pkey, bits = tonumber(C.EVP_PKEY_get_bits(pkey)) }
    if id == EVP_PKEY_RSA then
        key.type = "RSA"
    elseif id == EVP_PKEY_EC then
        key.type = "EC"
        if C.EVP_PKEY_get_group_name(pkey, group_buf, 64, group_len) ~= 1 then
            C.ERR_clear_error()
            return nil, "an EC key without a named curve"
        end
        key.curve = ffi_string(group_buf, group_len[0])
    else
        return nil, "neither an RSA nor an EC key (EVP_PKEY type " .. tonumber(id) .. ")"
    end
    return key
end

-- DER INTEGER of a big-endian unsigned number: leading zero bytes stripped (one kept for zero), and a
-- zero byte put back when the high bit is set, so the value stays positive.
local function der_integer(n)
    local i, last = 1, #n
    while i < last and byte(n, i) == 0 do
        i = i + 1
    end
    local v = sub(n, i)
    if byte(v, 1) >= 0x80 then
        v = "\0" .. v
    end
    return "\2" .. char(#v) .. v
end

-- A JWT ES256 signature (r||s, 32 bytes each) as the DER ECDSA-Sig-Value OpenSSL verifies:
-- SEQUENCE { INTEGER r, INTEGER s }. nil unless exactly 64 bytes. At most 72 bytes: short lengths.
function _M.es256_der(raw)
    if type(raw) ~= "string" or #raw ~= 64 then
        return nil
    end
    local body = der_integer(sub(raw, 1, 32)) .. der_integer(sub(raw, 33, 64))
    return "\48" .. char(#body) .. body
end
local es256_der = _M.es256_der

local md_ctx = ffi_gc(C.EVP_MD_CTX_new(), C.EVP_MD_CTX_free)

-- Does sig sign input under key with alg? "RS256": RSASSA-PKCS1-v1_5 with SHA-256, an RSA key;
-- "ES256": ECDSA P-256 with SHA-256, an EC key on P-256, sig the JWT's raw r||s (64 bytes). Anything
-- else is false. OpenSSL's error queue is left empty whatever the outcome: nginx would otherwise log
-- "ignoring stale global SSL error" on the worker's next TLS operation.
function _M.verify(key, alg, input, sig)
    if type(key) ~= "table" or type(input) ~= "string" or type(sig) ~= "string" then
        return false
    end
    if alg == "RS256" then
        if key.type ~= "RSA" then
            return false
        end
    elseif alg == "ES256" then
        if key.type ~= "EC" or key.curve ~= "prime256v1" then
            return false
        end
        sig = es256_der(sig)
        if not sig then
            return false
        end
    else
        return false
    end
    C.EVP_MD_CTX_reset(md_ctx)
    if C.EVP_DigestVerifyInit(md_ctx, nil, SHA256, nil, key.pkey) ~= 1 then
        C.ERR_clear_error()
        return false
    end
    if C.EVP_DigestVerify(md_ctx, sig, #sig, input, #input) ~= 1 then
        C.ERR_clear_error()
        return false
    end
    return true
end

return _M
