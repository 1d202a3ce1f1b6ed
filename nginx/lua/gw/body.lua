-- The model a JSON request body names, found without building the document (issue 11).
--
-- A structural scan over the bytes: top-level keys and scalars are checked against JSON's grammar,
-- nested objects and arrays are skipped by matching brackets with strings honoured (escapes checked),
-- and only the top-level "model" string is decoded. NaN and Infinity are refused wherever they stand
-- outside a string (no JSON token outside strings holds those letters; a backend whose parser takes
-- them would read numbers no JSON client can send). What the scan cannot see (a missing comma deep
-- inside "messages", a raw control character in a string, which Python's json only refuses when
-- strict) is left to the backend, which parses the body anyway.
--
-- Cost (~3.9k instructions for a 1 KB chat body, JIT-compiled): a string's closing quote and the next
-- backslash are found by libc's memchr through the FFI (whatever the string's length); between
-- strings, nested containers are stepped through a byte at a time (JSON outside strings is mostly
-- structure), and a long run of other bytes (a big array of numbers) is jumped over with find cursors
-- that only move forward. Never a pattern class, which LuaJIT matches a byte at a time (~20 us a KB).
-- Pure: no ngx.* use, so busted runs it under plain LuaJIT (nginx/lua/spec/body_spec.lua) and
-- tests/unit/test_lua_body.py checks it against Python's json on generated bodies.
--
--   local body = require("gw.body")
--   local model, err, ms, me, streams = body.model(text)  -- model: the decoded string (UTF-8), or nil
--                                                -- and one of body.ERR; ms..me: where its characters are
--                                                -- in text; streams: the last top-level "stream" (its key
--                                                -- written without escapes) is true
--   text = body.with_model(text, ms, me, "other-model")

local ffi = require("ffi")

local byte, char, find, sub = string.byte, string.char, string.find, string.sub
local cast = ffi.cast
local concat, floor, min, tonumber = table.concat, math.floor, math.min, tonumber
local NONE = math.huge                    -- a cursor's value when no such byte is left

ffi.cdef("void *memchr(const void *s, int c, size_t n);")
local C = ffi.C
local BYTES = ffi.typeof("const uint8_t *")

local _M = {}

-- Why a body names no usable model. Values are stable names for error messages and logs.
local ERR = {
    invalid = "invalid_json",            -- not JSON as far as the scan can tell (incl. an empty body)
    not_object = "not_object",           -- JSON, but not an object at the top
    no_model = "no_model",               -- an object without a top-level "model" key
    not_string = "model_not_string",     -- "model" is there but its value is not a string
    repeated = "model_repeated",         -- "model" is a top-level key more than once (issue 19 item 5)
    too_deep = "too_deep",               -- nested deeper than MAX_DEPTH
}
_M.ERR = ERR

-- Objects and arrays nested deeper than this are refused (lua-cjson's default decode_max_depth).
local MAX_DEPTH = 1000
_M.MAX_DEPTH = MAX_DEPTH

local QUOTE, BACKSLASH, COMMA, COLON = 34, 92, 44, 58
local LBRACE, RBRACE, LBRACKET, RBRACKET = 123, 125, 91, 93
local SPACE, TAB, LF, CR = 32, 9, 10, 13
local LOWER_U, LOWER_T = 117, 116

local HEX4 = "^%x%x%x%x"
local SIMPLE_ESCAPE = {}                  -- byte after a backslash -> the character it stands for
for c, v in pairs({['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r",
                   t = "\t"}) do
    SIMPLE_ESCAPE[byte(c)] = v
end

-- Openers of the containers being skipped, by depth. Scratch reused by every call: the scan never
-- yields, so one worker runs one scan at a time; sized once here so a call allocates nothing.
local open_at = {}
for depth = 1, MAX_DEPTH do
    open_at[depth] = 0
end

-- Where the next backslash is, at or after the scan's position (NONE when there is none left): found
-- once per call in a body without escapes. Reset by each call; searched again only once passed.
local at_backslash

-- Where the next quote, brace and bracket are, at or after the scan's position, for container_end's
-- jumps over long runs of other bytes; kept like at_backslash.
local at_quote, at_lbrace, at_rbrace, at_lbracket, at_rbracket
-- ... and the next "NaN" and "Infinity" after such a jump (issue 19: a nested NaN reached the backend).
local at_nan, at_infinity

-- Does NaN or Infinity start in text[i..j-1], a stretch the scan knows is outside any string?
local function bare_constant(text, i, j)
    if at_nan < i then
        at_nan = find(text, "NaN", i, true) or NONE
    end
    if at_infinity < i then
        at_infinity = find(text, "Infinity", i, true) or NONE
    end
    return at_nan < j or at_infinity < j
end

-- The next quote, brace or bracket at or after i, or NONE.
local function next_structure(text, i)
    if at_quote < i then
        at_quote = find(text, '"', i, true) or NONE
    end
    if at_lbrace < i then
        at_lbrace = find(text, "{", i, true) or NONE
    end
    if at_rbrace < i then
        at_rbrace = find(text, "}", i, true) or NONE
    end
    if at_lbracket < i then
        at_lbracket = find(text, "[", i, true) or NONE
    end
    if at_rbracket < i then
        at_rbracket = find(text, "]", i, true) or NONE
    end
    return min(at_quote, at_lbrace, at_rbrace, at_lbracket, at_rbracket)
end

-- Bytes of other kinds container_end steps over one by one before it searches for the next structure.
local RUN = 64

-- What the skip of a nested value looks for, by byte: 1 a quote, 2 an opener, 3 a closer, 4 a letter
-- no JSON token outside strings has (the N of NaN, the I of Infinity), 0 the rest. Every byte has an
-- entry, so that the lookup is an array access in a trace.
local KIND = {}
for b = 0, 255 do
    KIND[b] = 0
end
KIND[QUOTE], KIND[LBRACE], KIND[LBRACKET], KIND[RBRACE], KIND[RBRACKET] = 1, 2, 2, 3, 3
KIND[78], KIND[73] = 4, 4

-- Index of the first non-whitespace byte at or after i, or nil at the end. A byte loop: runs of
-- whitespace are short, and a pattern find would stop LuaJIT's trace.
local function skip_ws(text, i)
    local c = byte(text, i)
    while c == SPACE or c == LF or c == CR or c == TAB do
        i = i + 1
        c = byte(text, i)
    end
    return c and i
end

-- Index of the first byte b in text at or after i, or nil: memchr through the FFI, about half what a
-- plain string.find of one character costs in a trace.
local function find_byte(text, b, i)
    local n = #text - i + 1
    if n <= 0 then
        return nil
    end
    local p = cast(BYTES, text)
    local q = C.memchr(p + (i - 1), b, n)
    if q == nil then
        return nil
    end
    return tonumber(cast(BYTES, q) - p) + 1
end

-- string_end's loop over the escapes of a string: q the first quote after its opening one, and
-- at_backslash (a backslash of the string) before q.
local function escaped_end(text, q)
    local i
    while true do
        local j = at_backslash
        local c = byte(text, j + 1)
        if SIMPLE_ESCAPE[c] then
            i = j + 2
        elseif c == LOWER_U and find(text, HEX4, j + 2) then
            i = j + 6
        else
            return nil
        end
        if q < i then
            q = find_byte(text, QUOTE, i)
            if not q then
                return nil
            end
        end
        at_backslash = find_byte(text, BACKSLASH, i) or NONE
        if at_backslash > q then
            return q, true
        end
    end
end

-- i: the byte after an opening quote. Returns the index of the closing quote and whether the string
-- holds escapes, or nil when it is unterminated or holds a bad escape. The quote is found by memchr
-- (plain find), whatever the string's length; without a backslash before it there is no loop.
local function string_end(text, i)
    local q = find_byte(text, QUOTE, i)
    if not q then
        return nil
    end
    if at_backslash < i then
        at_backslash = find_byte(text, BACKSLASH, i) or NONE
    end
    if at_backslash > q then
        return q, false
    end
    return escaped_end(text, q)
end

-- i: an opening bracket or brace inside depth containers. Returns the index after its match, or nil
-- and an error. Between strings a byte loop: outside strings JSON's bytes are mostly structure, but a
-- long run of anything else (a big array of numbers) is jumped over at memchr speed.
local function container_end(text, i, depth)
    local base, run = depth, 0
    depth = depth + 1
    if depth > MAX_DEPTH then
        return nil, ERR.too_deep
    end
    open_at[depth] = byte(text, i)
    i = i + 1
    while true do
        local c = byte(text, i)
        local kind = KIND[c]
        if kind == 1 then
            local e = string_end(text, i + 1)
            if not e then
                return nil, ERR.invalid
            end
            i = e + 1
            run = 0
        elseif kind == 2 then
            depth = depth + 1
            if depth > MAX_DEPTH then
                return nil, ERR.too_deep
            end
            open_at[depth] = c
            i = i + 1
            run = 0
        elseif kind == 3 then
            if open_at[depth] ~= c - 2 then   -- "]" is "[" + 2, "}" is "{" + 2
                return nil, ERR.invalid
            end
            depth = depth - 1
            if depth == base then
                return i + 1
            end
            i = i + 1
            run = 0
        elseif kind == 4 or not c then
            return nil, ERR.invalid
        elseif run < RUN then
            i = i + 1
            run = run + 1
        else
            local j = next_structure(text, i)
            if j == NONE or bare_constant(text, i, j) then
                return nil, ERR.invalid
            end
            i = j
            run = 0
        end
    end
end

-- Index after the run of digits starting at i (i itself when there is none).
local function digits_end(text, i)
    local c = byte(text, i)
    while c and c >= 48 and c <= 57 do
        i = i + 1
        c = byte(text, i)
    end
    return i
end

-- i: the first byte of a number, true, false or null. Returns the index after it, or nil. Bytes, not
-- patterns: a pattern find costs a C call and stops LuaJIT's trace.
local function scalar_end(text, i)
    local c1, c2, c3, c4, c5 = byte(text, i, i + 4)
    if c1 == 116 then                     -- true
        return c2 == 114 and c3 == 117 and c4 == 101 and i + 4 or nil
    elseif c1 == 102 then                 -- false
        return c2 == 97 and c3 == 108 and c4 == 115 and c5 == 101 and i + 5 or nil
    elseif c1 == 110 then                 -- null
        return c2 == 117 and c3 == 108 and c4 == 108 and i + 4 or nil
    end
    local c = c1
    if c == 45 then                       -- -
        i = i + 1
        c = c2
    end
    if c == 48 then                       -- a leading 0 stands alone
        i = i + 1
    elseif c and c >= 49 and c <= 57 then
        i = digits_end(text, i + 1)
    else
        return nil
    end
    if byte(text, i) == 46 then           -- .digits
        local e = digits_end(text, i + 1)
        if e == i + 1 then
            return nil
        end
        i = e
    end
    c = byte(text, i)
    if c == 101 or c == 69 then           -- e or E, a sign, digits
        i = i + 1
        c = byte(text, i)
        if c == 43 or c == 45 then
            i = i + 1
        end
        local e = digits_end(text, i)
        if e == i then
            return nil
        end
        i = e
    end
    return i
end

-- Any JSON value starting at i, inside depth containers: the index after it, or nil and an error.
local function value_end(text, i, depth)
    local c = byte(text, i)
    if c == QUOTE then
        local e = string_end(text, i + 1)
        return e and e + 1, ERR.invalid
    elseif c == LBRACE or c == LBRACKET then
        return container_end(text, i, depth)
    end
    return scalar_end(text, i), ERR.invalid
end

-- A code point as UTF-8; a lone surrogate as its three-byte form (as lua-cjson and Python's
-- "surrogatepass" do).
local function utf8(cp)
    if cp < 0x80 then
        return char(cp)
    elseif cp < 0x800 then
        return char(0xC0 + floor(cp / 0x40), 0x80 + cp % 0x40)
    elseif cp < 0x10000 then
        return char(0xE0 + floor(cp / 0x1000), 0x80 + floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
    end
    return char(0xF0 + floor(cp / 0x40000), 0x80 + floor(cp / 0x1000) % 0x40,
        0x80 + floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
end

-- The string between s and e (inclusive, already checked by string_end) with its escapes resolved.
local function decode(text, s, e)
    local raw = sub(text, s, e)
    local out, n, i = {}, 0, 1
    while true do
        local j = find(raw, "\\", i, true)
        if not j then
            n = n + 1
            out[n] = sub(raw, i)
            return concat(out, "", 1, n)
        end
        n = n + 1
        out[n] = sub(raw, i, j - 1)
        local c = byte(raw, j + 1)
        if c == LOWER_U then
            local cp = tonumber(sub(raw, j + 2, j + 5), 16)
            i = j + 6
            if cp >= 0xD800 and cp <= 0xDBFF
                    and byte(raw, i) == BACKSLASH and byte(raw, i + 1) == LOWER_U then
                local low = tonumber(sub(raw, i + 2, i + 5), 16)
                if low >= 0xDC00 and low <= 0xDFFF then
                    cp = 0x10000 + (cp - 0xD800) * 0x400 + (low - 0xDC00)
                    i = i + 6
                end
            end
            n = n + 1
            out[n] = utf8(cp)
        else
            n = n + 1
            out[n] = SIMPLE_ESCAPE[c]
            i = j + 2
        end
    end
end

-- Is the key between the quotes at q and e "model" (also when spelled with escapes)?
local function is_model_key(text, q, e, escaped)
    if not escaped then
        local m, o, d, e2, l = byte(text, q + 1, q + 5)
        return e - q == 6 and m == 109 and o == 111 and d == 100 and e2 == 101 and l == 108
    end
    -- five characters, each at most a six-byte \uXXXX: longer keys cannot be "model"
    return e - q <= 31 and decode(text, q + 1, e - 1) == "model"
end

-- Is the six-byte key after the quote at q "stream"?
local function is_stream_key(text, q)
    local s, t, r, e2, a, m = byte(text, q + 1, q + 6)
    return s == 115 and t == 116 and r == 114 and e2 == 101 and a == 97 and m == 109
end

-- The top-level "model" string of a JSON request body: model, or nil and one of ERR. The whole body
-- is scanned (a repeated key or a fault after "model" counts); an invalid body is reported as such
-- before what it names. Also whether the body streams: its last top-level "stream" (a key written
-- without escapes) is true, the one fact of the body the counting needs (gw.usage.with_include_usage is
-- asked only then: no search of the body for "stream").
_M.skip_ws = skip_ws

function _M.model(text)
    if text == nil then
        return nil, ERR.invalid
    end
    at_backslash, at_quote, at_lbrace, at_rbrace, at_lbracket, at_rbracket = 0, 0, 0, 0, 0, 0
    at_nan, at_infinity = 0, 0
    local i = skip_ws(text, 1)
    if not i then
        return nil, ERR.invalid
    end
    if byte(text, i) ~= LBRACE then
        local e, err = value_end(text, i, 0)
        if not e then
            return nil, err
        end
        if skip_ws(text, e) then
            return nil, ERR.invalid
        end
        return nil, ERR.not_object
    end
    local count, ms, me, mescaped, streams = 0, nil, nil, false, false
    i = skip_ws(text, i + 1)
    if i and byte(text, i) == RBRACE then
        i = i + 1
    else
        while true do
            if not i or byte(text, i) ~= QUOTE then
                return nil, ERR.invalid
            end
            local ke, kescaped = string_end(text, i + 1)
            if not ke then
                return nil, ERR.invalid
            end
            local is_model = is_model_key(text, i, ke, kescaped)
            local is_stream = ke - i == 7 and not kescaped and is_stream_key(text, i)
            i = skip_ws(text, ke + 1)
            if not i or byte(text, i) ~= COLON then
                return nil, ERR.invalid
            end
            i = skip_ws(text, i + 1)
            if not i then
                return nil, ERR.invalid
            end
            local e, err
            if is_model then
                count = count + 1
                if byte(text, i) == QUOTE then
                    e, mescaped = string_end(text, i + 1)
                    ms, me = i + 1, e and e - 1
                    e, err = e and e + 1, ERR.invalid
                else
                    ms = nil
                    e, err = value_end(text, i, 1)
                end
            else
                if is_stream then
                    streams = byte(text, i) == LOWER_T  -- a literal: value_end checks it is true
                end
                e, err = value_end(text, i, 1)
            end
            if not e then
                return nil, err
            end
            i = skip_ws(text, e)
            local c = i and byte(text, i)
            if c == RBRACE then
                i = i + 1
                break
            elseif c ~= COMMA then
                return nil, ERR.invalid
            end
            i = skip_ws(text, i + 1)
        end
    end
    if skip_ws(text, i) then
        return nil, ERR.invalid
    end
    if count == 0 then
        return nil, ERR.no_model
    elseif count > 1 then
        return nil, ERR.repeated
    elseif not ms then
        return nil, ERR.not_string
    elseif mescaped then
        return decode(text, ms, me), nil, ms, me, streams
    end
    return sub(text, ms, me), nil, ms, me, streams
end

-- The members of the object whose "{" is at i (inside depth containers: 0 for the top level), for a
-- caller that edits one of them (gw.usage's stream_options): a list of {key =, vs =, ve =} (the value's
-- first and last byte) and the index of the object's "}"; nil when the scan finds it is not an object,
-- or a key holds an escape (its name would need decoding). The walk model makes, at its cost.
function _M.members(text, i, depth)
    at_backslash, at_quote, at_lbrace, at_rbrace, at_lbracket, at_rbracket = 0, 0, 0, 0, 0, 0
    at_nan, at_infinity = 0, 0
    depth = (depth or 0) + 1
    local members, n = {}, 0
    i = skip_ws(text, i + 1)
    if i and byte(text, i) == RBRACE then
        return members, i
    end
    while true do
        if not i or byte(text, i) ~= QUOTE then
            return nil
        end
        local ke, escaped = string_end(text, i + 1)
        if not ke or escaped then
            return nil
        end
        local key = sub(text, i + 1, ke - 1)
        i = skip_ws(text, ke + 1)
        if not i or byte(text, i) ~= COLON then
            return nil
        end
        local vs = skip_ws(text, i + 1)
        local e = vs and value_end(text, vs, depth)
        if not e then
            return nil
        end
        n = n + 1
        members[n] = { key = key, vs = vs, ve = e - 1 }
        i = skip_ws(text, e)
        local c = i and byte(text, i)
        if c == RBRACE then
            return members, i
        elseif c ~= COMMA then
            return nil
        end
        i = skip_ws(text, i + 1)
    end
end

-- members' walk of the object whose "{" is at i for two of its members, without a table per member or a
-- copy of each key: the index of its "}" (nil where members(text, i, depth) is nil: the same walk and
-- checks), then the value of the last member named a (its first and last bytes' indexes; false, nil
-- when there is none), then how many members are named b (b may be nil: none) and the last one's value.
local function member_spans(text, i, a, b, depth)
    at_backslash, at_quote, at_lbrace, at_rbrace, at_lbracket, at_rbracket = 0, 0, 0, 0, 0, 0
    at_nan, at_infinity = 0, 0
    depth = (depth or 0) + 1
    local alen, blen = #a, b and #b or -1
    local avs, ave, bn, bvs, bve = false, nil, 0, false, nil
    i = skip_ws(text, i + 1)
    if i and byte(text, i) == RBRACE then
        return i, avs, ave, bn, bvs, bve
    end
    while true do
        if not i or byte(text, i) ~= QUOTE then
            return nil
        end
        local ke, escaped = string_end(text, i + 1)
        if not ke or escaped then
            return nil
        end
        local len = ke - i - 1
        local named = len == alen and sub(text, i + 1, ke - 1) == a and 1
            or len == blen and sub(text, i + 1, ke - 1) == b and 2
        i = skip_ws(text, ke + 1)
        if not i or byte(text, i) ~= COLON then
            return nil
        end
        local vs = skip_ws(text, i + 1)
        local e = vs and value_end(text, vs, depth)
        if not e then
            return nil
        end
        if named == 1 then
            avs, ave = vs, e - 1
        elseif named == 2 then
            bn, bvs, bve = bn + 1, vs, e - 1
        end
        i = skip_ws(text, e)
        local c = i and byte(text, i)
        if c == RBRACE then
            return i, avs, ave, bn, bvs, bve
        elseif c ~= COMMA then
            return nil
        end
        i = skip_ws(text, i + 1)
    end
end
_M.member_spans = member_spans

-- The value of the last member named `key` of the object whose "{" is at i, as its first and last
-- bytes' indexes; false when it has no such member; nil where members(text, i, depth) is nil.
function _M.member_span(text, i, key, depth)
    local close, vs, ve = member_spans(text, i, key, nil, depth)
    if not close then
        return nil
    end
    return vs, ve
end

-- text with the top-level model's string (its bytes ms..me, as model() returned them) replaced by
-- `model`, which must need no JSON escape (a registry model name). Everything else stays as sent.
function _M.with_model(text, ms, me, model)
    return sub(text, 1, ms - 1) .. model .. sub(text, me + 1)
end

return _M
