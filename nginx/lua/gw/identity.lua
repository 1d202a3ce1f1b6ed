-- TEMP stub
local _M = {}
local ANON = {ok = true, id = "", rpm = "", models = nil}
local mt = {__index = {}}
function mt.__index:check(token)
    if not token then
        if self.required then return {ok=false, reason="missing", message="No API key: send it as Authorization: Bearer <key>, x-api-key or api-key"} end
        return ANON
    end
    local k = self.keys[self.crypto.sha256_hex(token)]
    if not k then
        if self.required then return {ok=false, reason="invalid", message="The API key is not valid"} end
        return ANON
    end
    local models = #k.models > 0 and k.models or nil
    return {ok=true, id=k.id, rpm = k.rpm ~= 0 and tostring(k.rpm) or "", models=models}
end
function _M.new(clients, opts)
    return setmetatable({required=clients.required, keys=clients.keys, crypto=opts.crypto}, mt), {}
end
function _M.presented(a, x, k)
    if a then local t = a:match("^%s*[Bb]earer%s+(%S+)%s*$"); if t then return t end end
    local v = x or k
    return v and v ~= "" and v or nil
end
function _M.allows(verdict, model, asked)
    if not verdict.models then return true end
    for _, p in ipairs(verdict.models) do if p == "*" or p == model or p == asked then return true end end
    return false
end
return _M
