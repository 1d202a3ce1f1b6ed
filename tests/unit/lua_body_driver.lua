-- gw.body.model for tests/unit/test_lua_body.py, one process for the whole test session.
-- Usage: luajit lua_body_driver.lua <repository root>. Reads "<length>\n<length bytes>" from stdin and
-- answers "ok <length>\n<the model's bytes>" or "err <name>\n", until stdin closes.
package.path = arg[1] .. "/nginx/lua/?.lua;" .. package.path
local body = require("gw.body")

local stdin, stdout = io.stdin, io.stdout
while true do
    local line = stdin:read("*l")
    if not line then
        break
    end
    local length = assert(tonumber(line), "a length line")
    local text = length == 0 and "" or assert(stdin:read(length), "the body")
    local model, err = body.model(text)
    if model then
        stdout:write("ok ", #model, "\n", model)
    else
        stdout:write("err ", err, "\n")
    end
    stdout:flush()
end
