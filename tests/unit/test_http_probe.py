"""The probe client's pure parts (health/http_probe.py): what it sends and how it reads an answer's head.
Its effects (connections, keep-alive, TLS, timeouts) are tested against real servers in
tests/integration/test_probe_client.py."""

from __future__ import annotations

import pytest

from control_plane.health.http_probe import ProtocolError, parse_head, request_bytes, target_of


@pytest.mark.parametrize(
    ("url", "origin", "line", "host"),
    [
        ("http://127.0.0.1:8000/v1/models", ("http", "127.0.0.1", 8000), "/v1/models", "127.0.0.1:8000"),
        (
            "https://api.openai.com/v1/models",
            ("https", "api.openai.com", 443),
            "/v1/models",
            "api.openai.com",
        ),
        ("http://h:80/api/tags", ("http", "h", 80), "/api/tags", "h"),
        ("http://[::1]:11434/api/tags", ("http", "::1", 11434), "/api/tags", "[::1]:11434"),
        (
            "https://x.example/models?api-version=1",
            ("https", "x.example", 443),
            "/models?api-version=1",
            "x.example",
        ),
        ("http://h:9", ("http", "h", 9), "/", "h:9"),
    ],
)
def test_target(url: str, origin: tuple[str, str, int], line: str, host: str) -> None:
    target = target_of(url)
    assert target.origin == origin
    assert target.head == f"GET {line} HTTP/1.1\r\nHost: {host}\r\n".encode()


@pytest.mark.parametrize(
    "url",
    ["ftp://h/x", "http:///x", "http://h/a b", "http://h/a\r\nX: y", "http://h/\x00", "unix:/run/x.sock"],
)
def test_target_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        target_of(url)


def test_request_bytes() -> None:
    request = request_bytes(target_of("http://h:1/v1/models"), {"Authorization": "Bearer k"})
    assert request == (
        b"GET /v1/models HTTP/1.1\r\nHost: h:1\r\nAuthorization: Bearer k\r\n"
        b"User-Agent: ishgw-probe\r\nAccept: */*\r\n\r\n"
    )


@pytest.mark.parametrize(
    "headers",
    [{"X": "a\r\nInjected: 1"}, {"X": "a\nb"}, {"X\r\nY": "1"}, {"X: Y": "1"}, {"X": "\u20ac"}],
)
def test_request_bytes_refuses_what_would_split_or_break_a_header(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        request_bytes(target_of("http://h/"), headers)


def test_parse_head() -> None:
    head = (
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 20\r\ncontent-length: 2\r\nX-A: 1\r\nx-a: 2\r\n\r\n"
    )
    status, http11, headers = parse_head(head)
    assert (status, http11) == (429, True)
    assert headers == {"retry-after": "20", "content-length": "2", "x-a": "2"}
    assert parse_head(b"HTTP/1.0 200\r\n\r\n")[:2] == (200, False)


@pytest.mark.parametrize(
    "head",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n X: folded\r\n\r\n",
    ],
)
def test_parse_head_refuses(head: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_head(head)
