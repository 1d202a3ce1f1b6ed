-- luacheck's settings for the Lua request path (nginx/lua/): `luacheck nginx/lua` from the repository root.
std = "ngx_lua"            -- LuaJIT 2.1 plus the ngx API of lua-nginx-module
max_line_length = 110      -- as ruff's for the Python
-- Pure modules: no ngx.* (busted runs them under plain LuaJIT), so only LuaJIT's globals are known.
files["nginx/lua/gw/body.lua"] = { std = "luajit" }
files["nginx/lua/gw/crypto.lua"] = { std = "luajit" }
files["nginx/lua/gw/identity.lua"] = { std = "luajit" }
files["nginx/lua/gw/answers.lua"] = { std = "luajit" }
files["nginx/lua/gw/usage.lua"] = { std = "luajit" }
files["nginx/lua/gw/tally.lua"] = { std = "luajit" }
files["nginx/lua/gw/limits.lua"] = { std = "luajit" }
files["nginx/lua/spec"] = { std = "+busted" }
files["nginx/lua/spec/fixtures"] = { max_line_length = false }  -- generated keys and tokens
files["tests/unit/lua_body_driver.lua"] = { std = "luajit" }
