"""Bounded background load (count and time) for integration tests."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Self

import httpx
import openai


class ClientThreads:
    """Client threads, each running ``_run`` (bounded by its subclass) until ``stop()``: started by ``with``,
    stopped and joined when it ends; what failed in ``failures``."""

    def __init__(self, threads: int) -> None:
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        raise NotImplementedError

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self.failures.append(repr(exc)[:200])

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Load(ClientThreads):
    """Threads sending chat requests until stopped, a deadline, or a request budget.

    sdk=True: the official openai SDK, which retries connection errors as every SDK does (nginx closes
    idle keep-alive connections when it reloads; a request racing that close is retried by the client).
    sdk=False: a raw httpx client; with retry_transport=True it retries a request once on a transport
    error (a reset keep-alive connection, what every SDK retries) but never on an HTTP status, so a 5xx or
    429 the gateway lets through still counts; with retry_transport=False it never retries at all.
    rate: at most this many requests per second over all threads, so that a scenario that must last its
    seconds does not spend its request budget early on a fast machine.
    """

    def __init__(
        self,
        url: str,
        model: str,
        *,
        sdk: bool = True,
        threads: int = 4,
        seconds: float = 60.0,
        max_requests: int = 50_000,
        path: str = "/v1/chat/completions",
        timeout: float = 15.0,
        retry_transport: bool = True,
        rate: float | None = None,
    ) -> None:
        self.retry_transport = retry_transport
        self.interval = threads / rate if rate else 0.0  # seconds between one thread's requests
        self.url, self.model, self.sdk, self.seconds, self.max_requests = (
            url,
            model,
            sdk,
            seconds,
            max_requests,
        )
        self.path, self.timeout = path, timeout
        self.seen: Counter[str] = Counter()
        self.first_seen: dict[str, float] = {}
        self.last_seen: dict[str, float] = {}
        self.latencies: list[float] = []
        super().__init__(threads)

    @property
    def total(self) -> int:
        return sum(self.seen.values()) + len(self.failures)

    def _send_sdk(self, client: openai.OpenAI) -> str:
        raw = client.chat.completions.with_raw_response.create(model=self.model, messages=[])
        return raw.headers.get("X-ISHGW-Instance", "")

    def _send_raw(self, client: httpx.Client) -> str:
        body = {"model": self.model, "messages": [], "stream": False}
        try:
            r = client.post(self.path, json=body)
        except httpx.TransportError:
            if not self.retry_transport:
                raise
            r = client.post(self.path, json=body)
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code} {r.text[:120]}")
        instance: str = r.headers.get("X-ISHGW-Instance", "")
        return instance

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        sdk = openai.OpenAI(base_url=f"{self.url}/v1", api_key="k", timeout=self.timeout, max_retries=2)
        raw = httpx.Client(base_url=self.url, timeout=self.timeout)
        try:
            next_at = time.monotonic()
            while not self._stop.is_set() and time.monotonic() < deadline and self.total < self.max_requests:
                if self.interval:  # paced: wait for this thread's next slot (or a stop)
                    next_at += self.interval
                    if self._stop.wait(max(0.0, next_at - time.monotonic())):
                        break
                started = time.monotonic()
                try:
                    name = self._send_sdk(sdk) if self.sdk else self._send_raw(raw)
                except (openai.OpenAIError, httpx.HTTPError, RuntimeError) as exc:
                    self._failed(exc)
                    continue
                now = time.monotonic()
                with self._lock:
                    self.seen[name] += 1
                    self.first_seen.setdefault(name, now)
                    self.last_seen[name] = now
                    self.latencies.append(now - started)
        finally:
            sdk.close()
            raw.close()
