-- Helpers shared by the specs (not a spec itself: busted runs *_spec.lua only).
local cjson = require("cjson")
local crypto = require("gw.crypto")

local M = {}

local B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

-- Unpadded base64url, for making tokens (the modules only decode).
function M.b64url(s)
    local out = {}
    for i = 1, #s, 3 do
        local a, b, c = s:byte(i, i + 2)
        local v = a * 65536 + (b or 0) * 256 + (c or 0)
        local n = c and 4 or (b and 3 or 2)
        for k = 1, n do
            local d = math.floor(v / 2 ^ (18 - 6 * (k - 1))) % 64
            out[#out + 1] = B64URL:sub(d + 1, d + 1)
        end
    end
    return table.concat(out)
end

function M.hex(s)
    return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

function M.unhex(h)
    return (h:gsub("%x%x", function(x) return string.char(tonumber(x, 16)) end))
end

-- A JWT's first two parts from tables (or raw JSON text), and the token signed with HS256 under secret.
function M.unsigned(header, claims)
    local h = type(header) == "string" and header or cjson.encode(header)
    local c = type(claims) == "string" and claims or cjson.encode(claims)
    return M.b64url(h) .. "." .. M.b64url(c)
end

function M.hs256(secret, claims, header)
    local input = M.unsigned(header or { alg = "HS256", typ = "JWT" }, claims)
    return input .. "." .. M.b64url(crypto.hmac_sha256(secret, input))
end

-- A token's three parts.
function M.split(token)
    return token:match("^([^.]+)%.([^.]+)%.([^.]+)$")
end

return M
