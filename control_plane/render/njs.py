"""The njs code nginx runs: one module, concatenated from the fragments in nginx/njs.

njs 0.7 evaluates the top level of every imported module on each request: each function object, each
property of each export object, each object literal. Three modules with their export objects and a
generated settings module cost a request about 54,000 instructions before any routing (cachegrind);
as one module with a five-property export, with the settings in a preloaded object (clients.json,
js_preload_object), about a third of that.
"""

from __future__ import annotations

import functools
from pathlib import Path

NJS_DIR = Path(__file__).resolve().parents[2] / "nginx" / "njs"
# gateway.js last: it calls the functions of the others, and it alone exports.
FRAGMENTS = ("table.js", "auth.js", "gateway.js")
MODULE = "gateway.js"


@functools.cache
def njs_module() -> str:
    """The module nginx imports (js_import gw from gateway.js)."""
    header = f"// Generated: nginx/njs/{', '.join(FRAGMENTS)} as one module (control_plane/render/njs.py)\n"
    parts = (f"\n// ---- {name} ----\n" + (NJS_DIR / name).read_text() for name in FRAGMENTS)
    return header + "\n".join(parts)
