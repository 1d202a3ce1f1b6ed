"""The probes' HTTP client: one GET of a small answer, over keep-alive connections kept per origin.

At 10,000 instances the prober sends about 1,000 probes a second, and aiohttp's ClientSession.get was
about 43 % of the prober's CPU (per request: a URL object, a multidict of headers, a response object,
tracing hooks, a timeout object, the connector's bookkeeping). A probe needs far less: HTTP/1.1 GET over
http or https, a total timeout, the status, a few headers and a body read up to a bound. This client does
that on asyncio streams, and nothing more:

- connections are kept per origin (scheme, host, port) while idle for at most IDLE_S (below uvicorn's
  5-second keep-alive, vLLM's server), at most MAX_IDLE_PER_ORIGIN per origin and MAX_IDLE in all; idle
  ones past their time are closed by a sweep at most once a second (never one per probe and instance);
- a request on a reused connection that the server closed meanwhile (no byte of an answer) is sent once
  more on a new connection (a GET is safe to repeat);
- host names are resolved through a small cache (DNS_TTL_S, at most DNS_ENTRIES names);
- the answer's head is at most MAX_HEAD bytes, its body is read up to the caller's ``limit`` (chunked or
  by Content-Length or to the end), and a connection whose answer was cut there is not reused;
- no Accept-Encoding is sent: answers come uncompressed. Header values holding CR or LF are refused.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import ip_address
from urllib.parse import urlsplit

IDLE_S = 4.0
MAX_IDLE_PER_ORIGIN = 64
MAX_IDLE = 256
MAX_HEAD = 64 * 1024
DNS_TTL_S = 60.0
DNS_ENTRIES = 4096
SWEEP_S = 1.0
DEFAULT_PORTS = {"http": 80, "https": 443}
USER_AGENT = "ishgw-probe"

Origin = tuple[str, str, int]  # scheme, host, port


class ProtocolError(Exception):
    """The answer is not the HTTP/1.x the client reads."""


class Stale(Exception):
    """A reused connection was closed by the server before it answered."""


class NoAnswer(ProtocolError):
    """The connection closed before the first byte of an answer."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]  # names in lower case; the last of a repeated header
    body: bytes


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0

    def usable(self, now: float, idle_s: float) -> bool:
        return now - self.idle_since < idle_s and not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


@dataclass(frozen=True)
class Target:
    origin: Origin
    head: bytes  # the request line and the Host header


def target_of(url: str) -> Target:
    """Where a GET of ``url`` goes and the start of its request. Raises ValueError for what it cannot ask."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or DEFAULT_PORTS[scheme]
    host = parts.hostname
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = f"[{host}]" if ":" in host else host
    if parts.port is not None and parts.port != DEFAULT_PORTS[scheme]:
        authority = f"{authority}:{port}"
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in path + authority):
        raise ValueError("the URL holds a space or a control character")
    return Target((scheme, host, port), f"GET {path} HTTP/1.1\r\nHost: {authority}\r\n".encode("latin-1"))


def request_bytes(target: Target, headers: Mapping[str, str]) -> bytes:
    lines = [target.head]
    for name, value in headers.items():
        if any(c in name for c in "\r\n:\0 ") or any(c in value for c in "\r\n\0"):
            raise ValueError(f"header {name!r} holds a character a header may not")
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    lines.append(f"User-Agent: {USER_AGENT}\r\nAccept: */*\r\n\r\n".encode())
    return b"".join(lines)


def parse_head(head: bytes) -> tuple[int, bool, dict[str, str]]:
    """(status, HTTP/1.1, headers) of an answer's head (the status line and headers, CRLF CRLF included)."""
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code = rest[:3]
    well_formed = len(code) == 3 and code.isdigit() and rest[3:4] in (b"", b" ")
    if not version.startswith(b"HTTP/1.") or not well_formed:
        raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise ProtocolError(f"malformed header line: {line[:80]!r}")
        headers[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
    return int(code), version == b"HTTP/1.1", headers


async def _read_chunked(reader: asyncio.StreamReader, limit: int) -> tuple[bytes, bool]:
    body = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        size_text = line[:-2].split(b";", 1)[0].strip()
        if not size_text or len(size_text) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
            raise ProtocolError(f"malformed chunk size: {line[:40]!r}")
        size = int(size_text, 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return bytes(body), True
        if len(body) + size > limit:
            body += await reader.readexactly(limit - len(body))
            return bytes(body), False
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise ProtocolError("a chunk does not end with CRLF")


async def _read_to_end(reader: asyncio.StreamReader, limit: int) -> bytes:
    body = bytearray()
    while len(body) < limit:
        data = await reader.read(limit - len(body))
        if not data:
            break
        body += data
    return bytes(body)


async def read_response(reader: asyncio.StreamReader, limit: int) -> tuple[Response, bool]:
    """One answer to a GET, and whether its connection may carry another request."""
    first = True
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError as exc:
            raise ProtocolError(f"the answer's head is longer than {MAX_HEAD} bytes") from exc
        except asyncio.IncompleteReadError as exc:
            if first and not exc.partial:
                raise NoAnswer("the connection closed before an answer") from exc
            raise
        first = False
        status, keep_alive, headers = parse_head(head)
        if not 100 <= status < 200:
            break  # 1xx: an interim answer, the final one follows
    keep_alive = keep_alive and "close" not in headers.get("connection", "").lower()
    if status in (204, 304):
        return Response(status, headers, b""), keep_alive
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body, complete = await _read_chunked(reader, limit)
        return Response(status, headers, body), keep_alive and complete
    length_text = headers.get("content-length")
    if length_text is None:
        return Response(status, headers, await _read_to_end(reader, limit)), False
    if not length_text.isdigit():
        raise ProtocolError(f"malformed Content-Length: {length_text[:40]!r}")
    length = int(length_text)
    body = await reader.readexactly(min(length, limit))
    return Response(status, headers, body), keep_alive and length <= limit


class ProbeClient:
    def __init__(self, ssl_context: ssl.SSLContext | None = None, idle_s: float = IDLE_S) -> None:
        self._ssl = ssl_context
        self.idle_s = idle_s
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._idle_count = 0
        self._swept = time.monotonic()
        self._dns: dict[str, tuple[float, tuple[str, ...]]] = {}
        self.connections_opened = 0  # for tests and the bench: how often keep-alive did not serve

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def get(self, url: str, headers: Mapping[str, str], timeout_s: float, limit: int) -> Response:
        """GET ``url``; raises TimeoutError past ``timeout_s`` (connecting included), OSError when it
        cannot connect or the connection breaks, ProtocolError for an answer it cannot read, ValueError
        for a URL or header it will not send."""
        target = target_of(url)
        request = request_bytes(target, headers)
        async with asyncio.timeout(timeout_s):
            connection = self._take(target.origin)
            if connection is not None:
                try:
                    return await self._exchange(connection, target.origin, request, limit, reused=True)
                except Stale:
                    pass
            connection = await self._connect(target.origin)
            return await self._exchange(connection, target.origin, request, limit, reused=False)

    async def _exchange(
        self, connection: _Connection, origin: Origin, request: bytes, limit: int, reused: bool
    ) -> Response:
        keep = False
        try:
            connection.writer.write(request)
            try:
                await connection.writer.drain()
                response, keep = await read_response(connection.reader, limit)
            except (NoAnswer, ConnectionError) as exc:
                # Sent on a connection the server had closed (or closed meanwhile): once more, on a new one.
                if reused:
                    raise Stale from exc
                raise
            return response
        except asyncio.IncompleteReadError as exc:
            raise ProtocolError(f"the connection closed in the answer ({len(exc.partial)} bytes)") from exc
        finally:
            if keep:
                self._put(origin, connection)
            else:
                connection.close()

    def _take(self, origin: Origin) -> _Connection | None:
        now = time.monotonic()
        self._sweep(now)
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            self._idle_count -= 1
            if connection.usable(now, self.idle_s):
                return connection
            connection.close()
        return None

    def _put(self, origin: Origin, connection: _Connection) -> None:
        idle = self._idle.setdefault(origin, deque())
        if len(idle) >= MAX_IDLE_PER_ORIGIN or self._idle_count >= MAX_IDLE:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)
        self._idle_count += 1

    def _sweep(self, now: float) -> None:
        """Close the connections idle too long (at most once every SWEEP_S)."""
        if now - self._swept < SWEEP_S:
            return
        self._swept = now
        for origin in list(self._idle):
            idle = self._idle[origin]
            while idle and not idle[0].usable(now, self.idle_s):  # the oldest first
                idle.popleft().close()
                self._idle_count -= 1
            if not idle:
                del self._idle[origin]

    async def _addresses(self, host: str, port: int) -> tuple[str, ...]:
        try:
            ip_address(host)
            return (host,)
        except ValueError:
            pass
        now = time.monotonic()
        cached = self._dns.get(host)
        if cached is not None and cached[0] > now:
            return cached[1]
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = tuple(sorted({str(info[4][0]) for info in infos}, key=lambda a: (":" in a, a)))
        if len(self._dns) >= DNS_ENTRIES:
            self._dns.clear()
        self._dns[host] = (now + DNS_TTL_S, addresses)
        return addresses

    async def _connect(self, origin: Origin) -> _Connection:
        scheme, host, port = origin
        tls = scheme == "https"
        failure: OSError = OSError(f"{host} did not resolve")
        for address in await self._addresses(host, port):
            try:
                reader, writer = await asyncio.open_connection(
                    address,
                    port,
                    ssl=self._context() if tls else None,
                    server_hostname=host if tls else None,
                    limit=MAX_HEAD,
                )
            except OSError as exc:
                failure = exc
                continue
            self.connections_opened += 1
            return _Connection(reader, writer)
        raise failure

    async def close(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
        self._idle_count = 0
