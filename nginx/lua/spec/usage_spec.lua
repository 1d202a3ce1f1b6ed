-- gw.usage: token usage found in answer bodies as they pass, chunk by chunk (nginx/lua/gw/usage.lua).
local usage = require("gw.usage")
local cjson = require("cjson")

local decode = cjson.decode

-- The fixtures: answers of tests/backends/stub_llm.py, byte for byte (fixtures/usage/README.md).
local FIXTURES = debug.getinfo(1, "S").source:match("^@(.*/)") .. "fixtures/usage/"

local function fixture(name)
    local file = assert(io.open(FIXTURES .. name, "rb"))
    local text = file:read("*a")
    file:close()
    return text
end

-- text cut at the given positions (each the last byte of a piece).
local function cut(text, ...)
    local pieces, from = {}, 1
    for _, at in ipairs({ ... }) do
        pieces[#pieces + 1] = text:sub(from, at)
        from = at + 1
    end
    pieces[#pieces + 1] = text:sub(from)
    return pieces
end

-- Ways to cut text into chunks: whole, a byte at a time, in two at every position (small texts), and
-- pieces of random sizes (seeded: the same cuts every run).
local function chunkings(text, opts)
    opts = opts or {}
    local ways = { { text } }
    if #text <= (opts.every_max or 8192) then
        local bytes = {}
        for i = 1, #text do
            bytes[i] = text:sub(i, i)
        end
        ways[#ways + 1] = bytes
        for at = 1, #text - 1 do
            ways[#ways + 1] = cut(text, at)
        end
    end
    math.randomseed(opts.seed or 12)
    for _ = 1, opts.random or 20 do
        local pieces, i = {}, 1
        local max = opts.max_piece or 64
        while i <= #text do
            local size = math.random(1, max)
            pieces[#pieces + 1] = text:sub(i, i + size - 1)
            i = i + size
        end
        ways[#ways + 1] = pieces
    end
    return ways
end

-- The usage of pieces fed to a scanner of format, without the byte count (checked apart).
local function scan(format, pieces, opts)
    local scanner = usage.new(format, opts)
    for _, piece in ipairs(pieces) do
        scanner:feed(piece)
    end
    local u = scanner:finish()
    local copy = {}
    for k, v in pairs(u) do
        copy[k] = v
    end
    copy.bytes = nil
    return copy
end

-- Every chunking of text gives expected.
local function flat_equal(a, b)
    for k, v in pairs(a) do
        if b[k] ~= v then
            return false
        end
    end
    for k in pairs(b) do
        if a[k] == nil then
            return false
        end
    end
    return true
end

local function check_all(format, text, expected, opts)
    for _, pieces in ipairs(chunkings(text, opts)) do
        local got = scan(format, pieces, opts)
        if not flat_equal(expected, got) then
            assert.same({ usage = expected, pieces = pieces }, { usage = got, pieces = pieces })
        end
    end
end

local function reported(prompt, completion, total, extra)
    local u = { source = "reported", prompt_tokens = prompt, completion_tokens = completion,
                total_tokens = total or prompt + completion }
    for k, v in pairs(extra or {}) do
        u[k] = v
    end
    return u
end

local ESTIMATED = { source = "estimated" }

local function crlf(text)
    return (text:gsub("\n", "\r\n"))
end

-- An OpenAI chunk's id and time, which differ between two answers of the stub.
local function normalized(text)
    return (text:gsub('"id":"(%a+)%-%x+"', '"id":"%1-ID"'):gsub('"created":%d+', '"created":0'))
end

-- A random JSON value as text, with random whitespace, escapes, UTF-8, and nested "usage" decoys that no
-- scanner may take for the answer's.
local STRINGS = { "", "a", "stream", "stream_options", "usage", 'q"uote', "back\\slash", "\n\t",
                  "h\xC3\xA9 \xE2\x82\xAC", "{[\"]}", "/", "\1", '"usage":{"prompt_tokens":1}',
                  '\\"usage\\":{', '\\', '\\\\"', '"\\\\\\"' }
local DECOY = '{"usage":{"prompt_tokens":999,"completion_tokens":999,"input_tokens":999,"output_tokens":999},'
    .. '"eval_count":999,"prompt_eval_count":999}'

local function ws()
    local r = math.random(1, 6)
    return r == 1 and " " or r == 2 and "\n  " or r == 3 and "\t" or r == 4 and "\r\n" or ""
end

local function str()
    return cjson.encode(STRINGS[math.random(1, #STRINGS)])
end

local function value(depth)
    local r = math.random(1, depth > 3 and 5 or 9)
    if r == 1 then
        return tostring(math.random(-1000, 1000))
    elseif r == 2 then
        return ({ "true", "false", "null", "1.5e3", "-0.25" })[math.random(1, 5)]
    elseif r <= 5 then
        return str()
    elseif r == 6 then
        local items = {}
        for k = 1, math.random(0, 4) do
            items[k] = ws() .. value(depth + 1) .. ws()
        end
        return "[" .. table.concat(items, ",") .. "]"
    elseif r == 9 then
        return DECOY
    end
    local members = {}
    for k = 1, math.random(0, 4) do
        members[k] = ws() .. str() .. ws() .. ":" .. ws() .. value(depth + 1) .. ws()
    end
    return "{" .. table.concat(members, ",") .. "}"
end

describe("gw.usage", function()
    describe("format_for", function()
        it("picks the format from the family and the Content-Type", function()
            local cases = {
                { "openai", "application/json", "openai_json" },
                { "openai", "application/json; charset=utf-8", "openai_json" },
                { "openai", "Application/JSON", "openai_json" },
                { "openai", "text/event-stream; charset=utf-8", "openai_sse" },
                { "anthropic", "application/json", "anthropic_json" },
                { "anthropic", "text/event-stream", "anthropic_sse" },
                { "ollama", "application/json; charset=utf-8", "ollama_json" },
                { "ollama", "application/x-ndjson", "ollama_ndjson" },
                { "ollama", "text/event-stream", "openai_sse" },      -- Ollama's /v1 API
                { "openai", "application/problem+json", "openai_json" },
                { "openai", "text/html", nil },
                { "openai", "text/plain; charset=utf-8", nil },
                { "openai", nil, nil },
            }
            for _, case in ipairs(cases) do
                local format = usage.format_for(case[1], case[2])
                assert.same({ case[1], case[2], case[3] }, { case[1], case[2], format })
            end
        end)

        it("knows every format it names, and refuses an unknown one", function()
            local formats = { "openai_json", "openai_sse", "anthropic_json", "anthropic_sse", "ollama_json",
                              "ollama_ndjson" }
            for _, format in ipairs(formats) do
                assert.is_string(usage.FORMATS[format])
                assert.same(ESTIMATED.source, usage.new(format):finish().source)
            end
            assert.has_error(function() usage.new("gemini_json") end)
        end)
    end)

    describe("finds the usage the stand-in backends report, however the body is cut", function()
        local cases = {
            { "openai_chat.json", "openai_json", reported(6, 3) },
            { "openai_completions.json", "openai_json", reported(6, 3) },
            { "openai_embeddings.json", "openai_json", reported(6, 0) },
            { "openai_responses.json", "openai_json", reported(6, 3, 9, { cache_read_tokens = 0 }) },
            { "openai_chat_stream_usage.sse", "openai_sse", reported(6, 3) },
            { "openai_completions_stream_usage.sse", "openai_sse", reported(6, 3) },
            { "openai_responses_stream.sse", "openai_sse", reported(6, 3, 9, { cache_read_tokens = 0 }) },
            { "anthropic.json", "anthropic_json",
              reported(6, 3, 9, { cache_read_tokens = 0, cache_creation_tokens = 0 }) },
            { "anthropic_stream.sse", "anthropic_sse",
              reported(6, 3, 9, { cache_read_tokens = 0, cache_creation_tokens = 0 }) },
            { "ollama_chat.json", "ollama_json", reported(6, 3) },
            { "ollama_chat_stream.ndjson", "ollama_ndjson", reported(6, 3) },
            { "ollama_generate_stream.ndjson", "ollama_ndjson", reported(6, 3) },
            { "ollama_embed.json", "ollama_json", reported(3, 0) },
        }
        for _, case in ipairs(cases) do
            local name, format, expected = case[1], case[2], case[3]
            it(name .. " (" .. format .. ")", function()
                check_all(format, fixture(name), expected)
            end)
        end

        it("and counts the bytes it was fed", function()
            local text = fixture("anthropic_stream.sse")
            local scanner = usage.new("anthropic_sse")
            for _, piece in ipairs(cut(text, 10, 500, 501)) do
                scanner:feed(piece)
            end
            scanner:feed("")
            scanner:feed(nil)
            assert.same(#text, scanner:finish().bytes)
            assert.equal(scanner:finish(), scanner:finish())     -- the same table again
            assert.same(#text, usage.new("openai_json"):finish().bytes + #text)
        end)

        it("with CRLF line ends", function()
            for _, case in ipairs(cases) do
                if case[2] ~= "openai_json" and case[2] ~= "anthropic_json" and case[2] ~= "ollama_json" then
                    check_all(case[2], crlf(fixture(case[1])), case[3], { every_max = 0 })
                end
            end
            check_all("openai_json", crlf('{\n"usage" :\n{"prompt_tokens":1,\n"completion_tokens":2}\n}\n'),
                reported(1, 2))
        end)
    end)

    describe("a body without usage is estimated, never zero", function()
        it("a stream that did not ask for usage", function()
            check_all("openai_sse", fixture("openai_chat_stream.sse"), ESTIMATED)
            check_all("openai_sse", fixture("openai_completions_stream.sse"), ESTIMATED)
        end)

        it("streams cut off before their usage (the stub's die_mid_stream)", function()
            check_all("openai_sse", fixture("openai_chat_stream_usage_cut.sse"), ESTIMATED)
            -- message_start came (the input is known), message_delta did not (the output is not)
            check_all("anthropic_sse", fixture("anthropic_stream_cut.sse"), ESTIMATED)
            check_all("ollama_ndjson", fixture("ollama_chat_stream_cut.ndjson"), ESTIMATED)
            check_all("openai_json", fixture("openai_chat_cut.json"), ESTIMATED)
        end)

        it("a JSON answer cut anywhere before its usage is complete", function()
            local cases = { { "openai_chat.json", "openai_json" }, { "anthropic.json", "anthropic_json" },
                            { "ollama_chat.json", "ollama_json" }, { "ollama_embed.json", "ollama_json" } }
            for _, case in ipairs(cases) do
                local text = fixture(case[1])
                for at = 0, #text - 1 do                  -- also with the usage whole, but not the document
                    assert.same({ at, ESTIMATED }, { at, scan(case[2], { text:sub(1, at) }) })
                end
                assert.same("reported", scan(case[2], { text }).source)
            end
        end)

        it("a stream cut anywhere before its usage line is complete", function()
            local text = fixture("openai_chat_stream_usage.sse")
            local usage_at = text:find('"choices":[]', 1, true)
            for at = 1, usage_at + 60 do
                assert.same(ESTIMATED, scan("openai_sse", { text:sub(1, at) }))
            end
            local ndjson = fixture("ollama_chat_stream.ndjson")
            local last = ndjson:find('"done":true', 1, true)
            assert.same(ESTIMATED, scan("ollama_ndjson", { ndjson:sub(1, last) }))
        end)

        it("answers that carry none (errors, Ollama's /api/embeddings, an empty body)", function()
            local bodies = {
                { "openai_json", '{"error":{"message":"m","type":"server_error","param":null,"code":null}}' },
                { "anthropic_json", '{"type":"error","error":{"type":"overloaded_error","message":"m"}}' },
                { "ollama_json", '{"embedding":[0.1,0.2]}' },
                { "ollama_json", '{"error":"model not found"}' },
                { "openai_json", "" },
                { "openai_json", "not json at all" },
                { "openai_json", '{"usage":null}' },
                { "openai_json", '{"usage":{}}' },
                { "openai_json", '{"usage":{"prompt_tokens":"12","completion_tokens":-1}}' },
                { "openai_json", '[{"usage":{"prompt_tokens":1}}]' },              -- not an object at the top
                { "openai_sse", 'data: {"error":{"message":"overloaded"}}\n\n' },
                { "anthropic_sse", 'event: error\ndata: {"type":"error","error":{"type":"overloaded_erro'
                    .. 'r"}}\n\n' },
                { "ollama_ndjson", '{"error":"out of memory"}\n' },
                -- a load request: done, but no counts
                { "ollama_ndjson", '{"model":"m","created_at":"x","response":"","done":true,"done_reason'
                    .. '":"load"}\n' },
            }
            for _, case in ipairs(bodies) do
                assert.same({ case[2], ESTIMATED }, { case[2], scan(case[1], chunkings(case[2])[1]) })
            end
        end)

        it("an Anthropic stream whose message_delta never came, or whose message_start is missing", function()
            local start = 'event: message_start\ndata: {"type":"message_start","message":{"usage":'
                .. '{"input_tokens":10,"output_tokens":1}}}\n\n'
            local delta = 'event: message_delta\ndata: {"type":"message_delta","delta":{},"usage":'
                .. '{"output_tokens":7}}\n\n'
            assert.same(ESTIMATED, scan("anthropic_sse", { start }))
            assert.same(ESTIMATED, scan("anthropic_sse", { delta }))
            assert.same(reported(10, 7), scan("anthropic_sse", { start, delta }))
        end)
    end)

    describe("OpenAI SSE", function()
        it("data: without the space, comments and keep-alives", function()
            local text = ": OPENROUTER PROCESSING\n\n"
                .. 'data:{"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
                .. ": ping\n\n"
                .. "event: ping\ndata: {}\n\n"
                .. 'data:{"id":"c","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,'
                .. '"total_tokens":17}}\n\n'
                .. "retry: 1000\n\ndata:[DONE]\n\n"
            check_all("openai_sse", text, reported(12, 5))
            check_all("openai_sse", crlf(text), reported(12, 5))
        end)

        it("OpenAI's own final chunk, with the token details", function()
            local text = 'data: {"id":"chatcmpl-B","object":"chat.completion.chunk","created":1,'
                .. '"model":"gpt-4o","service_tier":"default","system_fingerprint":"fp_1","choices":[],'
                .. '"usage":{"prompt_tokens":1117,"completion_tokens":46,"total_tokens":1163,'
                .. '"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},'
                .. '"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,'
                .. '"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"obfuscation":"x"}\n\n'
                .. "data: [DONE]\n\n"
            check_all("openai_sse", text, reported(1117, 46, 1163, { cache_read_tokens = 1024 }))
        end)

        it("usage in every chunk (vLLM's continuous usage): the last one", function()
            local text = ""
            for i = 1, 5 do
                text = text .. 'data: {"choices":[{"index":0,"delta":{"content":"x"}}],'
                    .. '"usage":{"prompt_tokens":4,"completion_tokens":' .. i
                    .. ',"total_tokens":' .. (4 + i) .. "}}\n\n"
            end
            check_all("openai_sse", text .. "data: [DONE]\n\n", reported(4, 5))
        end)

        it("Groq's x_groq.usage, and whitespace around the usage key", function()
            local groq = 'data: {"id":"x","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
                .. '"x_groq":{"id":"req_1","usage":{"prompt_tokens":20,"completion_tokens":8,'
                .. '"total_tokens":28}}}\n\ndata: [DONE]\n\n'
            check_all("openai_sse", groq, reported(20, 8))
            local spaced = 'data: {"choices": [], "usage" :\t{ "prompt_tokens": 3,'
                .. ' "completion_tokens": 4 }}\n\n'
            check_all("openai_sse", spaced, reported(3, 4))
        end)

        it("a chunk ending in \"usage\":null is skipped, unless a usage object comes before", function()
            local chunk = 'data: {"id":"c","choices":[{"index":0,"delta":{"content":"x"}}],"usage":null}\n\n'
            check_all("openai_sse", chunk .. chunk .. "data: [DONE]\n\n", ESTIMATED)
            check_all("openai_sse", crlf(chunk .. chunk), ESTIMATED)
            local groq = 'data: {"choices":[],"x_groq":{"usage":{"prompt_tokens":20,"completion_tokens":8}},'
                .. '"usage":null}\n\n'
            check_all("openai_sse", chunk .. groq .. chunk, reported(20, 8))
            check_all("openai_sse", crlf(chunk .. groq .. chunk), reported(20, 8))
            local bare = 'data:,"usage":null}\n\n' .. ',"usage":null}\n\n'
            check_all("openai_sse", bare .. groq, reported(20, 8))
        end)

        it("skips malformed JSON and usage that is not an object", function()
            local good = 'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3}}\n\n'
            local broken = 'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":\n\n'
                .. 'data: {"usage":{"prompt_tokens":9}} trailing\n\n'
                .. 'data: {"choices":[],"usage":"lots"}\n\n'
                .. 'data: {"choices":[],"usage":[1,2]}\n\n'
                .. 'data: {"choices":[],"usage":{"prompt_tokens":null,"completion_tokens":null}}\n\n'
                .. 'data: {"content":"\\"usage\\":{\\"prompt_tokens\\":9}"}\n\n'
            check_all("openai_sse", broken, ESTIMATED)
            check_all("openai_sse", good .. broken, reported(2, 3))
            check_all("openai_sse", broken .. good, reported(2, 3))
        end)

        it("a last line without its newline is still read", function()
            local text = 'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3}}'
            check_all("openai_sse", text, reported(2, 3))
            check_all("openai_sse", text .. "\r", reported(2, 3))
        end)

        it("splits inside a UTF-8 character do not matter", function()
            local text = 'data: {"choices":[{"delta":{"content":"h\xC3\xA9llo \xE2\x82\xAC \xF0\x9F\x98'
                .. '\x80"}}]}\n\n'
                .. 'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":1}}\n\n'
            check_all("openai_sse", text, reported(7, 1))
        end)
    end)

    describe("Anthropic SSE", function()
        -- As Anthropic's documentation shows it: spaces after colons and commas, a ping, cache counts.
        local text = 'event: message_start\ndata: {"type": "message_start", "message": {"id": "msg_1", '
            .. '"type": "message", "role": "assistant", "content": [], "model": "claude-sonnet-4-5", '
            .. '"stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 25, '
            .. '"cache_creation_input_tokens": 100, '
            .. '"cache_read_input_tokens": 2000, "output_tokens": 1}}}\n\n'
            .. 'event: content_block_start\ndata: {"type": "content_block_start", "index": 0, '
            .. '"content_block": {"type": "text", "text": ""}}\n\n'
            .. 'event: ping\ndata: {"type": "ping"}\n\n'
            .. 'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, "delta": '
            .. '{"type": "text_delta", "text": "Hello \\"usage\\": {}"}}\n\n'
            .. 'event: content_block_stop\ndata: {"type": "content_block_stop", "index": 0}\n\n'
            .. 'event: message_delta\ndata: {"type": "message_delta", "delta": {"stop_reason": "tool_use", '
            .. '"stop_sequence": null}, "usage": {"output_tokens": 8}}\n\n'
            .. 'event: message_delta\ndata: {"type": "message_delta", "delta": {"stop_reason": "end_turn", '
            .. '"stop_sequence": null}, "usage": {"output_tokens": 15}}\n\n'
            .. 'event: message_stop\ndata: {"type": "message_stop"}\n\n'

        it("input and cache tokens from message_start, output from the last message_delta", function()
            local expected = reported(2125, 15, 2140,
                { cache_creation_tokens = 100, cache_read_tokens = 2000 })
            check_all("anthropic_sse", text, expected)
            check_all("anthropic_sse", crlf(text), expected, { every_max = 0 })
        end)

        it("counts a message_delta gives for input and cache replace message_start's (cumulative)", function()
            local delta = 'event: message_delta\ndata: {"type":"message_delta","delta":{},"usage":'
                .. '{"input_tokens":30,"cache_creation_input_tokens":0,"cache_read_input_tokens":2000,'
                .. '"output_tokens":20}}\n\n'
            local expected = reported(2030, 20, 2050, { cache_creation_tokens = 0, cache_read_tokens = 2000 })
            check_all("anthropic_sse", text .. delta, expected, { every_max = 0 })
        end)

        it("ignores usage outside message_start and message_delta, and malformed events", function()
            local noise = 'event: other\ndata: {"type":"other","usage":{"input_tokens":999,'
                .. '"output_tokens":999}}\n\n'
                .. 'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":\n\n'
            check_all("anthropic_sse", noise .. text .. noise,
                reported(2125, 15, 2140, { cache_creation_tokens = 100, cache_read_tokens = 2000 }),
                { every_max = 0 })
        end)
    end)

    describe("Ollama NDJSON", function()
        it("takes the line with done:true, also without a last newline and with CRLF", function()
            local text = fixture("ollama_generate_stream.ndjson")
            check_all("ollama_ndjson", text:sub(1, -2), reported(6, 3))
            check_all("ollama_ndjson", crlf(text), reported(6, 3))
        end)

        it("a done line without prompt_eval_count (a cached prompt) counts its output", function()
            check_all("ollama_ndjson", '{"response":"","done":true,"eval_count":4}\n', reported(0, 4))
        end)

        it("ignores counts on lines that are not done, and malformed lines", function()
            local text = '{"done":false,"eval_count":100}\n{"done":true,"eval_count":\n'
                .. '{"done":true,"prompt_eval_count":5,"eval_count":2}\n{"done":false}\n'
            check_all("ollama_ndjson", text, reported(5, 2))
            check_all("ollama_ndjson", '{"done":false,"prompt_eval_count":5,"eval_count":2}\n', ESTIMATED)
        end)
    end)

    describe("JSON bodies: the top-level usage, wherever it is", function()
        it("before the content, with whitespace, and the Responses API's names", function()
            check_all("openai_json", ' {\n  "usage": {\n    "input_tokens": 11,\n    "output_tokens": 3,\n'
                .. '    "total_tokens": 14\n  },\n  "output": [{"content": [{"text": "hi"}]}]\n}\n'
                .. '', reported(11, 3))
        end)

        it("not a usage key nested deeper (an Anthropic tool_use input), nor one inside a string", function()
            local text = '{"content":[{"type":"tool_use","input":{"usage":{"input_tokens":999,'
                .. '"output_tokens":999}}},{"type":"text","text":"\\"usage\\":{\\"input_tokens\\":1}'
                .. ' [{\\\\"}],"note":"usage","meta":{"usage":{"input_tokens":5}},"usage":{"input_tokens":12,'
                .. '"output_tokens":6}}'
            check_all("anthropic_json", text, reported(12, 6))
            local nested_only = '{"content":[{"input":{"usage":{"input_tokens":999,"output_tokens":1}}}],'
                .. '"meta":{"usage":{"input_tokens":5,"output_tokens":5}}}'
            check_all("anthropic_json", nested_only, ESTIMATED)
            -- "usage" counts inside a top-level "response" or "message" object (the Responses API's
            -- response.completed event, scanned when too long to keep), not inside the objects after it
            check_all("openai_json", '{"response":{"id":"r","usage":{"input_tokens":4,"output_tokens":2}}}',
                reported(4, 2))
            check_all("openai_json", '{"response":{"id":"r"},'
                .. '"meta":{"usage":{"input_tokens":4,"output_tokens":2}},'
                .. '"message":[{"usage":{"input_tokens":4,"output_tokens":2}}]}', ESTIMATED)
        end)

        it("keys that only begin or end like usage are other keys", function()
            check_all("openai_json", '{"usages":{"prompt_tokens":1},"my_usage":{"prompt_tokens":2},'
                .. '"eval_counts":3,"usage":{"prompt_tokens":4,"completion_tokens":0}}', reported(4, 0))
        end)

        it("Ollama's counts as the document's last keys, or before them", function()
            check_all("ollama_json", '{"prompt_eval_count":7,"eval_count":2,"response":"x"}', reported(7, 2))
            check_all("ollama_json", '{"response":"x","prompt_eval_count" : 7 ,\n"eval_count":\t2'
                .. '}', reported(7, 2))
            check_all("ollama_json", '{"eval_count":2}', reported(0, 2))
            check_all("ollama_json", '{"prompt_eval_count":6,"eval_count":12', ESTIMATED)  -- cut: 1 or 12?
            check_all("ollama_json", '{"prompt_eval_count":"7","eval_count":2.0}', reported(0, 2))
        end)

        it("a repeated usage key: the last", function()
            check_all("openai_json", '{"usage":{"prompt_tokens":1,"completion_tokens":1},"x":[],'
                .. '"usage":{"prompt_tokens":2,"completion_tokens":2}}', reported(2, 2))
        end)

        it("the usage far from the end, with other keys ending in usage near it", function()
            -- the last 512 bytes hold only keys ending in usage": the whole text is searched then
            local pad = '"pad":"' .. string.rep("x", 600) .. '"'
            local text = '{"usage":{"prompt_tokens":3,"completion_tokens":4},' .. pad
                .. ',"my_usage":1,"last_usage":{"prompt_tokens":9}}'
            assert.same(reported(3, 4), scan("openai_json", { text }))
            -- a usage key in the last 512 bytes is the last one, however many come before
            local late = '{"usage":{"prompt_tokens":1,"completion_tokens":1},' .. pad
                .. ',"usage":{"prompt_tokens":5,"completion_tokens":6},"total_usage":2}'
            assert.same(reported(5, 6), scan("openai_json", { late }))
        end)

        it("the compact ending most servers write, and what only looks like it", function()
            local head = '{"id":"c","choices":[{"message":{"content":"}}"}}],'
            local compact = '"usage":{"prompt_tokens":250,"completion_tokens":60,"total_tokens":310}'
            check_all("openai_json", head .. compact .. "}", reported(250, 60, 310))
            check_all("openai_json", head .. compact .. "}\r\n \t", reported(250, 60, 310))
            -- the last member of a nested object, not of the document: not the usage
            check_all("openai_json", '{"meta":{' .. compact .. '}}', ESTIMATED)
            -- a count that is not a whole number of at most 15 digits is read by the general walk
            check_all("openai_json", '{"usage":{"prompt_tokens":2.5,"completion_tokens":1e1,'
                .. '"total_tokens":12}}', reported(2, 10, 12))
            check_all("openai_json", '{"usage":{"prompt_tokens":-1,"completion_tokens":4,"total_tokens":4}}',
                reported(0, 4, 4))
            check_all("openai_json", '{"usage":{"prompt_tokens":1234567890123456,"completion_tokens":4,'
                .. '"total_tokens":4}}', reported(1234567890123456, 4, 4))
            -- other members between the fixed parts
            check_all("openai_json", '{"usage":{"prompt_tokens":1,"x":2,"completion_tokens":4,'
                .. '"total_tokens":5}}', reported(1, 4, 5))
            check_all("openai_json", '{"usage":{"prompt_tokens":1,"completion_tokens":4,"total_tokens":5,'
                .. '"prompt_tokens_details":{"cached_tokens":0}}}', reported(1, 4, 5))
        end)

        it("escapes of every kind before the usage, cut anywhere", function()
            local text = '{"a":"\\\\","b":"\\"","c":"\\\\\\"}{[","d":"\\u0022usage\\u0022:{","e":["]}\\\\"],'
                .. '"usage":{"prompt_tokens":5,"completion_tokens":6,"total_tokens":11}}'
            check_all("openai_json", text, reported(5, 6))
        end)
        it("finds the top-level usage among nested decoys, cut anywhere (generated bodies)", function()
            math.randomseed(5)
            for round = 1, 300 do
                local members = {}
                for k = 1, math.random(0, 6) do
                    local key = cjson.encode("k" .. k)
                    members[#members + 1] = ws() .. key .. ws() .. ":" .. ws() .. value(1) .. ws()
                end
                local p, c = math.random(0, 100000), math.random(0, 5000)
                local format, adds
                if round % 3 == 0 then
                    format = "openai_json"
                    adds = { '"usage"' .. ws() .. ":" .. ws() .. '{"prompt_tokens":' .. p
                        .. ',"completion_tokens":' .. c .. "," .. ws() .. '"total_tokens":' .. (p + c)
                        .. ',"details":' .. value(2) .. "}" }
                elseif round % 3 == 1 then
                    format = "anthropic_json"
                    adds = { '"usage":{"input_tokens":' .. p .. ',"output_tokens":' .. c .. "}" }
                else
                    format = "ollama_json"
                    adds = { '"prompt_eval_count":' .. ws() .. p, '"eval_count"' .. ws() .. ":" .. c }
                end
                for _, add in ipairs(adds) do
                    table.insert(members, math.random(1, #members + 1), ws() .. add .. ws())
                end
                local text = ws() .. "{" .. table.concat(members, ",") .. "}" .. ws()
                assert.is_table(decode(text))
                check_all(format, text, reported(p, c),
                    { every_max = round <= 30 and 4096 or 0, random = 5, max_piece = 32 })
                -- not held whole (its first byte is gone): the walk from the last members alone finds it
                check_all(format, text, reported(p, c),
                    { every_max = 0, random = 3, max_piece = 32, tail_max = #text - 1 })
            end
        end)
    end)

    describe("bounded memory", function()
        local MB = 1024 * 1024

        -- Feeds pieces of random sizes (up to max bytes), asserting the held bytes stay within bound.
        local function stream(scanner, text, bound, max)
            math.randomseed(7)
            local i, peak = 1, 0
            while i <= #text do
                local size = math.random(1, max or 65536)
                scanner:feed(text:sub(i, i + size - 1))
                i = i + size
                peak = math.max(peak, scanner:buffered())
                assert(scanner:buffered() <= bound, "holds " .. scanner:buffered() .. " bytes")
            end
            return scanner:finish(), peak
        end

        it("a 5 MB JSON answer holds only its last bytes", function()
            local text = '{"id":"x","choices":[{"message":{"content":"' .. string.rep("lorem \\\"ipsum\\"
                .. "\" ", 5 * MB / 16)
                .. '"}}],"usage":{"prompt_tokens":10,"completion_tokens":1310720,"total_tokens":1310730}}'
            local u, peak = stream(usage.new("openai_json"), text, 2 * usage.TAIL_MAX)
            assert.same(reported(10, 1310720), { source = u.source, prompt_tokens = u.prompt_tokens,
                completion_tokens = u.completion_tokens, total_tokens = u.total_tokens })
            assert.is_true(peak >= usage.TAIL_MAX)
            -- a usage before the last tail_max bytes of a long document is not seen: estimated
            local early = '{"usage":{"prompt_tokens":1,"completion_tokens":2},"x":"' .. string.rep("y", 100)
                .. '"}'
            assert.same(ESTIMATED, scan("openai_json", { early }, { tail_max = 50 }))
            assert.same(reported(1, 2), scan("openai_json", { early }, { tail_max = 200 }))
        end)

        it("a 5 MB embeddings answer, and a value too long to be a usage is dropped", function()
            local vector = "[" .. string.rep("0.12345678,", 100000) .. "0.5]"
            local text = '{"object":"list","data":[{"embedding":' .. vector .. '},{"embedding":' .. vector
                .. '}],"model":"m","usage":{"prompt_tokens":4096,"total_tokens":4096}}'
            assert.is_true(#text > 2 * MB)
            local u = stream(usage.new("openai_json"), text, usage.CAPTURE_MAX)
            assert.same({ "reported", 4096, 0 }, { u.source, u.prompt_tokens, u.completion_tokens })
            local huge = '{"usage":{"prompt_tokens":1,"pad":"' .. string.rep("x", 100000) .. '"}}'
            local scanner = usage.new("openai_json", { tail_max = 1000 })
            assert.same("estimated", stream(scanner, huge, 2000, 300).source)
        end)

        it("a 5 MB SSE stream holds one line at most", function()
            local parts = {}
            local line = 'data: {"choices":[{"index":0,"delta":{"content":"' .. string.rep("word"
                .. " ", 50) .. '"}}]}\n\n'
            for k = 1, math.floor(5 * MB / #line) do
                parts[k] = line
            end
            parts[#parts + 1] = 'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
            local u, peak = stream(usage.new("openai_sse"), table.concat(parts), #line, 700)
            assert.same("reported", u.source)
            assert.is_true(peak < #line)
        end)

        it("a line longer than line_max is not kept; outside OpenAI SSE its usage is lost", function()
            local long = 'data: {"type":"message_delta","delta":{"text":"' .. string.rep("z", 5 * MB)
                .. '"},"usage":{"output_tokens":9}}\n\n'
            local start = 'data: {"type":"message_start","message":{"usage":{"input_tokens":1}}}\n\n'
            local u = stream(usage.new("anthropic_sse"), start .. long, usage.LINE_MAX)
            assert.same("estimated", u.source)
            assert.same(ESTIMATED, scan("anthropic_sse", { start .. long }))   -- also when it came whole
            local ndjson = '{"done":true,"pad":"' .. string.rep("z", 5 * MB) .. '","eval_count":3}\n'
            assert.same("estimated", stream(usage.new("ollama_ndjson"), ndjson, usage.LINE_MAX).source)
            -- what follows the long line is read again
            local after = stream(usage.new("anthropic_sse"), start .. long
                .. 'data: {"type":"message_delta","usage":{"output_tokens":4}}\n\n', usage.LINE_MAX)
            assert.same(reported(1, 4), { source = after.source, prompt_tokens = after.prompt_tokens,
                completion_tokens = after.completion_tokens, total_tokens = after.total_tokens })
        end)

        it("OpenAI SSE: a response.completed longer than line_max is scanned as it passes", function()
            local text = fixture("openai_responses_stream.sse")
            local expected = reported(6, 3, 9, { cache_read_tokens = 0 })
            -- a small line_max: every event line overflows it, at every cut
            check_all("openai_sse", text, expected, { line_max = 64, every_max = 0, random = 50 })
            check_all("openai_sse", crlf(text), expected, { line_max = 200, random = 10 })
            local output = string.rep("x", 3 * MB)
            local big = 'event: response.completed\ndata: {"type":"response.completed","response":{"id":"r",'
                .. '"output":[{"content":[{"text":"' .. output .. '"}]}],"usage":{"input_tokens":8,'
                .. '"output_tokens":750000,"total_tokens":750008},"metadata":{}},"sequence_number":9}\n\n'
            local u = stream(usage.new("openai_sse"), big, usage.LINE_MAX)
            assert.same({ "reported", 8, 750000 }, { u.source, u.prompt_tokens, u.completion_tokens })
            -- and the chat usage chunk too
            check_all("openai_sse", fixture("openai_chat_stream_usage.sse"), reported(6, 3),
                { line_max = 16, every_max = 0 })
        end)
    end)

    describe("openai_sse_filter", function()
        local function run(filter, pieces)
            local out = {}
            for _, piece in ipairs(pieces) do
                out[#out + 1] = filter:feed(piece)
            end
            out[#out + 1] = filter:finish()
            return table.concat(out)
        end

        it("without stripping passes every chunk on as it came, and records the usage", function()
            local names = { "openai_chat_stream_usage.sse", "openai_chat_stream.sse",
                            "openai_responses_stream.sse", "openai_chat_stream_usage_cut.sse" }
            for _, name in ipairs(names) do
                local text = fixture(name)
                for _, pieces in ipairs(chunkings(text)) do
                    local filter = usage.openai_sse_filter(false)
                    for _, piece in ipairs(pieces) do
                        assert.equal(piece, filter:feed(piece))
                    end
                    assert.equal("", filter:finish())
                end
                local filter = usage.openai_sse_filter(false)
                assert.equal(text, run(filter, { text }))
                assert.same(scan("openai_sse", { text }).source, filter:usage().source)
            end
            -- the Responses API has no stream_options: stripping changes none of its events
            local responses = fixture("openai_responses_stream.sse")
            assert.equal(responses, run(usage.openai_sse_filter(true), { responses }))
            local filter = usage.openai_sse_filter(false)
            run(filter, { fixture("openai_chat_stream_usage.sse") })
            assert.same({ 6, 3 }, { filter:usage().prompt_tokens, filter:usage().completion_tokens })
        end)

        it("stripping gives the client the stream it asked for, byte for byte", function()
            local pairs_ = { { "openai_chat_stream_usage.sse", "openai_chat_stream.sse" },
                             { "openai_completions_stream_usage.sse", "openai_completions_stream.sse" } }
            for _, pair in ipairs(pairs_) do
                local with, without = fixture(pair[1]), normalized(fixture(pair[2]))
                for _, text in ipairs({ with, crlf(with) }) do
                    local expected = text == with and without or crlf(without)
                    for _, pieces in ipairs(chunkings(text, { every_max = #with })) do
                        local filter = usage.openai_sse_filter(true)
                        local out = run(filter, pieces)
                        if normalized(out) ~= expected then
                            assert.same(expected, normalized(out))
                        end
                        local u = filter:usage()
                        assert.same({ "reported", 6, 3, #text },
                            { u.source, u.prompt_tokens, u.completion_tokens, u.bytes })
                    end
                end
            end
        end)

        it("takes out only the usage-only chunk, with its comments and blank line", function()
            local head = ": hi\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"usage\"}}]}\n\n"
            local tail = "data: [DONE]\n\n"
            local only = "id: 7\n: about to report\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,"
                .. "\"completion_tokens\":4}}\n\n"
            local kept = "data: {\"choices\":[{\"delta\":{}}],"
                .. "\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n"
            for _, pieces in ipairs(chunkings(head .. kept .. only .. tail)) do
                local filter = usage.openai_sse_filter(true)
                assert.same(head .. kept .. tail, run(filter, pieces))
                assert.same({ 3, 4 }, { filter:usage().prompt_tokens, filter:usage().completion_tokens })
            end
        end)

        it("reads a usage-only chunk without decoding it, and only such a chunk", function()
            local function only(data)
                local r = usage.usage_only(data)
                return r and { r.prompt_tokens, r.completion_tokens, r.total_tokens }
            end
            assert.same({ 5, 2, 7 }, only('{"id":"c","choices":[],"usage":{"prompt_tokens":5,'
                .. '"completion_tokens":2,"total_tokens":7}}'))
            assert.same({ 5, 2, 7 }, only('{"choices":[],"id":"c","usage":{"prompt_tokens":5,'
                .. '"completion_tokens":2,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":3}}} '))
            for _, data in ipairs({
                '{"choices":[{"delta":{}}],"usage":{"prompt_tokens":5,"completion_tokens":2}}',
                '{"a":{"choices":[]},"usage":{"prompt_tokens":5,"completion_tokens":2}}',
                '{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2},"choices":[1]}',
                '{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2},"x":1}',
                '{"choices":[],"usage":null}',
                '{"choices":[],"usage":{"prompt_tokens":-5}}',
                '{"choices":[],"a":"\\"usage\\":{\\"prompt_tokens\\":5}"}',
                '{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}',
            }) do
                assert.is_nil(only(data), data)
            end
        end)

        it("takes a top-level \"usage\":null out of every chunk, and nothing else", function()
            local cases = {
                { '{"a":1,"usage":null}', '{"a":1}' },
                { '{"usage":null,"a":1}', '{"a":1}' },
                { '{"a":1, "usage" : null ,"b":2}', '{"a":1 ,"b":2}' },
                { '{"usage":null}', "{}" },
                { '{ "usage": null, "b": [] }', '{ "b": [] }' },
                { '{"a":{"usage":null},"b":"\\"usage\\":null"}', '{"a":{"usage":null},"b":"\\"usage\\":n'
                    .. 'ull"}' },
                { '{"a":"usage","usage":nullx}', '{"a":"usage","usage":nullx}' },
                { '{"usage":0}', '{"usage":0}' },
            }
            for _, case in ipairs(cases) do
                assert.same(case[2], usage.without_null_usage(case[1]))
                local filter = usage.openai_sse_filter(true)
                local out = run(filter, { "data: " .. case[1] .. "\r\n\r\n" })
                assert.same("data: " .. case[2] .. "\r\n\r\n", out)
            end
        end)

        it("strips exactly what the gateway added and passes all else (generated streams)", function()
            math.randomseed(77)
            for round = 1, 200 do
                local eol = math.random(1, 2) == 1 and "\n" or "\r\n"
                local injected, plain = {}, {}
                local function both(with, without)
                    injected[#injected + 1] = with
                    plain[#plain + 1] = without or with
                end
                if math.random(1, 4) == 1 then     -- Azure's first chunk: no choices, no usage
                    both('data: {"choices":[],"created":0,"id":"","model":"","object":"",'
                        .. '"prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}]}'
                        .. eol .. eol)
                end
                for k = 1, math.random(1, 8) do
                    local r = math.random(1, 6)
                    if r == 1 then
                        both(": ping" .. eol .. eol)
                    elseif r == 2 then
                        both("event: x" .. eol .. "id: " .. k .. eol .. 'data: {"a":' .. value(2) .. "}"
                            .. eol .. eol)
                    elseif r == 3 then
                        local chunk = '"id":"c","choices":[{"index":0,"delta":{"content":' .. str() .. "}}]"
                        both('data: {"usage":null,' .. chunk .. "}" .. eol .. eol,
                            "data: {" .. chunk .. "}" .. eol .. eol)
                    else
                        local chunk = 'data: {"id":"c","choices":[{"index":0,"delta":{"content":' .. str()
                            .. "}}]"
                        both(chunk .. ',"usage":null}' .. eol .. eol, chunk .. "}" .. eol .. eol)
                    end
                end
                both((math.random(1, 3) == 1 and ": usage next" .. eol or "")
                    .. 'data: {"id":"c","choices":[],"usage":{"prompt_tokens":' .. round
                    .. ',"completion_tokens":3}}'
                    .. eol .. eol, "")
                both("data: [DONE]" .. eol .. eol)
                local text, expected = table.concat(injected), table.concat(plain)
                local opts = { every_max = round <= 20 and 4096 or 0, random = 10, max_piece = 40 }
                for _, pieces in ipairs(chunkings(text, opts)) do
                    local filter = usage.openai_sse_filter(true)
                    local out = run(filter, pieces)
                    if out ~= expected then
                        assert.same(expected, out)
                    end
                    local u = filter:usage()
                    assert.same({ round, 3 }, { u.prompt_tokens, u.completion_tokens })
                    assert.same(text, run(usage.openai_sse_filter(false), pieces))
                end
            end
        end)

        it("passes a line longer than line_max on as it comes, holding at most line_max bytes", function()
            local long = 'data: {"choices":[{"delta":{"content":"' .. string.rep("y", 5000) .. '"}}],"us'
                .. 'age":null}\n\n'
            local text = ": x\n" .. long .. fixture("openai_chat_stream_usage.sse")
            for _, pieces in ipairs(chunkings(text, { every_max = 0, max_piece = 700 })) do
                local filter = usage.openai_sse_filter(true, { line_max = 1000 })
                local out = {}
                for _, piece in ipairs(pieces) do
                    out[#out + 1] = filter:feed(piece)
                    assert(filter:buffered() <= 1000 + 700, "holds " .. filter:buffered())
                end
                out[#out + 1] = filter:finish()
                assert.same(normalized(": x\n" .. long .. fixture("openai_chat_stream.sse")),
                    normalized(table.concat(out)))
            end
        end)

        it("a stream cut before its usage: the rest passed on at finish, usage estimated", function()
            local text = fixture("openai_chat_stream_usage_cut.sse") .. 'data: {"choices":[{"delta"'
            for _, pieces in ipairs(chunkings(text, { every_max = 0 })) do
                local filter = usage.openai_sse_filter(true)
                local out = run(filter, pieces)
                local _, nulls = text:gsub(',"usage":null', "")
                assert.same(#text - 13 * nulls, #out)       -- each ,"usage":null taken out
                assert.is_true(nulls >= 2)
                assert.same("estimated", filter:usage().source)
            end
        end)
    end)

    describe("with_include_usage", function()
        local INCLUDE = '"stream_options":{"include_usage":true},'

        it("adds stream_options right after the opening brace of a streamed request", function()
            local body = ' {"model":"gpt-4o","messages":[{"role":"user","content":"{\\"stream\\":false}"}],'
                .. '"stream":true}\n'
            assert.same(' {' .. INCLUDE .. body:sub(3), usage.with_include_usage(body))
            local spaced = '{\n "stream" : true }'
            assert.same('{' .. INCLUDE .. '\n "stream" : true }', usage.with_include_usage(spaced))
        end)

        it("merges into a stream_options the client sent without include_usage", function()
            local cases = {
                { '{"stream":true,"stream_options":{}}', '{"stream":true,"stream_options":{"include_usag'
                    .. 'e":true}}' },
                { '{"stream_options":{"include_obfuscation":false},"stream":true}',
                  '{"stream_options":{"include_usage":true,"include_obfuscation":false},"stream":true}' },
                { '{"stream":true,"stream_options": { } }',
                  '{"stream":true,"stream_options": {"include_usage":true } }' },
                { '{"stream":true,"stream_options":null}', '{"stream":true,"stream_options":{"include_us'
                    .. 'age":true}}' },
                { '{"stream":true,"stream_options":{"include_usage":false}}',
                  '{"stream":true,"stream_options":{"include_usage":true}}' },
                { '{"stream":true,"stream_options":{"a":[1],"include_usage" : null }}',
                  '{"stream":true,"stream_options":{"a":[1],"include_usage" : true }}' },
            }
            for _, case in ipairs(cases) do
                assert.same(case[2], usage.with_include_usage(case[1]))
            end
        end)

        it("leaves alone what it should not touch (nil)", function()
            local bodies = {
                '{"model":"m","messages":[]}',                               -- not streaming
                '{"stream":false}',
                '{"stream":"true"}',
                '{"stream":1}',
                '{"stream":true,"stream":false}',                            -- the last one counts
                '{"options":{"stream":true}}',                               -- not at the top
                '{"stream":true,"stream_options":{"include_usage":true}}',   -- asked for already
                '{"stream":true,"stream_options":{"include_usage":"yes"}}',  -- the provider's 400
                '{"stream":true,"stream_options":true}',
                '{"stream":true,"stream_options":{},"stream_options":{}}',   -- which one?
                '{"stream":true,"stream_options":{"include_usage":false,"include_usage":false}}',
                '{"stream":true,"str\\u0065am_options":{}}',                 -- a key with an escape
                '{"stream":true,"stream_options":{"include_\\u0075sage":false}}',
                '{"stream":true', '{"stream":true,}', '{"stream":true} x', '["stream",true]', "", "null",
                '{"stream":true,"a":[1,2}', '{"stream":true,"a":"\\', '{"stream"true}',
            }
            for _, body in ipairs(bodies) do
                assert.same({ body }, { body, usage.with_include_usage(body) })
            end
            assert.is_nil(usage.with_include_usage(nil))
        end)

        it("gw.body.member_span walks as gw.body.members does (generated objects, whole and cut)", function()
            local body = require("gw.body")
            math.randomseed(7)
            local keys = { '"choices"', '"usage"', '"id"', '"choices\\u0041"', '"c"' }
            for _ = 1, 2000 do
                local members = {}
                for k = 1, math.random(0, 6) do
                    local key = keys[math.random(1, #keys)]
                    members[k] = ws() .. key .. ws() .. ":" .. ws() .. value(1) .. ws()
                end
                local text = ws() .. "{" .. table.concat(members, ",") .. "}" .. ws()
                for _, t in ipairs({ text, text:sub(1, math.random(0, #text)) }) do
                    local open = t:find("{", 1, true) or 1
                    local list = body.members(t, open)
                    local vs, ve = body.member_span(t, open, "choices")
                    if not list then
                        assert.is_nil(vs, t)
                    else
                        local last = false
                        for _, m in ipairs(list) do
                            if m.key == "choices" then
                                last = m
                            end
                        end
                        assert.same(last and { last.vs, last.ve } or { false }, { vs, ve }, t)
                    end
                end
            end
        end)

        it("changes no other byte and no other field (generated bodies)", function()
            math.randomseed(2024)
            for _ = 1, 2000 do
                local members = {}
                for k = 1, math.random(0, 6) do
                    local key = ({ '"model"', '"messages"', '"n"', '"temperature"', '"tools"', '"user"' })[k]
                    members[#members + 1] = ws() .. key .. ws() .. ":" .. ws() .. value(1) .. ws()
                end
                local at = math.random(1, #members + 1)
                table.insert(members, at, ws() .. '"stream"' .. ws() .. ":" .. ws() .. "true" .. ws())
                local body = ws() .. "{" .. table.concat(members, ",") .. "}" .. ws()
                local with = usage.with_include_usage(body)
                assert.is_string(with, body)
                local open = body:find("{", 1, true)
                assert.same(body, with:sub(1, open) .. with:sub(open + 1 + #INCLUDE))
                local expected = decode(body)
                expected.stream_options = { include_usage = true }
                assert.same(expected, decode(with))
                assert.is_nil(usage.with_include_usage(with))            -- asked for, now
                -- and a body that does not stream is left alone
                local still = body:gsub('"stream"(%s*):(%s*)true', '"stream"%1:%2false')
                assert.is_nil(usage.with_include_usage(still))
            end
        end)

        it("and merging keeps every other option (generated bodies)", function()
            math.randomseed(99)
            for _ = 1, 500 do
                local options = {}
                for k = 1, math.random(0, 3) do
                    options[k] = ws() .. '"opt' .. k .. '"' .. ws() .. ":" .. ws() .. value(2) .. ws()
                end
                local body = '{"model":"m",' .. ws() .. '"stream_options"' .. ws() .. ":" .. ws() .. "{"
                    .. table.concat(options, ",") .. "}" .. ws() .. ',"stream":true}'
                local with = usage.with_include_usage(body)
                local expected = decode(body)
                expected.stream_options.include_usage = true
                assert.same(expected, decode(with))
                assert.same(#body + #'"include_usage":true' + (#options > 0 and 1 or 0), #with)
            end
        end)
    end)
end)
