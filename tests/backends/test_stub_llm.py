"""Drive the stub LLM backend directly with the official SDKs (openai, ollama, anthropic)."""

from __future__ import annotations

import base64
import json
import struct
import threading
import time
from collections.abc import Iterator

import anthropic
import httpx
import ollama
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.backends.stub_llm import StubServer, iter_sse

NAME = "stub-a"
MSGS: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def stub() -> Iterator[StubServer]:
    with StubServer(name=NAME, models=["m1", "m2"]) as s:
        yield s


@pytest.fixture(autouse=True)
def _reset(stub: StubServer) -> Iterator[None]:
    stub.set_mode("ok")
    stub.clear_requests()
    yield
    stub.set_mode("ok")


@pytest.fixture
def oai(stub: StubServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stub.url}/v1", api_key="sk-test", max_retries=0, timeout=5)


@pytest.fixture
def oll(stub: StubServer) -> ollama.Client:
    return ollama.Client(host=stub.url, timeout=5)


@pytest.fixture
def ant(stub: StubServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stub.url, api_key="sk-ant-test", max_retries=0, timeout=5)


# ------------------------------------------------------------------------------------------ OpenAI


def test_openai_chat_non_stream(oai: openai.OpenAI) -> None:
    raw = oai.chat.completions.with_raw_response.create(model="m2", messages=MSGS)
    assert raw.headers["X-Backend-Name"] == NAME
    r = raw.parse()
    assert r.object == "chat.completion"
    assert r.model == "m2"
    content = r.choices[0].message.content or ""
    assert content.startswith(f"Hello from {NAME}")
    assert 250 <= len(content) <= 300
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens == 10


def test_openai_chat_stream_with_usage(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="m1",
        messages=MSGS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.model == "m1" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith(f"Hello from {NAME}")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 10
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "stop"


def test_openai_stream_raw_wire_format(stub: StubServer) -> None:
    r = httpx.post(
        f"{stub.url}/v1/chat/completions",
        json={"model": "m1", "messages": MSGS, "stream": True},
        headers={"X-Stub-Chunks": "4"},
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-backend-name"] == NAME
    assert r.text.endswith("data: [DONE]\n\n")
    events = [data for _, data in iter_sse(r.content)]
    assert events[-1] == "[DONE]"
    objs = [json.loads(d) for d in events[:-1]]
    assert len(objs) == 4 + 1  # 4 content chunks + finish chunk, no usage chunk
    assert all("usage" not in o for o in objs)
    assert objs[0]["choices"][0]["delta"]["role"] == "assistant"


def test_openai_embeddings_default_base64_and_float(stub: StubServer, oai: openai.OpenAI) -> None:
    e = oai.embeddings.create(model="emb", input=["alpha", "beta"])
    assert stub.requests()[-1]["json"]["encoding_format"] == "base64"  # the SDK's default
    assert [d.index for d in e.data] == [0, 1]
    assert len(e.data[0].embedding) == 16 and isinstance(e.data[0].embedding[0], float)
    f = oai.embeddings.create(model="emb", input="alpha", encoding_format="float")
    assert f.data[0].embedding == e.data[0].embedding
    assert f.model == "emb"
    raw = httpx.post(
        f"{stub.url}/v1/embeddings", json={"model": "emb", "input": "alpha", "encoding_format": "base64"}
    ).json()
    decoded = list(struct.unpack("<16f", base64.b64decode(raw["data"][0]["embedding"])))
    assert decoded == f.data[0].embedding


def test_openai_completions(oai: openai.OpenAI) -> None:
    r = oai.completions.create(model="m1", prompt="say hi")
    assert r.object == "text_completion" and r.choices[0].text.startswith(f"Hello from {NAME}")
    parts = list(oai.completions.create(model="m1", prompt="say hi", stream=True))
    assert "".join(p.choices[0].text for p in parts) == r.choices[0].text


def test_openai_responses_and_models(oai: openai.OpenAI) -> None:
    r = oai.responses.create(model="m1", input="hi")
    assert r.status == "completed" and r.model == "m1"
    assert r.output_text.startswith(f"Hello from {NAME}")
    assert [m.id for m in oai.models.list()] == ["m1", "m2"]


def test_azure_path_and_request_log(stub: StubServer) -> None:
    r = httpx.post(
        f"{stub.url}/openai/deployments/dep1/chat/completions?api-version=2024-10-21",
        json={"messages": MSGS},
        headers={"api-key": "azure-key"},
    )
    assert r.status_code == 200
    assert r.json()["model"] == "dep1" and r.json()["object"] == "chat.completion"
    (req,) = stub.requests()
    assert req["method"] == "POST"
    assert req["path"] == "/openai/deployments/dep1/chat/completions"
    assert req["query_string"] == "api-version=2024-10-21"
    assert req["headers"]["Api-Key"] == "azure-key"  # case-insensitive lookup
    assert req["json"]["messages"] == MSGS
    stub.clear_requests()
    assert stub.requests() == []


def test_invalid_json_is_400(stub: StubServer) -> None:
    for path in ("/v1/chat/completions", "/api/chat", "/v1/messages"):
        r = httpx.post(
            f"{stub.url}{path}", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 400, path
        assert r.headers["content-type"].startswith("application/json")
        assert "error" in r.json()


def test_chunk_count_and_delay_headers(stub: StubServer) -> None:
    t0 = time.monotonic()
    r = httpx.post(
        f"{stub.url}/api/generate",
        json={"model": "m1", "prompt": "x"},
        headers={"X-Stub-Chunks": "5", "X-Stub-Chunk-Delay-Ms": "50"},
    )
    elapsed = time.monotonic() - t0
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert len(lines) == 6 and lines[-1]["done"] is True
    assert elapsed >= 0.19  # 4 gaps of 50 ms


# ------------------------------------------------------------------------------------------ Ollama


def test_ollama_chat_stream_and_non_stream(oll: ollama.Client) -> None:
    r = oll.chat(model="m1", messages=MSGS, stream=False)
    assert r.model == "m1" and r.done and r.done_reason == "stop"
    assert r.message.content is not None
    assert r.message.content.startswith(f"Hello from {NAME}")
    parts = list(oll.chat(model="m1", messages=MSGS, stream=True))
    assert len(parts) == 11
    assert not any(p.done for p in parts[:-1])
    assert parts[-1].done and parts[-1].done_reason == "stop" and parts[-1].eval_count == 10
    assert "".join(p.message.content or "" for p in parts) == r.message.content


def test_ollama_default_is_ndjson_stream(stub: StubServer) -> None:
    r = httpx.post(f"{stub.url}/api/chat", json={"model": "m1", "messages": MSGS})
    assert r.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert len(lines) == 11 and lines[-1]["done"] is True
    one = httpx.post(f"{stub.url}/api/chat", json={"model": "m1", "messages": MSGS, "stream": False}).json()
    assert one["done"] is True and one["message"]["content"].startswith(f"Hello from {NAME}")


def test_ollama_generate_embed_list_version(stub: StubServer, oll: ollama.Client) -> None:
    g = oll.generate(model="m2", prompt="x")
    assert g.response is not None
    assert g.response.startswith(f"Hello from {NAME}") and g.model == "m2"
    e = oll.embed(model="emb", input=["a", "b"])
    assert len(e.embeddings) == 2 and len(e.embeddings[0]) == 16
    legacy = oll.embeddings(model="emb", prompt="a")
    assert list(legacy.embedding) == list(e.embeddings[0])
    assert [m.model for m in oll.list().models] == ["m1", "m2"]
    assert httpx.get(f"{stub.url}/api/version").json()["version"]


def test_ollama_openai_compat(stub: StubServer) -> None:
    c = openai.OpenAI(base_url=f"{stub.url}/v1/", api_key="ollama", max_retries=0)
    r = c.chat.completions.create(model="llama3", messages=MSGS)
    assert r.model == "llama3" and NAME in (r.choices[0].message.content or "")


# ------------------------------------------------------------------------------------------ Anthropic


def test_anthropic_messages_create(ant: anthropic.Anthropic) -> None:
    m = ant.messages.create(model="claude-x", max_tokens=64, messages=MSGS)  # type: ignore[arg-type]
    assert m.type == "message" and m.model == "claude-x" and m.stop_reason == "end_turn"
    block = m.content[0]
    assert block.type == "text" and block.text.startswith(f"Hello from {NAME}")


def test_anthropic_messages_stream(stub: StubServer, ant: anthropic.Anthropic) -> None:
    with ant.messages.stream(model="claude-x", max_tokens=64, messages=MSGS) as s:  # type: ignore[arg-type]
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text.startswith(f"Hello from {NAME}") and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 10
    req = stub.requests()[-1]
    # older anthropic SDKs send x-api-key; the installed 2.x sends the api key as a Bearer token
    hdrs = req["headers"]
    assert hdrs.get("x-api-key") == "sk-ant-test" or hdrs.get("Authorization") == "Bearer sk-ant-test"
    assert "anthropic-version" in req["headers"]


def test_anthropic_raw_event_sequence(stub: StubServer) -> None:
    r = httpx.post(
        f"{stub.url}/v1/messages",
        json={"model": "claude-x", "max_tokens": 10, "messages": MSGS, "stream": True},
        headers={"X-Stub-Chunks": "2"},
    )
    names = [ev for ev, _ in iter_sse(r.content)]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(json.loads(d)["type"] == ev for ev, d in iter_sse(r.content))


# ------------------------------------------------------------------------------------------ faults


def test_status_429_with_retry_after(
    stub: StubServer, oai: openai.OpenAI, ant: anthropic.Anthropic, oll: ollama.Client
) -> None:
    stub.set_mode("status", status=429, retry_after="20")
    with pytest.raises(openai.RateLimitError) as ei:
        oai.chat.completions.create(model="m1", messages=MSGS)
    assert ei.value.response.headers["retry-after"] == "20"
    assert ei.value.response.headers["x-backend-name"] == NAME
    with pytest.raises(anthropic.RateLimitError) as ai:
        ant.messages.create(model="c", max_tokens=5, messages=MSGS)  # type: ignore[arg-type]
    assert isinstance(ai.value.body, dict) and ai.value.body["error"]["type"] == "rate_limit_error"
    assert ai.value.response.headers["retry-after"] == "20"
    with pytest.raises(ollama.ResponseError) as oi:
        oll.chat(model="m1", messages=MSGS, stream=False)
    assert oi.value.status_code == 429
    assert stub.control()["counters"]["faults_injected"] == 3


def test_fail_mode_is_500(oai: openai.OpenAI, stub: StubServer) -> None:
    stub.set_mode("fail")
    with pytest.raises(openai.InternalServerError):
        oai.chat.completions.create(model="m1", messages=MSGS)
    r = httpx.get(f"{stub.url}/health")  # health/control are never faulted
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_stall_times_out_then_releases(stub: StubServer, oai: openai.OpenAI) -> None:
    stub.set_mode("stall")
    t0 = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        oai.with_options(timeout=0.5).chat.completions.create(model="m1", messages=MSGS)
    assert 0.4 < time.monotonic() - t0 < 3
    # disconnect ends the stalled handler
    deadline = time.monotonic() + 3
    while stub.control()["counters"]["stalled"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stub.control()["counters"]["stalled"] == 0

    # a stalled request is answered once the mode changes
    result: dict[str, str] = {}

    def call() -> None:
        r = oai.chat.completions.create(model="m1", messages=MSGS)
        result["content"] = r.choices[0].message.content or ""

    th = threading.Thread(target=call)
    th.start()
    deadline = time.monotonic() + 3
    while stub.control()["counters"]["stalled"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    stub.set_mode("ok")
    th.join(timeout=5)
    assert result["content"].startswith(f"Hello from {NAME}")


def test_slow_mode(stub: StubServer, oai: openai.OpenAI) -> None:
    stub.set_mode("slow", delay_ms=300)
    t0 = time.monotonic()
    oai.chat.completions.create(model="m1", messages=MSGS)
    assert time.monotonic() - t0 >= 0.29


def test_die_mid_stream(stub: StubServer, oai: openai.OpenAI, oll: ollama.Client) -> None:
    aborted_before = stub.control()["counters"]["aborted"]
    stub.set_mode("die_mid_stream", after_chunks=3)
    got: list[str] = []
    # What really happens: the SDK yields the chunks that arrived, then the truncated chunked body
    # surfaces as openai.APIConnectionError (no [DONE], no finish_reason).
    with pytest.raises(openai.APIConnectionError):
        for c in oai.chat.completions.create(model="m1", messages=MSGS, stream=True):
            got.extend(ch.delta.content or "" for ch in c.choices)
            assert all(ch.finish_reason is None for ch in c.choices)
    assert len(got) == 3 and got[0].startswith("Hello from")

    with httpx.stream(
        "POST", f"{stub.url}/v1/chat/completions", json={"model": "m1", "messages": MSGS, "stream": True}
    ) as r:
        buf = b""
        with pytest.raises(httpx.RemoteProtocolError):
            for part in r.iter_bytes():
                buf += part
    assert buf.count(b"data: ") == 3 and b"[DONE]" not in buf

    with pytest.raises(httpx.RemoteProtocolError):
        list(oll.chat(model="m1", messages=MSGS, stream=True))
    assert stub.control()["counters"]["aborted"] - aborted_before == 3


def test_fail_ratio_half_is_deterministic(stub: StubServer, oai: openai.OpenAI) -> None:
    stub.set_mode("fail", fail_ratio=0.5)
    outcome = []
    for _ in range(10):
        try:
            oai.chat.completions.create(model="m1", messages=MSGS)
            outcome.append(True)
        except openai.InternalServerError:
            outcome.append(False)
    assert outcome.count(False) == 5
    assert outcome == [True, False] * 5
    assert stub.control()["counters"]["faults_injected"] == 5


def test_control_validation(stub: StubServer) -> None:
    r = httpx.post(f"{stub.url}/_control", json={"mode": "nope"})
    assert r.status_code == 400
    state = stub.set_mode("status", status=503, retry_after="7")
    assert state["mode"] == "status" and state["status"] == 503 and state["retry_after"] == "7"
    assert stub.set_mode()["mode"] == "ok"


def test_kill_and_restart_same_port() -> None:
    s = StubServer(name="stub-b").start()
    try:
        port = s.port
        s.kill()
        assert not s.is_running()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{s.url}/health")
        s.restart()
        assert s.port == port
        r = httpx.get(f"{s.url}/health")
        assert r.headers["X-Backend-Name"] == "stub-b"
    finally:
        s.stop()
