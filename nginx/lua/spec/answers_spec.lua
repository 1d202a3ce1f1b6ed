-- gw.answers: the gateway's own answers as JSON text (nginx/lua/gw/answers.lua).
local answers = require("gw.answers")
local cjson = require("cjson")

local decode = cjson.decode

describe("gw.answers", function()
    describe("quote", function()
        it("is a JSON string literal that keeps '/' as it is", function()
            assert.same('"/v1/chat/completions"', answers.quote("/v1/chat/completions"))
            assert.same('"a\\\\/b"', answers.quote("a\\/b"))  -- a backslash before a slash stays escaped
            assert.same("a\\/b", decode(answers.quote("a\\/b")))
        end)

        it("escapes quotes and control characters", function()
            local text = 'say "hi"\n\t\1'
            assert.same(text, decode(answers.quote(text)))
            assert.is_nil(answers.quote(text):find("\n", 1, true))
        end)
    end)

    describe("shown", function()
        it("quotes a short value whole", function()
            assert.same('"llama3"', answers.shown("llama3"))
        end)

        it("cuts a long value to ECHO_MAX bytes and marks the cut", function()
            local shown = decode(answers.shown(string.rep("x", 10000)))
            assert.same(string.rep("x", answers.ECHO_MAX) .. "\226\128\166", shown)
        end)

        it("never cuts a UTF-8 character in two", function()
            -- 255 ASCII bytes, then two-byte characters: byte 256 starts one, 257 ends it
            local text = string.rep("a", 255) .. string.rep("\195\169", 10)
            local shown = decode(answers.shown(text))
            assert.same(string.rep("a", 255) .. "\226\128\166", shown)
            local three = string.rep("a", 254) .. string.rep("\226\130\172", 5)  -- euro signs
            assert.same(string.rep("a", 254) .. "\226\128\166", decode(answers.shown(three)))
        end)

        it("shows a non-string as text", function()
            assert.same('"12"', answers.shown(12))
        end)
    end)

    describe("error_body", function()
        it("speaks OpenAI's format by default", function()
            local body = decode(answers.error_body("openai", 404, "not_found_error", "no such model"))
            assert.same({ error = { message = "no such model", type = "not_found_error", param = cjson.null,
                                    code = "404" } }, body)
        end)

        it("speaks Anthropic's format", function()
            local body = decode(answers.error_body("anthropic", 429, "rate_limit_error", "slow down"))
            assert.same({ type = "error", error = { type = "rate_limit_error", message = "slow down" } },
                body)
        end)

        it("speaks Ollama's format", function()
            local body = answers.error_body("ollama", 400, "invalid_request_error", "bad")
            assert.same({ error = "bad" }, decode(body))
        end)

        it("adds available_models as a list, also an empty one", function()
            local body = answers.error_body("openai", 404, "not_found_error", "m", { "a", "b/c" })
            assert.same({ "a", "b/c" }, decode(body).available_models)
            local empty = answers.error_body("ollama", 404, "not_found_error", "m", {})
            assert.matches('"available_models":%[%]', empty)
            assert.same({ error = "m", available_models = {} }, decode(empty))
        end)

        it("keeps a hostile message inside its string", function()
            local message = '"}],"x":1,{"' .. "\0\r\n"
            local body = decode(answers.error_body("openai", 400, "invalid_request_error", message))
            assert.same(message, body.error.message)
            assert.is_nil(body.x)
        end)
    end)

    describe("listings", function()
        it("OpenAI's /v1/models", function()
            local body = decode(answers.openai_models({ "a", "b" }, 1700000001))
            assert.same("list", body.object)
            assert.same({ id = "b", object = "model", created = 1700000001, owned_by = "ish-gateway" },
                body.data[2])
            assert.matches('"data":%[%]', answers.openai_models({}, 1))
        end)

        it("Anthropic's /v1/models, with first and last ids (null when empty)", function()
            local body = decode(answers.anthropic_models({ "claude-a", "claude-b" }))
            assert.same({ "claude-a", "claude-b", false }, { body.first_id, body.last_id, body.has_more })
            assert.same({ type = "model", id = "claude-a", display_name = "claude-a",
                          created_at = "1970-01-01T00:00:00Z" }, body.data[1])
            local empty = decode(answers.anthropic_models({}))
            assert.same({ cjson.null, cjson.null }, { empty.first_id, empty.last_id })
        end)

        it("Ollama's /api/tags", function()
            local body = decode(answers.ollama_tags({ "llama3:latest" }))
            assert.same("llama3:latest", body.models[1].name)
            assert.same("llama3:latest", body.models[1].model)
            assert.same(cjson.null, body.models[1].details.families)
            assert.matches('"models":%[%]', answers.ollama_tags({}))
        end)
    end)

    describe("binding_limit", function()
        local retry = {
            ip = 6000,
            conn_key = 256,
            conn_ip = 512,
            classes = {
                chat = { rpm = 3000, all = false, setting = "ISHGW_LIMIT_CHAT_RPM" },
                embeddings = { rpm = 30, all = true, setting = "ISHGW_LIMIT_EMBEDDINGS_RPM" },
            },
        }

        it("names the connection limit that said no", function()
            local wait, text = answers.binding_limit(retry, true, "60", true, "chat")
            assert.same(1, wait)
            assert.matches("256 requests in progress %(ISHGW_LIMIT_CONN_PER_KEY%)", text)
            local _, anonymous = answers.binding_limit(retry, false, "", true, "chat")
            assert.matches("512 requests in progress without a valid key (ISHGW_LIMIT_CONN_PER_IP)",
                anonymous, 1, true)
        end)

        it("a keyed client meets its key's rate, not a default class rate", function()
            local wait, text = answers.binding_limit(retry, true, "6", false, "chat")
            assert.same(10, wait)
            assert.matches("the limit of 6 requests per minute of this key or token", text, 1, true)
        end)

        it("a class rate an operator set binds keyed clients when it is the lower", function()
            local wait, text = answers.binding_limit(retry, true, "600", false, "embeddings")
            assert.same(2, wait)
            assert.matches("30 requests per minute for this endpoint class per key "
                .. "(ISHGW_LIMIT_EMBEDDINGS_RPM)", text, 1, true)
        end)

        it("an anonymous client meets the per-address and default class rates", function()
            local wait, text = answers.binding_limit(retry, false, "", false, "chat")
            assert.same(1, wait)
            assert.matches("3000 requests per minute for this endpoint class per address without a valid key",
                text, 1, true)
            local _, other = answers.binding_limit(retry, false, "", false, nil)
            assert.matches("6000 requests per minute per address without a valid key (ISHGW_LIMIT_IP_RPM)",
                other, 1, true)
        end)

        it("a key without a rate and no class says so generally", function()
            local wait, text = answers.binding_limit(retry, true, "", false, "chat")
            assert.same({ 1, "a rate limit of this gateway" }, { wait, text })
        end)
    end)
end)
