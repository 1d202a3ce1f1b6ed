-- TEMP stub (helper writes the real one)
local ffi = require("ffi")
ffi.cdef[[
typedef struct evp_md_st EVP_MD;
const EVP_MD *EVP_sha256(void);
int EVP_Digest(const void *data, size_t count, unsigned char *md, unsigned int *size, const EVP_MD *type, void *impl);
]]
local C = ffi.C
local ok = pcall(function() return C.EVP_sha256 end)
if not ok then C = ffi.load("libcrypto.so.3") end
local buf = ffi.new("unsigned char[32]")
local _M = {}
function _M.sha256_hex(s)
    C.EVP_Digest(s, #s, buf, nil, C.EVP_sha256(), nil)
    local t = ffi.string(buf, 32)
    return (t:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end
return _M
