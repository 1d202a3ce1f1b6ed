-- The answers the gateway gives itself, as JSON text in the client's API style (OpenAI, Anthropic,
-- Ollama): error bodies, model listings, and the words of a 429. Pure: no ngx.* use, so busted runs it
-- under plain LuaJIT (nginx/lua/spec/answers_spec.lua). Bodies are built as text, not encoded from
-- tables: Debian's lua-cjson encodes an empty table as {} where a list must be [], and key order would
-- follow the hash.
local cjson = require("cjson")

local encode = cjson.encode
local byte, gsub, sub, tostring = string.byte, string.gsub, string.sub, tostring
local concat, ceil, max, tonumber = table.concat, math.ceil, math.max, tonumber

local _M = {}

-- Characters of a client's value an error message repeats.
local ECHO_MAX = 256
_M.ECHO_MAX = ECHO_MAX
local ELLIPSIS = "\226\128\166"  -- U+2026

-- A JSON string literal. lua-cjson writes "/" as "\/": valid, but clients show it, so it is undone
-- (cjson writes a raw "/" nowhere else, so every "\/" it wrote is that escape).
local function quote(text)
    return (gsub(encode(text), "\\/", "/"))
end
_M.quote = quote

-- A client's value as an error message quotes it: JSON-quoted, at most ECHO_MAX bytes of it, cut at a
-- UTF-8 character boundary.
function _M.shown(value)
    local text = tostring(value)
    if #text > ECHO_MAX then
        local cut = ECHO_MAX
        local c = byte(text, cut + 1)
        while cut > 0 and c >= 0x80 and c < 0xC0 do  -- the next byte continues a character: cut earlier
            cut = cut - 1
            c = byte(text, cut + 1)
        end
        text = sub(text, 1, cut) .. ELLIPSIS
    end
    return quote(text)
end

-- A JSON array of strings.
local function list(names)
    local out = {}
    for i = 1, #names do
        out[i] = quote(names[i])
    end
    return "[" .. concat(out, ",") .. "]"
end
_M.list = list

-- An error in the client's API style; `available` (a list of model names) is added as available_models.
function _M.error_body(family, status, kind, message, available)
    local extra = available and (',"available_models":' .. list(available)) or ""
    if family == "anthropic" then
        return '{"type":"error","error":{"type":' .. quote(kind) .. ',"message":' .. quote(message) .. "}"
            .. extra .. "}"
    elseif family == "ollama" then
        return '{"error":' .. quote(message) .. extra .. "}"
    end
    return '{"error":{"message":' .. quote(message) .. ',"type":' .. quote(kind) .. ',"param":null,"code":"'
        .. status .. '"}' .. extra .. "}"
end

-- GET /v1/models, OpenAI's style.
function _M.openai_models(names, created)
    local out = {}
    for i = 1, #names do
        out[i] = '{"id":' .. quote(names[i]) .. ',"object":"model","created":' .. created
            .. ',"owned_by":"ish-gateway"}'
    end
    return '{"object":"list","data":[' .. concat(out, ",") .. "]}"
end

-- GET /v1/models with an anthropic-version header, Anthropic's style.
function _M.anthropic_models(names)
    local out = {}
    for i = 1, #names do
        local id = quote(names[i])
        out[i] = '{"type":"model","id":' .. id .. ',"display_name":' .. id
            .. ',"created_at":"1970-01-01T00:00:00Z"}'
    end
    local n = #names
    local first, last = n > 0 and quote(names[1]) or "null", n > 0 and quote(names[n]) or "null"
    return '{"data":[' .. concat(out, ",") .. '],"has_more":false,"first_id":' .. first
        .. ',"last_id":' .. last .. "}"
end

-- GET /api/tags, Ollama's style: what follows each model's name.
local OLLAMA_TAG_REST = ',"modified_at":"1970-01-01T00:00:00Z","size":0,"digest":"","details":{"format":"",'
    .. '"family":"","families":null,"parameter_size":"","quantization_level":""}}'
function _M.ollama_tags(names)
    local out = {}
    for i = 1, #names do
        local name = quote(names[i])
        out[i] = '{"name":' .. name .. ',"model":' .. name .. OLLAMA_TAG_REST
    end
    return '{"models":[' .. concat(out, ",") .. "]}"
end

-- The limit that said no, named with the setting that raises it, and the seconds until it lets one
-- more request through: wait, text. A key is the unit of quota: a client with a valid key meets its
-- key's limits (and a class limit only where an operator set one); per-address limits bind requests
-- without a valid key.
--   retry: clients.json's "retry"; keyed: the request had a valid key or token; rpm: its rate ("" none);
--   conn_rejected: limit_conn said no; class: the endpoint class of the path (or nil).
function _M.binding_limit(retry, keyed, rpm, conn_rejected, class)
    if conn_rejected then
        if keyed then
            return 1, "this client already has " .. retry.conn_key .. " requests in progress "
                .. "(ISHGW_LIMIT_CONN_PER_KEY)"
        end
        return 1, "this address already has " .. retry.conn_ip .. " requests in progress without a valid key "
            .. "(ISHGW_LIMIT_CONN_PER_IP)"
    end
    local best_rpm, best_text = 0, "a rate limit of this gateway"
    local function consider(value, text)
        if value and value > 0 and (best_rpm == 0 or value < best_rpm) then
            best_rpm, best_text = value, text
        end
    end
    if keyed then
        consider(tonumber(rpm), "the limit of " .. rpm .. " requests per minute of this key or token "
            .. "(its rpm_limit: PUT /admin/keys/<id>; JWT: the rpm claim)")
    else
        consider(retry.ip, retry.ip .. " requests per minute per address without a valid key "
            .. "(ISHGW_LIMIT_IP_RPM)")
    end
    local cls = class and retry.classes[class]
    if cls and (cls.all or not keyed) then
        consider(cls.rpm, cls.rpm .. " requests per minute for this endpoint class per "
            .. (keyed and "key" or "address without a valid key") .. " (" .. cls.setting .. ")")
    end
    return best_rpm > 0 and max(1, ceil(60 / best_rpm)) or 1, best_text
end

return _M
