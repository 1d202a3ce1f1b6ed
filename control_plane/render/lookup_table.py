"""The data njs looks up per request, as one nginx map (lookup.conf), never as JavaScript.

njs 0.7 runs every imported module's top-level code again for each request, so data written as a
JavaScript literal costs time in proportion to its size on every request (2,000 entries: 34k -> 1.1k
requests/s). An nginx map is a hash built once at reload: njs sets $gw_q to a key and reads $gw_route
(a volatile map, so each read looks up again). nginx matches map strings ignoring case, so every name
in a key passes through `table_key`, which marks capitals with '^' (a character no model name has).

Keys (njs side: nginx/njs/table.js):
  p:<family>|<kind>|<name>    "<pool> <profile> <model>" for every name a client may send for a model
                              (its own, aliases, Ollama's ":latest" spellings); "- -": none available
  f:<model>:<n>               its fallback chain, space separated, in chunks
  l:<family>|<kind>:<n>       models with an available pool for an endpoint kind, in chunks
  l:<family>:<n>              the same for every kind of a family (model listings)
  k:<sha256 of a client key>  "<id> <rpm> <expires epoch> <enabled 0|1> <allowed model patterns...>"
                              (patterns "+": too many for one value, they are in km:<sha256>:<n>)
  created                     the "created" time /v1/models reports
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from control_plane.render.edge import EdgeSpec
from control_plane.render.spec import GatewaySpec

# nginx reads a configuration token into a 4 KiB buffer; list values stay well below.
CHUNK_CHARS = 2000
NO_POOL = "-"

Entry = tuple[str, str]


def table_key(name: str) -> str:
    return re.sub(r"[A-Z]", lambda m: "^" + m.group(0), name)


def chunked(key: str, names: Iterable[str]) -> Iterator[Entry]:
    """`names` as space-separated values under key:0, key:1, ... (nothing for no names)."""
    chunk: list[str] = []
    size = 0
    n = 0
    for name in names:
        if chunk and size + 1 + len(name) > CHUNK_CHARS:
            yield f"{key}:{n}", " ".join(chunk)
            chunk, size, n = [], 0, n + 1
        chunk.append(name)
        size += len(name) + 1
    if chunk:
        yield f"{key}:{n}", " ".join(chunk)


def _spellings(model: str) -> tuple[str, ...]:
    """Other names a client may use for a model: Ollama reads "llama3" as "llama3:latest" and back."""
    if model.endswith(":latest"):
        return (model.removesuffix(":latest"),)
    return () if ":" in model else (f"{model}:latest",)


def resolution_table(spec: GatewaySpec) -> dict[str, dict[str, str]]:
    """Per endpoint kind: every name a client may send -> "<pool> <proxy profile> <model>" ("- -": no
    instance available). Exact model names win
    over other spellings; aliases win over both (as an alias is meant to)."""
    tables: dict[str, dict[str, str]] = {}
    for pool in spec.pools:
        table = tables.setdefault(f"{pool.family}|{pool.kind}", {})
        where = f"{pool.name} {pool.profile.name}" if pool.members else f"{NO_POOL} {NO_POOL}"
        table[pool.model] = f"{where} {pool.model}"
    for table in tables.values():
        models = list(table)
        for model in models:
            for name in _spellings(model):
                table.setdefault(name, table[model])
        for alias, target in spec.aliases:
            if target in table:
                table[alias] = table[target]
    return tables


def route_entries(spec: GatewaySpec) -> Iterator[Entry]:
    served: dict[str, set[str]] = {}
    for kind, table in sorted(resolution_table(spec).items()):
        for name, value in table.items():
            yield f"p:{kind}|{table_key(name)}", value
    for pool in spec.pools:
        if pool.members:
            served.setdefault(f"{pool.family}|{pool.kind}", set()).add(pool.model)
            served.setdefault(str(pool.family), set()).add(pool.model)
    for kind, models in sorted(served.items()):
        yield from chunked(f"l:{kind}", sorted(models))
    for model, chain in spec.fallbacks:
        yield from chunked(f"f:{table_key(model)}", chain)
    yield "created", str(1700000000 + spec.generation)


def key_entries(edge: EdgeSpec) -> Iterator[Entry]:
    for key in edge.keys:
        head = f"{key.id} {key.rpm} {key.expires or 0} {int(key.enabled)}"
        models = " ".join(key.models)
        if len(head) + 1 + len(models) <= CHUNK_CHARS:
            yield f"k:{key.key_hash}", f"{head} {models}".rstrip()
        else:
            yield f"k:{key.key_hash}", f"{head} +"
            yield from chunked(f"km:{key.key_hash}", key.models)


def lookup_entries(spec: GatewaySpec) -> list[Entry]:
    """Every entry of the map, sorted (the rendered file is stable for an unchanged registry)."""
    return sorted([*route_entries(spec), *key_entries(spec.edge)])
