"""Issue 12, OpenAI streams and their usage: a stream that did not ask for usage is sent to the provider
with stream_options.include_usage, the client gets byte for byte the stream it asked for (compared with
the same request sent to the stand-in directly), and the usage is counted as reported; ISHGW_STREAM_USAGE=off
leaves such streams alone (estimated); an answer that reports no usage, or is cut off, is estimated."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam

from tests.backends.stub_llm import StubServer
from tests.integration.conftest import start_stub
from tests.integration.gateway import Gateway, wait_for

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi there"}]
MODEL = "gpt-4o-mini"


def _normalized(text: bytes) -> bytes:
    """The stream without what differs between two answers of the stand-in: ids and times."""
    text = re.sub(rb'"id":"([a-z]+)-[0-9a-f]+"', rb'"id":"\1-ID"', text)
    return re.sub(rb'"created":\d+', b'"created":0', text)


def _stream(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    with httpx.stream("POST", url, json=body, headers=headers or {}, timeout=30) as answer:
        assert answer.status_code == 200, answer.read()
        assert answer.headers["content-type"].startswith("text/event-stream")
        return b"".join(answer.iter_bytes())


def _usage_rows(gw: Gateway) -> dict[str, int]:
    answer = gw.admin.get("/admin/usage", params={"group_by": "instance"})
    assert answer.status_code == 200, answer.text
    rows = answer.json()["rows"]
    keys = ("requests", "prompt_tokens", "completion_tokens", "estimated_requests")
    return {k: sum(int(row[k]) for row in rows) for k in keys}


def _reported(stream: bytes) -> tuple[int, int]:
    """The usage the stand-in reported in a stream that asked for it."""
    for line in stream.split(b"\n"):
        if line.startswith(b"data: {") and b'"usage":{' in line:
            usage = json.loads(line[6:])["usage"]
            return int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    raise AssertionError("no usage chunk")


def _gateway(stubs: dict[str, StubServer], name: str, **env: str) -> tuple[Gateway, StubServer]:
    stub = start_stub(stubs, name, models=(MODEL,))
    gw = Gateway(extra_env={"ISHGW_USAGE_ACCOUNTING": "true", "ISHGW_USAGE_DRAIN_INTERVAL_S": "0.3", **env})
    return gw, stub


def _add(gw: Gateway, stub: StubServer) -> None:
    created = gw.add_instance(
        name="oa", provider_type="openai_compatible", api_base=f"{stub.url}/v1", supported_models=[MODEL]
    )
    assert created.status_code == 201, created.text
    gw.wait_applied()


def test_a_stream_is_asked_for_its_usage_and_the_client_gets_the_stream_it_asked_for(
    stubs: dict[str, StubServer],
) -> None:
    gw, stub = _gateway(stubs, "su-on")
    with gw:
        _add(gw, stub)
        direct = f"{stub.url}/v1/chat/completions"
        through = f"{gw.url}/v1/chat/completions"
        expected = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "estimated_requests": 0}

        def count(prompt: int, completion: int) -> None:
            expected["requests"] += 1
            expected["prompt_tokens"] += prompt
            expected["completion_tokens"] += completion

        # What the provider reports for this request, asked directly.
        plain = {"model": MODEL, "messages": HI, "stream": True}
        asked = {**plain, "stream_options": {"include_usage": True}}
        usage = _reported(_stream(direct, asked))

        # Not asked (no stream_options, include_usage false, stream_options null): byte for byte what the
        # stand-in answers directly, and no usage in it; counted as reported.
        for body in (
            plain,
            {**plain, "stream_options": {"include_usage": False}},
            {**plain, "stream_options": None},
            {"stream": True, "temperature": 0.5, "model": MODEL, "messages": HI, "max_tokens": 9},
        ):
            got = _stream(through, body)
            assert b'"usage"' not in got
            assert _normalized(got) == _normalized(_stream(direct, body))
            count(*usage)

        # Asked: the usage chunk reaches the client, as the stand-in sends it.
        got = _stream(through, asked)
        assert _normalized(got) == _normalized(_stream(direct, asked))
        assert _reported(got) == usage
        count(*usage)

        # The openai SDK: the same chunks as from the stand-in, none with usage.
        for base in (f"{gw.url}/v1", f"{stub.url}/v1"):
            client = openai.OpenAI(base_url=base, api_key="sk-test", max_retries=0)
            chunks = list(client.chat.completions.create(model=MODEL, messages=HI, stream=True))
            assert chunks and all(chunk.usage is None for chunk in chunks)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            if base.startswith(gw.url):
                through_text, through_n = text, len(chunks)
            else:
                assert (text, len(chunks)) == (through_text, through_n)
        count(*usage)

        # Completions: the same.
        completion_body = {"model": MODEL, "prompt": "say hi", "stream": True}
        got = _stream(f"{gw.url}/v1/completions", completion_body)
        assert b'"usage"' not in got
        assert _normalized(got) == _normalized(_stream(f"{stub.url}/v1/completions", completion_body))
        completion_usage = _reported(
            _stream(
                f"{stub.url}/v1/completions", {**completion_body, "stream_options": {"include_usage": True}}
            )
        )
        count(*completion_usage)

        wait_for(lambda: _usage_rows(gw) == expected, timeout=15, what=f"usage {expected}")


def test_a_stream_handed_down_its_fallback_chain_is_asked_for_its_usage_there_too(
    stubs: dict[str, StubServer],
) -> None:
    """The first model's only instance is down: nginx's failure sends the stream down the fallback chain
    (@next_openai, route again, the body rewritten to the fallback's model). The fallback's pool gets the
    stream asked for its usage, the client gets the stream it asked for with no usage chunk, and the request
    counts once, as reported, under the model and instance that answered."""
    gw, stub = _gateway(stubs, "su-fallback")
    dead = start_stub(stubs, "su-dead", models=("llama-x",))
    with gw:
        _add(gw, stub)
        created = gw.add_instance(
            name="dead",
            provider_type="openai_compatible",
            api_base=f"{dead.url}/v1",
            supported_models=["llama-x"],
        )
        assert created.status_code == 201, created.text
        routing = gw.admin.put("/admin/routing", json={"fallbacks": {"llama-x": [MODEL]}})
        assert routing.status_code == 200, routing.text
        gw.wait_applied()
        dead.kill()  # before the controller notices: nginx's own failure goes down the chain

        plain = {"model": MODEL, "messages": HI, "stream": True}
        usage = _reported(
            _stream(f"{stub.url}/v1/chat/completions", {**plain, "stream_options": {"include_usage": True}})
        )
        got = _stream(f"{gw.url}/v1/chat/completions", {**plain, "model": "llama-x"})
        assert b'"usage"' not in got
        sent = stub.last_request("/v1/chat/completions")["json"]
        assert sent["model"] == MODEL and sent["stream_options"] == {"include_usage": True}
        assert _normalized(got) == _normalized(_stream(f"{stub.url}/v1/chat/completions", plain))

        want = {
            "requests": 1,
            "prompt_tokens": usage[0],
            "completion_tokens": usage[1],
            "estimated_requests": 0,
        }
        wait_for(lambda: _usage_rows(gw) == want, timeout=15, what=f"usage {want}")
        rows = gw.admin.get("/admin/usage", params={"group_by": "model"}).json()["rows"]
        assert [(row["model"], row["requests"]) for row in rows] == [(MODEL, 1)]


def test_without_stream_usage_and_without_a_usage_the_answer_is_estimated(
    stubs: dict[str, StubServer],
) -> None:
    """ISHGW_STREAM_USAGE=off: the request goes as sent, the stream has no usage: estimated (request and
    answer bytes / 4, rounded up). A stream cut off mid-way, with the injection on elsewhere: estimated."""
    gw, stub = _gateway(stubs, "su-off", ISHGW_STREAM_USAGE="off")
    with gw:
        _add(gw, stub)
        body = {"model": MODEL, "messages": HI, "stream": True}
        sent = json.dumps(body, separators=(",", ":")).encode()
        with httpx.stream(
            "POST",
            f"{gw.url}/v1/chat/completions",
            content=sent,
            headers={"Content-Type": "application/json"},
            timeout=30,
        ) as answer:
            assert answer.status_code == 200
            got = b"".join(answer.iter_bytes())
        assert b'"usage"' not in got
        want = {
            "requests": 1,
            "prompt_tokens": math.ceil(len(sent) / 4),
            "completion_tokens": math.ceil(len(got) / 4),
            "estimated_requests": 1,
        }
        wait_for(lambda: _usage_rows(gw) == want, timeout=15, what=f"usage {want}")


def test_a_stream_cut_off_is_estimated(stubs: dict[str, StubServer]) -> None:
    gw, stub = _gateway(stubs, "su-cut")
    with gw:
        _add(gw, stub)
        stub.set_mode("die_mid_stream")
        body = {"model": MODEL, "messages": HI, "stream": True}
        sent = json.dumps(body, separators=(",", ":")).encode()
        got = b""
        try:
            with httpx.stream(
                "POST",
                f"{gw.url}/v1/chat/completions",
                content=sent,
                headers={"Content-Type": "application/json"},
                timeout=30,
            ) as answer:
                assert answer.status_code == 200
                for piece in answer.iter_bytes():
                    got += piece
        except httpx.HTTPError:
            pass  # the cut reaches the client as a broken chunked body
        assert b"data: [DONE]" not in got

        def estimated() -> bool:
            rows = _usage_rows(gw)
            return rows["requests"] == 1 and rows["estimated_requests"] == 1 and rows["prompt_tokens"] > 0

        wait_for(estimated, timeout=15, what="the cut stream counted as estimated")


def test_a_client_gone_mid_stream_is_counted_once_and_leaves_nothing_behind(
    stubs: dict[str, StubServer],
) -> None:
    """The log phase counts what the body filter saw of an answer whose client went away (each answer's
    scanner is kept by its request's address, gw.gateway, and taken out there): the request counts once,
    estimated; the next request, which may get the same address, starts with a scanner of its own."""
    gw, stub = _gateway(stubs, "su-gone")
    with gw:
        _add(gw, stub)
        stub.set_mode("stall_mid_stream")
        body = {"model": MODEL, "messages": HI, "stream": True}
        with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, timeout=30) as answer:
            assert answer.status_code == 200
            assert b"data: " in next(answer.iter_bytes())
        # the connection is closed here, mid-answer, the stand-in still stalled

        def gone_counted() -> bool:
            rows = _usage_rows(gw)
            return rows["requests"] == 1 and rows["estimated_requests"] == 1 and rows["prompt_tokens"] > 0

        wait_for(gone_counted, timeout=15, what="the abandoned stream counted as estimated")
        before = _usage_rows(gw)
        stub.set_mode("ok")
        asked = {**body, "stream_options": {"include_usage": True}}
        prompt, completion = _reported(_stream(f"{gw.url}/v1/chat/completions", asked))
        want = {
            "requests": 2,
            "prompt_tokens": before["prompt_tokens"] + prompt,
            "completion_tokens": before["completion_tokens"] + completion,
            "estimated_requests": 1,
        }
        wait_for(lambda: _usage_rows(gw) == want, timeout=15, what=f"usage {want}")
