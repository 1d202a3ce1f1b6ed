-- gw.body: the top-level "model" of a JSON request body (nginx/lua/gw/body.lua).
local body = require("gw.body")
local ERR = body.ERR

-- model(text) as one value for assert.same: the model, or {err = ...}.
local function scan(text)
    local model, err = body.model(text)
    if model == nil then
        return { err = err }
    end
    return model
end

describe("gw.body.model", function()
    it("runs under OpenResty's LuaJIT 2.1 (Debian's luajit2), which libnginx-mod-http-lua prefers", function()
        assert.is_table(jit)
        assert.matches("^LuaJIT 2%.1", jit.version)
        assert.is_true(pcall(require, "table.isempty"))  -- only OpenResty's branch has it
    end)

    describe("finds the top-level model", function()
        it("alone", function()
            assert.same("llama3", scan('{"model":"llama3"}'))
        end)

        it("among other keys, after nested values and with whitespace everywhere", function()
            local text = ' \t\r\n{ "messages" : [ {"role":"user","content":"hi { [ \\" } ]"} ] ,'
                .. '\n"model"\t:\r"m:latest" , "stream" : true , "n" : -1.5e+3 , "x" : null } \n'
            assert.same("m:latest", scan(text))
        end)

        it("and not a model key inside a nested object or array", function()
            assert.same("top", scan('{"a":{"model":"inner"},"b":[{"model":"x"}],"model":"top"}'))
            assert.same({ err = ERR.no_model }, scan('{"a":{"model":"inner"},"b":[{"model":"x"}]}'))
        end)

        it("and not a string value that looks like a model key", function()
            assert.same({ err = ERR.no_model }, scan('{"content":"\\"model\\":\\"x\\"","a":"model"}'))
        end)

        it("after numbers and literals of every form JSON has", function()
            local text = '{"a":-0,"b":0.0,"c":1E5,"d":12e-3,"e":-7.25E+10,'
                .. '"f":true,"g":false,"h":null,"model":"m"}'
            assert.same("m", scan(text))
        end)

        it("the empty string as the model (the router decides what a name may be)", function()
            assert.same("", scan('{"model":""}'))
        end)

        it("with raw control characters in strings (as Python's json, strict=False; the backend decides)",
            function()
                assert.same("a\nb\0", scan('{"model":"a\nb\0"}'))
                assert.same("m", scan('{"a":{"b":"\1\t\31"},"model":"m"}'))
            end)

        it("with NaN and Infinity inside strings, keys and values, nested or not", function()
            local text = '{"NaN":"Infinity","a":[{"NaN":["NaN","-Infinity","x NaN y"]}],'
                .. '"b":{"Infinity":"\\"NaN"},"model":"m"}'
            assert.same("m", scan(text))
        end)

        it("with brackets, braces and escaped quotes or backslashes inside strings", function()
            assert.same("m", scan('{"a":["]","}","[","{","\\"]","\\\\"],"b":"x\\\\","model":"m"}'))
            assert.same('\\"', scan('{"model":"\\\\\\""}'))
            assert.same("m", scan('{"model":"m","a":"\\n"}'))
        end)

        it("after many containers and a brace only at the end", function()
            local text = '{' .. string.rep('"k":[1,[2]],', 20000) .. '"model":"m","z":{}}'
            assert.same("m", scan(text))
        end)

        it("after long runs of numbers inside containers, with structure after them", function()
            local run = string.rep("-1.5e3, 7 ,", 50)
            assert.same("m", scan('{"a":[' .. run .. '{"b":"]"},' .. run .. '[' .. run .. '0]],"model":"m"}'))
            assert.same({ err = ERR.invalid }, scan('{"a":[' .. run .. '1},"model":"m"}'))
            assert.same({ err = ERR.invalid }, scan('{"a":[' .. run .. '1'))
        end)

        it("when the body holds many long strings", function()
            local long = string.rep("abc \\\" \\\\ ", 10000)
            assert.same("m", scan('{"messages":[{"content":"' .. long .. '"}],"model":"m"}'))
        end)
    end)

    describe("decodes the model's escapes", function()
        it("the short ones", function()
            assert.same('a"b\\c/d\be\ff\ng\rh\ti', scan('{"model":"a\\"b\\\\c\\/d\\be\\ff\\ng\\rh\\ti"}'))
        end)

        it("\\u escapes to UTF-8, in either case of hex digit", function()
            assert.same("A\0\xC3\xA9\xE2\x82\xAC", scan('{"model":"\\u0041\\u0000\\u00E9\\u20ac"}'))
        end)

        it("a surrogate pair to one four-byte character", function()
            assert.same("\xF0\x9F\x98\x80", scan('{"model":"\\ud83d\\ude00"}'))
            assert.same("\xF4\x8F\xBF\xBF", scan('{"model":"\\uDBFF\\uDFFF"}'))
        end)

        it("a lone surrogate to its three-byte form", function()
            assert.same("\xED\xA0\xBDx", scan('{"model":"\\ud83dx"}'))
            assert.same("\xED\xB8\x80", scan('{"model":"\\ude00"}'))
            assert.same("\xED\xA0\xBD\xED\xA0\xBD", scan('{"model":"\\ud83d\\ud83d"}'))
        end)

        it("and leaves raw UTF-8 as it is", function()
            assert.same("mod\xC3\xA8le-\xF0\x9F\x98\x80", scan('{"model":"mod\xC3\xA8le-\xF0\x9F\x98\x80"}'))
        end)
    end)

    describe("refuses a repeated top-level model", function()
        it("spelled the same", function()
            assert.same({ err = ERR.repeated }, scan('{"model":"lm","model":"m"}'))
        end)

        it("spelled with \\u escapes", function()
            assert.same({ err = ERR.repeated }, scan('{"model":"lm","mod\\u0065l":"m"}'))
            assert.same({ err = ERR.repeated }, scan('{"\\u006D\\u006f\\u0064\\u0065\\u006c":1,"model":"m"}'))
        end)

        it("whatever the values are", function()
            assert.same({ err = ERR.repeated }, scan('{"model":null,"model":"m"}'))
            assert.same({ err = ERR.repeated }, scan('{"model":"m","x":1,"model":{"a":[]}}'))
        end)

        it("but takes a key that only resembles model", function()
            assert.same("m", scan('{"models":"x","Model":"y","mode":"z","mod\\u0065l2":1,"model":"m"}'))
        end)
    end)

    describe("says the model is not a string", function()
        for _, value in ipairs({ "1", "-0.5e+3", "true", "false", "null", "{}", '{"model":"m"}', '["m"]' }) do
            it("for " .. value, function()
                assert.same({ err = ERR.not_string }, scan('{"model":' .. value .. '}'))
            end)
        end
    end)

    describe("says the body is not an object", function()
        local texts = { "[]", '["model","m"]', '"model"', "1", "null", " true ", '[{"model":"m"}]' }
        for _, text in ipairs(texts) do
            it("for " .. text, function()
                assert.same({ err = ERR.not_object }, scan(text))
            end)
        end
    end)

    describe("says the body is not JSON", function()
        local cases = {
            ["empty"] = "",
            ["only whitespace"] = " \n\t\r",
            ["unbalanced"] = '{"model":"m"',
            ["unbalanced nested"] = '{"model":"m","a":[{"b":1}}',
            ["mismatched brackets"] = '{"a":[1},"model":"m"}',
            ["a closing bracket too many"] = '{"a":[1]]}',
            ["unterminated string"] = '{"model":"m',
            ["unterminated nested string"] = '{"model":"m","a":["x]}',
            ["an escaped quote that does not end the string"] = '{"model":"m\\"}',
            ["a bad escape"] = '{"model":"\\x41"}',
            ["a short \\u escape"] = '{"model":"\\u41"}',
            ["a bad escape in a nested string"] = '{"model":"m","a":["\\q"]}',
            ["text after the object"] = '{"model":"m"} x',
            ["a second object"] = '{"model":"m"}{"model":"n"}',
            ["a key without a value"] = '{"model"}',
            ["a key without a colon"] = '{"model" "m"}',
            ["a missing comma"] = '{"model":"m" "a":1}',
            ["a trailing comma"] = '{"model":"m",}',
            ["a leading comma"] = '{,"model":"m"}',
            ["a key that is not a string"] = '{model:"m"}',
            ["a number key"] = '{1:"m"}',
            ["a leading zero"] = '{"model":"m","n":01}',
            ["a bare minus"] = '{"model":"m","n":-}',
            ["a bare dot"] = '{"model":"m","n":1.}',
            ["an empty exponent"] = '{"model":"m","n":1e}',
            ["NaN"] = '{"model":"m","n":NaN}',
            ["Infinity"] = '{"model":"m","n":Infinity}',
            ["NaN nested in an array"] = '{"model":"m","messages":[{"role":"user"},[1,NaN]]}',
            ["NaN nested in an object"] = '{"a":{"b":{"c":NaN}},"model":"m"}',
            ["-Infinity nested"] = '{"model":"m","logit_bias":{"1":-Infinity}}',
            ["Infinity after a nested string"] = '{"model":"m","a":["x", Infinity ]}',
            ["NaN after a string that names NaN"] = '{"model":"m","a":["NaN",NaN]}',
            ["a misspelt literal"] = '{"model":"m","n":tru}',
            ["a literal cut short at the end"] = '{"model":"m","n":fals',
            ["a literal run on"] = '{"model":"m","n":nullx}',
            ["an exponent sign without digits"] = '{"model":"m","n":1e+}',
            ["a plus sign"] = '{"model":"m","n":+1}',
            ["single quotes"] = "{'model':'m'}",
            ["a byte-order mark"] = '\xEF\xBB\xBF{"model":"m"}',
            ["garbage"] = "model=m",
            ["an unbalanced array at the top"] = '[1,2',
        }
        for name, text in pairs(cases) do
            it(name, function()
                assert.same({ err = ERR.invalid }, scan(text))
            end)
        end

        it("no body at all (nil: nginx read none)", function()
            assert.same({ err = ERR.invalid }, scan(nil))
        end)

        it("before it names a repeated model", function()
            assert.same({ err = ERR.invalid }, scan('{"model":"a","model":"b"'))
        end)
    end)

    describe("refuses nesting deeper than MAX_DEPTH", function()
        local function nested(n)
            return '{"model":"m","a":' .. string.rep("[", n - 1) .. string.rep("]", n - 1) .. "}"
        end

        it("and takes MAX_DEPTH itself", function()
            assert.same("m", scan(nested(body.MAX_DEPTH)))
        end)

        it("one more", function()
            assert.same({ err = ERR.too_deep }, scan(nested(body.MAX_DEPTH + 1)))
        end)

        it("however deep the body goes, without running out of stack", function()
            assert.same({ err = ERR.too_deep }, scan(string.rep("[", 1000000)))
        end)
    end)

    describe("says whether the body streams (the fifth value)", function()
        local function streams(text)
            return select(5, body.model(text))
        end

        it("true only for a top-level stream that is true", function()
            assert.is_true(streams('{"model":"m","stream":true}'))
            assert.is_true(streams('{ "stream" : true ,"model":"m"}'))
            assert.is_false(streams('{"model":"m","stream":false}'))
            assert.is_false(streams('{"model":"m"}'))
            assert.is_false(streams('{"model":"m","stream":"true"}'))
            assert.is_false(streams('{"model":"m","stream":null}'))
            assert.is_false(streams('{"model":"m","a":{"stream":true},"b":[{"stream":true}]}'))
            assert.is_false(streams('{"model":"m","x":"\\"stream\\":true"}'))
        end)

        it("the last stream counting, as for gw.usage.with_include_usage", function()
            assert.is_false(streams('{"stream":true,"model":"m","stream":false}'))
            assert.is_true(streams('{"stream":false,"model":"m","stream":true}'))
        end)

        it("not for keys that only resemble stream, nor one written with escapes", function()
            assert.is_false(streams('{"model":"m","streams":true,"strea":true,"Stream":true}'))
            assert.is_false(streams('{"model":"m","str\\u0065am":true}'))
        end)

        it("nothing for a body refused", function()
            assert.is_nil(streams('{"model":"m","stream":tru}'))
            assert.is_nil(streams('{"stream":true}'))
        end)
    end)

    it("keeps no state between calls", function()
        assert.same({ err = ERR.invalid }, scan('{"a":[[[{"b":1'))
        assert.same("m", scan('{"a":[{}],"model":"m"}'))
        assert.same({ err = ERR.repeated }, scan('{"model":"a","model":"b"}'))
        assert.same("b", scan('{"model":"b"}'))
    end)
end)
