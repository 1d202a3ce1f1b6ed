-- The request path's entry points, called from the rendered configuration:
--   init(dir)       init_by_lua (http.conf): load the tree's routes.json and clients.json, once per (re)load
--   identify()      rewrite_by_lua of the API locations that answer from Lua (listings, unknown paths):
--                   the client's identity for the limit zones that run next, and the 401 of a request its
--                   headers refuse (its body never read)
--   route(uri)      rewrite_by_lua of every routed endpoint, given its exact location's path ($uri): the
--                   client's identity as identify's, then the model from the body, aliases, the pool, the
--                   fallback chain, the client's permissions; a request to a pool of the location's own
--                   profile goes on there (the limits, then proxy_pass), any other is handed to its pool's
--                   named location
--   answer(name)    content_by_lua of the answers the gateway gives itself (listings, errors, next pool)
--   hide_headers()  header_filter_by_lua of the shim servers: provider header families never reach clients
--   count(family)   body_filter_by_lua of the pool locations: the answer's token usage, scanned as it passes
--                   (never changed); counted(family), their log_by_lua, adds it to the worker's usage, moved
--                   into the shared counters within a second
--   stripping()     header_filter_by_lua of the pool locations' "_su" twins, where the router sends an
--                   OpenAI stream it asked for its usage: that usage is taken back out of the answer
--   exit_worker()   exit_worker_by_lua: the worker's usage into the shared counters
--   drain()         content_by_lua of the usage server: the pending usage batch (GET) and its ack (DELETE)
-- The pure parts live in gw.body (the JSON scan), gw.identity (keys and JWTs), gw.answers (bodies).
-- Data loaded by init lives in this module's upvalues for the life of the configuration; nothing of a
-- request is kept here beyond its end (ngx.ctx carries a verdict that limits the models from identify to
-- the listings, within a request; a configuration whose verdicts cannot limit them does without it; an
-- answer's usage scanner is kept by request address from its body filter to its log phase, which takes it
-- out: see `scanning`).
local cjson = require("cjson.safe")
local ffi = require("ffi")
local lrucache = require("resty.lrucache")
local answers = require("gw.answers")
local body = require("gw.body")
local crypto = require("gw.crypto")
local identity = require("gw.identity")
local limits = require("gw.limits")
local tally = require("gw.tally")
local usage = require("gw.usage")

local ngx = ngx
local var, req, header = ngx.var, ngx.req, ngx.header
local find, lower, sub, pairs, tonumber = string.find, string.lower, string.sub, pairs, tonumber
local concat, sformat = table.concat, string.format
local quote, shown = answers.quote, answers.shown

local _M = {}

local RETRY_AFTER = "5"  -- seconds, on a 503 or a 429 of the gateway's own that has no better figure

-- Set by init; the same for every request of this configuration.
local endpoints, resolve_tables, served, fallbacks, created, leaky  -- routes.json
local retry, address_rules, client_identity                        -- clients.json
local key_limits  -- clients.json's "limits" (gw.limits): nil when no key has a tpm_limit or a budget
local state = ngx.shared.gw_state  -- gw.limits' counters; nil under `nginx -t` of a tree without it

local function read_json(path)
    local file, err = io.open(path, "rb")
    if not file then
        error("gw: cannot read " .. path .. ": " .. tostring(err))
    end
    local text = file:read("*a")
    file:close()
    local value, derr = cjson.decode(text)
    if type(value) ~= "table" then
        error("gw: " .. path .. " is not a JSON object: " .. tostring(derr))
    end
    return value
end

function _M.init(dir)
    local routes = read_json(dir .. "/routes.json")
    local clients = read_json(dir .. "/clients.json")
    endpoints, resolve_tables, served = routes.endpoints, routes.resolve, routes.served
    fallbacks, created, leaky = routes.fallbacks, routes.created, routes.leaky_prefixes
    retry, address_rules = clients.retry, clients.address_rules
    local problems
    client_identity, problems = identity.new(clients, {
        now = ngx.time,
        crypto = crypto,
        cache = lrucache.new(clients.jwt_cache_size or 10000),  -- one per worker: forked from here
    })
    for _, problem in ipairs(problems or {}) do
        ngx.log(ngx.WARN, "gw: JWT key not used: ", problem)
    end
    key_limits = limits.new(clients.limits)
    if key_limits and state then
        -- The registry's spend of each budgeted key (the controller's seed file, written before this load).
        local file = io.open(clients.limits.seed_file or "", "rb")
        local seeds = file and cjson.decode(file:read("*a") or "")
        if file then
            file:close()
        end
        limits.seed_counters(key_limits, state, type(seeds) == "table" and seeds or nil, ngx.time())
    end
end

-- The API family of any request, for answers made outside the router (limits, address filter, 401).
local function family_of_request()
    local uri = var.uri
    local ep = endpoints[uri]
    if ep then
        return ep.family
    elseif find(uri, "/api/", 1, true) == 1 then
        return "ollama"
    elseif var.http_anthropic_version then
        return "anthropic"
    end
    return "openai"
end

-- Answer with a JSON body and end the request (any phase).
local function send_json(status, text)
    ngx.status = status
    header["Content-Type"] = "application/json"
    header["Content-Length"] = #text
    ngx.print(text)
    return ngx.exit(ngx.HTTP_OK)
end

-- The request's id on an answer of the gateway's own. The endpoint locations add it themselves (they
-- proxy: servers.conf), to the router's answers too, which come from their rewrite phase.
local function request_id_header()
    if ngx.get_phase() ~= "rewrite" then
        header["X-Request-ID"] = var.gw_request_id
    end
end

local function fail(family, status, kind, message, available)
    request_id_header()
    if (status == 503 or status == 429) and not header["Retry-After"] then
        header["Retry-After"] = RETRY_AFTER
    end
    return send_json(status, answers.error_body(family, status, kind, message, available))
end

-- A request its headers refuse goes to @gw_unauthorized (servers.conf), whose per-address limits count it
-- (this location's come after this phase, and with ISHGW_AUTH_REQUIRED its locations have none: edge.j2
-- guard) and which answers the 401 (handlers.unauthorized); the refusal goes along in $gw_refusal,
-- "<reason>|<message>" (ngx.ctx does not survive the redirect). Valid requests never pay for this.
local function unauthorized(verdict)
    var.gw_refusal = verdict.reason .. "|" .. verdict.message
    return ngx.exec("@gw_unauthorized")
end

-- Who the client is, from the request's headers (rewrite phase, before the limits): its verdict, or nil
-- when the request went to @gw_unauthorized or is left to the allow/deny rules.
local function identified()
    -- The request's id unless the client gave one (http.conf: $gw_request_id), cheaper than $request_id.
    var.gw_rid = crypto.random_hex16()
    -- The other two headers are read only when Authorization brings no bearer token (each read costs).
    local token = identity.presented(var.http_authorization)
        or identity.presented(nil, var.http_x_api_key, var.http_api_key)
    local verdict = client_identity:check(token)
    if verdict.ok then
        if verdict.id ~= "" then
            var.gw_client_id = verdict.id
            var.gw_client_rpm = verdict.rpm
        end
        return verdict
    end
    if address_rules and var.gw_address_refused == "1" then
        return nil  -- the allow/deny rules answer it (403) in the access phase
    end
    return unauthorized(verdict)
end

-- rewrite_by_lua of the locations that answer from Lua (/v1/models, /api/tags, the unknown paths).
function _M.identify()
    local verdict = identified()
    if verdict and verdict.models then
        ngx.ctx.verdict = verdict
    end
end

-- The verdict identify found, as far as the models go: ngx.ctx holds only one that limits them (creating
-- and reading ngx.ctx costs ~1k instructions a request, not spent when no verdict can limit them).
local function verdict_of_request()
    return client_identity.restricts and ngx.ctx.verdict or identity.ANONYMOUS
end

-- Where a name goes for an endpoint kind: {model, pool, location} (pool "" when no instance of the model
-- is available), or nil when the name is not served. Aliases and ":latest" spellings are in the table.
local function resolve(key, name)
    local table_ = resolve_tables[key]
    return table_ and table_[name]
end

-- The models in `names` this client may use.
local function allowed(verdict, names)
    if not verdict.models then
        return names or {}
    end
    local out = {}
    for _, name in ipairs(names or {}) do
        if identity.allows(verdict, name) then
            out[#out + 1] = name
        end
    end
    return out
end

-- The body a pool is sent: the model's own name when it differs from the one the body names (an alias,
-- a ":latest" spelling, a fallback); and, for an endpoint whose streams report usage only when asked
-- (routes.json: stream_usage), stream_options.include_usage when the client streams without asking for
-- it (then true as the second value). $gw_stream_usage then says so to a fallback's hop (its body
-- already asks), which goes to the "_su" twin too. streams: gw.body.model's word that the body's
-- top-level "stream" is true (no other body can be asked for its usage).
local function body_for(ep, text, ms, me, streams, named, model)
    local out = text
    if model ~= named then
        out = body.with_model(text, ms, me, model)
    end
    if streams and ep.stream_usage then
        local asked = usage.with_include_usage(out)
        if asked then
            var.gw_stream_usage = "1"
            return asked, true
        end
    end
    return out, false
end

-- Hand the request to a pool, with the body body_for makes: to the pool's location, or its "_su" twin
-- (servers.conf: a header filter that takes the usage the gateway asked for back out of the answer).
-- here: the location the request is in when that proxies it as the pool's would (the router's endpoint
-- location and its home profile, routes.json): it goes on there, without a second pass through the phases.
local function send(ep, text, ms, me, streams, named, found, position, base, here)
    if position > 0 then
        var.gw_hop = position
        var.gw_base = base
    end
    var.gw_model = found.model
    var.gw_pool = found.pool
    local out, asked = body_for(ep, text, ms, me, streams, named, found.model)
    if out ~= text then
        req.set_body_data(out)
    end
    if asked or (position > 0 and ep.stream_usage and var.gw_stream_usage == "1") then
        return ngx.exec(found.location .. "_su")
    end
    if found.location == here then
        return
    end
    return ngx.exec(found.location)
end

-- Send the request to the first available fallback of `base` from position `from` (1: the first one).
local function hop(ep, text, ms, me, streams, named, base, from, here)
    local chain = fallbacks[base]
    if chain then
        for i = from, #chain do
            local found = resolve(ep.key, chain[i])
            if found and found.pool ~= "" then
                return send(ep, text, ms, me, streams, named, found, i, base, here)
            end
        end
    end
    return fail(ep.family, 503, "overloaded_error",
        "No instance of model " .. quote(base) .. " is available right now")
end

local BODY_ERRORS = {
    [body.ERR.invalid] = "The request body is not valid JSON",
    [body.ERR.too_deep] = "The request body is not valid JSON",
    [body.ERR.not_object] = "The request body must be a JSON object",
    [body.ERR.repeated] = 'The request names its model more than once (field "model")',
}
local NO_MODEL = 'The request names no model (field "model")'

-- 429 of a key's own limit (gw.limits): tokens per minute, or its budget (OpenAI's insufficient_quota).
local function refuse(family, refusal)
    local kind = "rate_limit_error"
    if refusal.kind == "budget" then
        kind = family == "anthropic" and "budget_exceeded" or "insufficient_quota"
        if refusal.reset then
            header["X-ISHGW-Budget-Reset"] = limits.iso(refusal.reset)
        end
    end
    request_id_header()
    header["Retry-After"] = refusal.wait
    return send_json(429, answers.error_body(family, 429, kind, refusal.message))
end

-- The request body as text: in memory (client_body_buffer_size is the body limit), "" when empty.
local function body_text()
    req.read_body()
    local text = req.get_body_data()
    if text then
        return text
    end
    local path = req.get_body_file()
    if not path then
        return ""
    end
    local file = io.open(path, "rb")
    if not file then
        return ""
    end
    text = file:read("*a")
    file:close()
    return text or ""
end

-- rewrite_by_lua of the endpoint locations: the client's identity (before the limits, which count it
-- next), the body's model, its pool. A request to a pool of the location's own profile (ep.home) goes on
-- there; any other is handed to its pool's named location. Refusals are answered here.
function _M.route(uri)
    if address_rules and var.gw_address_refused == "1" then
        return ngx.exec("@gw_denied")  -- no error_page 403 where an instance's 403 passes (edge.j2 guard)
    end
    local verdict = identified()
    if not verdict then
        return
    end
    local ep = endpoints[uri]
    local family = ep.family
    if req.get_method() ~= "POST" then
        header["Allow"] = "POST"
        return fail(family, 405, "invalid_request_error", "Use POST for " .. shown(uri))
    end
    if key_limits then
        local refusal = limits.check(key_limits, state, var.gw_client_id, ngx.now())
        if refusal then
            return refuse(family, refusal)
        end
    end
    local text = body_text()
    local named, err, ms, me, streams = body.model(text)
    if not named or named == "" then
        return fail(family, 400, "invalid_request_error", BODY_ERRORS[err] or NO_MODEL)
    end
    local found = resolve(ep.key, named)
    if not found then
        -- Only the models this client may use: a key limited to some models learns nothing of the others.
        local available = allowed(verdict, served[ep.key])
        local listing = #available > 0 and ("Available: " .. concat(available, ", "))
            or ("No " .. ep.kind .. " model is served here for " .. uri)
        return fail(family, 404, "not_found_error",
            "The model " .. shown(named) .. " is not served here. " .. listing, available)
    end
    if not identity.allows(verdict, found.model, named) then
        return fail(family, 403, "permission_error", "This API key may not use the model " .. shown(named))
    end
    if found.pool ~= "" then
        return send(ep, text, ms, me, streams, named, found, 0, nil, ep.home)
    end
    return hop(ep, text, ms, me, streams, named, found.model, 1, ep.home)
end

-- Answers made here rather than by an instance, by the name the location gives.
local handlers = {}

function handlers.unavailable()
    return fail(family_of_request(), 503, "overloaded_error",
        "No instance of model " .. quote(var.gw_model or "") .. " could answer; retry later")
end

-- error_page target of a pool that could not answer: the next model in the fallback chain, or a 503.
-- The body is the one the pool was sent: its model is the pool's; the chain's base is in $gw_base
-- once a fallback was taken, else it is the pool's model.
function handlers.next()
    local ep = endpoints[var.uri]
    local text = ep and req.get_body_data()
    local named, _, ms, me, streams
    if text then
        named, _, ms, me, streams = body.model(text)
    end
    if not named then
        return handlers.unavailable()
    end
    local position = tonumber(var.gw_hop) or 0
    local base = position > 0 and var.gw_base or var.gw_model
    return hop(ep, text, ms, me, streams, named, base, position + 1)
end

function handlers.models()
    local verdict = verdict_of_request()
    if var.http_anthropic_version then
        return send_json(200, answers.anthropic_models(allowed(verdict, served.anthropic)))
    end
    return send_json(200, answers.openai_models(allowed(verdict, served.openai), created))
end

function handlers.tags()
    return send_json(200, answers.ollama_tags(allowed(verdict_of_request(), served.ollama)))
end

function handlers.version()
    return send_json(200, '{"version":"0.5.0"}')
end

function handlers.not_found()
    return fail(family_of_request(), 404, "not_found_error", "Unknown endpoint " .. shown(var.uri))
end

-- error_page 413 target: the body is larger than the endpoint takes, or (the endpoint's location proxies
-- too) the instance answered 413.
function handlers.too_large()
    local by = var.upstream_status and "the instance" or "the gateway"
    return fail(family_of_request(), 413, "request_too_large",
        "The request body is larger than " .. by .. " accepts")
end

-- error_page 429 target: limit_req / limit_conn said no. The verdict's ngx.ctx is gone after the
-- redirect; the identity is still in $gw_client_id and $gw_client_rpm.
function handlers.rate_limited()
    local id = var.gw_client_id
    local wait, text = answers.binding_limit(retry, id ~= "", var.gw_client_rpm,
        var.limit_conn_status == "REJECTED", retry.paths[var.uri])
    header["Retry-After"] = wait
    return fail(family_of_request(), 429, "rate_limit_error",
        "Too many requests: the gateway's limit was reached: " .. text .. "; retry in " .. wait .. " s")
end

-- @gw_unauthorized (see unauthorized): 401 in the client's API style, with the challenge RFC 6750 asks
-- for. The body is discarded unread.
function handlers.unauthorized()
    local refusal = var.gw_refusal or ""
    local bar = find(refusal, "|", 1, true)
    local invalid = identity.REFUSED.key_invalid  -- only unauthorized() comes here, so never used
    local reason = bar and sub(refusal, 1, bar - 1) or invalid.reason
    req.discard_body()
    header["WWW-Authenticate"] = reason == "missing" and 'Bearer realm="ish-gateway"'
        or 'Bearer realm="ish-gateway", error="invalid_token"'
    local message = bar and sub(refusal, bar + 1) or invalid.message
    return fail(family_of_request(), 401, "authentication_error", message)
end

-- error_page 403 target: the client's address is not allowed.
function handlers.denied()
    return fail(family_of_request(), 403, "permission_error", "Requests from this address are not allowed")
end

function _M.answer(name)
    return (handlers[name] or handlers.unavailable)()
end

-- Response header families (x-ms-*, cf-*, openai-*, ...) nginx's proxy_hide_header cannot name by prefix.
function _M.hide_headers()
    for name in pairs(ngx.resp.get_headers(0, true)) do
        local low = lower(name)
        for i = 1, #leaky do
            if find(low, leaky[i], 1, true) == 1 then
                header[name] = nil
                break
            end
        end
    end
end

-- The counters (lua_shared_dict gw_usage); nil under `nginx -t` of a tree without it (never served).
local counters = ngx.shared.gw_usage

-- The format of an answer per family and Content-Type (false: none gw.usage reads), worked out once per
-- worker for each of the few Content-Types instances send (at most FORMATS_KEPT of them are kept).
local FORMATS_KEPT = 64
local formats, formats_kept = {}, 0

local function format_of(family, content_type)
    if not content_type then
        return false
    end
    local known = formats[family]
    if not known then
        known = {}
        formats[family] = known
    end
    local format = known[content_type]
    if format == nil then
        format = usage.format_for(family, content_type) or false
        if formats_kept < FORMATS_KEPT then
            formats_kept = formats_kept + 1
            known[content_type] = format
        end
    end
    return format
end

-- A response is scanned when it is a 2xx of a format gw.usage reads; every answered request is counted,
-- an error answer with no tokens (providers bill none). An OpenAI stream the gateway asked for its usage
-- (strip: in a "_su" twin's header filter) gets a filter that takes it back out
-- (gw.usage.openai_sse_filter, whose .strip is true): its length changes, so its Content-Length goes (the
-- header filter makes the scanner, before headers are sent). Elsewhere the body filter makes it (no header
-- filter). Answers the scanner, or false: nothing to scan. content_type: the answer's (bucket_of).
local function start_count(family, content_type, strip)
    local status = ngx.status
    if status < 200 or status >= 300 then
        return false
    end
    -- No format (an unknown content type): still a 2xx answer, estimated from its bytes.
    local format = format_of(family, content_type) or "openai_json"
    if strip and format == "openai_sse" then
        header["Content-Length"] = nil
        return usage.openai_sse_filter(true)
    end
    return usage.new(format)
end

-- The scanner of each answer being counted, by request (the address of its ngx_http_request_t, from
-- thread.exdata as lua-resty-core's get_request has it): set by the request's first body filter call (a
-- "_su" twin: its header filter), taken out by its log phase, which every request reaches (the pool
-- location's log_by_lua: once a body filter ran, the request can no longer go elsewhere). Not ngx.ctx:
-- its table per request and its lookups cost more (cachegrind).
local exdata = require("thread.exdata")
local cast, UINTPTR = ffi.cast, ffi.typeof("uintptr_t")
local scanning = {}
local buckets = {}  -- ... and its usage bucket (bucket_of), kept beside it

-- The request's usage bucket ("<key id>|<instance>|<model>", tally's), its answer's Content-Type (nil:
-- none) and, asked for (with_length), its Content-Length (false: none), read as one variable (http.conf:
-- $gw_usage_bucket, "<content type>\n<content length>\n<bucket>"; no header value holds a newline) where
-- the scanner is made: a variable read by name costs ~800-1,600 instructions.
local function bucket_of(with_length)
    local all = var.gw_usage_bucket
    local a = find(all, "\n", 1, true)
    local b = find(all, "\n", a + 1, true)
    local length = with_length and b > a + 1 and tonumber(sub(all, a + 1, b - 1))
    return sub(all, b + 1), a > 1 and sub(all, 1, a - 1) or nil, length
end

local function request_key()
    return tonumber(cast(UINTPTR, exdata()))
end

-- A key's tokens and cost for its limits (gw.limits), as gw.tally counts them.
local function spend(u, key_id, instance, request_bytes)
    local prompt, completion
    if u.source == "reported" then
        prompt, completion = u.prompt_tokens, u.completion_tokens
    else
        prompt, completion = tally.estimate(request_bytes or 0), tally.estimate(u.bytes or 0)
    end
    limits.spend(key_limits, state, key_id, instance, prompt, completion, ngx.now())
end

-- This worker's usage not yet in the shared counters (gw.tally.accumulate): moved there by a timer armed
-- by the first request after the last move (FLUSH_DELAY later: one timer per FLUSH_DELAY under load, none
-- when idle), and when the worker exits (exit_worker, and a pending timer then fires early). A worker
-- exiting gracefully (reload) cannot arm timers: its last requests go straight to the counters. What a
-- worker that dies (SIGKILL, a crash) holds here is lost: at most FLUSH_DELAY of its answers.
local FLUSH_DELAY = 1  -- seconds
local pending, armed = {}, false

local function flush_pending()
    if tally.flush(counters, pending) then
        ngx.log(ngx.WARN, "gw: usage counters evicted older entries: raise ISHGW_LUA_SHM_USAGE_MB")
    end
end

local function flush_timer()
    armed = false
    flush_pending()
end

-- u: gw.usage's result, or nil for an answer that carries no tokens; bucket: the request's (bucket_of).
-- Tokens the answer reported also go to the access log line ($gw_tokens, "<prompt> <completion>": routing
-- per output token); the body filter (an answer whole in its first chunk) or the log phase runs this,
-- before the access log is written.
local function record_usage(u, bucket)
    if u and u.source == "reported" then
        var.gw_tokens = sformat("%d %d", u.prompt_tokens, u.completion_tokens)
    end
    local now = ngx.time()
    local request_bytes = u and u.source ~= "reported" and tonumber(var.http_content_length) or 0
    tally.accumulate(pending, now - now % 60, bucket, u, request_bytes)
    if not armed then
        if ngx.timer.at(FLUSH_DELAY, flush_timer) then
            armed = true
        else
            flush_pending()  -- the worker is exiting (no timers) or has too many pending
        end
    end
    if key_limits and u then  -- the key id and the instance, from the bucket ("<key id>|<instance>|<model>")
        local a = find(bucket, "|", 1, true)
        local b = find(bucket, "|", a + 1, true)
        spend(u, sub(bucket, 1, a - 1), sub(bucket, a + 1, b - 1), request_bytes)
    end
end

-- An answer's usage into the counters, from its scanner (false: an answer with nothing to scan). A
-- stream the gateway asked for its usage (.strip) passes its held bytes on at finish; its usage is read
-- apart.
local function record_answer(scanner, bucket)
    if not scanner then
        record_usage(nil, bucket)
    elseif scanner.strip then
        scanner:finish()
        record_usage(scanner:usage(), bucket)
    else
        record_usage(scanner:finish(), bucket)
    end
end

-- exit_worker_by_lua: what this worker holds into the shared counters.
function _M.exit_worker()
    if counters then
        flush_pending()
    end
end

-- header_filter_by_lua of the "_su" twins (OpenAI streams the router asked for their usage): the request's
-- scanner, made while headers can change.
function _M.stripping()
    local r = request_key()
    if scanning[r] == nil then
        local bucket, content_type = bucket_of()
        buckets[r] = bucket
        scanning[r] = start_count("openai", content_type, true)
    end
end

-- scanning[r] of a request whose usage its body filter recorded: its log phase has nothing left to do.
local RECORDED = true

-- The body filter's work on one chunk with the request's scanner (made here when the request has none).
-- An answer whose first chunk is all of it (its Content-Length: a JSON answer mostly is) is counted at
-- once, and that chunk marked as the body's end (ngx.arg[2]): lua-nginx-module then runs no body filter
-- for the empty chunk that ends the body (the Lua call alone costs ~1,400 instructions).
local function scan(family, chunk)
    local r = request_key()
    local scanner = scanning[r]
    if scanner == nil then
        local bucket, content_type, length = bucket_of(true)
        scanner = start_count(family, content_type)
        if length == #chunk then
            if scanner then
                scanner:feed(chunk)
            end
            record_answer(scanner, bucket)
            scanning[r] = RECORDED
            ngx.arg[2] = true
            return
        end
        buckets[r] = bucket
        scanning[r] = scanner
    end
    if not scanner or scanner == RECORDED then
        return
    end
    if scanner.strip then
        local arg = ngx.arg
        local out = scanner:feed(chunk)
        if arg[2] then
            out = out .. scanner:finish()
        end
        arg[1] = out
    elseif chunk ~= "" then
        scanner:feed(chunk)
    end
end

-- body_filter_by_lua of the pool locations: the answer scanned as it passes (never changed). An empty
-- chunk (the end of the body comes as one) has nothing to scan: the log phase makes the scanner of a
-- request that had no other.
function _M.count(family)
    local chunk = ngx.arg[1]
    if chunk ~= "" then
        return scan(family, chunk)
    end
end

-- body_filter_by_lua of the "_su" twins: as count, and a stream the gateway asked for its usage is
-- filtered (its held bytes passed on at the end of the body, which may come as an empty chunk).
function _M.count_stripped(family)
    return scan(family, ngx.arg[1])
end

-- log_by_lua of the pool locations: the request's usage into the counters, once, whether its answer
-- ended or the client went away mid-answer (what was seen of it counts), unless its body filter did.
function _M.counted(family)
    local r = request_key()
    local scanner, bucket = scanning[r], buckets[r]
    scanning[r], buckets[r] = nil, nil
    if scanner == RECORDED then
        return
    end
    if scanner == nil then
        local content_type
        bucket, content_type = bucket_of()
        scanner = start_count(family, content_type)
    end
    record_answer(scanner, bucket)
end

-- A pending batch's id: random (gw.crypto's pooled random bytes, as request ids) and the time it was made.
local function batch_id()
    return crypto.random_hex16() .. "-" .. string.format("%d", ngx.now() * 1000)
end

-- GET /_ishgw/usage: the pending batch; DELETE /_ishgw/usage/<id>: its ack (204, or 404: not pending).
function _M.drain()
    local method = req.get_method()
    if method == "GET" and var.uri == "/_ishgw/usage" then
        local text, err = tally.batch(counters, ngx.time(), batch_id)
        if not text then
            return send_json(503, cjson.encode({ error = err }))
        end
        return send_json(200, text)
    elseif method == "DELETE" then
        local id = string.match(var.uri, "^/_ishgw/usage/([%w-]+)$")
        if id and tally.ack(counters, id) then
            return ngx.exit(204)
        end
        return send_json(404, '{"error":"no such pending batch"}')
    end
    return send_json(405, '{"error":"GET /_ishgw/usage or DELETE /_ishgw/usage/<id>"}')
end

return _M
