// Lookups in the generated nginx map $gw_route (lookup.conf; keys in control_plane/render/lookup_table.py).
// The data lives in nginx, not in a module: njs 0.7 evaluates module top-level code on every request.
// A fragment of the one njs module the renderer writes (control_plane/render/njs.py): no import/export.

// A name as it appears in a key: nginx matches map strings ignoring case, so capitals carry a '^'.
function tableKey(name) {
    return name.replace(/[A-Z]/g, '^$&');
}

function tableGet(r, k) {
    r.variables.gw_q = k;
    return r.variables.gw_route || '';
}

// A space-separated list stored in chunks k:0, k:1, ...
function tableList(r, k) {
    var out = [];
    for (var n = 0; ; n++) {
        var chunk = tableGet(r, k + ':' + n);
        if (!chunk) {
            return out;
        }
        out = out.concat(chunk.split(' '));
    }
}
