"""Stand-in LLM backend for integration tests and benchmarks.

One aiohttp server that speaks the real wire formats of

* OpenAI  -- ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ``/v1/responses``,
  ``GET /v1/models``.  Any path *ending* in ``/chat/completions``, ``/completions``, ``/embeddings``,
  ``/responses`` or ``/messages`` is dispatched the same way, so Azure style paths such as
  ``/openai/deployments/dep1/chat/completions?api-version=2024-10-21`` work too.
* Ollama  -- ``/api/chat``, ``/api/generate`` (NDJSON streaming by default), ``/api/embed``,
  ``/api/embeddings``, ``GET /api/tags``, ``GET /api/version``, ``GET /api/ps``, ``GET /``
  and the OpenAI compatible ``/v1/*`` (the same handlers as above).
* Anthropic -- ``/v1/messages`` (JSON and SSE with the exact event sequence), ``GET /v1/models``
  in Anthropic's format when the request carries an ``anthropic-version`` header.

Every response carries ``X-Backend-Name: NAME`` and generated text starts with ``Hello from NAME``.

Per-request knobs (request headers, default from CLI/env):

* ``X-Stub-Chunks: N``            number of content chunks (``--chunks``, ``STUB_CHUNKS``, default 10)
* ``X-Stub-Chunk-Delay-Ms: D``    delay between chunks (``--chunk-delay-ms``, ``STUB_CHUNK_DELAY_MS``, 0)
* ``X-Stub-Answer-Bytes: B``      answer length (``--answer-bytes``, ``STUB_ANSWER_BYTES``, default 300)
* ``X-Stub-Stream-Script: S``     an OpenAI chat stream as scripted: S is base64 of JSON ``{"contents":
  [str, ...], "usage": [prompt, completion], "splits": [byte offsets], "delay_ms": D}``: one chunk per
  content, the usage reported as given (when asked), the stream's bytes written in pieces cut at the
  offsets, D ms apart (a property test of what a proxy does to a stream, whatever its cuts)

Test/control endpoints (never recorded, never affected by fault injection):

* ``GET /health`` -> ``{"status": "ok", "name": NAME}``
* ``POST /_control`` with JSON ``{"mode": "ok"|"fail"|"status"|"stall"|"slow"|"die_mid_stream"|
  "stall_mid_stream", "status": 503, "retry_after": "20", "retry_after_ms": "250", "delay_ms": 200,
  "fail_ratio": 0.5, "after_chunks": 3, "jitter_pct": 20}``: ``slow`` waits ``delay_ms`` (+- ``jitter_pct`` %)
  before answering, a fixed latency with noise.  The posted object *replaces* the whole fault config
  (omitted fields fall back to their defaults) and resets the fault counter.
  ``fail_ratio`` is deterministic: request number ``n`` (1-based, counted since the last
  ``POST /_control``) is affected iff ``floor(n*ratio) > floor((n-1)*ratio)``; 0.5 -> every 2nd.
* ``GET /_control`` -> current config plus counters.
* ``POST /_load`` with JSON ``{"waiting": 20, "running": 4, "cache": 0.5, "loaded": ["m"]}`` sets what
  ``GET /metrics`` (vLLM's ``vllm:num_requests_waiting`` / ``_running`` / ``gpu_cache_usage_perc``) and
  ``GET /api/ps`` (``loaded``; omitted: every listed model) report.
* ``POST /_models`` with JSON ``{"models": ["a", "b:latest"]}`` replaces the models the lists
  (``/v1/models``, ``/api/tags``, ``/api/ps``) name from now on; ``GET /_models`` reads them.
* ``GET /_requests`` -> last 200 API requests ``{method, path, query_string, headers (lower-case keys),
  json, body_text, time}``; ``DELETE /_requests`` clears them.

``--processes N`` starts N worker processes sharing the port via SO_REUSEPORT.  Control state and
the request log are then *per process* (whichever worker accepted the connection), so fault
injection and ``/_requests`` are only meaningful with ``--processes 1`` (the default).

Use :class:`StubServer` from sync test code to run the stub as a subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import functools
import hashlib
import json
import math
import multiprocessing
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from aiohttp import web

from tests.ports import free_port

MODES: Final = ("ok", "fail", "status", "stall", "slow", "die_mid_stream", "stall_mid_stream")
REQUEST_LOG_SIZE: Final = 200
DEFAULT_MODELS: Final = ("stub-model",)
OLLAMA_VERSION: Final = "0.5.7"
_FILLER: Final = (
    "The quick brown fox jumps over the lazy dog while the gateway balances the load. "
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor. "
)
_JSON_CT: Final = "application/json"
_SSE_CT: Final = "text/event-stream; charset=utf-8"
_NDJSON_CT: Final = "application/x-ndjson"

Json = dict[str, Any]
Handler = Callable[[web.Request, "_Ctx"], Awaitable[web.StreamResponse]]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else default


# --------------------------------------------------------------------------------------------------
# configuration and runtime state
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StubConfig:
    name: str = "stub"
    models: tuple[str, ...] = DEFAULT_MODELS
    chunks: int = 10
    chunk_delay_ms: int = 0
    answer_bytes: int = 300
    embedding_dim: int = 16
    record: bool = True
    # Serve the API only under this prefix (404 elsewhere), as llama.cpp, LM Studio or TGI serve /v1/...
    api_prefix: str = ""
    model_list: bool = True  # False: GET .../models and /api/tags answer 404 (a server without a list)


@dataclass
class FaultConfig:
    mode: str = "ok"
    status: int = 503
    retry_after: str | None = None
    retry_after_ms: str | None = None
    delay_ms: int = 200
    fail_ratio: float = 1.0
    after_chunks: int = 3
    jitter_pct: float = 0.0  # "slow": each delay uniformly within delay_ms +- this percentage

    @classmethod
    def from_json(cls, data: Json) -> FaultConfig:
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown control fields: {sorted(unknown)}")
        fc = cls()
        mode = str(data.get("mode", "ok"))
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        fc.mode = mode
        if data.get("status") is not None:
            fc.status = int(data["status"])
            if not 100 <= fc.status <= 599:
                raise ValueError("status must be an HTTP status code")
        for key in ("retry_after", "retry_after_ms"):
            if data.get(key) is not None:
                setattr(fc, key, str(data[key]))
        if data.get("delay_ms") is not None:
            fc.delay_ms = max(0, int(data["delay_ms"]))
        if data.get("fail_ratio") is not None:
            fc.fail_ratio = float(data["fail_ratio"])
            if not 0.0 <= fc.fail_ratio <= 1.0:
                raise ValueError("fail_ratio must be within [0, 1]")
        if data.get("after_chunks") is not None:
            fc.after_chunks = max(0, int(data["after_chunks"]))
        if data.get("jitter_pct") is not None:
            fc.jitter_pct = float(data["jitter_pct"])
            if not 0.0 <= fc.jitter_pct <= 100.0:
                raise ValueError("jitter_pct must be within [0, 100]")
        return fc

    def to_json(self) -> Json:
        return {
            "mode": self.mode,
            "status": self.status,
            "retry_after": self.retry_after,
            "retry_after_ms": self.retry_after_ms,
            "delay_ms": self.delay_ms,
            "fail_ratio": self.fail_ratio,
            "after_chunks": self.after_chunks,
            "jitter_pct": self.jitter_pct,
        }


@dataclass
class StubState:
    cfg: StubConfig
    fault: FaultConfig = field(default_factory=FaultConfig)
    ratio: Fraction = Fraction(1)
    fault_seq: int = 0  # API requests seen since the last POST /_control
    requests_total: int = 0
    faults_injected: int = 0
    in_flight: int = 0
    stalled: int = 0
    aborted: int = 0
    mode_changed: asyncio.Event = field(default_factory=asyncio.Event)
    log: collections.deque[Json] = field(default_factory=lambda: collections.deque(maxlen=REQUEST_LOG_SIZE))
    id_seq: int = 0
    models: tuple[str, ...] = ()  # what the model lists name (cfg.models until POST /_models)
    load: Json = field(default_factory=dict)  # POST /_load: vLLM metrics and Ollama's loaded models

    def __post_init__(self) -> None:
        self.models = self.models or self.cfg.models

    def set_fault(self, fc: FaultConfig) -> None:
        self.fault = fc
        self.ratio = Fraction(fc.fail_ratio).limit_denominator(10_000)
        self.fault_seq = 0
        self.faults_injected = 0
        # wake up everything stalled under the previous mode
        self.mode_changed.set()
        self.mode_changed = asyncio.Event()

    def pick_fault(self) -> str:
        """Mode to apply to the current API request (deterministic fail_ratio)."""
        mode = self.fault.mode
        if mode == "ok":
            return "ok"
        self.fault_seq += 1
        n = self.fault_seq
        if math.floor(n * self.ratio) > math.floor((n - 1) * self.ratio):
            self.faults_injected += 1
            return mode
        return "ok"

    def next_id(self) -> str:
        self.id_seq += 1
        return f"{os.getpid():x}{self.id_seq:016x}"

    def control_json(self) -> Json:
        return {
            "name": self.cfg.name,
            "pid": os.getpid(),
            **self.fault.to_json(),
            "counters": {
                "requests_total": self.requests_total,
                "fault_seq": self.fault_seq,
                "faults_injected": self.faults_injected,
                "in_flight": self.in_flight,
                "stalled": self.stalled,
                "aborted": self.aborted,
            },
        }


@dataclass
class _Ctx:
    """Per-request parameters."""

    body: Json
    model: str
    chunks: int
    delay: float
    answer_bytes: int
    fault: str


# --------------------------------------------------------------------------------------------------
# text generation helpers (cached)
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _answer(name: str, model: str, answer_bytes: int) -> str:
    head = f"Hello from {name}! This is a stub answer from model {model}. "
    if len(head) >= answer_bytes:
        return head if answer_bytes >= len(f"Hello from {name}!") else f"Hello from {name}!"
    reps = answer_bytes // len(_FILLER) + 1
    text = head + _FILLER * reps
    return text[:answer_bytes].rstrip() or head


@functools.lru_cache(maxsize=256)
def _pieces(name: str, model: str, answer_bytes: int, chunks: int) -> tuple[str, ...]:
    text = _answer(name, model, answer_bytes)
    n = max(1, chunks)
    size = len(text)
    return tuple(text[i * size // n : (i + 1) * size // n] for i in range(n))


def _estimate_tokens(value: Any) -> int:
    """Very rough token estimate (chars/4) over every string in a JSON value."""
    total = 0
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.get(k) for k in ("content", "text", "prompt", "input", "system", "messages"))
    return max(1, total // 4)


@functools.lru_cache(maxsize=4096)
def _vector(text: str, dim: int) -> tuple[float, ...]:
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    rnd = random.Random(seed)
    vec = [rnd.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(x * x for x in vec)) or 1.0
    # round-trip through float32 so float and base64 encodings agree exactly
    packed = struct.pack(f"<{dim}f", *(x / norm for x in vec))
    return struct.unpack(f"<{dim}f", packed)


def _embedding_inputs(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if value and all(isinstance(x, int) for x in value):
            return [json.dumps(value)]  # a single tokenised input
        return [x if isinstance(x, str) else json.dumps(x) for x in value]
    return [json.dumps(value)]


def _now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"


# --------------------------------------------------------------------------------------------------
# the application
# --------------------------------------------------------------------------------------------------


class StubApp:
    def __init__(self, cfg: StubConfig) -> None:
        self.cfg = cfg
        self.state = StubState(cfg)
        self.name_header = {"X-Backend-Name": cfg.name}
        self._health_body = _dumps({"status": "ok", "name": cfg.name})
        self._post_exact: dict[str, Handler] = {
            "/api/chat": self.ollama_chat,
            "/api/generate": self.ollama_generate,
            "/api/embed": self.ollama_embed,
            "/api/embeddings": self.ollama_embeddings,
            "/api/show": self.ollama_show,
        }
        self._post_suffix: tuple[tuple[str, Handler], ...] = (
            ("/chat/completions", self.openai_chat),
            ("/completions", self.openai_completions),
            ("/embeddings", self.openai_embeddings),
            ("/messages", self.anthropic_messages),
            ("/responses", self.openai_responses),
        )
        self._get_exact: dict[str, Handler] = {
            "/api/tags": self.ollama_tags,
            "/api/version": self.ollama_version,
            "/api/ps": self.ollama_ps,
            "/": self.ollama_root,
        }

    def build(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        return app

    # ---------------------------------------------------------------- dispatch
    def _route(self, method: str, path: str) -> Handler | None:
        if method == "POST":
            h = self._post_exact.get(path)
            if h is not None:
                return h
            for suffix, handler in self._post_suffix:
                if path.endswith(suffix):
                    return handler
            return None
        if method in ("GET", "HEAD"):
            h = self._get_exact.get(path)
            if h is not None:
                return h
            if path.endswith("/models"):
                return self.models
        return None

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        method = request.method
        if path == "/health" and method in ("GET", "HEAD"):
            return web.Response(body=self._health_body, content_type=_JSON_CT, headers=self.name_header)
        if path == "/_control":
            return await self.control(request)
        if path == "/_requests":
            return self.requests_endpoint(request)
        if path == "/_models":
            return await self.models_endpoint(request)
        if path == "/_load":
            data = json.loads(await request.read() or b"{}") if request.method == "POST" else None
            if isinstance(data, dict):
                self.state.load = data
            return web.Response(body=_dumps(self.state.load), content_type=_JSON_CT, headers=self.name_header)
        if path == "/metrics" and method == "GET":
            return web.Response(
                text=self._vllm_metrics(), content_type="text/plain", headers=self.name_header
            )

        handler = self._route(method, path)
        if self.cfg.api_prefix and not path.startswith(self.cfg.api_prefix + "/"):
            handler = None
        if not self.cfg.model_list and method == "GET" and (path.endswith("/models") or path == "/api/tags"):
            handler = None
        raw = await request.read() if request.body_exists else b""
        body: Any = None
        bad_json: str | None = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                bad_json = f"invalid JSON body: {exc}"
            else:
                if not isinstance(body, dict):
                    bad_json = "JSON body must be an object"
        elif method == "POST" and handler is not None:
            bad_json = "request body is empty, expected a JSON object"

        st = self.state
        st.requests_total += 1
        if self.cfg.record:
            st.log.append(
                {
                    "method": method,
                    "path": path,
                    "query_string": request.query_string,
                    "headers": {k.lower(): v for k, v in request.headers.items()},
                    "json": body if bad_json is None else None,
                    "body_text": raw[:65536].decode("utf-8", "replace") if bad_json is not None else None,
                    "time": time.time(),
                }
            )
        if handler is None:
            return self.error(path, request, 404, f"no route for {method} {path}")

        st.in_flight += 1
        try:
            fault = st.pick_fault()
            if fault != "ok":
                early = await self._apply_early_fault(request, fault)
                if early is not None:
                    return early
            if bad_json is not None:
                return self.error(path, request, 400, bad_json)
            ctx = self._ctx(request, body or {}, fault)
            return await handler(request, ctx)
        finally:
            st.in_flight -= 1

    async def _apply_early_fault(self, request: web.Request, fault: str) -> web.StreamResponse | None:
        fc = self.state.fault
        if fault == "fail":
            return self.error(request.path, request, 500, "stub injected failure")
        if fault == "status":
            extra: dict[str, str] = {}
            if fc.retry_after is not None:
                extra["Retry-After"] = fc.retry_after
            if fc.retry_after_ms is not None:
                extra["retry-after-ms"] = fc.retry_after_ms
            return self.error(request.path, request, fc.status, f"stub injected status {fc.status}", extra)
        if fault == "slow":
            spread = fc.delay_ms * fc.jitter_pct / 100
            await asyncio.sleep(max(0.0, fc.delay_ms + random.uniform(-spread, spread)) / 1000)
        elif fault == "stall":
            await self._stall(request)
        return None

    async def _stall(self, request: web.Request) -> None:
        """Wait until the mode changes or the client goes away (without blocking the loop)."""
        st = self.state
        ev = st.mode_changed
        st.stalled += 1
        try:
            while not ev.is_set():
                transport = request.transport
                if transport is None or transport.is_closing():
                    raise asyncio.CancelledError()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), 0.5)
        finally:
            st.stalled -= 1

    def _ctx(self, request: web.Request, body: Json, fault: str) -> _Ctx:
        h = request.headers
        cfg = self.cfg
        chunks = int(h.get("X-Stub-Chunks") or cfg.chunks)
        delay_ms = float(h.get("X-Stub-Chunk-Delay-Ms") or cfg.chunk_delay_ms)
        answer_bytes = int(h.get("X-Stub-Answer-Bytes") or cfg.answer_bytes)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            parts = request.path.split("/")
            if "deployments" in parts and parts.index("deployments") + 1 < len(parts):
                model = parts[parts.index("deployments") + 1]
            else:
                model = cfg.models[0]
        return _Ctx(body, model, max(1, chunks), max(0.0, delay_ms) / 1000, max(1, answer_bytes), fault)

    # ---------------------------------------------------------------- errors
    def error(
        self,
        path: str,
        request: web.Request,
        status: int,
        message: str,
        extra_headers: dict[str, str] | None = None,
    ) -> web.Response:
        headers = {**self.name_header, **(extra_headers or {})}
        if path.startswith("/api/"):
            body: Json = {"error": message}
        elif path.endswith("/messages") or "anthropic-version" in request.headers:
            etype = {
                400: "invalid_request_error",
                401: "authentication_error",
                403: "permission_error",
                404: "not_found_error",
                413: "request_too_large",
                429: "rate_limit_error",
                529: "overloaded_error",
            }.get(status, "api_error")
            body = {"type": "error", "error": {"type": etype, "message": message}}
            headers["request-id"] = f"req_stub{self.state.next_id()}"
        else:
            etype = {
                400: "invalid_request_error",
                401: "invalid_request_error",
                404: "invalid_request_error",
                429: "rate_limit_exceeded",
            }.get(status, "server_error")
            body = {"error": {"message": message, "type": etype, "param": None, "code": None}}
        return web.Response(status=status, body=_dumps(body), content_type=_JSON_CT, headers=headers)

    # ---------------------------------------------------------------- streaming core
    async def _stream(
        self,
        request: web.Request,
        ctx: _Ctx,
        content_type: str,
        head: Iterable[bytes],
        pieces: list[bytes],
        tail: Iterable[bytes],
        extra_headers: dict[str, str] | None = None,
    ) -> web.StreamResponse:
        """Send ``head`` + ``pieces`` (with the per-chunk delay between pieces) + ``tail``.

        Honours the die_mid_stream / stall_mid_stream faults: after ``after_chunks`` pieces the
        connection is aborted (no tail) or the stream stalls.
        """
        resp = web.StreamResponse(
            headers={
                **self.name_header,
                "Content-Type": content_type,
                "Cache-Control": "no-cache",
                **(extra_headers or {}),
            }
        )
        await resp.prepare(request)
        head_b = b"".join(head)
        if ctx.fault in ("die_mid_stream", "stall_mid_stream"):
            keep = min(self.state.fault.after_chunks, len(pieces))
            await resp.write(head_b + b"".join(pieces[:keep]))
            if ctx.fault == "stall_mid_stream":
                await self._stall(request)
                await resp.write(b"".join(pieces[keep:]) + b"".join(tail))
                await resp.write_eof()
                return resp
            self._abort(request)
        if ctx.delay <= 0:
            await resp.write(head_b + b"".join(pieces) + b"".join(tail))
        else:
            await resp.write(head_b)
            for i, piece in enumerate(pieces):
                if i:
                    await asyncio.sleep(ctx.delay)
                await resp.write(piece)
            await resp.write(b"".join(tail))
        await resp.write_eof()
        return resp

    def _abort(self, request: web.Request) -> None:
        self.state.aborted += 1
        transport = request.transport
        if transport is not None:
            transport.abort()
        # handled by aiohttp as a premature client disconnect, nothing more is written
        raise asyncio.CancelledError()

    async def _die_non_stream(self, request: web.Request, body: bytes) -> web.StreamResponse:
        """die_mid_stream for non-streaming requests: half a body, then the connection dies."""
        resp = web.StreamResponse(headers={**self.name_header, "Content-Type": _JSON_CT})
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        self._abort(request)
        return resp  # pragma: no cover

    async def _json(
        self, request: web.Request, ctx: _Ctx, obj: Json, extra_headers: dict[str, str] | None = None
    ) -> web.StreamResponse:
        body = _dumps(obj)
        if ctx.fault == "die_mid_stream":
            return await self._die_non_stream(request, body)
        if ctx.fault == "stall_mid_stream":
            await self._stall(request)
        headers = {**self.name_header, **extra_headers} if extra_headers else self.name_header
        return web.Response(body=body, content_type=_JSON_CT, headers=headers)

    # ---------------------------------------------------------------- OpenAI
    @staticmethod
    @functools.lru_cache(maxsize=256)
    def _openai_chat_pieces(name: str, model: str, answer_bytes: int, chunks: int, usage: bool) -> bytes:
        """SSE chunk lines with a placeholder id ``@ID@`` (joined; split on blank lines)."""
        base = chunk_base("chatcmpl-@ID@", model)
        out: list[bytes] = []
        for i, piece in enumerate(_pieces(name, model, answer_bytes, chunks)):
            delta: Json = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
            chunk = {
                **base,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
            }
            if usage:
                chunk["usage"] = None
            out.append(b"data: " + _dumps(chunk) + b"\n\n")
        return b"\x00".join(out)

    def _ids(self, blob: bytes, prefix: str) -> tuple[str, list[bytes]]:
        rid = self.state.next_id()
        return f"{prefix}{rid}", blob.replace(b"@ID@", rid.encode()).split(b"\x00")

    @staticmethod
    def _want_stream_openai(body: Json) -> bool:
        return body.get("stream") is True

    async def _scripted_chat_stream(
        self, request: web.Request, ctx: _Ctx, script: Json
    ) -> web.StreamResponse:
        """X-Stub-Stream-Script: the chunks, usage and write cuts of an OpenAI chat stream, as given."""
        so = ctx.body.get("stream_options")
        include_usage = isinstance(so, dict) and so.get("include_usage") is True
        cid = f"chatcmpl-{self.state.next_id()}"
        base = chunk_base(cid, ctx.model)
        extra: Json = {"usage": None} if include_usage else {}
        events: list[bytes] = []
        for i, content in enumerate(script.get("contents") or []):
            delta: Json = {"role": "assistant", "content": content} if i == 0 else {"content": content}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
            events.append(b"data: " + _dumps({**base, "choices": [choice], **extra}) + b"\n\n")
        final = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
        events.append(b"data: " + _dumps({**base, "choices": [final], **extra}) + b"\n\n")
        if include_usage:
            prompt, completion = (int(n) for n in script.get("usage") or (0, 0))
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
            events.append(b"data: " + _dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        text = b"".join(events)
        cuts = sorted({int(c) for c in script.get("splits") or () if 0 < int(c) < len(text)})
        delay = max(0.0, float(script.get("delay_ms") or 0)) / 1000
        resp = web.StreamResponse(
            headers={
                **self.name_header,
                "Content-Type": _SSE_CT,
                "Cache-Control": "no-cache",
                "x-request-id": cid,
            }
        )
        await resp.prepare(request)
        start = 0
        for cut in [*cuts, len(text)]:
            if start and delay:
                await asyncio.sleep(delay)
            await resp.write(text[start:cut])
            start = cut
        await resp.write_eof()
        return resp

    async def openai_chat(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        body = ctx.body
        script_header = request.headers.get("X-Stub-Stream-Script")
        if script_header and self._want_stream_openai(body):
            return await self._scripted_chat_stream(request, ctx, json.loads(base64.b64decode(script_header)))
        n_raw = body.get("n")
        n_choices: int = n_raw if isinstance(n_raw, int) else 1
        prompt_tokens = _estimate_tokens(body.get("messages"))
        text = _answer(self.cfg.name, ctx.model, ctx.answer_bytes)
        completion_tokens = ctx.chunks
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if self._want_stream_openai(body):
            so = body.get("stream_options")
            include_usage = isinstance(so, dict) and so.get("include_usage") is True
            blob = self._openai_chat_pieces(
                self.cfg.name, ctx.model, ctx.answer_bytes, ctx.chunks, include_usage
            )
            cid, pieces = self._ids(blob, "chatcmpl-")
            base = chunk_base(cid, ctx.model)
            final: Json = {
                **base,
                "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
            }
            tail = [b"data: " + _dumps(final | ({"usage": None} if include_usage else {})) + b"\n\n"]
            if include_usage:
                tail.append(b"data: " + _dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
            tail.append(b"data: [DONE]\n\n")
            return await self._stream(request, ctx, _SSE_CT, (), pieces, tail, {"x-request-id": cid})
        cid = f"chatcmpl-{self.state.next_id()}"
        obj = {
            "id": cid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": ctx.model,
            "system_fingerprint": "fp_stub",
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
                for i in range(max(1, n_choices))
            ],
            "usage": usage,
        }
        return await self._json(request, ctx, obj, {"x-request-id": cid})

    async def openai_completions(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        body = ctx.body
        prompt_tokens = _estimate_tokens(body.get("prompt"))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": ctx.chunks,
            "total_tokens": prompt_tokens + ctx.chunks,
        }
        cid = f"cmpl-{self.state.next_id()}"
        created = int(time.time())
        if self._want_stream_openai(body):
            so = body.get("stream_options")
            include_usage = isinstance(so, dict) and so.get("include_usage") is True
            base: Json = {"id": cid, "object": "text_completion", "created": created, "model": ctx.model}
            pieces = [
                b"data: "
                + _dumps(
                    {
                        **base,
                        "choices": [{"text": p, "index": 0, "logprobs": None, "finish_reason": None}],
                    }
                )
                + b"\n\n"
                for p in _pieces(self.cfg.name, ctx.model, ctx.answer_bytes, ctx.chunks)
            ]
            tail = [
                b"data: "
                + _dumps(
                    {**base, "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}]}
                )
                + b"\n\n"
            ]
            if include_usage:
                tail.append(b"data: " + _dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
            tail.append(b"data: [DONE]\n\n")
            return await self._stream(request, ctx, _SSE_CT, (), pieces, tail, {"x-request-id": cid})
        obj = {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": ctx.model,
            "system_fingerprint": "fp_stub",
            "choices": [
                {
                    "text": _answer(self.cfg.name, ctx.model, ctx.answer_bytes),
                    "index": 0,
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
        return await self._json(request, ctx, obj, {"x-request-id": cid})

    def _embed_dim(self, body: Json) -> int:
        dim = body.get("dimensions")
        return dim if isinstance(dim, int) and 0 < dim <= 8192 else self.cfg.embedding_dim

    async def openai_embeddings(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        body = ctx.body
        if "input" not in body:
            return self.error(request.path, request, 400, "'input' is a required property")
        inputs = _embedding_inputs(body["input"])
        dim = self._embed_dim(body)
        b64 = body.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(inputs):
            vec = _vector(text, dim)
            emb: Any = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode() if b64 else list(vec)
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = sum(_estimate_tokens(t) for t in inputs)
        obj = {
            "object": "list",
            "data": data,
            "model": ctx.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return await self._json(request, ctx, obj)

    async def openai_responses(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        body = ctx.body
        text = _answer(self.cfg.name, ctx.model, ctx.answer_bytes)
        rid = f"resp_{self.state.next_id()}"
        mid = f"msg_{self.state.next_id()}"
        in_tok = _estimate_tokens([body.get("input"), body.get("instructions")])
        out_tok = ctx.chunks
        created = int(time.time())

        def response(status: str, output: list[Json], usage: Json | None) -> Json:
            return {
                "id": rid,
                "object": "response",
                "created_at": created,
                "status": status,
                "error": None,
                "incomplete_details": None,
                "instructions": body.get("instructions"),
                "max_output_tokens": body.get("max_output_tokens"),
                "model": ctx.model,
                "output": output,
                "parallel_tool_calls": True,
                "previous_response_id": body.get("previous_response_id"),
                "reasoning": {"effort": None, "summary": None},
                "store": bool(body.get("store", True)),
                "temperature": body.get("temperature", 1.0),
                "text": {"format": {"type": "text"}},
                "tool_choice": "auto",
                "tools": [],
                "top_p": body.get("top_p", 1.0),
                "truncation": "disabled",
                "usage": usage,
                "user": None,
                "metadata": body.get("metadata") or {},
            }

        part_done: Json = {"type": "output_text", "text": text, "annotations": []}
        item_done: Json = {
            "type": "message",
            "id": mid,
            "status": "completed",
            "role": "assistant",
            "content": [part_done],
        }
        usage = {
            "input_tokens": in_tok,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": out_tok,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": in_tok + out_tok,
        }
        if body.get("stream") is not True:
            return await self._json(request, ctx, response("completed", [item_done], usage))

        seq = 0

        def ev(kind: str, data: Json) -> bytes:
            nonlocal seq
            data = {"type": kind, **data, "sequence_number": seq}
            seq += 1
            return b"event: " + kind.encode() + b"\ndata: " + _dumps(data) + b"\n\n"

        head = [
            ev("response.created", {"response": response("in_progress", [], None)}),
            ev("response.in_progress", {"response": response("in_progress", [], None)}),
            ev(
                "response.output_item.added",
                {"output_index": 0, "item": {**item_done, "status": "in_progress", "content": []}},
            ),
            ev(
                "response.content_part.added",
                {
                    "item_id": mid,
                    "output_index": 0,
                    "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": []},
                },
            ),
        ]
        pieces = [
            ev(
                "response.output_text.delta",
                {"item_id": mid, "output_index": 0, "content_index": 0, "delta": p, "logprobs": []},
            )
            for p in _pieces(self.cfg.name, ctx.model, ctx.answer_bytes, ctx.chunks)
        ]
        tail = [
            ev(
                "response.output_text.done",
                {"item_id": mid, "output_index": 0, "content_index": 0, "text": text, "logprobs": []},
            ),
            ev(
                "response.content_part.done",
                {"item_id": mid, "output_index": 0, "content_index": 0, "part": part_done},
            ),
            ev("response.output_item.done", {"output_index": 0, "item": item_done}),
            ev("response.completed", {"response": response("completed", [item_done], usage)}),
        ]
        return await self._stream(request, ctx, _SSE_CT, head, pieces, tail, {"x-request-id": rid})

    async def models(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        if "anthropic-version" in request.headers:
            data = [
                {
                    "type": "model",
                    "id": m,
                    "display_name": m,
                    "created_at": "2025-01-01T00:00:00Z",
                }
                for m in self.state.models
            ]
            obj: Json = {
                "data": data,
                "has_more": False,
                "first_id": self.state.models[0],
                "last_id": self.state.models[-1],
            }
        else:
            obj = {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 1700000000, "owned_by": self.cfg.name}
                    for m in self.state.models
                ],
            }
        return await self._json(request, ctx, obj)

    # ---------------------------------------------------------------- Anthropic
    async def anthropic_messages(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        body = ctx.body
        in_tok = _estimate_tokens([body.get("messages"), body.get("system")])
        out_tok = ctx.chunks
        mid = f"msg_stub{self.state.next_id()}"
        req_id = f"req_stub{self.state.next_id()}"
        extra = {"request-id": req_id}
        if body.get("stream") is not True:
            obj = {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": ctx.model,
                "content": [{"type": "text", "text": _answer(self.cfg.name, ctx.model, ctx.answer_bytes)}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {
                    "input_tokens": in_tok,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                    "output_tokens": out_tok,
                },
            }
            return await self._json(request, ctx, obj, extra)

        def ev(kind: str, data: Json) -> bytes:
            return b"event: " + kind.encode() + b"\ndata: " + _dumps({"type": kind, **data}) + b"\n\n"

        head = [
            ev(
                "message_start",
                {
                    "message": {
                        "id": mid,
                        "type": "message",
                        "role": "assistant",
                        "model": ctx.model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {
                            "input_tokens": in_tok,
                            "cache_creation_input_tokens": 0,
                            "cache_read_input_tokens": 0,
                            "output_tokens": 1,
                        },
                    }
                },
            ),
            ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
            ev("ping", {}),
        ]
        pieces = [
            ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": p}})
            for p in _pieces(self.cfg.name, ctx.model, ctx.answer_bytes, ctx.chunks)
        ]
        tail = [
            ev("content_block_stop", {"index": 0}),
            ev(
                "message_delta",
                {
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": out_tok},
                },
            ),
            ev("message_stop", {}),
        ]
        return await self._stream(request, ctx, _SSE_CT, head, pieces, tail, extra)

    # ---------------------------------------------------------------- Ollama
    def _ollama_final(self, ctx: _Ctx, prompt_tokens: int) -> Json:
        return {
            "done": True,
            "done_reason": "stop",
            "total_duration": 5_000_000 + ctx.chunks * 1_000_000,
            "load_duration": 1_000_000,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": 1_000_000,
            "eval_count": ctx.chunks,
            "eval_duration": ctx.chunks * 1_000_000,
        }

    async def _ollama(self, request: web.Request, ctx: _Ctx, chat: bool) -> web.StreamResponse:
        body = ctx.body
        prompt_tokens = _estimate_tokens(
            body.get("messages") if chat else [body.get("prompt"), body.get("system")]
        )
        final = self._ollama_final(ctx, prompt_tokens)
        created = _now_iso()
        if body.get("stream", True) is False:
            text = _answer(self.cfg.name, ctx.model, ctx.answer_bytes)
            obj: Json = {"model": ctx.model, "created_at": created}
            if chat:
                obj["message"] = {"role": "assistant", "content": text}
            else:
                obj["response"] = text
            obj.update(final)
            if not chat:
                obj["context"] = [1, 2, 3]
            return await self._json(request, ctx, obj)
        pieces = []
        for p in _pieces(self.cfg.name, ctx.model, ctx.answer_bytes, ctx.chunks):
            line: Json = {"model": ctx.model, "created_at": created}
            if chat:
                line["message"] = {"role": "assistant", "content": p}
            else:
                line["response"] = p
            line["done"] = False
            pieces.append(_dumps(line) + b"\n")
        last: Json = {"model": ctx.model, "created_at": _now_iso()}
        if chat:
            last["message"] = {"role": "assistant", "content": ""}
        else:
            last["response"] = ""
        last.update(final)
        if not chat:
            last["context"] = [1, 2, 3]
        return await self._stream(request, ctx, _NDJSON_CT, (), pieces, [_dumps(last) + b"\n"])

    async def ollama_chat(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        return await self._ollama(request, ctx, chat=True)

    async def ollama_generate(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        return await self._ollama(request, ctx, chat=False)

    async def ollama_embed(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        inputs = _embedding_inputs(ctx.body.get("input", ""))
        dim = self._embed_dim(ctx.body)
        obj = {
            "model": ctx.model,
            "embeddings": [list(_vector(t, dim)) for t in inputs],
            "total_duration": 2_000_000,
            "load_duration": 1_000_000,
            "prompt_eval_count": sum(_estimate_tokens(t) for t in inputs),
        }
        return await self._json(request, ctx, obj)

    async def ollama_embeddings(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        prompt = ctx.body.get("prompt", "")
        text = prompt if isinstance(prompt, str) else json.dumps(prompt)
        return await self._json(request, ctx, {"embedding": list(_vector(text, self.cfg.embedding_dim))})

    def _ollama_model(self, name: str) -> Json:
        digest = hashlib.sha256(name.encode()).hexdigest()
        return {
            "name": name,
            "model": name,
            "modified_at": "2025-01-01T00:00:00.000000000Z",
            "size": 4_661_224_676,
            "digest": digest,
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "llama",
                "families": ["llama"],
                "parameter_size": "8.0B",
                "quantization_level": "Q4_0",
            },
        }

    async def ollama_tags(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        return await self._json(request, ctx, {"models": [self._ollama_model(m) for m in self.state.models]})

    def _vllm_metrics(self) -> str:
        load = self.state.load
        lines = []
        for metric, key in (
            ("num_requests_waiting", "waiting"),
            ("num_requests_running", "running"),
            ("gpu_cache_usage_perc", "cache"),
        ):
            lines += [f"# TYPE vllm:{metric} gauge"]
            lines += [
                f'vllm:{metric}{{model_name="{m}"}} {float(load.get(key, 0))}' for m in self.state.models[:1]
            ]
        return "\n".join(lines) + "\n"

    async def ollama_ps(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        loaded = self.state.load.get("loaded", self.state.models)
        models = [
            {**self._ollama_model(m), "expires_at": "2099-01-01T00:00:00Z", "size_vram": 0} for m in loaded
        ]
        return await self._json(request, ctx, {"models": models})

    async def ollama_show(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        info = self._ollama_model(ctx.model)
        obj = {
            "modelfile": f"FROM {ctx.model}\n",
            "parameters": "",
            "template": "{{ .Prompt }}",
            "details": info["details"],
            "model_info": {"general.architecture": "llama"},
            "capabilities": ["completion", "embedding"],
            "modified_at": info["modified_at"],
        }
        return await self._json(request, ctx, obj)

    async def ollama_version(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        return await self._json(request, ctx, {"version": OLLAMA_VERSION})

    async def ollama_root(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        return web.Response(text="Ollama is running", headers=self.name_header)

    # ---------------------------------------------------------------- control endpoints
    async def control(self, request: web.Request) -> web.Response:
        st = self.state
        if request.method == "POST":
            try:
                data = json.loads(await request.read() or b"{}")
                if not isinstance(data, dict):
                    raise ValueError("control body must be a JSON object")
                st.set_fault(FaultConfig.from_json(data))
            except (ValueError, TypeError) as exc:
                return web.Response(
                    status=400,
                    body=_dumps({"error": str(exc)}),
                    content_type=_JSON_CT,
                    headers=self.name_header,
                )
        elif request.method not in ("GET", "HEAD"):
            return web.Response(status=405, headers=self.name_header)
        return web.Response(body=_dumps(st.control_json()), content_type=_JSON_CT, headers=self.name_header)

    async def models_endpoint(self, request: web.Request) -> web.Response:
        st = self.state
        if request.method == "POST":
            data = json.loads(await request.read() or b"{}")
            models = data.get("models") if isinstance(data, dict) else None
            if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
                return web.Response(
                    status=400,
                    body=_dumps({"error": "models must be a list of strings"}),
                    content_type=_JSON_CT,
                    headers=self.name_header,
                )
            st.models = tuple(models)
        elif request.method not in ("GET", "HEAD"):
            return web.Response(status=405, headers=self.name_header)
        body = _dumps({"models": list(st.models)})
        return web.Response(body=body, content_type=_JSON_CT, headers=self.name_header)

    def requests_endpoint(self, request: web.Request) -> web.Response:
        st = self.state
        if request.method == "DELETE":
            st.log.clear()
            return web.Response(body=b'{"cleared":true}', content_type=_JSON_CT, headers=self.name_header)
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, headers=self.name_header)
        return web.Response(body=_dumps(list(st.log)), content_type=_JSON_CT, headers=self.name_header)


def create_app(cfg: StubConfig | None = None) -> web.Application:
    """Build the aiohttp app (e.g. for in-process use with ``aiohttp_server``)."""
    return StubApp(cfg or StubConfig()).build()


# --------------------------------------------------------------------------------------------------
# serving / CLI
# --------------------------------------------------------------------------------------------------


async def _serve(cfg: StubConfig, host: str, port: int, reuse_port: bool) -> None:
    runner = web.AppRunner(create_app(cfg), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=4096)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _run_worker(cfg: StubConfig, host: str, port: int, reuse_port: bool) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(cfg, host, port, reuse_port))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.backends.stub_llm", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", default="stub")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma separated model names")
    p.add_argument(
        "--processes", type=int, default=1, help="worker processes sharing the port (SO_REUSEPORT)"
    )
    p.add_argument("--chunks", type=int, default=_env_int("STUB_CHUNKS", 10))
    p.add_argument("--chunk-delay-ms", type=int, default=_env_int("STUB_CHUNK_DELAY_MS", 0))
    p.add_argument("--answer-bytes", type=int, default=_env_int("STUB_ANSWER_BYTES", 300))
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--no-record", dest="record", action="store_false", help="disable the /_requests log")
    p.add_argument("--api-prefix", default="", help="serve the API only under this path prefix, e.g. /v1")
    p.add_argument("--no-model-list", dest="model_list", action="store_false", help="404 for model lists")
    p.add_argument(
        "--start-delay-ms", type=int, default=0, help="wait this long before listening (a slow model server)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.start_delay_ms > 0:
        time.sleep(args.start_delay_ms / 1000)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) or DEFAULT_MODELS
    cfg = StubConfig(
        name=args.name,
        models=models,
        chunks=max(1, args.chunks),
        chunk_delay_ms=max(0, args.chunk_delay_ms),
        answer_bytes=max(1, args.answer_bytes),
        embedding_dim=max(1, args.embedding_dim),
        record=args.record,
        api_prefix=args.api_prefix.rstrip("/"),
        model_list=args.model_list,
    )
    if args.processes <= 1:
        _run_worker(cfg, args.host, args.port, False)
        return
    ctx = multiprocessing.get_context("fork")
    workers = [
        ctx.Process(target=_run_worker, args=(cfg, args.host, args.port, True), daemon=True)
        for _ in range(args.processes)
    ]
    for w in workers:
        w.start()

    def _forward(signum: int, _frame: Any) -> None:
        for w in workers:
            if w.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, _forward)
    signal.signal(signal.SIGINT, _forward)
    for w in workers:
        w.join()


# --------------------------------------------------------------------------------------------------
# test helper
# --------------------------------------------------------------------------------------------------

_ROOT: Final = Path(__file__).resolve().parents[2]


def chunk_base(chunk_id: str, model: str) -> Json:
    """The members every OpenAI chat stream chunk starts with."""
    return {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_stub",
    }


class CIDict(dict[str, Any]):
    """dict with case-insensitive lookups (keys are stored lower-case)."""

    def __getitem__(self, key: str) -> Any:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key.lower() if isinstance(key, str) else key)

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


class StubServer:
    """Run the stub as a subprocess on 127.0.0.1 (sync API, stdlib only).

    >>> with StubServer(name="b1") as s:
    ...     s.set_mode("status", status=429, retry_after="20")
    """

    def __init__(
        self,
        name: str = "stub",
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        models: Iterable[str] | None = None,
        processes: int = 1,
        chunks: int | None = None,
        chunk_delay_ms: int | None = None,
        answer_bytes: int | None = None,
        extra_args: Iterable[str] = (),
        startup_timeout: float = 15.0,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port if port is not None else free_port()
        self.models = list(models) if models is not None else list(DEFAULT_MODELS)
        self.processes = processes
        self.startup_timeout = startup_timeout
        self._extra: list[str] = []
        for flag, val in (
            ("--chunks", chunks),
            ("--chunk-delay-ms", chunk_delay_ms),
            ("--answer-bytes", answer_bytes),
        ):
            if val is not None:
                self._extra += [flag, str(val)]
        self._extra += list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    # ---------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _cmd(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "tests.backends.stub_llm",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--name",
            self.name,
            "--models",
            ",".join(self.models),
            "--processes",
            str(self.processes),
            *self._extra,
        ]

    def start(self) -> StubServer:
        if self.is_running():
            return self
        self._spawn_and_wait()
        return self

    def _spawn_and_wait(self) -> None:
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the subprocess
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = str(_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            self._cmd(),
            cwd=_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"stub {self.name} exited with {self.proc.returncode}: {self._output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=0.5) as r:
                    if r.headers.get("X-Backend-Name") == self.name:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.02)  # poll interval
        self._kill_group(signal.SIGKILL)
        raise RuntimeError(f"stub {self.name} did not become healthy on {self.url}: {self._output()}")

    def _output(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return str(self._log.read()[-4000:].decode("utf-8", "replace"))

    def _kill_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Graceful stop (SIGTERM to the server's process group)."""
        self._kill_group(signal.SIGTERM)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """Hard kill (SIGKILL to the server's process group); in-flight connections drop."""
        self._kill_group(signal.SIGKILL)
        self.proc = None

    def restart(self) -> StubServer:
        """Stop (if running) and start again on the same port; control state is reset."""
        if self.is_running():
            self.stop()
        return self.start()

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---------------------------------------------------------------- control calls
    def _call(self, method: str, path: str, payload: Any = None, timeout: float = 5.0) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def set_mode(self, mode: str = "ok", **params: Any) -> Json:
        """POST /_control; replaces the whole fault config. Returns the new control state."""
        result: Json = self._call("POST", "/_control", {"mode": mode, **params})
        return result

    def control(self) -> Json:
        result: Json = self._call("GET", "/_control")
        return result

    def requests(self) -> list[Json]:
        items: list[Json] = self._call("GET", "/_requests")
        for item in items:
            item["headers"] = CIDict(item["headers"])
        return items

    def last_request(self, path: str) -> Json:
        """The last request to ``path``. Not simply the last request: the gateway's health probes reach a
        registered stand-in at any moment, so a probe may come after the request a test sent."""
        sent = [item for item in self.requests() if item["path"] == path]
        assert sent, f"no request to {path} reached {self.name}"
        return sent[-1]

    def clear_requests(self) -> None:
        self._call("DELETE", "/_requests")

    def set_load(self, **load: Any) -> Json:
        """POST /_load: what /metrics (vLLM) and /api/ps (Ollama) report from now on."""
        result: Json = self._call("POST", "/_load", load)
        return result

    def set_models(self, models: Iterable[str]) -> list[str]:
        """POST /_models: what the model lists name from now on."""
        result: list[str] = self._call("POST", "/_models", {"models": list(models)})["models"]
        return result

    def __repr__(self) -> str:
        return f"StubServer(name={self.name!r}, url={self.url!r}, running={self.is_running()})"


def iter_sse(raw: bytes) -> Iterator[tuple[str | None, str]]:
    """Tiny SSE parser for tests: yields (event, data) per event."""
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        event: str | None = None
        data: list[str] = []
        for line in block.split("\n"):
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
        yield event, "\n".join(data)


if __name__ == "__main__":
    main()
