"""The one quoting function for every value rendered into nginx configuration or Lua code."""

from __future__ import annotations

import re

# A value nginx would read as a variable ('$'), or anything that could end a string, a directive or a
# line, is refused outright: values are validated at the API boundary, this is the second line.
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f$]")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x23\x25-\x7e]*")


class UnsafeValue(ValueError):
    pass


def _escape(text: str) -> str:
    found = _FORBIDDEN.search(text)
    if found:
        # The value itself is never shown: it may be a credential.
        raise UnsafeValue(
            f"refusing to render a value with a control character or '$'"
            f" (character {found.start() + 1} of {len(text)})"
        )
    return text.replace("\\", "\\\\").replace('"', '\\"')


def nginx_quote(value: object, variables: tuple[str, ...] = ()) -> str:
    """Render ``value`` as one double-quoted nginx string token.

    ``variables`` names the only nginx variables the value may reference, written as ``${name}``.
    """
    text = str(value)
    if not variables:
        return '"' + _escape(text) + '"'
    pattern = "|".join(re.escape("${" + name + "}") for name in variables)
    pieces = re.split(f"({pattern})", text)
    return '"' + "".join(p if re.fullmatch(pattern, p) else _escape(p) for p in pieces) + '"'


def lua_string(value: object) -> str:
    """A Lua string literal inside an nginx *_by_lua_block, for settings such as a path (registry values
    reach Lua as JSON data, never as code): printable ASCII only, '"' and '\\' escaped."""
    text = str(value)
    if not _PRINTABLE_ASCII.fullmatch(text):
        raise UnsafeValue("refusing to render a Lua string with a character outside printable ASCII or '$'")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def nginx_map_regex(pattern: str, group: str) -> str:
    """A map source (double-quoted token) matching a whole value by ``pattern``, a rule the controller
    defines (unanchored, never a registry value), and capturing the match as ``$<group>``."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", group):
        raise UnsafeValue("a capture group is lowercase letters, digits and '_'")
    return '"~^(?<' + group + ">" + _escape(pattern) + ')$"'
