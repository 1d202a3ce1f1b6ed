// ISH Gateway router (njs). Reads the model from the JSON body with a real JSON parse, resolves aliases,
// and hands the request to the pool's named location. Routing data: nginx maps (table.js, lookup.conf).
// The last fragment of the one njs module the renderer writes (control_plane/render/njs.py), after
// table.js and auth.js, whose functions it calls; only this fragment exports.

var RETRY_AFTER = '5';
var MODEL_RE = /^[A-Za-z0-9][A-Za-z0-9._:\/@+-]{0,127}$/;  // control_plane/registry/validators.py
var ECHO_MAX = 256;  // characters of a client's value an error message repeats

// A client's value as an error message quotes it: JSON-quoted, at most ECHO_MAX characters of it.
function shown(value) {
    var text = String(value);
    return JSON.stringify(text.length > ECHO_MAX ? text.slice(0, ECHO_MAX) + '\u2026' : text);
}

// A JSON string spelling "model" (letters possibly \u-escaped) and a colon: a key named model, at any depth.
var MODEL_KEYS = /"(?:m|\\u006[dD])(?:o|\\u006[fF])(?:d|\\u0064)(?:e|\\u0065)(?:l|\\u006[cC])"(?=\s*:)/g;

// Does the body name "model" more than once at its top level? JSON.parse keeps the last, a backend may
// read the first. Only a body with two or more keys named model anywhere is looked at again: each such key
// is renamed "\u0001<n>" (distinct, so nothing collapses) and the body parsed once more, natively; a
// loop over the text in JavaScript would hold the worker for seconds on a large body.
function repeatsModel(text) {
    var keys = text.match(MODEL_KEYS);
    if (keys === null || keys.length < 2) {
        return false;
    }
    var n = 0;
    var renamed = JSON.parse(text.replace(MODEL_KEYS, function () { return '"\\u0001' + (n++) + '"'; }));
    return Object.keys(renamed).filter(function (k) { return k.charCodeAt(0) === 1; }).length > 1;
}

function errorBody(family, status, type, message, extra) {
    if (family === 'anthropic') {
        var a = {type: 'error', error: {type: type, message: message}};
        return JSON.stringify(Object.assign(a, extra || {}));
    }
    if (family === 'ollama') {
        return JSON.stringify(Object.assign({error: message}, extra || {}));
    }
    var o = {error: {message: message, type: type, param: null, code: String(status)}};
    return JSON.stringify(Object.assign(o, extra || {}));
}

function fail(r, family, status, type, message, extra) {
    r.headersOut['Content-Type'] = 'application/json';
    r.headersOut['X-Request-ID'] = r.variables.gw_request_id;
    if ((status === 503 || status === 429) && !r.headersOut['Retry-After']) {
        r.headersOut['Retry-After'] = RETRY_AFTER;
    }
    r.return(status, errorBody(family, status, type, message, extra));
}

// {family, kind, key} of the endpoint the request came in on (map $uri $gw_endpoint), or undefined.
function endpointOf(r) {
    var value = r.variables.gw_endpoint;
    if (!value) {
        return undefined;
    }
    var parts = value.split(' ');
    return {family: parts[0], kind: parts[1], key: parts[0] + '|' + parts[1]};
}

// {model, pool, location} a requested name resolves to for an endpoint kind, or undefined when it is not served.
// One map lookup: aliases and Ollama's ":latest" spellings are expanded when the table is rendered
// (control_plane/render/lookup_table.py). pool is '' when no instance of the model is available.
function resolve(r, kind, name) {
    if (typeof name !== 'string' || !MODEL_RE.test(name)) {
        return undefined;
    }
    var value = tableGet(r, 'p:' + kind + '|' + tableKey(name));
    if (!value) {
        return undefined;
    }
    var parts = value.split(' ');
    var available = parts[0] !== '-';
    return {model: parts[2], pool: available ? parts[0] : '', location: available ? '@' + parts[1] : ''};
}

// 401 in the client's API style, with the challenge RFC 6750 asks for.
function unauthorized(r, family, verdict) {
    r.headersOut['WWW-Authenticate'] = 'Bearer realm="ish-gateway"'
        + (verdict.reason === 'missing' ? '' : ', error="invalid_token"');
    fail(r, family, 401, 'authentication_error', verdict.message);
}

// js_content of every API endpoint. Synchronous unless a token's signature needs WebCrypto: an awaited
// promise costs every request about 10 us of CPU.
function route(r) {
    var verdict = identify(r);
    if (verdict.pending) {
        return authenticate(r).then(function (client) { routeAs(r, client); });
    }
    routeAs(r, verdict);
}

function routeAs(r, client) {
    var ep = endpointOf(r);
    var family = ep ? ep.family : 'openai';
    if (!ep) {
        return fail(r, family, 404, 'not_found_error', 'Unknown endpoint ' + shown(r.uri));
    }
    if (!client.ok) {
        return unauthorized(r, family, client);
    }
    if (r.method !== 'POST') {
        r.headersOut['Allow'] = 'POST';
        return fail(r, family, 405, 'invalid_request_error', 'Use POST for ' + shown(r.uri));
    }
    var body;
    try {
        body = JSON.parse(r.requestText || '');
    } catch (e) {
        return fail(r, family, 400, 'invalid_request_error', 'The request body is not valid JSON');
    }
    if (body === null || typeof body !== 'object' || Array.isArray(body)) {
        return fail(r, family, 400, 'invalid_request_error', 'The request body must be a JSON object');
    }
    var asked = body.model;
    if (typeof asked !== 'string' || asked.length === 0) {
        return fail(r, family, 400, 'invalid_request_error', 'The request names no model (field "model")');
    }
    if (repeatsModel(r.requestText)) {
        return fail(r, family, 400, 'invalid_request_error', 'The request names its model more than once '
            + '(field "model")');
    }
    var found = resolve(r, ep.key, asked);
    if (found === undefined) {
        // Only the models this client may use: a key limited to some models learns nothing of the others.
        var available = tableList(r, 'l:' + ep.key).filter(function (m) { return allows(client, m); });
        var served = available.length ? 'Available: ' + available.join(', ')
            : 'No ' + ep.kind + ' model is served here for ' + r.uri;
        return fail(r, family, 404, 'not_found_error',
            'The model ' + shown(asked) + ' is not served here. ' + served,
            {available_models: available});
    }
    if (!allows(client, found.model, asked)) {
        return fail(r, family, 403, 'permission_error', 'This API key may not use the model ' + shown(asked));
    }
    if (found.pool) {
        return send(r, body, found, 0);
    }
    hop(r, ep, body, found.model, 1);
}

// Hand the request to a pool; the body is rewritten when the model's name differs from the client's.
function send(r, body, found, position) {
    if (position) {
        r.variables.gw_hop = String(position);
    }
    r.variables.gw_model = found.model;
    r.variables.gw_pool = found.pool;
    if (found.model !== body.model) {
        body.model = found.model;
        r.variables.gw_body = JSON.stringify(body);
        return r.internalRedirect(found.location + '_rw');
    }
    return r.internalRedirect(found.location);
}

// Send the request to the first available fallback of `base` from position `from` (1: the first one).
function hop(r, ep, body, base, from) {
    var chain = tableList(r, 'f:' + tableKey(base));
    for (var i = from; i <= chain.length; i++) {
        var found = resolve(r, ep.key, chain[i - 1]);
        if (found && found.pool) {
            return send(r, body, found, i);
        }
    }
    return fail(r, ep.family, 503, 'overloaded_error',
        'No instance of model ' + JSON.stringify(base) + ' is available right now');
}

// error_page target of a pool that could not answer: the next model in the fallback chain, or a 503.
function next(r) {
    var ep = endpointOf(r);
    var body;
    try {
        body = JSON.parse(r.requestText || '');
    } catch (e) {
        return unavailable(r);
    }
    // The client's body, as sent: its model resolves to the chain's base model again.
    var found = ep && body ? resolve(r, ep.key, body.model) : undefined;
    if (!found) {
        return unavailable(r);
    }
    hop(r, ep, body, found.model, Number(r.variables.gw_hop || 0) + 1);
}

// The models of an API family with an available instance that this client may use, sorted.
function servedModels(r, family, client) {
    return tableList(r, 'l:' + family).filter(function (m) { return allows(client, m); });
}

function sendJson(r, status, value) {
    r.headersOut['Content-Type'] = 'application/json';
    r.return(status, JSON.stringify(value));
}

async function models(r) {
    var anthropic = Boolean(r.headersIn['anthropic-version']);
    var client = await authenticate(r);
    if (!client.ok) {
        return unauthorized(r, anthropic ? 'anthropic' : 'openai', client);
    }
    if (anthropic) {
        var data = servedModels(r, 'anthropic', client).map(function (m) {
            return {type: 'model', id: m, display_name: m, created_at: '1970-01-01T00:00:00Z'};
        });
        return sendJson(r, 200, {data: data, has_more: false,
            first_id: data.length ? data[0].id : null, last_id: data.length ? data[data.length - 1].id : null});
    }
    var created = Number(tableGet(r, 'created'));
    sendJson(r, 200, {object: 'list', data: servedModels(r, 'openai', client).map(function (m) {
        return {id: m, object: 'model', created: created, owned_by: 'ish-gateway'};
    })});
}

async function tags(r) {
    var client = await authenticate(r);
    if (!client.ok) {
        return unauthorized(r, 'ollama', client);
    }
    sendJson(r, 200, {models: servedModels(r, 'ollama', client).map(function (m) {
        return {name: m, model: m, modified_at: '1970-01-01T00:00:00Z', size: 0, digest: '',
            details: {format: '', family: '', families: null, parameter_size: '', quantization_level: ''}};
    })});
}

function version(r) {
    sendJson(r, 200, {version: '0.5.0'});
}

async function notFound(r) {
    var family = r.uri.indexOf('/api/') === 0 ? 'ollama' : 'openai';
    var client = await authenticate(r);
    if (!client.ok) {
        return unauthorized(r, family, client);
    }
    fail(r, family, 404, 'not_found_error', 'Unknown endpoint ' + shown(r.uri));
}

// The API family of any request, for answers made outside the router (limits, address filter).
function anyFamily(r) {
    var ep = endpointOf(r);
    if (ep) {
        return ep.family;
    }
    if (r.uri.indexOf('/api/') === 0) {
        return 'ollama';
    }
    return r.headersIn['anthropic-version'] ? 'anthropic' : 'openai';
}

// error_page 429 target: limit_req / limit_conn said no.
function rateLimited(r) {
    var limit = bindingLimit(r);
    r.headersOut['Retry-After'] = String(limit.wait);
    fail(r, anyFamily(r), 429, 'rate_limit_error',
        'Too many requests: the gateway\'s limit was reached: ' + limit.text + '; retry in ' + limit.wait + ' s');
}

// js_set $gw_auth_body: the 401 answer to a request whose headers bring no valid credential, which
// nginx sends with `return` (servers.conf.j2) so that the body is never read.
function authBody(r) {
    return errorBody(anyFamily(r), 401, 'authentication_error', identify(r).message);
}

// error_page 403 target: the client's address is not allowed.
function denied(r) {
    fail(r, anyFamily(r), 403, 'permission_error', 'Requests from this address are not allowed');
}

// Header families nginx's proxy_hide_header cannot name with a wildcard (see render/edge.py).
var LEAKY = /^(x-ratelimit-|anthropic-ratelimit-|openai-|x-ms-|x-envoy-|cf-|x-kong-)/i;

function hideHeaders(r) {
    var names = Object.keys(r.headersOut);
    for (var i = 0; i < names.length; i++) {
        if (LEAKY.test(names[i])) {
            delete r.headersOut[names[i]];
        }
    }
}

function familyOfRequest(r) {
    var ep = endpointOf(r);
    return ep ? ep.family : 'openai';
}

function unavailable(r) {
    fail(r, familyOfRequest(r), 503, 'overloaded_error',
        'No instance of model ' + JSON.stringify(r.variables.gw_model || '') + ' could answer; retry later');
}

function tooLarge(r) {
    fail(r, familyOfRequest(r), 413, 'request_too_large', 'The request body is larger than the gateway accepts');
}


// Answers made here rather than by an instance, by the name the location put in $gw_answer. One entry
// point instead of one export each: every property of the export object costs every request (njs 0.7).
function answer(r) {
    var handlers = {models: models, tags: tags, version: version, not_found: notFound, next: next,
        unavailable: unavailable, too_large: tooLarge, rate_limited: rateLimited, denied: denied};
    var handler = handlers[r.variables.gw_answer];
    return handler ? handler(r) : unavailable(r);
}

export default {route, answer, client_id: clientId, client_rpm: clientRpm, auth_fail: authFail,
    auth_body: authBody, hide_headers: hideHeaders};
