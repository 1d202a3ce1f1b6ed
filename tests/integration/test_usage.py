"""Issue 12, usage accounting end to end: nginx counts what the stand-in backends report, the controller
drains it into the registry, /admin/usage answers it; a reload and a controller killed mid-run lose and
double nothing."""

from __future__ import annotations

import http.client
import json
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from control_plane.nginx_process import children as nginx_children
from control_plane.registry.store import Store
from control_plane.registry.usage import UsageStore
from control_plane.usage.model import parse_batch
from tests.backends.stub_llm import StubServer
from tests.integration.conftest import start_stub
from tests.integration.gateway import Gateway, wait_for

Usage = tuple[str, str, int, int]  # instance, model, prompt tokens, completion tokens (as the stub said)
Call = Callable[[], Usage]
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
HI_CLAUDE: list[MessageParam] = [{"role": "user", "content": "hi"}]
HI_OLLAMA = [{"role": "user", "content": "hi"}]
RATES = {"chat": (0.5, 0.5), "claude": (3.0, 15.0)}  # USD per 1,000 tokens: prompt, completion


def _openai_calls(client: openai.OpenAI) -> list[Call]:
    def chat() -> Usage:
        u = client.chat.completions.create(model="llama3:8b", messages=HI).usage
        assert u is not None
        return "chat", "llama3:8b", u.prompt_tokens, u.completion_tokens

    def chat_stream() -> Usage:
        chunks = list(
            client.chat.completions.create(
                model="llama3:8b", messages=HI, stream=True, stream_options={"include_usage": True}
            )
        )
        u = chunks[-1].usage
        assert u is not None and len(chunks) > 2
        return "chat", "llama3:8b", u.prompt_tokens, u.completion_tokens

    def completions() -> Usage:
        u = client.completions.create(model="llama3:8b", prompt="say hi").usage
        assert u is not None
        return "chat", "llama3:8b", u.prompt_tokens, u.completion_tokens

    def completions_stream() -> Usage:
        chunks = list(
            client.completions.create(
                model="llama3:8b", prompt="say hi", stream=True, stream_options={"include_usage": True}
            )
        )
        u = chunks[-1].usage
        assert u is not None
        return "chat", "llama3:8b", u.prompt_tokens, u.completion_tokens

    def responses() -> Usage:
        u = client.responses.create(model="llama3:8b", input="hi").usage
        assert u is not None
        return "chat", "llama3:8b", u.input_tokens, u.output_tokens

    def responses_stream() -> Usage:
        done = [e for e in client.responses.create(model="llama3:8b", input="hi", stream=True)]
        final = [e for e in done if e.type == "response.completed"]
        u = final[0].response.usage
        assert u is not None
        return "chat", "llama3:8b", u.input_tokens, u.output_tokens

    def embeddings() -> Usage:
        u = client.embeddings.create(model="nomic-embed", input=["a", "bb", "ccc"]).usage
        return "chat", "nomic-embed", u.prompt_tokens, 0

    return [chat, chat_stream, completions, completions_stream, responses, responses_stream, embeddings]


def _anthropic_calls(client: anthropic.Anthropic) -> list[Call]:
    def messages() -> Usage:
        u = client.messages.create(model="claude-sonnet", max_tokens=64, messages=HI_CLAUDE).usage
        return "claude", "claude-sonnet", u.input_tokens, u.output_tokens

    def messages_stream() -> Usage:
        with client.messages.stream(model="claude-sonnet", max_tokens=64, messages=HI_CLAUDE) as stream:
            u = stream.get_final_message().usage
        return "claude", "claude-sonnet", u.input_tokens, u.output_tokens

    return [messages, messages_stream]


def _ollama_calls(client: ollama.Client) -> list[Call]:
    def chat() -> Usage:
        r = client.chat(model="llama3:8b", messages=HI_OLLAMA, stream=False)
        return "chat", "llama3:8b", r.prompt_eval_count or 0, r.eval_count or 0

    def chat_stream() -> Usage:
        parts = list(client.chat(model="llama3:8b", messages=HI_OLLAMA, stream=True))
        last = parts[-1]
        assert last.done and len(parts) > 2
        return "chat", "llama3:8b", last.prompt_eval_count or 0, last.eval_count or 0

    def generate() -> Usage:
        r = client.generate(model="llama3:8b", prompt="say hi", stream=False)
        return "chat", "llama3:8b", r.prompt_eval_count or 0, r.eval_count or 0

    def generate_stream() -> Usage:
        last = list(client.generate(model="llama3:8b", prompt="say hi", stream=True))[-1]
        assert last.done
        return "chat", "llama3:8b", last.prompt_eval_count or 0, last.eval_count or 0

    def embed() -> Usage:
        r = client.embed(model="nomic-embed", input=["one", "two two"])
        assert r.prompt_eval_count
        return "chat", "nomic-embed", r.prompt_eval_count, 0

    return [chat, chat_stream, generate, generate_stream, embed]


def _setup(gw: Gateway, stubs: dict[str, StubServer]) -> tuple[dict[str, str], dict[str, str]]:
    """Two instances (Ollama-style serving the OpenAI and Ollama APIs, and Anthropic) with their rates; two
    client keys. Answers ({key name: secret}, {key name: id})."""
    chat, claude = start_stub(stubs, "u-chat"), start_stub(stubs, "u-claude")
    created = gw.add_instance(
        name="chat",
        provider_type="ollama",
        api_base=chat.url,
        supported_models=["llama3:8b", "nomic-embed"],
        instance_type="both",
        cost_per_1k_tokens=RATES["chat"][0],
    )
    assert created.status_code == 201, created.text
    created = gw.add_instance(
        name="claude",
        provider_type="anthropic",
        api_base=claude.url,
        api_key="sk-ant-provider-0001",
        supported_models=["claude-sonnet"],
        input_cost_per_1k_tokens=RATES["claude"][0],
        output_cost_per_1k_tokens=RATES["claude"][1],
    )
    assert created.status_code == 201, created.text
    secrets, ids = {}, {}
    for name in ("app", "raw"):
        key = gw.admin.post("/admin/keys", json={"name": name})
        assert key.status_code == 201, key.text
        secrets[name], ids[name] = key.json()["key"], key.json()["id"]
    return secrets, ids


def _calls(gw: Gateway, secret: str) -> list[Call]:
    headers = {"Authorization": f"Bearer {secret}"}
    return [
        *_openai_calls(openai.OpenAI(base_url=f"{gw.url}/v1", api_key=secret, max_retries=0)),
        *_anthropic_calls(anthropic.Anthropic(base_url=gw.url, api_key=secret, max_retries=0)),
        *_ollama_calls(ollama.Client(host=gw.url, headers=headers)),
    ]


def _usage(gw: Gateway, **params: str) -> dict[str, Any]:
    answer = gw.admin.get("/admin/usage", params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def _by_instance_model(rows: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[int, int, int]]:
    return {
        (r["instance"], r["model"]): (r["requests"], r["prompt_tokens"], r["completion_tokens"]) for r in rows
    }


def _metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_usage_totals_equal_what_the_backends_reported(stubs: dict[str, StubServer]) -> None:
    """1,000 requests over the four wire formats, streamed and not, through the openai, anthropic and ollama
    SDKs with a client key (8 threads), with a reload after the first 300 and the controller killed
    (SIGKILL) after 600 and started again after 800: /admin/usage sums exactly what the stand-ins
    reported, per instance and model, with the instances' rates; a raw stream that did not ask for usage is
    counted as reported too (estimated answers: tests/integration/test_stream_usage.py)."""
    env = {
        "ISHGW_AUTH_REQUIRED": "true",
        "ISHGW_USAGE_ACCOUNTING": "true",
        "ISHGW_USAGE_DRAIN_INTERVAL_S": "0.5",
        "ISHGW_METRICS_KEY_LABEL": "true",
    }
    with Gateway(extra_env=env) as gw:
        secrets, ids = _setup(gw, stubs)
        gw.wait_applied()
        first_day = datetime.now(UTC).date()
        calls = _calls(gw, secrets["app"])
        expected: Counter[tuple[str, str, str]] = Counter()
        sent = 0

        def run(n: int) -> None:
            nonlocal sent
            with ThreadPoolExecutor(max_workers=8) as pool:  # bounded: n calls, 8 at a time
                results = list(pool.map(lambda i: calls[i % len(calls)](), range(sent, sent + n)))
            for instance, model, prompt, completion in results:
                expected[(instance, model, "requests")] += 1
                expected[(instance, model, "prompt")] += prompt
                expected[(instance, model, "completion")] += completion
            sent += n

        run(300)
        reload = gw.admin.post("/admin/reload")
        assert reload.status_code == 200, reload.text
        # The SDKs here never retry (a retry could count twice): let the old workers close their idle
        # keep-alive connections and exit first, so no request is sent on one as it closes.
        gw.wait_applied()
        master = gw.nginx_master_pid()
        assert master is not None
        wait_for(lambda: len(nginx_children(master)) == gw.workers, timeout=30, what="old workers gone")
        run(300)
        gw.kill_controller()  # nginx keeps serving and counting; the next controller drains it all
        run(200)
        gw.start_controller()
        run(200)
        assert sent == 1000

        # One raw OpenAI stream that did not ask for usage: the gateway asks the stand-in for it
        # (ISHGW_STREAM_USAGE, on by default) and takes it out of the answer; counted as reported, the
        # usage the stand-in gives the same request when it asks itself.
        body = json.dumps({"model": "llama3:8b", "messages": HI_OLLAMA, "stream": True}).encode()
        raw_headers = {"Authorization": f"Bearer {secrets['raw']}", "Content-Type": "application/json"}
        with httpx.stream("POST", f"{gw.url}/v1/chat/completions", content=body, headers=raw_headers) as r:
            assert r.status_code == 200
            answer = b"".join(r.iter_bytes())
        assert b'"usage"' not in answer
        asked = {**json.loads(body), "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{stubs['u-chat'].url}/v1/chat/completions", json=asked) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: {") and '"usage":{' in line]
        raw_usage = json.loads(lines[-1][6:])["usage"]

        want = {
            (instance, model): (
                expected[(instance, model, "requests")],
                expected[(instance, model, "prompt")],
                expected[(instance, model, "completion")],
            )
            for instance, model, _ in expected
        }

        def drained() -> bool:
            rows = _usage(gw, group_by="instance,model", key=ids["app"])["rows"]
            raw_rows = _usage(gw, group_by="key", key=ids["raw"])["rows"]
            # Both keys' requests: the raw one may come in a later drain than the last of the app's.
            return _by_instance_model(rows) == want and [r["requests"] for r in raw_rows] == [1]

        try:
            wait_for(drained, timeout=20, interval=0.2, what="the usage drained")
        except AssertionError:
            pytest.fail(f"want {want}, have {_usage(gw, group_by='instance,model', key=ids['app'])}")

        report = _usage(gw, group_by="key")
        rows = {row["key"]: row for row in report["rows"]}
        assert set(rows) == {ids["app"], ids["raw"]}
        app = rows[ids["app"]]
        assert app["key_name"] == "app" and app["requests"] == 1000 and app["estimated_requests"] == 0
        assert app["total_tokens"] == app["prompt_tokens"] + app["completion_tokens"]
        cost = sum(
            (expected[(i, m, "prompt")] * RATES[i][0] + expected[(i, m, "completion")] * RATES[i][1]) / 1000
            for i, m in want
        )
        assert app["cost_usd"] == pytest.approx(cost, rel=1e-9)
        raw = rows[ids["raw"]]
        assert (raw["requests"], raw["estimated_requests"]) == (1, 0)
        assert (raw["prompt_tokens"], raw["completion_tokens"]) == (
            raw_usage["prompt_tokens"],
            raw_usage["completion_tokens"],
        )
        assert report["from"].endswith("T00:00:00Z") and report["to"].endswith("T00:00:00Z")

        # A run may straddle midnight (UTC): its requests then fall on two days, and "today" holds fewer.
        last_day = datetime.now(UTC).date()
        by_day = _usage(gw, group_by="day")["rows"]
        assert len(by_day) == 1 + (last_day != first_day) and all(row["key"] is None for row in by_day)
        assert sum(row["requests"] for row in by_day) == 1001

        csv_answer = gw.admin.get("/admin/usage", params={"group_by": "key", "format": "csv"})
        assert csv_answer.status_code == 200 and csv_answer.headers["Content-Type"].startswith("text/csv")
        assert csv_answer.text.splitlines()[0].startswith("key,key_name,instance,model,day,requests")
        assert f"{ids['app']},app,,,,1000," in csv_answer.text

        key_usage = gw.admin.get(f"/admin/keys/{ids['app']}/usage")
        assert key_usage.status_code == 200, key_usage.text
        today, month = key_usage.json()["today"]["requests"], key_usage.json()["month"]["requests"]
        if last_day == first_day:
            assert today == month == 1000
        else:
            assert today <= 1000 and month == (1000 if last_day.month == first_day.month else today)
        assert gw.admin.get("/admin/usage", params={"group_by": "colour"}).status_code == 422

        # The restarted controller's counters hold what it stored itself: at most everything.
        metrics = gw.admin.get("/metrics").text
        stored_prompt = _metric_sum(metrics, "ishgw_tokens_total", instance="claude", direction="prompt")
        assert 0 < stored_prompt <= expected[("claude", "claude-sonnet", "prompt")]
        labels = {"instance": "claude", "direction": "prompt", "key": ids["app"]}
        by_key = _metric_sum(metrics, "ishgw_tokens_total", **labels)
        assert by_key == stored_prompt  # ISHGW_METRICS_KEY_LABEL: every series has its key


def test_a_batch_written_but_not_acknowledged_is_counted_once(stubs: dict[str, StubServer]) -> None:
    """The controller dies after writing a batch and before its ack: nginx hands the same batch out again
    and the next controller stores it once (here the dead controller's write is made by the test, with the
    registry's own code, on the gateway's database)."""
    stub = start_stub(stubs, "u-once")
    with Gateway(extra_env={"ISHGW_USAGE_ACCOUNTING": "true", "ISHGW_USAGE_DRAIN_INTERVAL_S": "0.3"}) as gw:
        created = gw.add_instance(
            name="once", provider_type="ollama", api_base=stub.url, supported_models=["m"]
        )
        assert created.status_code == 201, created.text
        gw.wait_applied()

        def send(n: int) -> None:
            for _ in range(n):
                answer = gw.client.post("/v1/chat/completions", json={"model": "m", "messages": HI_OLLAMA})
                assert answer.status_code == 200, answer.text

        def requests() -> int:
            rows = _usage(gw, group_by="instance")["rows"]
            return sum(int(row["requests"]) for row in rows)

        send(5)
        wait_for(lambda: requests() == 5, timeout=10, what="5 requests drained")
        gw.kill_controller()
        send(3)
        drain = httpx.Client(transport=httpx.HTTPTransport(uds=str(gw.home / "run" / "usage.sock")))

        def batch() -> httpx.Response | None:
            answer = drain.get("http://ishgw/_ishgw/usage")
            assert answer.status_code == 200, answer.text
            return answer if answer.json()["id"] else None

        # A batch is made once a worker has moved its requests into the shared counters (within a
        # second): some or all of the 3 (one row, or two across a minute), the rest stays for the next.
        pending = wait_for(batch, timeout=10, what="a pending batch")
        assert 1 <= sum(row[4] for row in pending.json()["rows"]) <= 3
        store = Store(f"sqlite:///{gw.home / 'ishgw.db'}")
        try:
            assert UsageStore(store).record(parse_batch(pending.json()), datetime.now(UTC)) is not None
        finally:
            store.close()
        send(2)
        assert drain.get("http://ishgw/_ishgw/usage").json() == pending.json()  # the same, until its ack
        gw.start_controller()
        wait_for(lambda: requests() == 10, timeout=10, what="10 requests drained")
        wait_for(lambda: drain.get("http://ishgw/_ishgw/usage").json()["id"] is None, timeout=5, what="acked")
        assert requests() == 10
        metrics = gw.admin.get("/metrics").text
        assert _metric_sum(metrics, "ishgw_usage_drains_total", result="repeated") >= 1


def test_one_server_registered_once_per_model_is_counted_under_each_instance(
    stubs: dict[str, StubServer],
) -> None:
    """One stand-in registered twice, once per model, at different rates (the way a LiteLLM model list
    names one server per model): each answer is counted, priced and headed under the instance of the
    model asked for, and passive health sees each instance's own answers."""
    stub = start_stub(stubs, "u-shared")
    env = {"ISHGW_USAGE_ACCOUNTING": "true", "ISHGW_USAGE_DRAIN_INTERVAL_S": "0.3"}
    with Gateway(extra_env=env) as gw:
        for name, model, rate in (("small", "m-small", 0.1), ("large", "m-large", 2.0)):
            created = gw.add_instance(
                name=name,
                provider_type="ollama",
                api_base=stub.url,
                supported_models=[model],
                cost_per_1k_tokens=rate,
            )
            assert created.status_code == 201, created.text
        gw.wait_applied()
        assert gw.status()["shared_addresses"] == {stub.url.removeprefix("http://"): ["large", "small"]}
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
        sent = Counter({"small": 3, "large": 5})
        for name, count in sent.items():
            for _ in range(count):
                raw = client.chat.completions.with_raw_response.create(model=f"m-{name}", messages=HI)
                assert raw.headers["X-ISHGW-Instance"] == name
        # An Ollama-API request to the same server, the other pool of each instance.
        answer = gw.client.post(
            "/api/chat", json={"model": "m-large", "messages": HI_OLLAMA, "stream": False}
        )
        assert answer.status_code == 200 and answer.headers["X-ISHGW-Instance"] == "large"
        sent["large"] += 1

        def counted() -> dict[str, tuple[int, float]]:
            rows = _usage(gw, group_by="instance")["rows"]
            return {r["instance"]: (r["requests"], r["cost_usd"]) for r in rows}

        wait_for(lambda: {n: c[0] for n, c in counted().items()} == dict(sent), what="usage per instance")
        (small_requests, small_cost), (large_requests, large_cost) = counted()["small"], counted()["large"]
        assert small_cost / small_requests < large_cost / large_requests  # each at its own rate

        def seen(name: str) -> int:
            return int(gw.admin.get(f"/admin/instances/{name}/state").json()["total_requests"])

        wait_for(
            lambda: (seen("small"), seen("large")) == (sent["small"], sent["large"]), what="passive health"
        )


def test_an_answer_counted_as_it_ends_keeps_its_connection_and_its_bytes(
    stubs: dict[str, StubServer],
) -> None:
    """A JSON answer whose first chunk is all of it is counted in its body filter, which then marks that
    chunk as the body's end (gw.gateway.scan): on one keep-alive connection an answer, an instance's 400
    and an answer again each arrive whole, and the usage holds each request once, the 400 without tokens."""
    stub = start_stub(stubs, "u-ends")
    env = {"ISHGW_USAGE_ACCOUNTING": "true", "ISHGW_USAGE_DRAIN_INTERVAL_S": "0.3"}
    with Gateway(extra_env=env) as gw:
        created = gw.add_instance(
            name="ends", provider_type="ollama", api_base=stub.url, supported_models=["m"]
        )
        assert created.status_code == 201, created.text
        gw.wait_applied()
        body = json.dumps({"model": "m", "messages": HI_OLLAMA}).encode()
        connection = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=10)
        answers, ports = [], set()
        try:
            for mode in ("ok", "status", "ok"):
                stub.set_mode(mode, status=400)
                connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                data = response.read()
                assert response.getheader("Content-Length") == str(len(data))
                assert response.getheader("Connection", "keep-alive").lower() == "keep-alive"
                answers.append((response.status, json.loads(data)))
                assert connection.sock is not None
                ports.add(connection.sock.getsockname()[1])
        finally:
            connection.close()
        assert [status for status, _ in answers] == [200, 400, 200]
        assert len(ports) == 1  # one connection: nginx kept it after each answer
        assert answers[1][1]["error"]["message"] == "stub injected status 400"
        prompt = sum(a["usage"]["prompt_tokens"] for s, a in answers if s == 200)
        completion = sum(a["usage"]["completion_tokens"] for s, a in answers if s == 200)

        def counted() -> tuple[int, int, int, int]:
            rows = _usage(gw, group_by="instance")["rows"]
            return tuple(  # type: ignore[return-value]
                sum(int(r[field]) for r in rows)
                for field in ("requests", "prompt_tokens", "completion_tokens", "estimated_requests")
            )

        wait_for(lambda: counted() == (3, prompt, completion, 0), what="three requests counted once each")
