"""gw.body (nginx/lua/gw/body.lua) agrees with Python's json on generated request bodies.

The Lua side runs in one luajit process for the session (tests/unit/lua_body_driver.lua), fed over a pipe.
Bodies: nested objects and arrays, strings with every escape (short ones, \\u in either case, surrogate
pairs, lone surrogates), raw unicode and raw control characters (the scan takes them, as json does with
strict=False), the top-level model absent, a string, another value, repeated (also spelled with \\u
escapes) or only nested; and faults the scan must see (truncated, unterminated or badly escaped strings,
mismatched brackets, text after the value).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("lua_body_driver.lua")

Answer = tuple[str, bytes]  # ("ok", the model's UTF-8 bytes) or ("err", the error's name)


class LuaBody:
    """One luajit process answering gw.body.model(text) for each body written to it."""

    def __init__(self, luajit: str) -> None:
        self.proc = subprocess.Popen(
            [luajit, str(DRIVER), str(ROOT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin: IO[bytes] = self.proc.stdin
        self.stdout: IO[bytes] = self.proc.stdout

    def model(self, data: bytes) -> Answer:
        self.stdin.write(b"%d\n" % len(data) + data)
        self.stdin.flush()
        line = self.stdout.readline()
        if not line:
            raise RuntimeError(f"the luajit driver exited with {self.proc.wait()}")
        kind, _, rest = line.rstrip(b"\n").partition(b" ")
        if kind == b"ok":
            return "ok", self.stdout.read(int(rest))
        return kind.decode(), rest

    def close(self) -> None:
        self.stdin.close()
        assert self.proc.wait(timeout=10) == 0


@pytest.fixture(scope="session")
def lua_body() -> Iterator[LuaBody]:
    luajit = shutil.which("luajit")
    if luajit is None:
        pytest.fail("luajit is not installed (scripts/test.sh installs Debian's luajit2, OpenResty's LuaJIT)")
    driver = LuaBody(luajit)
    yield driver
    driver.close()


class _Pairs(list[tuple[str, Any]]):
    """An object's members in order, repeats kept (json's object_pairs_hook)."""


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def expected(text: str) -> Answer:
    """What the scan must answer, by Python's json (which keeps the last of repeated keys). strict=False:
    the scan leaves raw control characters in strings to the backend (nginx/lua/gw/body.lua)."""
    try:
        doc = json.loads(text, object_pairs_hook=_Pairs, parse_constant=_no_constants, strict=False)
    except (ValueError, RecursionError):
        return "err", b"invalid_json"
    if not isinstance(doc, _Pairs):
        return "err", b"not_object"
    values = [value for key, value in doc if key == "model"]
    if not values:
        return "err", b"no_model"
    if len(values) > 1:
        return "err", b"model_repeated"
    if not isinstance(values[0], str):
        return "err", b"model_not_string"
    return "ok", values[0].encode("utf-8", "surrogatepass")


# --- generated JSON text ---------------------------------------------------------------------------------

SHORT_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "/": "\\/",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}
# JSON's specials, control characters, brackets and the letters of "model"; then any code point but a
# surrogate, astral ones too.
CHARS = st.one_of(
    st.sampled_from(list('"\\/\b\f\n\r\t\x00\x1f\x7f{}[]:, model')), st.characters(codec="utf-8")
)
TEXT = st.text(CHARS, max_size=12)
# How a string is spelt (which escapes) and where whitespace goes: a seed per token, not a draw per character.
SEEDS = st.integers(0, 2**32 - 1)


def _u(code: int, upper: bool) -> str:
    return f"\\u{code:04X}" if upper else f"\\u{code:04x}"


def escaped(char: str, rnd: random.Random) -> str:
    """char as a JSON string may spell it: raw, a short escape, or \\u escapes."""
    code = ord(char)
    styles = ["u"]
    if char in SHORT_ESCAPES:
        styles.append("short")
    if char not in '"\\':
        styles += ["raw", "raw"]  # control characters too: JSON wants them escaped, strict=False takes them
    style = rnd.choice(styles)
    if style == "raw":
        return char
    if style == "short":
        return SHORT_ESCAPES[char]
    upper = rnd.random() < 0.5
    if code > 0xFFFF:
        code -= 0x10000
        return _u(0xD800 + (code >> 10), upper) + _u(0xDC00 + (code & 0x3FF), upper)
    return _u(code, upper)


@st.composite
def string_token(draw: st.DrawFn, of: st.SearchStrategy[str] = TEXT) -> str:
    """A JSON string literal, quotes included, of a text spelt with random escapes; a lone surrogate
    (as a \\u escape) goes in now and then."""
    rnd = random.Random(draw(SEEDS))
    pieces = [escaped(c, rnd) for c in draw(of)]
    if rnd.random() < 0.1:
        pieces.insert(rnd.randint(0, len(pieces)), _u(rnd.randint(0xD800, 0xDFFF), rnd.random() < 0.5))
    return '"' + "".join(pieces) + '"'


MODEL_KEY = string_token(st.just("model"))  # "model", "mod\u0065l", "\u006D\u006F..."
NEAR_MODEL_KEY = string_token(st.sampled_from(["models", "Model", "mode", "modeL", "model\x00"]))
KEY = st.one_of(string_token(), MODEL_KEY, NEAR_MODEL_KEY)
SPACES = ["", "", "", " ", "\n", "\t ", "\r\n  "]


@st.composite
def number(draw: st.DrawFn) -> str:
    rnd = random.Random(draw(SEEDS))
    text = rnd.choice(["", "-"]) + rnd.choice(["0", str(rnd.randint(1, 10**7))])
    if rnd.random() < 0.4:
        text += "." + str(rnd.randint(0, 9999))
    if rnd.random() < 0.3:
        text += rnd.choice("eE") + rnd.choice(["", "+", "-"]) + str(rnd.randint(0, 400))
    return text


SCALAR = st.one_of(st.sampled_from(["true", "false", "null"]), number(), string_token())


def _members(rnd: random.Random, pairs: list[tuple[str, str]]) -> str:
    def ws() -> str:
        return rnd.choice(SPACES)

    return "{" + ws() + ",".join(ws() + k + ws() + ":" + ws() + v + ws() for k, v in pairs) + "}"


@st.composite
def _array(draw: st.DrawFn, items: st.SearchStrategy[str]) -> str:
    rnd = random.Random(draw(SEEDS))
    values = draw(st.lists(items, max_size=4))
    return (
        "[" + rnd.choice(SPACES) + ",".join(rnd.choice(SPACES) + v + rnd.choice(SPACES) for v in values) + "]"
    )


@st.composite
def _object(draw: st.DrawFn, items: st.SearchStrategy[str]) -> str:
    return _members(random.Random(draw(SEEDS)), draw(st.lists(st.tuples(KEY, items), max_size=4)))


VALUE = st.recursive(SCALAR, lambda inner: st.one_of(_array(inner), _object(inner)), max_leaves=12)


@st.composite
def request_body(draw: st.DrawFn) -> str:
    """A top-level object: other members, with zero to three model keys among them."""
    others = draw(st.lists(st.tuples(KEY, VALUE), max_size=5))
    for _ in range(draw(st.integers(0, 3))):
        value = draw(st.one_of(string_token(), string_token(), VALUE))
        others.insert(draw(st.integers(0, len(others))), (draw(MODEL_KEY), value))
    rnd = random.Random(draw(SEEDS))
    return rnd.choice(SPACES) + _members(rnd, others) + rnd.choice(SPACES)


BAD_STRINGS = st.sampled_from(['"\\x41"', '"\\u12"', '"\\u12G4"', '"\\', '"abc', '"\\"', '"\\\\\\"'])
BAD_CLOSERS = st.sampled_from(["[1}", '{"a":1]', "[[]", "[]]", "{", "]"])


@st.composite
def faulty_body(draw: st.DrawFn) -> str:
    """A request body with a fault the scan must see, at the top or nested."""
    text = draw(request_body())
    fault = draw(st.sampled_from(["truncated", "trailing", "bad string", "bad closer"]))
    if fault == "truncated":
        return text[: draw(st.integers(0, max(len(text) - 1, 0)))]
    if fault == "trailing":
        return (
            text
            + draw(st.sampled_from(SPACES))
            + draw(st.sampled_from(["x", "}", "]", ",", "{}", '"', "0", "null"]))
        )
    bad = draw(BAD_STRINGS if fault == "bad string" else BAD_CLOSERS)
    inner = draw(st.sampled_from(["{}", "[]", '{"a":[1,{}]}']))
    nested = draw(st.sampled_from([bad, f"[{bad}]", f'{{"k":{bad}}}', f'[1,{{"k":[{bad}]}}]']))
    return text[: text.index("{") + 1] + f'"x":{inner},"y":{nested},' + text[text.index("{") + 1 :]


BODIES = st.one_of(request_body(), request_body(), faulty_body(), VALUE)


ANSWERS = {"ok", "invalid_json", "not_object", "no_model", "model_repeated", "model_not_string"}


def test_scan_agrees_with_python_json(lua_body: LuaBody) -> None:
    """Also: the generated bodies reach every answer, so the property sees each kind go right or wrong."""
    seen: Counter[str] = Counter()

    @settings(max_examples=300, deadline=None)
    @given(BODIES)
    @example('{"model":"lm","model":"m"}')
    @example('{"model":"lm","mod\\u0065l":"m"}')
    @example('{"a":{"model":"nested"},"b":[{"model":"x"}]}')
    @example('{"model":"\\ud83d\\ude00\\ud83d\\u00e9\\"\\\\"}')
    @example('{"model":"m","a":[}]}')
    @example('[{"model":"m"}]')
    @example("")
    @example('{"model":"m","messages":[{"a":[1,NaN]}]}')  # issue 19: nested NaN/Infinity are not JSON
    @example('{"model":"m","b":{"c":-Infinity}}')
    @example('{"model":"m","a":["NaN",{"Infinity":"x"}]}')
    def agrees(text: str) -> None:
        want = expected(text)
        seen[want[0] if want[0] == "ok" else want[1].decode()] += 1
        assert lua_body.model(text.encode()) == want, text

    agrees()
    assert set(seen) == ANSWERS, seen
