// ISH Gateway client authentication (njs 0.7.9). A fragment of the one njs module the renderer writes
// (control_plane/render/njs.py); settings from the preloaded object `clients` (generated clients.json,
// js_preload_object: shared, not rebuilt per request) and, for API keys, lookup.conf (table.js).
//
// A client presents an API key or a JWT in Authorization: Bearer, x-api-key (Anthropic style) or api-key
// (Azure style). API keys are looked up by their sha256. JWTs: HS256 is verified synchronously (HMAC);
// RS256/ES256 need WebCrypto, which is asynchronous, so they are verified in the content phase
// (authenticate), while identify() (also used by js_set for the limit zones, which run before any
// content handler) checks everything else and keys the limits by the token's hash until then.
var nodeCrypto = require('crypto');
var JWT_RE = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/;
var BEARER_RE = /^\s*Bearer\s+(\S+)\s*$/i;
// identify()'s verdict. Module state lives for one request: njs 0.7 gives each request its own VM (and a
// new one after an internal redirect), so no request can see another's verdict.
var cachedVerdict = null;

function sha256hex(text) {
    return nodeCrypto.createHash('sha256').update(text).digest('hex');
}

function now() {
    return Math.floor(Date.now() / 1000);
}

function presented(r) {
    var header = r.headersIn['Authorization'];
    if (header !== undefined) {
        var m = BEARER_RE.exec(header);
        if (m) {
            return m[1];
        }
    }
    var key = r.headersIn['x-api-key'] || r.headersIn['api-key'] || '';
    return key.trim();
}

function accept(id, rpm, models, pending) {
    return {ok: true, id: id, rpm: rpm, models: models, pending: pending};
}

function reject(reason, message) {
    return {ok: false, reason: reason, message: message, id: '', rpm: '', models: null, pending: null};
}

function anonymous() {
    return accept('', '', null, null);
}

// Equal strings in time independent of where they differ.
function equal(a, b) {
    if (a.length !== b.length) {
        return false;
    }
    var diff = 0;
    for (var i = 0; i < a.length; i++) {
        diff |= a.charCodeAt(i) ^ b.charCodeAt(i);
    }
    return diff === 0;
}

// Keys are looked up by their sha256 in lookup.conf: "k:<hash>" -> "<id> <rpm> <expires> <enabled> <models>".
function checkKey(r, token) {
    var hash = sha256hex(token);
    var entry = tableGet(r, 'k:' + hash);
    if (!entry) {
        return reject('invalid', 'The API key is not valid');
    }
    var fields = entry.split(' ');
    if (fields[3] !== '1') {
        return reject('disabled', 'The API key is disabled');
    }
    var exp = Number(fields[2]);
    if (exp && exp <= now()) {
        return reject('expired', 'The API key has expired');
    }
    var models = fields[4] === '+' ? tableList(r, 'km:' + hash) : fields.slice(4);
    return accept(fields[0], fields[1] !== '0' ? fields[1] : '', models.length ? models : null, null);
}

function decodePart(part) {
    var value = JSON.parse(Buffer.from(part, 'base64url').toString());
    if (value === null || typeof value !== 'object' || Array.isArray(value)) {
        throw new Error('not an object');
    }
    return value;
}

// The per-key zone rate for a token: its 'rpm' claim rounded down to a configured tier (a claim below
// the lowest tier gets the lowest tier), or ISHGW_JWT_DEFAULT_RPM without a claim (0: no per-token limit).
function tokenRate(claim) {
    var jwt = clients.jwt;
    if (typeof claim !== 'number' || !(claim > 0)) {
        return jwt.default_rpm ? String(jwt.default_rpm) : '';
    }
    var rpm = claim;
    var tiers = jwt.tiers;
    var pick = tiers[0];
    for (var i = 0; i < tiers.length; i++) {
        if (tiers[i] <= rpm) {
            pick = tiers[i];
        }
    }
    return String(pick);
}

// A loop, not filter(): the arrays of a preloaded object have no Array methods.
function keysFor(alg, kid) {
    var all = clients.jwt.keys;
    var out = [];
    for (var i = 0; i < all.length; i++) {
        if (all[i].alg === alg && (!kid || !all[i].kid || all[i].kid === kid)) {
            out.push(all[i]);
        }
    }
    return out;
}

function tokenModels(claim) {
    var list = typeof claim === 'string' ? claim.split(/[\s,]+/) : claim;
    if (!Array.isArray(list)) {
        return null;
    }
    list = list.filter(function (m) { return typeof m === 'string' && m.length > 0; });
    return list.length ? list : null;
}

function checkJwt(token) {
    var jwt = clients.jwt;
    var parts = token.split('.');
    var header;
    var claims;
    try {
        header = decodePart(parts[0]);
        claims = decodePart(parts[1]);
    } catch (e) {
        return reject('invalid', 'The bearer token is not a valid JWT');
    }
    var signed = parts[0] + '.' + parts[1];
    var pending = null;
    var verified = false;
    if (header.alg === 'HS256' && jwt.hs256) {
        var expected = nodeCrypto.createHmac('sha256', jwt.hs256).update(signed).digest('base64url');
        if (!equal(expected, parts[2])) {
            return reject('invalid', 'The token signature is not valid');
        }
        verified = true;
    } else if ((header.alg === 'RS256' || header.alg === 'ES256') && keysFor(header.alg, header.kid).length) {
        pending = {alg: header.alg, kid: header.kid, signed: signed, signature: parts[2]};
    } else {
        return reject('invalid', 'The token algorithm is not accepted here');
    }
    var t = now();
    if (typeof claims.exp !== 'number') {
        return reject('invalid', 'The token has no expiry (exp)');
    }
    if (claims.exp + jwt.leeway <= t) {
        return reject('expired', 'The token has expired');
    }
    if (claims.nbf !== undefined && (typeof claims.nbf !== 'number' || claims.nbf - jwt.leeway > t)) {
        return reject('invalid', 'The token is not valid yet (nbf)');
    }
    if (jwt.audience) {
        var aud = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
        if (aud.indexOf(jwt.audience) < 0) {
            return reject('invalid', 'The token is not meant for this audience');
        }
    }
    if (jwt.issuer && claims.iss !== jwt.issuer) {
        return reject('invalid', 'The token comes from an issuer not accepted here');
    }
    // A verified subject shares one bucket across its tokens; an unverified token (until WebCrypto has
    // checked it) only ever counts against its own bucket, so a forged token cannot spend someone else's.
    var id = verified && typeof claims.sub === 'string'
        ? 'jwt_' + sha256hex(String(claims.iss || '') + '|' + claims.sub).slice(0, 16)
        : 'jwt_t' + sha256hex(token).slice(0, 16);
    return accept(id, tokenRate(claims.rpm), tokenModels(claims.models), pending);
}

function evaluate(r) {
    var token = presented(r);
    var verdict;
    if (!token) {
        verdict = reject('missing', 'No API key: send it as Authorization: Bearer <key>, x-api-key or api-key');
    } else if (clients.jwt && JWT_RE.test(token)) {
        verdict = checkJwt(token);
    } else {
        verdict = checkKey(r, token);
    }
    // Running open (ISHGW_AUTH_REQUIRED=false): a valid credential still brings its limits and models;
    // anything else is an anonymous client.
    return verdict.ok || clients.required ? verdict : anonymous();
}

// The verdict on the request's credential without WebCrypto (cached per request).
function identify(r) {
    if (cachedVerdict === null) {
        cachedVerdict = evaluate(r);
    }
    return cachedVerdict;
}

function pemParams(alg) {
    return alg === 'RS256'
        ? [{name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256'}, {name: 'RSASSA-PKCS1-v1_5'}]
        : [{name: 'ECDSA', namedCurve: 'P-256'}, {name: 'ECDSA', hash: 'SHA-256'}];
}

async function verifySignature(pending) {
    var signature = Buffer.from(pending.signature, 'base64url');
    if (pending.alg === 'ES256' && signature.length !== 64) {
        return false;
    }
    var params = pemParams(pending.alg);
    var data = Buffer.from(pending.signed);
    var keys = keysFor(pending.alg, pending.kid);
    for (var i = 0; i < keys.length; i++) {
        try {
            var key = await crypto.subtle.importKey('spki', Buffer.from(keys[i].spki, 'base64'), params[0],
                false, ['verify']);
            if (await crypto.subtle.verify(params[1], key, signature, data)) {
                break;
            }
        } catch (e) {
            // a key that cannot verify this signature: try the next one
        }
    }
    if (i > 0) {
        await clearSslErrors();  // keys[0..i-1] did not verify it
    }
    return i < keys.length;
}

// A signature that does not verify leaves OpenSSL's per-thread error queue filled (njs 0.7.9 does not
// clear it), and nginx's next TLS operation in this worker logs "[alert] ignoring stale global SSL error".
// njs empties the queue when a WebCrypto call throws, so one import that must fail clears it.
async function clearSslErrors() {
    try {
        await crypto.subtle.importKey('spki', Buffer.alloc(1), pemParams('RS256')[0], false, ['verify']);
    } catch (e) {
        // expected: the queue is empty now
    }
}

// The full verdict, signatures included. Resolves to {ok, id, rpm, models} or {ok: false, reason, message}.
async function authenticate(r) {
    var verdict = identify(r);
    if (!verdict.ok || !verdict.pending) {
        return verdict;
    }
    if (await verifySignature(verdict.pending)) {
        return verdict;
    }
    return clients.required ? reject('invalid', 'The token signature is not valid') : anonymous();
}

function bare(model) {
    return model.endsWith(':latest') ? model.slice(0, -7) : model;
}

function matches(pattern, model) {
    if (pattern === '*') {
        return true;
    }
    if (pattern.endsWith('*')) {
        return bare(model).indexOf(pattern.slice(0, -1)) === 0;
    }
    return bare(pattern) === bare(model);
}

// May this client use `model`? `asked` (an alias, say) counts when it is listed exactly.
function allows(verdict, model, asked) {
    if (!verdict.models) {
        return true;
    }
    return verdict.models.some(function (p) {
        return matches(p, model) || (asked !== undefined && !p.endsWith('*') && bare(p) === bare(asked));
    });
}

function clientId(r) {
    return identify(r).id;
}

function clientRpm(r) {
    return identify(r).rpm;
}

// js_set $gw_auth_fail: why the headers alone refuse the request ('missing', 'invalid', 'expired',
// 'disabled'), '' when they do not. An RS256/ES256 token passes here: its signature is checked in the
// content phase, after the body is read (WebCrypto is asynchronous, js_set is not).
function authFail(r) {
    var verdict = identify(r);
    return verdict.ok ? '' : verdict.reason;
}

// The limit that said no, named with the setting that raises it, and the seconds until it lets one more
// request through. A key is the unit of quota: a client with a valid key meets its key's limits (and a
// class limit only where an operator set one); per-address limits bind requests without a valid key.
function bindingLimit(r) {
    var client = identify(r);
    var retry = clients.retry;
    var keyed = client.id !== '';
    if (r.variables.limit_conn_status === 'REJECTED') {
        return {wait: 1, text: keyed
            ? 'this client already has ' + retry.conn_key + ' requests in progress (ISHGW_LIMIT_CONN_PER_KEY)'
            : 'this address already has ' + retry.conn_ip + ' requests in progress without a valid key '
                + '(ISHGW_LIMIT_CONN_PER_IP)'};
    }
    var best = {rpm: 0, text: 'a rate limit of this gateway'};
    var consider = function (rpm, text) {
        if (rpm && (!best.rpm || rpm < best.rpm)) {
            best = {rpm: rpm, text: text};
        }
    };
    if (keyed) {
        consider(Number(client.rpm), 'the limit of ' + client.rpm + ' requests per minute of this key or token '
            + '(its rpm_limit: PUT /admin/keys/<id>; JWT: the rpm claim)');
    } else {
        consider(retry.ip, retry.ip + ' requests per minute per address without a valid key (ISHGW_LIMIT_IP_RPM)');
    }
    var cls = retry.classes[retry.paths[r.uri]];
    if (cls && (cls.all || !keyed)) {
        consider(cls.rpm, cls.rpm + ' requests per minute for this endpoint class per '
            + (keyed ? 'key' : 'address without a valid key') + ' (' + cls.setting + ')');
    }
    return {wait: best.rpm ? Math.max(1, Math.ceil(60 / best.rpm)) : 1, text: best.text};
}
