-- The token usage of an LLM answer, found in its body as it passes through (issue 12).
--
-- A body filter sees the answer in chunks cut anywhere (mid-line, mid-JSON, mid-UTF-8 character). The
-- scanners here take those chunks and keep only what they need, never the body:
--   * JSON answers (application/json): the last TAIL_MAX bytes are kept (as the chunks that hold them:
--     fewer than 2 * TAIL_MAX bytes) and read at the end (Tail, below): the last top-level "usage" (or
--     Ollama's top-level "prompt_eval_count" and "eval_count"), found from the members that follow it up to
--     the document's last "}", where every provider writes it; a document cut off before its end counts as
--     reporting none. A document held whole (up to TAIL_MAX bytes) is also scanned from its start when
--     its last members hold no usage (the structural scan, Json below: the usage may be anywhere at the
--     top level); in a longer one a usage before its last TAIL_MAX bytes is not seen (estimated). Nothing
--     is done per chunk but keeping it: a 60 MB embeddings answer costs what a chat answer costs.
--   * SSE (text/event-stream) and NDJSON (Ollama's streams): line by line; only the current incomplete
--     line is kept, at most LINE_MAX bytes. A longer line is not kept: in OpenAI SSE it is scanned as it
--     passes (the structural scan, Json below, for the "usage" of a Responses API `response.completed` event,
--     which repeats the whole output); in the other formats it is skipped. A line is decoded only when a
--     plain find says it can carry usage ('"usage"' followed by ':' and '{'; NDJSON 'eval_count"').
-- Lines end with LF or CRLF (a lone CR, legal in SSE, is used by no provider and is not a line end here);
-- "data:" with or without the space. An event's JSON split over several data: lines is not joined (no
-- provider does that): such data does not decode and is skipped, like malformed JSON. A last line
-- without its newline is still read at finish().
--
-- What counts as the usage, per format (the last one reported wins where a stream repeats it):
--   openai_json / anthropic_json / ollama_json: top-level "usage" {prompt_tokens, completion_tokens,
--       total_tokens} (chat, completions, embeddings: no completion -> 0) or {input_tokens, output_tokens}
--       (Responses API, Anthropic); else top-level prompt_eval_count / eval_count (Ollama, /api/embed: no
--       eval_count -> 0). The three share one scanner: the names do not collide.
--   openai_sse: a data: event whose "usage" (or "response"."usage": Responses API's response.completed;
--       or "x_groq"."usage": Groq) is an object; the usage-only chunk (`"choices":[]`) of a stream that
--       asked for stream_options.include_usage; vLLM's continuous usage (every chunk; the last is the sum).
--   anthropic_sse: message_start's message.usage (input and cache tokens), then the last message_delta's
--       usage.output_tokens (cumulative, as Anthropic documents; input and cache counts in a message_delta
--       replace those of message_start). Reported only once a message_delta with output_tokens was seen:
--       a stream cut before it is "estimated" (its output is unknown).
--   ollama_ndjson: the line with "done":true and its prompt_eval_count / eval_count.
--
-- Anthropic's input_tokens leaves out cached input: prompt_tokens here is input_tokens +
-- cache_creation_input_tokens + cache_read_input_tokens (every input token, as OpenAI's prompt_tokens
-- counts its cached ones), and both cache counts are given apart (cache_creation_tokens,
-- cache_read_tokens); OpenAI's prompt_tokens_details.cached_tokens is given as cache_read_tokens.
--
-- Not seen: a key spelled with escapes ("us\u0061ge": no provider writes one); a compressed body (the
-- caller scans what the client is sent uncompressed, or asks the provider for identity encoding).
--
-- Cost: a 524-byte chat answer (new, feed, finish) about 4,600 instructions under plain LuaJIT with the
-- JIT on (cachegrind; 16,000 with it off), most of it the finish: one plain find of '"usage"' in the last
-- 512 bytes and a digit loop per count for the compact ending vLLM, Ollama and llama.cpp write, a walk of
-- the usage object's members for the others, cjson only when neither applies. Streams (LuaJIT 2.1, one
-- core, best of 5, before the JSON tail): an OpenAI stream of 6 events 9 us (2.5 us without a usage
-- chunk to decode); Anthropic's 9 events 9 us; Ollama's 4 lines 4 us; a 5 MB SSE stream 2.6 ms. The
-- filter with stripping: 25 us for 6 events (OpenAI's trailing "usage":null is cut without a walk);
-- with_include_usage 2 us a 1 KB body.
--
-- Pure: no ngx.* use, so busted runs it under plain LuaJIT (nginx/lua/spec/usage_spec.lua).
--
--   local usage = require("gw.usage")
--   local format = usage.format_for(family, content_type)   -- "openai_sse", ... or nil: nothing to scan
--   local scanner = usage.new(format)                        -- opts: {line_max =, capture_max =}
--   scanner:feed(chunk)                                      -- any boundaries, any number of times
--   local u = scanner:finish()
--     -- {source = "reported", prompt_tokens =, completion_tokens =, total_tokens =, bytes =,
--     --  [cache_read_tokens =, cache_creation_tokens =]}, or {source = "estimated", bytes =} when the
--     --  body reported none (the caller estimates from bytes; never a silent zero). bytes: all fed.
--
--   -- An OpenAI chat or completions stream:
--   local text = usage.with_include_usage(request_body)     -- nil: leave the request (and answer) alone
--   local f = usage.openai_sse_filter(text ~= nil)           -- strip what the client did not ask for
--   ngx.arg[1] = f:feed(ngx.arg[1])                          -- in body_filter: the bytes to pass on
--   if ngx.arg[2] then ngx.arg[1] = ngx.arg[1] .. f:finish() end   -- the last held bytes at eof
--   local u = f:usage()                                      -- as scanner:finish()
local cjson = require("cjson.safe")

local json_decode = cjson.decode
local byte, find, sub = string.byte, string.find, string.sub
local concat, floor, min = table.concat, math.floor, math.min
local next, setmetatable, tonumber, type = next, setmetatable, tonumber, type
local NONE = math.huge                    -- a cursor's value when no such byte is left

local _M = {}

local LINE_MAX = 1024 * 1024              -- bytes of an incomplete SSE / NDJSON line kept
local CAPTURE_MAX = 64 * 1024             -- bytes of a captured JSON value ("usage": ~100 bytes)
local TAIL_MAX = 16 * 1024                -- last bytes of a JSON answer kept (a few more: whole chunks)
_M.LINE_MAX, _M.CAPTURE_MAX, _M.TAIL_MAX = LINE_MAX, CAPTURE_MAX, TAIL_MAX

local QUOTE, BACKSLASH, COLON, COMMA = 34, 92, 58, 44
local LBRACE, RBRACE, LBRACKET, RBRACKET = 123, 125, 91, 93
local SPACE, TAB, LF, CR = 32, 9, 10, 13
local LOWER_L = 108

-- How OpenAI ends every chunk of a stream that asked for usage, but the usage-only one.
local NULL_USAGE_END = ',"usage":null}'

-- Where the '"usage"' of a NULL_USAGE_END ending the line s[i..j-1] (j: its LF; a CR before it is not
-- content) is, or nil when the line does not end so. A plain look at its last bytes, no search.
local function null_usage_at(s, i, j)
    local ce = j - 1
    if byte(s, ce) == CR then
        ce = ce - 1
    end
    local from = ce - 13
    if from >= i and byte(s, ce - 1) == LOWER_L and sub(s, from, ce) == NULL_USAGE_END then
        return from + 1
    end
    return nil
end

-- Index of the first non-whitespace byte at or after i, or nil at the end of s.
local skip_ws = require("gw.body").skip_ws
-- The members of an object, as a list of {key =, vs =, ve =} (the walk gw.body's model scan makes);
-- member_span: the same walk for one member's value, without a table per member.
local members_of = require("gw.body").members
local member_span, member_spans = require("gw.body").member_span, require("gw.body").member_spans

---------------------------------------------------------------------------------------------------
-- Usage objects to results
---------------------------------------------------------------------------------------------------

-- A token count: a non-negative number (a float is floored), else nil (absent, null, a string).
local function count(v)
    if type(v) == "number" and v >= 0 and v < 2 ^ 53 then
        return floor(v)
    end
    return nil
end

-- The result of a usage object in any of the namings (OpenAI chat/completions/embeddings, OpenAI
-- Responses, Anthropic), or nil when it holds neither an input nor an output count.
local function from_usage(u)
    if type(u) ~= "table" then
        return nil
    end
    local prompt = count(u.prompt_tokens) or count(u.input_tokens)
    local completion = count(u.completion_tokens) or count(u.output_tokens)
    if not prompt and not completion then
        return nil
    end
    local r = { source = "reported" }
    local creation, read = count(u.cache_creation_input_tokens), count(u.cache_read_input_tokens)
    if creation or read then              -- Anthropic: input_tokens leaves the cache out
        prompt = (prompt or 0) + (creation or 0) + (read or 0)
        r.cache_creation_tokens, r.cache_read_tokens = creation, read
    else
        local details = u.prompt_tokens_details or u.input_tokens_details
        if type(details) == "table" then
            r.cache_read_tokens = count(details.cached_tokens)
        end
    end
    prompt, completion = prompt or 0, completion or 0
    r.prompt_tokens, r.completion_tokens = prompt, completion
    r.total_tokens = count(u.total_tokens) or prompt + completion
    return r
end
_M.from_usage = from_usage

-- The result of Ollama's counts, or nil when there are none.
local function from_ollama(prompt, completion)
    prompt, completion = count(prompt), count(completion)
    if not prompt and not completion then
        return nil
    end
    prompt, completion = prompt or 0, completion or 0
    return { source = "reported", prompt_tokens = prompt, completion_tokens = completion,
             total_tokens = prompt + completion }
end

-- Does s hold a "usage" key whose value is an object? The pre-check before decoding an event: '"usage"'
-- raw can only be a key or a string value (quotes inside strings are escaped), and an OpenAI stream that
-- asked for usage has "usage":null in every other chunk.
local function has_usage_object(s)
    local p = find(s, '"usage"', 1, true)
    while p do
        local i = skip_ws(s, p + 7)
        if i and byte(s, i) == COLON then
            i = skip_ws(s, i + 1)
            if i and byte(s, i) == LBRACE then
                return true
            end
        end
        p = find(s, '"usage"', p + 7, true)
    end
    return false
end

---------------------------------------------------------------------------------------------------
-- JSON: a structural scan across chunks
---------------------------------------------------------------------------------------------------

-- Keys whose value is captured: at the top level, and "usage" inside these top-level objects.
local TOP = { usage = true, prompt_eval_count = true, eval_count = true }
local PARENT = { response = true, message = true, x_groq = true }
local KEY_MAX = 17                        -- longest key of interest ("prompt_eval_count"); longer: skipped

-- Modes outside strings.
local SCAN, WANT_COLON, WANT_VALUE, IN_SCALAR = 0, 1, 2, 3

local Json = {}
Json.__index = Json

local function new_json(capture_max)
    return setmetatable({
        capture_max = capture_max or CAPTURE_MAX,
        bytes = 0,
        depth = 0,              -- containers open; 1: inside the top-level value
        object1 = false,        -- the container at depth 1 is an object
        object2 = false,        -- the container at depth 2 is an object
        parent = nil,           -- inside the value of this PARENT key (depth >= 2)
        in_str = false,
        esc = false,            -- the previous chunk ended inside a string on an odd run of backslashes
        key_from = nil,         -- collecting the bytes of a possible key from here in this chunk
        key_parts = nil,        -- ... and these from earlier chunks
        mode = SCAN,
        key = nil,              -- the key of interest whose ':' or value comes next
        cap = nil,              -- capturing the value of this key
        cap_depth = 0,          -- ... a container, until depth comes back to this
        cap_from = 1,           -- ... from here in this chunk
        cap_parts = nil,        -- ... and these bytes from earlier chunks (nil when it grew too long)
        cap_len = 0,
        found = {},             -- key -> value text (the last of each)
        closed = false,         -- the top-level value ended
    }, Json)
end

function Json:end_capture(s, e)
    local parts = self.cap_parts
    if parts then
        parts[#parts + 1] = sub(s, self.cap_from, e)
        if self.cap_len + e - self.cap_from + 1 <= self.capture_max then
            self.found[self.cap] = concat(parts)
        end
    end
    self.cap, self.cap_parts, self.cap_len = nil, nil, 0
end

-- A string at depth d (1 or 2) ended with the possible key k: is its ':' or value worth waiting for?
function Json:closed_string(k)
    local d = self.depth
    if d == 1 then
        if self.object1 and (TOP[k] or PARENT[k]) then
            self.mode, self.key = WANT_COLON, k
        end
    elseif d == 2 and k == "usage" then
        self.mode, self.key = WANT_COLON, k
    end
end

-- The closing quote of a string in s, the first quote at or after q (nil: none) that follows an even
-- run of backslashes (carry: the run before s's first byte was odd), or nil and whether s ends on an odd
-- run (the next chunk's first byte is escaped).
local function string_close(s, q, n, carry)
    while q do
        local k = q - 1
        while k > 0 and byte(s, k) == BACKSLASH do
            k = k - 1
        end
        local run = q - 1 - k
        if k == 0 and carry then
            run = run + 1
        end
        if run % 2 == 0 then
            return q, false
        end
        q = find(s, '"', q + 1, true)
    end
    local k = n
    while k > 0 and byte(s, k) == BACKSLASH do
        k = k - 1
    end
    local run = n - k
    if k == 0 and carry then
        run = run + 1
    end
    return nil, run % 2 == 1
end

function Json:feed(s)
    if s == nil or s == "" then
        return
    end
    local n = #s
    self.bytes = self.bytes + n
    local i = 1
    if self.cap then
        self.cap_from = 1
    end
    if self.key_from then
        self.key_from = 1
    end
    -- where the next byte of each kind is, at or after i (NONE: none left in this chunk)
    local at_quote, at_lbrace, at_rbrace, at_lbracket, at_rbracket = 0, 0, 0, 0, 0
    while i <= n do
        if self.in_str then
            -- The string ends at the first quote after an even run of backslashes: a string's bytes are
            -- searched for quotes only, whatever its escapes (a run may begin in the previous chunk).
            local q = find(s, '"', i, true)
            if not q or (q > 1 and byte(s, q - 1) == BACKSLASH) or (q == 1 and self.esc) then
                q, self.esc = string_close(s, q, n, self.esc)
                if not q then                  -- continues in the next chunk
                    break
                end
            end
            self.in_str, self.esc = false, false
            i = q + 1
            local from = self.key_from
            if from then
                self.key_from = nil
                local parts = self.key_parts
                local k
                if parts then
                    self.key_parts = nil
                    k = concat(parts) .. sub(s, from, q - 1)
                elseif q - from <= KEY_MAX then
                    k = sub(s, from, q - 1)
                end
                if k and #k <= KEY_MAX then
                    self:closed_string(k)
                end
            end
        elseif self.mode == SCAN then
            if at_quote < i then
                at_quote = find(s, '"', i, true) or NONE
            end
            if at_lbrace < i then
                at_lbrace = find(s, "{", i, true) or NONE
            end
            if at_rbrace < i then
                at_rbrace = find(s, "}", i, true) or NONE
            end
            if at_lbracket < i then
                at_lbracket = find(s, "[", i, true) or NONE
            end
            if at_rbracket < i then
                at_rbracket = find(s, "]", i, true) or NONE
            end
            local j = min(at_quote, at_lbrace, at_rbrace, at_lbracket, at_rbracket)
            if j == NONE then
                break
            end
            local c = byte(s, j)
            local d = self.depth
            if c == QUOTE then
                self.in_str = true
                if (d == 1 and self.object1) or (d == 2 and self.parent and self.object2) then
                    self.key_from = j + 1
                end
            elseif c == LBRACE or c == LBRACKET then
                d = d + 1
                self.depth = d
                if d == 1 then
                    self.object1 = c == LBRACE
                elseif d == 2 then
                    self.object2 = c == LBRACE
                end
            else
                if d > 0 then
                    d = d - 1
                    self.depth = d
                end
                if d <= 1 then
                    self.parent = nil
                    if d == 0 then
                        self.closed = true
                    end
                end
                if self.cap and d == self.cap_depth then
                    self:end_capture(s, j)
                end
            end
            i = j + 1
        elseif self.mode == WANT_COLON then
            local j = skip_ws(s, i)
            if not j then
                break
            end
            if byte(s, j) == COLON then
                self.mode = WANT_VALUE
                i = j + 1
            else                               -- a string value, not a key
                self.mode, self.key = SCAN, nil
                i = j
            end
        elseif self.mode == WANT_VALUE then
            local j = skip_ws(s, i)
            if not j then
                break
            end
            local c, k = byte(s, j), self.key
            self.mode, self.key = SCAN, nil
            if c == LBRACE or c == LBRACKET then
                if PARENT[k] and self.depth == 1 then
                    self.parent = c == LBRACE and k or nil
                else
                    self.cap, self.cap_depth, self.cap_from, self.cap_parts, self.cap_len =
                        k, self.depth, j, {}, 0
                end
            elseif c ~= QUOTE and not PARENT[k] then
                self.cap, self.cap_from, self.cap_parts, self.cap_len = k, j, {}, 0
                self.mode = IN_SCALAR
            end
            i = j                              -- the value's first byte is scanned as usual
        else                                   -- IN_SCALAR: up to the next delimiter
            local c = byte(s, i)
            while c and c ~= COMMA and c ~= RBRACE and c ~= RBRACKET and c ~= SPACE and c ~= LF
                    and c ~= CR and c ~= TAB do
                i = i + 1
                c = byte(s, i)
            end
            if c then
                self:end_capture(s, i - 1)
                self.mode = SCAN
            end
        end
    end
    -- What continues in the next chunk: the captured value, the possible key.
    if self.cap then
        local parts = self.cap_parts
        if parts and self.cap_from <= n then
            local len = self.cap_len + n - self.cap_from + 1
            if len > self.capture_max then
                self.cap_parts, self.cap_len = nil, 0   -- too long to be a usage: dropped
            else
                parts[#parts + 1] = sub(s, self.cap_from, n)
                self.cap_len = len
            end
        end
    end
    local from = self.key_from
    if from then
        local parts = self.key_parts or {}
        parts[#parts + 1] = sub(s, from, n)
        if #concat(parts) > KEY_MAX then
            self.key_from, self.key_parts = nil, nil
        else
            self.key_parts = parts
        end
    end
end

-- Bytes held for what continues in the next chunk.
function Json:buffered()
    local key = self.key_parts and #concat(self.key_parts) or 0
    return self.cap_len + key
end

-- The usage the document reported, or nil when it reported none or was cut off before its end (its
-- top-level value never closed: the counts may be missing or have lost digits).
function Json:result()
    if not self.closed then
        return nil
    end
    local found = self.found
    if found.usage then
        local r = from_usage(json_decode(found.usage))
        if r then
            return r
        end
    end
    return from_ollama(tonumber(found.prompt_eval_count), tonumber(found.eval_count))
end

---------------------------------------------------------------------------------------------------
-- Streams: SSE and NDJSON, line by line
---------------------------------------------------------------------------------------------------

-- The data of an SSE data: line, or nil for any other line (event:, id:, retry:, comments).
local function sse_data(line)
    if sub(line, 1, 5) ~= "data:" then
        return nil
    end
    return sub(line, byte(line, 6) == SPACE and 7 or 6)
end

-- The event an SSE line carries when its data holds a usage object, decoded; nil for any other line.
local function usage_event(line)
    local data = sse_data(line)
    if not data or not has_usage_object(data) then
        return nil
    end
    local event = json_decode(data)
    return type(event) == "table" and event or nil
end

-- Per format: the plain needle a line must hold to be looked at, and what to do with such a line.
local LINES = {}

local NESTED = { "response", "x_groq" }    -- OpenAI SSE: where else an event's usage may be

LINES.openai_sse = {
    needle = '"usage"',
    line = function(self, line)
        local event = usage_event(line)
        if not event then
            return
        end
        local u = event.usage
        if type(u) ~= "table" then
            for _, parent in ipairs(NESTED) do
                local p = event[parent]
                if type(p) == "table" and type(p.usage) == "table" then
                    u = p.usage
                    break
                end
            end
        end
        local r = from_usage(u)
        if r then
            self.usage = r
        end
        return event
    end,
    long = true,                           -- a longer line: scanned as it passes
    null_usage = true,                     -- a line ending in NULL_USAGE_END holds no other usage: skipped
}

local ANTHROPIC_FIELDS = { "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                           "output_tokens" }

LINES.anthropic_sse = {
    needle = '"usage"',
    line = function(self, line)
        local event = usage_event(line)
        if not event then
            return
        end
        local u
        if event.type == "message_start" then
            u = type(event.message) == "table" and event.message.usage
        elseif event.type == "message_delta" then
            u = event.usage
        end
        if type(u) ~= "table" then
            return
        end
        local merged = self.merged or {}
        self.merged = merged
        for _, name in ipairs(ANTHROPIC_FIELDS) do
            local v = count(u[name])
            if v then
                merged[name] = v
            end
        end
        if event.type == "message_delta" and count(u.output_tokens) then
            self.delta_seen = true
        end
    end,
    null_usage = true,
}

LINES.ollama_ndjson = {
    needle = 'eval_count"',
    line = function(self, line)
        local obj = json_decode(line)
        if type(obj) == "table" and obj.done == true then
            local r = from_ollama(obj.prompt_eval_count, obj.eval_count)
            if r then
                self.usage = r
            end
        end
    end,
}

local Lines = {}
Lines.__index = Lines

local function new_lines(format, opts)
    local kind = LINES[format]
    return setmetatable({
        needle = kind.needle,
        null_usage = kind.null_usage,
        line = kind.line,
        long_ok = kind.long,
        line_max = opts.line_max or LINE_MAX,
        capture_max = opts.capture_max,
        bytes = 0,
        pend = {},               -- the current incomplete line, in pieces
        npend = 0,
        plen = 0,
        skipping = false,        -- inside a line longer than line_max, up to its LF
        long = nil,              -- ... scanned by this Json (OpenAI SSE data), or nil
        usage = nil,             -- the last usage reported
    }, Lines)
end

-- A complete line, without its LF.
function Lines:complete(line)
    if byte(line, #line) == CR then
        line = sub(line, 1, #line - 1)
    end
    if find(line, self.needle, 1, true) then
        self:line(line)
    end
end

-- The line being held grew past line_max with tail (the rest of this chunk): stop keeping it.
function Lines:overflow(tail)
    local head = concat(self.pend, "", 1, self.npend)
    self.pend, self.npend, self.plen, self.skipping = {}, 0, 0, true
    if not self.long_ok then
        return
    end
    local start = head .. sub(tail, 1, 6)
    if sub(start, 1, 5) ~= "data:" then
        return
    end
    local skip = byte(start, 6) == SPACE and 6 or 5
    local long = new_json(self.capture_max)
    if #head >= skip then
        long:feed(sub(head, skip + 1))
        long:feed(tail)
    else
        long:feed(sub(tail, skip - #head + 1))
    end
    self.long = long
end

function Lines:end_long()
    local long = self.long
    self.skipping, self.long = false, nil
    if long then
        local r = long:result()
        if r then
            self.usage = r
        end
    end
end

function Lines:feed(chunk)
    if chunk == nil or chunk == "" then
        return
    end
    local n = #chunk
    self.bytes = self.bytes + n
    local needle = self.needle
    local at_needle = 0
    local i = 1
    while true do
        local j = find(chunk, "\n", i, true)
        if not j then
            break
        end
        if self.skipping then
            if self.long then
                self.long:feed(sub(chunk, i, j - 1))
            end
            self:end_long()
        elseif self.plen + j - i > self.line_max then   -- a long line, complete in this chunk
            self:overflow(sub(chunk, i, j - 1))
            self:end_long()
        elseif self.npend > 0 then
            local pend = self.pend
            local line = concat(pend, "", 1, self.npend) .. sub(chunk, i, j - 1)
            self.npend, self.plen = 0, 0
            for k = #pend, 1, -1 do
                pend[k] = nil
            end
            self:complete(line)
        else
            if at_needle < i then
                at_needle = find(chunk, needle, i, true) or NONE
            end
            -- a line whose only '"usage"' is a NULL_USAGE_END ending: no usage object (OpenAI's chunks)
            if at_needle < j and not (self.null_usage and at_needle == null_usage_at(chunk, i, j)) then
                self:complete(sub(chunk, i, j - 1))
            end
        end
        i = j + 1
    end
    if i <= n then
        local tail = sub(chunk, i)
        if self.skipping then
            if self.long then
                self.long:feed(tail)
            end
        elseif self.plen + #tail > self.line_max then
            self:overflow(tail)
        else
            self.npend = self.npend + 1
            self.pend[self.npend] = tail
            self.plen = self.plen + #tail
        end
    end
end

function Lines:buffered()
    return self.plen + (self.long and self.long:buffered() or 0)
end

function Lines:result()
    if self.skipping then
        self:end_long()
    elseif self.npend > 0 then                  -- a last line without its newline
        local line = concat(self.pend, "", 1, self.npend)
        self.pend, self.npend, self.plen = {}, 0, 0
        self:complete(line)
    end
    local merged = self.merged
    if merged then                              -- Anthropic SSE
        if self.delta_seen and merged.input_tokens then
            return from_usage(merged)
        end
        return nil
    end
    return self.usage
end

---------------------------------------------------------------------------------------------------
-- A whole-text walk (the request's stream_options, a JSON answer's last members)
---------------------------------------------------------------------------------------------------

-- A whole-text structural walk of one object's members (as gw.body's scan: plain finds from cursors
-- that only move forward; nested values skipped by matching brackets, strings and escapes honoured;
-- scalars are not validated: the provider parses the body anyway). Reset per walk.
local w_quote, w_backslash, w_lbrace, w_rbrace, w_lbracket, w_rbracket

local function w_reset()
    w_quote, w_backslash, w_lbrace, w_rbrace, w_lbracket, w_rbracket = 0, 0, 0, 0, 0, 0
end

-- i: after an opening quote. The index of the closing quote and whether the string has escapes, or nil.
local function w_string_end(text, i)
    local escaped = false
    while true do
        if w_quote < i then
            w_quote = find(text, '"', i, true) or NONE
        end
        if w_backslash < i then
            w_backslash = find(text, "\\", i, true) or NONE
        end
        if w_backslash > w_quote then
            if w_quote == NONE then
                return nil
            end
            return w_quote, escaped
        end
        if w_backslash + 1 > #text then
            return nil
        end
        i = w_backslash + 2
        escaped = true
    end
end

-- i: an opening brace or bracket. The index of its match, or nil.
local function w_container_end(text, i)
    local open = { byte(text, i) }
    local depth = 1
    i = i + 1
    while true do
        if w_quote < i then
            w_quote = find(text, '"', i, true) or NONE
        end
        if w_lbrace < i then
            w_lbrace = find(text, "{", i, true) or NONE
        end
        if w_rbrace < i then
            w_rbrace = find(text, "}", i, true) or NONE
        end
        if w_lbracket < i then
            w_lbracket = find(text, "[", i, true) or NONE
        end
        if w_rbracket < i then
            w_rbracket = find(text, "]", i, true) or NONE
        end
        local j = min(w_quote, w_lbrace, w_rbrace, w_lbracket, w_rbracket)
        if j == NONE then
            return nil
        end
        local c = byte(text, j)
        if c == QUOTE then
            local e = w_string_end(text, j + 1)
            if not e then
                return nil
            end
            i = e + 1
        elseif c == LBRACE or c == LBRACKET then
            depth = depth + 1
            open[depth] = c
            i = j + 1
        else
            if open[depth] ~= c - 2 then       -- "]" is "[" + 2, "}" is "{" + 2
                return nil
            end
            depth = depth - 1
            if depth == 0 then
                return j
            end
            i = j + 1
        end
    end
end

-- i: a value's first byte. The index of its last byte, or nil.
local function w_value_end(text, i)
    local c = byte(text, i)
    if c == QUOTE then
        return w_string_end(text, i + 1)
    elseif c == LBRACE or c == LBRACKET then
        return w_container_end(text, i)
    end
    local j = i
    while c and c ~= COMMA and c ~= RBRACE and c ~= RBRACKET and c ~= SPACE and c ~= LF and c ~= CR
            and c ~= TAB and c ~= QUOTE and c ~= LBRACE and c ~= LBRACKET and c ~= COLON do
        j = j + 1
        c = byte(text, j)
    end
    return j > i and j - 1 or nil
end

---------------------------------------------------------------------------------------------------
-- JSON answers: the last bytes, read at the end
---------------------------------------------------------------------------------------------------

-- Is the quote at p the start of a string (not escaped: an even run of backslashes before it)?
local function unescaped(text, p)
    local k = p - 1
    while k > 0 and byte(text, k) == BACKSLASH do
        k = k - 1
    end
    return (p - 1 - k) % 2 == 0
end

-- Only members up to the "}" at e, from i (after a member's value): the member ends the top-level
-- object (the document's last "}" closes it: a member of a nested object is followed by that object's
-- "}", before e).
local function last_members(text, i, e)
    while true do
        i = skip_ws(text, i)
        local c = i and byte(text, i)
        if c == RBRACE then
            return i == e
        elseif c ~= COMMA then
            return false
        end
        i = skip_ws(text, i + 1)
        if not i or byte(text, i) ~= QUOTE then
            return false
        end
        local ke = w_string_end(text, i + 1)
        i = ke and skip_ws(text, ke + 1)
        if not i or byte(text, i) ~= COLON then
            return false
        end
        local vs = skip_ws(text, i + 1)
        local ve = vs and w_value_end(text, vs)
        if not ve then
            return false
        end
        i = ve + 1
    end
end

-- The text of the value of the last top-level member named by key ('"usage"', with its quotes) in text
-- (a JSON document whose last "}" is at e), or nil. object: the value must be an object.
local function top_value(text, key, e, object)
    local found, n = nil, 0
    local p = find(text, key, 1, true)
    while p do
        n = n + 1
        found = found or {}
        found[n] = p
        p = find(text, key, p + #key, true)
    end
    for k = n, 1, -1 do
        p = found[k]
        local i = skip_ws(text, p + #key)
        if i and byte(text, i) == COLON and unescaped(text, p) then
            local vs = skip_ws(text, i + 1)
            local c = vs and byte(text, vs)
            if c and (c == LBRACE or not object) then
                w_reset()
                local ve = w_value_end(text, vs)
                if ve and last_members(text, ve + 1, e) then
                    return sub(text, vs, ve)
                end
            end
        end
    end
    return nil
end

-- The usage of a whole JSON document, or of its last bytes, from its last top-level members (where
-- every provider writes it), or nil.
-- Ollama's top-level counts among the last members of text (a document whose last "}" is at e), or nil.
local function tail_ollama(text, e)
    if not find(text, 'eval_count"', 1, true) then
        return nil
    end
    local completion = top_value(text, '"eval_count"', e)
    local prompt = top_value(text, '"prompt_eval_count"', e)
    return from_ollama(tonumber(prompt), tonumber(completion))
end

-- The common ending '"usage":{...}}' read without decoding it (cjson.decode of the usage object costs
-- more than the rest of the answer's scan): a walk of the usage object's members, each a number, null,
-- true, false, a string without escapes, or an object of such members (OpenAI's *_tokens_details,
-- Anthropic's cache_creation), whose "}" is followed by the document's last "}" at e (so a member of the
-- top-level object: in valid JSON neither "}" can be inside a string). p: where '"usage"' is. nil: not
-- that ending (the walk of top_value reads every other).
local USAGE_COUNTS = { prompt_tokens = true, completion_tokens = true, total_tokens = true,
                       input_tokens = true, output_tokens = true, cache_creation_input_tokens = true,
                       cache_read_input_tokens = true }
local USAGE_DETAILS = { prompt_tokens_details = true, input_tokens_details = true }
local ZERO, NINE, LOWER_N, LOWER_T, LOWER_F, DOT, LOWER_E, UPPER_E = 48, 57, 110, 116, 102, 46,
    101, 69

-- The flat object whose "{" is at i: the "}" index, and its counts into into (keys of want; nested
-- objects of the keys of nest read into nested tables), or nil when it is not such an object.
local function flat_members(text, i, into, want, nest)
    i = skip_ws(text, i + 1)
    local c = i and byte(text, i)
    if c == RBRACE then
        return i
    end
    while c == QUOTE do
        local ke = find(text, '"', i + 1, true)
        if not ke or byte(text, ke - 1) == BACKSLASH then
            return nil
        end
        local key = sub(text, i + 1, ke - 1)
        i = skip_ws(text, ke + 1)
        if not i or byte(text, i) ~= COLON then
            return nil
        end
        i = skip_ws(text, i + 1)
        c = i and byte(text, i)
        if not c then
            return nil
        elseif c >= ZERO and c <= NINE then
            local v = 0
            repeat
                v = v * 10 + c - ZERO
                i = i + 1
                c = byte(text, i)
            until not c or c < ZERO or c > NINE
            if c == DOT or c == LOWER_E or c == UPPER_E then
                return nil                           -- a float: the decoding walk floors it
            end
            if want[key] then
                into[key] = v
            end
        elseif c == LBRACE and nest and nest[key] then
            local inner = {}
            i = flat_members(text, i, inner, USAGE_COUNTS)
            if not i then
                return nil
            end
            into[key] = inner
            i = i + 1
        elseif c == QUOTE then
            local q = find(text, '"', i + 1, true)
            if not q or byte(text, q - 1) == BACKSLASH then
                return nil
            end
            i = q + 1
        elseif c == LBRACE and nest then             -- an object the counts do not need
            local close = find(text, "}", i + 1, true)
            local open = find(text, "{", i + 1, true)
            if not close or (open and open < close) then
                return nil
            end
            i = close + 1
        elseif c == LOWER_N or c == LOWER_T then
            i = i + 4
        elseif c == LOWER_F then
            i = i + 5
        else
            return nil                               -- a negative number, an array: the decoding walk
        end
        i = skip_ws(text, i)
        c = i and byte(text, i)
        if c == RBRACE then
            return i
        elseif c ~= COMMA then
            return nil
        end
        i = skip_ws(text, i + 1)
        c = i and byte(text, i)
    end
    return nil
end

local function flat_usage(text, p, e)
    local i = skip_ws(text, p + 7)
    if not i or byte(text, i) ~= COLON or not unescaped(text, p) then
        return nil
    end
    i = skip_ws(text, i + 1)
    if not i or byte(text, i) ~= LBRACE then
        return nil
    end
    local u = {}
    local close = flat_members(text, i, u, USAGE_COUNTS, USAGE_DETAILS)
    if not close or skip_ws(text, close + 1) ~= e then
        return nil
    end
    return from_usage(u)
end

-- The ending most OpenAI-compatible servers write (vLLM, Ollama, llama.cpp):
-- '"usage":{"prompt_tokens":P,"completion_tokens":C,"total_tokens":T}}' (compact_end below).
local COMPACT_1 = '"usage":{"prompt_tokens":'
local COMPACT_2, COMPACT_3 = ',"completion_tokens":', ',"total_tokens":'
local N1, N2, N3 = #COMPACT_1, #COMPACT_2, #COMPACT_3

-- The compact ending as the document's last bytes ("}}" and whitespace after the counts), read with plain
-- finds of its fixed parts and tonumber of what lies between them: in the log phase these handlers run
-- interpreted, where each call costs a few hundred instructions (a Lua pattern over these ~80 bytes
-- ~5,000, the general walk below ~8,000; this ~4,000). Ending the document, it is its last top-level
-- member.
local COMPACT_END_MAX = 128  -- its length with 15-digit counts (109) and some trailing whitespace

-- The count text[i..j] holds when it is a number of at most 15 characters that is a whole count: nil for
-- anything else between the fixed parts (another member, a nested value).
local function count_between(text, i, j)
    if j < i or j - i >= 15 then
        return nil
    end
    local v = tonumber(sub(text, i, j))
    if v and v >= 0 and v < 2 ^ 53 and v % 1 == 0 then
        return v
    end
    return nil
end

local function compact_end(text)
    local n = #text
    local p = find(text, COMPACT_1, n > COMPACT_END_MAX and n - COMPACT_END_MAX or 1, true)
    local j = p and find(text, COMPACT_2, p + N1, true)
    local k = j and find(text, COMPACT_3, j + N2, true)
    local m = k and find(text, "}}", k + N3, true)
    if not m or (m + 1 ~= n and find(text, "%S", m + 2)) then
        return nil
    end
    local prompt = count_between(text, p + N1, j - 1)
    local completion = prompt and count_between(text, j + N2, k - 1)
    local total = completion and count_between(text, k + N3, m - 1)
    if not total or not unescaped(text, p) then
        return nil
    end
    -- bytes: set by finish (a key made here, not added later: adding it would grow the table's hash)
    return { source = "reported", prompt_tokens = prompt, completion_tokens = completion,
             total_tokens = total, bytes = 0 }
end

-- The position of the last '"usage"' in text that starts at `start` or after, or nil. Found by its
-- 'usage"' and the quote before: a search for '"usage"' stops, and compares, at every quote before it
-- (a JSON answer is mostly quotes).
local function last_usage_key(text, start)
    local p
    local q = find(text, 'usage"', start + 1, true)
    while q do
        if byte(text, q - 1) == QUOTE then
            p = q - 1
        end
        q = find(text, 'usage"', q + 6, true)
    end
    return p
end

local function tail_usage(text)
    local fast = compact_end(text)
    if fast then
        return fast
    end
    local e = #text
    local c = byte(text, e)
    while c == SPACE or c == LF or c == CR or c == TAB do
        e = e - 1
        c = byte(text, e)
    end
    if c ~= RBRACE then
        return nil
    end
    -- the last '"usage"': looked for near the end first (where it is), then from the start
    local p = e > 512 and last_usage_key(text, e - 512) or last_usage_key(text, 1)
    if not p then
        return tail_ollama(text, e)
    end
    local r = flat_usage(text, p, e)
    if r then
        return r
    end
    local u = top_value(text, '"usage"', e, true)
    r = u and from_usage(json_decode(u))
    if r then
        return r
    end
    return tail_ollama(text, e)
end

-- A JSON answer's scanner keeps its last bytes (at least tail_max of them, when there are as many; fewer
-- than 2 * tail_max), as the chunks it was fed (copied only when one chunk is longer than tail_max), and
-- reads the usage from them at the end: the last top-level "usage" (or Ollama's counts) found by a walk
-- of the members that follow it up to the document's last "}". Every provider writes the usage last, or
-- among the last members (the Responses API: a few hundred bytes before the end). A document held whole
-- (up to tail_max bytes) whose last members hold no usage is scanned from its start (Json above): there
-- the usage may be anywhere at the top level. Cost: a plain find of 'usage"' and a walk of the few bytes
-- after it, once per answer; nothing per chunk beyond keeping it.
local Tail = {}
Tail.__index = Tail

local function new_tail(tail_max)
    -- [1]: the first chunk's slot made with the table (set later, it would grow the table)
    return setmetatable({ false, tail_max = tail_max or TAIL_MAX, bytes = 0, first = 1, last = 0, held = 0 },
        Tail)
end

function Tail:feed(s)
    if s == nil or s == "" then
        return
    end
    local n, max = #s, self.tail_max
    self.bytes = self.bytes + n
    local first, last = self.first, self.last
    if n >= max then                            -- this chunk alone holds the tail
        for k = first, last do
            self[k] = nil
        end
        last = last + 1
        self[last] = n > max and sub(s, n - max + 1) or s
        self.first, self.last, self.held = last, last, max
        return
    end
    last = last + 1
    self[last] = s
    local held = self.held + n
    local len = #self[first]
    while held - len >= max do                  -- the pieces after the first still hold tail_max bytes
        self[first] = nil
        first = first + 1
        held = held - len
        len = #self[first]
    end
    self.first, self.last, self.held = first, last, held
end

function Tail:buffered()
    return self.held
end

function Tail:result()
    local first, last = self.first, self.last
    if last < first then
        return nil
    end
    local text = first == last and self[first] or concat(self, "", first, last)
    local r = tail_usage(text)
    if r or #text ~= self.bytes then
        return r
    end
    if not find(text, '"usage"', 1, true) and not find(text, 'eval_count"', 1, true) then
        return nil
    end
    local whole = new_json(#text)              -- held whole: a usage elsewhere at the top level
    whole:feed(text)
    return whole:result()
end

---------------------------------------------------------------------------------------------------
-- The scanner
---------------------------------------------------------------------------------------------------

local FORMATS = {
    openai_json = "json", anthropic_json = "json", ollama_json = "json",
    openai_sse = "lines", anthropic_sse = "lines", ollama_ndjson = "lines",
}
_M.FORMATS = FORMATS

-- The usage, once the body has ended: see the top of this file. Calling it again gives the same table.
local function finish(self)
    local done = self.done
    if not done then
        done = self:result() or { source = "estimated", bytes = 0 }
        done.bytes = self.bytes
        self.done = done
    end
    return done
end
Tail.finish, Lines.finish = finish, finish

-- A scanner for one answer body in format (a key of FORMATS). opts.line_max, opts.tail_max: the bounds
-- (defaults LINE_MAX, TAIL_MAX); opts.capture_max: CAPTURE_MAX, for an SSE line longer than line_max.
--   scanner:feed(chunk)     the next chunk of the body (a string; nil and "" are nothing)
--   scanner:buffered()      bytes held between chunks (bounded by line_max or 2 * tail_max)
--   scanner:finish()        the usage
function _M.new(format, opts)
    local kind = FORMATS[format]
    if not kind then
        error("gw.usage: unknown format " .. tostring(format), 2)
    end
    if kind == "json" then
        return new_tail(opts and opts.tail_max)
    end
    return new_lines(format, opts or {})
end

-- The format of an answer in an API family ("openai", "anthropic", "ollama") with this Content-Type,
-- or nil when it is none of them (an HTML error page, text/plain): nothing to scan.
function _M.format_for(family, content_type)
    if type(content_type) ~= "string" then
        return nil
    end
    local semi = find(content_type, ";", 1, true)
    local mime = string.lower(semi and sub(content_type, 1, semi - 1) or content_type)
    mime = string.match(mime, "^%s*(.-)%s*$")
    if mime == "text/event-stream" then
        return family == "anthropic" and "anthropic_sse" or "openai_sse"  -- Ollama's SSE: its /v1 API
    elseif mime == "application/x-ndjson" or mime == "application/ndjson" then
        return "ollama_ndjson"
    elseif mime == "application/json" or string.find(mime, "^application/[%w.-]+%+json$") then
        if family == "anthropic" then
            return "anthropic_json"
        elseif family == "ollama" then
            return "ollama_json"
        end
        return "openai_json"
    end
    return nil
end

---------------------------------------------------------------------------------------------------
-- The request side: stream_options.include_usage
---------------------------------------------------------------------------------------------------

-- The one member named key (nil when there is none), or false when there are several.
local function member(members, key)
    local found
    for _, m in ipairs(members) do
        if m.key == key then
            if found then
                return false
            end
            found = m
        end
    end
    return found
end

local function is_literal(text, m, literal)
    return m.ve - m.vs + 1 == #literal and sub(text, m.vs, m.ve) == literal
end

-- Is text[vs..ve] literal?
local function span_is(text, vs, ve, literal)
    return ve - vs + 1 == #literal and sub(text, vs, ve) == literal
end

local INCLUDE = '"include_usage":true'

-- Can text have a top-level "stream":true? Somewhere its key is followed by ':' and 'true' (plain finds,
-- no walk): a request that does not stream (most JSON ones: "stream":false, or none) is answered at once.
local T, R, U, E = 116, 114, 117, 101
local function may_stream(text)
    local p = find(text, '"stream"', 1, true)
    while p do
        local i = skip_ws(text, p + 8)
        if i and byte(text, i) == COLON then
            i = skip_ws(text, i + 1)
            if i then
                local a, b, c, d = byte(text, i, i + 3)
                if a == T and b == R and c == U and d == E then
                    return true
                end
            end
        end
        p = find(text, '"stream"', p + 8, true)
    end
    return false
end

-- The request body with stream_options.include_usage true, for an OpenAI chat or completions request
-- that streams ("stream":true at the top level) and did not ask for usage; nil when there is nothing to
-- add (not streaming, already asked for, not a JSON object, a key written with escapes, a repeated
-- stream_options or include_usage, a stream_options that is not an object or null). Every other byte
-- stays as sent:
--   no stream_options:              '"stream_options":{"include_usage":true},' right after the top "{"
--   "stream_options":null           -> {"include_usage":true}
--   "stream_options":{...}          '"include_usage":true' (and a comma) right after its "{"
--   "include_usage":false or null   -> true (the client's "no" is kept by stripping the answer)
-- Not for the Responses API (it refuses stream_options and always reports usage), nor Anthropic's or
-- Ollama's native APIs. A non-nil answer means the gateway asked: strip the answer's usage
-- (openai_sse_filter(true)).
function _M.with_include_usage(text)
    if type(text) ~= "string" or not may_stream(text) then
        return nil
    end
    local open = skip_ws(text, 1)
    if not open or byte(text, open) ~= LBRACE then
        return nil
    end
    -- the last "stream" counts, as for most JSON parsers; a repeated stream_options is left alone
    local close, svs, sve, n_options, ovs, ove = member_spans(text, open, "stream", "stream_options")
    if not close or skip_ws(text, close + 1) then
        return nil
    end
    if not svs or not span_is(text, svs, sve, "true") then
        return nil
    end
    if n_options > 1 then
        return nil
    elseif n_options == 0 then
        return sub(text, 1, open) .. '"stream_options":{' .. INCLUDE .. "}," .. sub(text, open + 1)
    elseif span_is(text, ovs, ove, "null") then
        return sub(text, 1, ovs - 1) .. "{" .. INCLUDE .. "}" .. sub(text, ove + 1)
    elseif byte(text, ovs) ~= LBRACE then
        return nil
    end
    local inner = members_of(text, ovs, 1)
    if not inner then
        return nil
    end
    local include = member(inner, "include_usage")
    if include == false then
        return nil
    elseif not include then
        local comma = #inner > 0 and "," or ""
        return sub(text, 1, ovs) .. INCLUDE .. comma .. sub(text, ovs + 1)
    elseif is_literal(text, include, "false") or is_literal(text, include, "null") then
        return sub(text, 1, include.vs - 1) .. "true" .. sub(text, include.ve + 1)
    end
    return nil                                -- true: the client asked; anything else: the provider's 400
end

---------------------------------------------------------------------------------------------------
-- The answer side: an OpenAI SSE filter that takes out what the gateway asked for
---------------------------------------------------------------------------------------------------

-- In data (a chunk's JSON), the span of a top-level "usage":null member with one of its commas (the
-- one before it, else the one after), or nil. p: where a '"usage"' is.
local function null_usage_span(data, p)
    local i = skip_ws(data, p + 7)
    if not i or byte(data, i) ~= COLON then
        return nil
    end
    i = skip_ws(data, i + 1)
    if not i or sub(data, i, i + 3) ~= "null" then
        return nil
    end
    local e = i + 3
    -- top level: the walk of the object from its "{" meets this key as one of its members
    local open = skip_ws(data, 1)
    if not open or byte(data, open) ~= LBRACE then
        return nil
    end
    local members = members_of(data, open)
    if not members then
        return nil
    end
    for k, m in ipairs(members) do
        if m.vs == i and m.ve == e then
            if k > 1 then                     -- from the comma after the previous value
                local c = skip_ws(data, members[k - 1].ve + 1)
                return c, e
            elseif members[2] then            -- through the comma and blanks before the next key
                local c = skip_ws(data, e + 1)
                return p, skip_ws(data, c + 1) - 1
            end
            return p, e
        end
    end
    return nil
end

-- The usage of an OpenAI usage-only chunk (its data: top-level "choices":[] and a "usage" object as its
-- last member, read as a JSON answer's ending is: compact_end, flat_usage), or nil: anything else, or
-- a usage those do not read (then the chunk is decoded, as before). Decoding the chunk costs ~15k
-- instructions, this ~7k (~3k of it the walk of the top-level members for "choices": gw.body's
-- member_span; its list of members, members_of, cost ~10k).
local function usage_only(data)
    if not find(data, '"choices":[]', 1, true) then
        return nil
    end
    local e = #data
    local c = byte(data, e)
    while c == SPACE or c == TAB do
        e = e - 1
        c = byte(data, e)
    end
    if c ~= RBRACE then
        return nil
    end
    local r = compact_end(data)
    if not r then
        local p = last_usage_key(data, 1)
        r = p and flat_usage(data, p, e)
    end
    local open = r and skip_ws(data, 1)
    if not open or byte(data, open) ~= LBRACE then
        return nil
    end
    local vs, ve = member_span(data, open, "choices")      -- the last top-level "choices"
    if not vs or ve ~= vs + 1 or byte(data, vs + 1) ~= RBRACKET then
        return nil
    end
    return r
end
_M.usage_only = usage_only

-- data without its top-level "usage":null member (OpenAI adds one to every chunk of a stream that asked
-- for usage), or data itself.

local function without_null_usage(data)
    local n = #data
    -- OpenAI's chunks: the member last, so of the object that ends the data (the top-level one)
    if sub(data, n - 13) == NULL_USAGE_END then
        return sub(data, 1, n - 14) .. "}"
    end
    local p = find(data, '"usage"', 1, true)
    while p do
        local s, e = null_usage_span(data, p)
        if s then
            return sub(data, 1, s - 1) .. sub(data, e + 1)
        end
        p = find(data, '"usage"', p + 7, true)
    end
    return data
end
_M.without_null_usage = without_null_usage

local Filter = {}
Filter.__index = Filter

-- A filter for an OpenAI SSE answer (chat or completions; the Responses API's events pass untouched).
-- strip = false: every chunk is passed on as it came (feed returns its argument), the usage recorded.
-- strip = true (the gateway added stream_options.include_usage): the usage-only chunk (an event whose
-- data has "choices":[] and a "usage" object) is taken out whole, with its blank line, and the
-- "usage":null member OpenAI adds to every other chunk is taken out of each, so the client gets byte for
-- byte the stream it asked for; the usage is recorded. Lines are passed on once complete (an event's
-- lines before its data: line wait for it); a line longer than line_max is passed on as it comes.
function _M.openai_sse_filter(strip, opts)
    opts = opts or {}
    local scanner = _M.new("openai_sse", opts)
    return setmetatable({
        strip = strip and true or false,
        scanner = scanner,
        rec = scanner,            -- a Lines: its line handler records the usage
        line_max = opts.line_max or LINE_MAX,
        pend = {}, npend = 0, plen = 0,
        held = {}, nheld = 0, hlen = 0,   -- complete lines of the current event, not yet decided
        fate = nil,               -- of the current event: nil (undecided), "pass" or "drop"
        passing = false,          -- inside a line longer than line_max: passed on up to its LF
        out = nil,
    }, Filter)
end

function Filter:emit(s)
    local out = self.out
    out[#out + 1] = s
end

function Filter:flush_held()
    local held = self.held
    for k = 1, self.nheld do
        self:emit(held[k])
        held[k] = nil
    end
    self.nheld, self.hlen = 0, 0
end

function Filter:drop_held()
    local held = self.held
    for k = 1, self.nheld do
        held[k] = nil
    end
    self.nheld, self.hlen = 0, 0
end

-- line (content: without its line end; data: its data) without a top-level "usage":null.
local function cleaned(line, content, data)
    local clean = without_null_usage(data)
    if clean == data then
        return line
    end
    return sub(content, 1, #content - #data) .. clean .. sub(line, #content + 1)
end

-- A complete line with its terminator (none for a last line at finish).
function Filter:line(line)
    local content = line
    local last = byte(content, #content)
    if last == LF then
        content = sub(content, 1, #content - 1)
        last = byte(content, #content)
    end
    if last == CR then
        content = sub(content, 1, #content - 1)
    end
    local fate = self.fate
    if #content > self.line_max then                  -- passed on untouched, as when cut in pieces
        if fate ~= "drop" then
            self.fate = "pass"
            self:flush_held()
            self:emit(line)
        end
        return
    elseif content == "" then                         -- the end of an event
        if fate ~= "drop" then
            self:flush_held()
            self:emit(line)
        end
        self.fate = nil
        return
    elseif fate == "drop" then
        return
    end
    local data = sse_data(content)
    if data then
        local usage_key = find(data, '"usage"', 1, true)
        local null_last = usage_key and sub(data, #data - 13) == NULL_USAGE_END
        if fate == nil and usage_key and not null_last then
            local u = usage_only(data)
            if u then                                      -- the usage-only chunk: taken out
                self.rec.usage = u
                self.fate = "drop"
                self:drop_held()
                return
            end
        end
        local event = usage_key and not null_last and self.rec:line(content)   -- records the usage
        if fate == nil then                                -- this line decides
            if type(event) == "table" and type(event.usage) == "table"
                    and type(event.choices) == "table" and next(event.choices) == nil then
                self.fate = "drop"
                self:drop_held()
                return
            end
            self.fate = "pass"
            self:flush_held()
        end
        if null_last then
            self:emit(sub(content, 1, #content - 14) .. "}" .. sub(line, #content + 1))
        else
            self:emit(usage_key and cleaned(line, content, data) or line)
        end
    elseif fate == "pass" then
        self:emit(line)
    else                                             -- event:, id:, a comment: wait for the data
        self.nheld = self.nheld + 1
        self.held[self.nheld] = line
        self.hlen = self.hlen + #line
        if self.hlen > self.line_max then
            self.fate = "pass"
            self:flush_held()
        end
    end
end

-- A complete line of chunk, bytes i..j (j its LF), read where it is when nothing is held (no line of an
-- undecided event, no piece of a line from an earlier chunk): true when it passes on as it is; a number
-- when it passes on but for the 13 bytes from there (the ',"usage":null' ending its data: OpenAI's every
-- chunk); false when Filter:line must take it (the usage-only event, an event: line before its data, a
-- long line, a usage elsewhere in the data). The same fates as Filter:line's, without copying the line.
function Filter:in_place(chunk, i, j)
    local fate = self.fate
    if fate == "drop" or self.nheld > 0 then
        return false
    end
    local ce = j - 1                                   -- the content's last byte
    if ce >= i and byte(chunk, ce) == CR then
        ce = ce - 1
    end
    if ce < i then                                     -- the end of an event
        self.fate = nil
        return true
    elseif ce - i + 1 > self.line_max then
        return false
    end
    local d, a, t, a2, colon = byte(chunk, i, i + 4)
    if d ~= 100 or a ~= 97 or t ~= 116 or a2 ~= 97 or colon ~= COLON then   -- not "data:"
        return fate == "pass"
    end
    -- OpenAI's every chunk but the usage-only one: its ending looked at first (no search of the line)
    local at = null_usage_at(chunk, i, j)
    if at and at > i + (byte(chunk, i + 5) == SPACE and 6 or 5) then
        self.fate = "pass"
        return at - 1
    end
    local u = self.at_usage
    if u < i then
        u = find(chunk, '"usage"', i, true) or NONE
        self.at_usage = u
    end
    if u > ce then
        self.fate = "pass"
        return true
    end
    return false
end

-- The bytes to pass on for this chunk (with strip = false: chunk itself).
function Filter:feed(chunk)
    if chunk == nil or chunk == "" then
        return chunk or ""
    end
    if not self.strip then
        self.scanner:feed(chunk)
        return chunk
    end
    self.rec.bytes = self.rec.bytes + #chunk
    self.out = {}
    self.at_usage = 0
    local n = #chunk
    local i = 1
    local from = 1                                    -- chunk's bytes from here pass on as they are
    while true do
        local j = find(chunk, "\n", i, true)
        if not j then
            break
        end
        local kept = not self.passing and self.npend == 0 and self:in_place(chunk, i, j)
        if kept == false then                         -- Filter:line takes it
            if from < i then
                self:emit(sub(chunk, from, i - 1))
            end
            from = j + 1
            if self.passing then
                if self.fate ~= "drop" then
                    self:emit(sub(chunk, i, j))
                end
                self.passing = false
            elseif self.npend > 0 then
                local pend = self.pend
                local line = concat(pend, "", 1, self.npend) .. sub(chunk, i, j)
                for k = self.npend, 1, -1 do
                    pend[k] = nil
                end
                self.npend, self.plen = 0, 0
                self:line(line)
            else
                self:line(sub(chunk, i, j))
            end
        elseif kept ~= true then                      -- without its ',"usage":null'
            self:emit(sub(chunk, from, kept - 1))
            from = kept + 13
        end
        i = j + 1
    end
    if from < i then
        self:emit(sub(chunk, from, i - 1))
    end
    if i <= n then
        local tail = sub(chunk, i)
        if self.passing then
            if self.fate ~= "drop" then
                self:emit(tail)
            end
        elseif self.plen + #tail > self.line_max then  -- too long to hold: pass it on as it comes
            if self.fate ~= "drop" then
                self.fate = "pass"
                self:flush_held()
                for k = 1, self.npend do
                    self:emit(self.pend[k])
                end
                self:emit(tail)
            end
            self.pend, self.npend, self.plen, self.passing = {}, 0, 0, true
        else
            self.npend = self.npend + 1
            self.pend[self.npend] = tail
            self.plen = self.plen + #tail
        end
    end
    local out = self.out
    self.out = nil
    return out[2] and concat(out) or out[1] or ""
end

-- The bytes still held, to pass on at the end of the body.
function Filter:finish()
    if not self.strip or self.finished then
        return ""
    end
    self.finished = true
    self.out = {}
    if self.npend > 0 then
        local line = concat(self.pend, "", 1, self.npend)
        self.pend, self.npend, self.plen = {}, 0, 0
        self:line(line)
    end
    if self.fate ~= "drop" then
        self:flush_held()
    end
    self.passing = false
    local out = concat(self.out)
    self.out = nil
    return out
end

-- Bytes held between chunks (the incomplete line and an undecided event's lines).
function Filter:buffered()
    if not self.strip then
        return self.scanner:buffered()
    end
    return self.plen + self.hlen + self.rec:buffered()
end

-- The usage, as Scanner:finish() gives it (call after finish()).
function Filter:usage()
    return self.scanner:finish()
end

return _M
