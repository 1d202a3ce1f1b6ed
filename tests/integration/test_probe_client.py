"""The probe client (control_plane/health/http_probe.py) against real servers on 127.0.0.1: a scripted
asyncio TCP server (keep-alive, a server that closes idle connections, chunked and cut answers, silence,
garbage), TLS with a self-signed certificate, and the stand-in backend's model list."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from control_plane.health.http_probe import ProbeClient, ProtocolError
from tests.backends.stub_llm import StubServer
from tests.tls_util import make_self_signed

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[object]]


class Scripted:
    """A TCP server whose connections each run ``handler``; counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests = 0
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # asyncio.run cancels a handler still waiting on a kept-alive connection at the end; ending
            # normally here spares Python 3.11's start_server callback, which logs a cancelled handler
            # task as an error ("Exception in callback ... CancelledError").
            pass
        finally:
            writer.close()

    async def request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests += 1
        return head


@asynccontextmanager
async def scripted(
    handler: Callable[[Scripted], Handler], tls: ssl.SSLContext | None = None
) -> AsyncIterator[Scripted]:
    server = Scripted(lambda r, w: asyncio.sleep(0))
    server.handler = handler(server)
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=tls)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()


def answer(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def keep_alive(server: Scripted) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.request(reader)
            writer.write(answer(b'{"data":[{"id":"m"}]}', extra="Retry-After: 7\r\n"))
            await writer.drain()

    return handle


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())  # type: ignore[arg-type]


def test_keep_alive_serves_the_next_probe_on_the_same_connection() -> None:
    async def body() -> None:
        async with scripted(keep_alive) as server:
            client = ProbeClient()
            url = f"http://127.0.0.1:{server.port}/v1/models"
            for _ in range(5):
                response = await client.get(url, {"Authorization": "Bearer k"}, 2.0, 1 << 20)
                assert response.status == 200 and response.body == b'{"data":[{"id":"m"}]}'
                assert response.headers["retry-after"] == "7"
            assert server.requests == 5 and server.connections == 1 and client.connections_opened == 1
            await client.close()

    run(body)


def test_a_connection_the_server_closed_is_not_reused_and_the_probe_still_answers() -> None:
    """uvicorn (vLLM) closes a keep-alive connection idle for 5 s; here the server closes each one after
    its answer without saying so: the next probe finds it closed (or sends into it) and uses a new one."""

    def one_answer(server: Scripted) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.request(reader)
            writer.write(answer(b"{}"))
            await writer.drain()

        return handle

    async def body() -> None:
        async with scripted(one_answer) as server:
            client = ProbeClient()
            url = f"http://127.0.0.1:{server.port}/"
            for _ in range(3):
                assert (await client.get(url, {}, 2.0, 1 << 20)).status == 200
            assert server.connections == 3 and server.requests == 3
            await client.close()

    run(body)


def test_a_request_the_server_closes_on_unanswered_is_sent_once_more_on_a_new_connection() -> None:
    """The race keep-alive has: the server closes an idle connection just as a probe is sent on it."""

    def first_only(server: Scripted) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.request(reader)
            writer.write(answer(b"{}"))
            await writer.drain()
            await server.request(reader)  # the next request on this connection: closed, unanswered

        return handle

    async def body() -> None:
        async with scripted(first_only) as server:
            client = ProbeClient()
            url = f"http://127.0.0.1:{server.port}/"
            assert (await client.get(url, {}, 2.0, 1 << 20)).status == 200
            assert (await client.get(url, {}, 2.0, 1 << 20)).status == 200
            assert server.requests == 3 and server.connections == 2
            await client.close()
        async with scripted(lambda server: lambda reader, writer: server.request(reader)) as server:
            with pytest.raises(ProtocolError):  # a new connection closed unanswered: not sent again
                await ProbeClient().get(f"http://127.0.0.1:{server.port}/", {}, 2.0, 1 << 20)
            assert server.requests == 1

    run(body)


def test_idle_connections_older_than_the_idle_time_are_closed() -> None:
    async def body() -> None:
        async with scripted(keep_alive) as server:
            client = ProbeClient(idle_s=0.05)
            url = f"http://127.0.0.1:{server.port}/"
            await client.get(url, {}, 2.0, 1 << 20)
            await asyncio.sleep(0.1)  # past the idle time (a duration under test, not a wait for a condition)
            await client.get(url, {}, 2.0, 1 << 20)
            assert client.connections_opened == 2 and server.connections == 2
            await client.close()

    run(body)


def test_chunked_cut_and_unbounded_answers() -> None:
    def varied(server: Scripted) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                head = await server.request(reader)
                path = head.split(b" ")[1]
                if path == b"/chunked":
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n"
                    )
                elif path == b"/big":
                    writer.write(answer(b"x" * 5000))
                elif path == b"/big-chunked":
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1388\r\n" + b"y" * 5000
                    )
                elif path == b"/no-length":
                    writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nto the end")
                    await writer.drain()
                    return
                elif path == b"/continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"after", "503 Busy"))
                await writer.drain()

        return handle

    async def body() -> None:
        async with scripted(varied) as server:
            client = ProbeClient()
            base = f"http://127.0.0.1:{server.port}"
            chunked = await client.get(f"{base}/chunked", {}, 2.0, 1 << 20)
            assert chunked.body == b"hello world"
            big = await client.get(f"{base}/big", {}, 2.0, 1000)
            assert big.body == b"x" * 1000  # read to the bound; the connection is not reused
            cut = await client.get(f"{base}/big-chunked", {}, 2.0, 1000)
            assert cut.body == b"y" * 1000
            assert (await client.get(f"{base}/no-length", {}, 2.0, 1 << 20)).body == b"to the end"
            interim = await client.get(f"{base}/continue", {}, 2.0, 1 << 20)
            assert (interim.status, interim.body) == (503, b"after")
            # chunked kept the connection; each cut or unbounded answer closed one
            assert client.connections_opened == 4 and server.requests == 5
            await client.close()

    run(body)


def test_silence_times_out_and_garbage_is_a_protocol_error() -> None:
    def silent(server: Scripted) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.request(reader)
            await asyncio.sleep(30)

        return handle

    def garbage(server: Scripted) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await server.request(reader)
            if b"/long" in head:
                writer.write(b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * 70_000 + b"\r\n\r\n")
            elif b"/cut" in head:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
                await writer.drain()
                return
            else:
                writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
            await writer.drain()

        return handle

    async def body() -> None:
        client = ProbeClient()
        async with scripted(silent) as server:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await client.get(f"http://127.0.0.1:{server.port}/", {}, 0.3, 1 << 20)
            assert time.monotonic() - started < 2
        async with scripted(garbage) as server:
            for path in ("/", "/long", "/cut"):
                with pytest.raises(ProtocolError):
                    await client.get(f"http://127.0.0.1:{server.port}{path}", {}, 2.0, 1 << 20)
        with pytest.raises(OSError):
            await client.get(f"http://127.0.0.1:{server.port}/", {}, 2.0, 1 << 20)  # nothing listens now
        await client.close()

    run(body)


def test_https_with_the_host_name_checked(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_self_signed(cert, key)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def body() -> None:
        async with scripted(keep_alive, tls=server_tls) as server:
            trusting = ssl.create_default_context(cafile=str(cert))
            client = ProbeClient(ssl_context=trusting)
            url = f"https://127.0.0.1:{server.port}/v1/models"
            for _ in range(2):
                assert (await client.get(url, {}, 2.0, 1 << 20)).status == 200
            assert client.connections_opened == 1
            await client.close()
            with pytest.raises(ssl.SSLError):  # the default trust store does not know the certificate
                await ProbeClient().get(url, {}, 2.0, 1 << 20)

    run(body)


def test_the_stand_in_backends_model_list() -> None:
    with StubServer(name="probe", models=["a", "b"]) as stub:

        async def body() -> None:
            client = ProbeClient()
            for _ in range(3):
                response = await client.get(f"http://127.0.0.1:{stub.port}/v1/models", {}, 5.0, 1 << 20)
                assert response.status == 200 and b'"a"' in response.body and b'"b"' in response.body
            assert client.connections_opened == 1
            await client.close()

        run(body)
