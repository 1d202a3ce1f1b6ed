"""Issue 12, the stream_options injection as a property, through the gateway: for generated OpenAI chat
streams (chunk contents, where the stand-in cuts its writes, whether and how the client asked for usage,
where "stream" stands in the request) the client receives byte for byte what the stand-in sends for its
request when asked directly (the stream without the gateway's injection), and the usage counted is the
usage the stand-in reported. The stand-in plays the generated stream (X-Stub-Stream-Script)."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.backends.stub_llm import StubServer
from tests.integration.gateway import wait_for
from tests.integration.test_stream_usage import MODEL, _add, _gateway, _normalized, _usage_rows

# Content that looks like what the filter takes out or looks for: it must pass untouched.
TRICKY = st.sampled_from(
    [
        '"usage":null',
        ',"usage":null}',
        '"usage":{"prompt_tokens":1}',
        "data: [DONE]\n\n",
        "\r\n",
        '"choices":[]',
    ]
)
CONTENT = st.one_of(st.text(max_size=40), TRICKY)
# How the client asks for usage: not at all (the gateway adds it and takes it back out), or it does.
ASKS: list[dict[str, Any]] = [
    {},
    {"stream_options": None},
    {"stream_options": {}},
    {"stream_options": {"include_usage": False}},
    {"stream_options": {"x_other": [1, {"a": None}]}},
    {"stream_options": {"include_usage": True}},
]


@st.composite
def cases(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    members: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": draw(st.text(max_size=30))}],
        "stream": True,
        **draw(st.sampled_from(ASKS)),
    }
    if draw(st.booleans()):
        members["temperature"] = 0.5
    order = draw(st.permutations(list(members)))
    body = json.dumps({k: members[k] for k in order}, separators=(",", ":") if draw(st.booleans()) else None)
    script = {
        "contents": draw(st.lists(CONTENT, min_size=1, max_size=6)),
        "usage": [draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6))],
        "splits": draw(st.lists(st.integers(1, 2500), max_size=6)),
        "delay_ms": 2,
    }
    return body.encode(), script


def _stream(url: str, body: bytes, script: dict[str, Any]) -> bytes:
    headers = {
        "Content-Type": "application/json",
        "X-Stub-Stream-Script": base64.b64encode(json.dumps(script).encode()).decode(),
    }
    with httpx.stream("POST", url, content=body, headers=headers, timeout=30) as answer:
        assert answer.status_code == 200, answer.read()
        return b"".join(answer.iter_bytes())


def test_generated_streams_reach_the_client_as_sent_and_count_as_reported(
    stubs: dict[str, StubServer],
) -> None:
    gw, stub = _gateway(stubs, "su-prop")
    with gw:
        _add(gw, stub)
        expected = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "estimated_requests": 0}

        @settings(
            max_examples=25,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(case=cases())
        def check(case: tuple[bytes, dict[str, Any]]) -> None:
            body, script = case
            got = _stream(f"{gw.url}/v1/chat/completions", body, script)
            direct = _stream(f"{stub.url}/v1/chat/completions", body, script)
            assert _normalized(got) == _normalized(direct)
            asked = b'"include_usage":true' in body.replace(b" ", b"")
            assert (b'"usage":{' in got) == asked
            expected["requests"] += 1
            expected["prompt_tokens"] += script["usage"][0]
            expected["completion_tokens"] += script["usage"][1]

        check()
        assert expected["requests"] >= 25
        wait_for(lambda: _usage_rows(gw) == expected, timeout=15, what=f"usage {expected}")
