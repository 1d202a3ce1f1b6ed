"""nginx's JSON access log, one syslog datagram per request: parsing (pure) and the receiver (effect)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, NamedTuple

import orjson

log = logging.getLogger(__name__)

# The nginx side of this contract: the log_format in http.conf.j2, rendered from LOG_FIELDS below.
LOG_TAG = "ishgw"
_SPLIT = re.compile(r", | : ")
_STATUS_CODES = {str(code): code for code in range(1000)}
_new = tuple.__new__


class Attempt(NamedTuple):
    address: str
    status: int | None  # None: no answer recorded ("-")
    response_ms: float | None


class Limited(NamedTuple):
    """A 429 answer as a pool's _429_<n> location noted it: which attempt, and its headers."""

    attempt: int  # its index in LogRecord.attempts
    retry_after: str
    retry_after_ms: str


class LogRecord(NamedTuple):  # a NamedTuple: a tenth of a frozen dataclass's construction cost
    at: float  # unix seconds
    request_id: str
    pool: str
    model: str
    status: int
    request_ms: float
    attempts: tuple[Attempt, ...]
    retry_after: str
    retry_after_ms: str
    key_id: str = ""
    # 429s that nginx did not retry in place (a pool's _429_<n> locations): nginx's own variables carry
    # only the last attempt's headers.
    limited: tuple[Limited, ...] = ()
    # The last attempt's time to its response header (ms; None: none) and the answer's Content-Type: a
    # stream's time to first byte (ishgw_time_to_first_byte_seconds).
    header_ms: float | None = None
    content_type: str = ""
    # Tokens of the answer as its usage reported them (the last attempt's); None: not known.
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class LogField(NamedTuple):
    name: str  # what it holds (format_line's keyword)
    variable: str  # the nginx variable that fills it
    counted: bool = False  # only in a tree that counts usage (nothing sets it otherwise); the last fields


# The access-log line of log_format gw_log, in order: the one place its fields and variables are written.
# The line is a JSON array of strings, one per field at its index (escape=json: every value a JSON string,
# so no value can stand for another field); orjson reads an array of 15 strings in half the time of an
# object with their keys, and the datagram is ~90 bytes shorter. The log_format in http.conf.j2 is rendered
# from this table (control_plane/render/nginx.py log_format_lines); _record reads it by position.
LOG_FIELDS = (
    LogField("msec", "msec"),
    LogField("request_id", "gw_request_id"),
    LogField("pool", "proxy_host"),
    LogField("model", "gw_model"),
    LogField("status", "status"),
    LogField("request_time", "request_time"),
    LogField("upstream_addr", "upstream_addr"),
    LogField("upstream_status", "upstream_status"),
    LogField("upstream_response_time", "upstream_response_time"),
    LogField("retry_after", "upstream_http_retry_after"),
    LogField("retry_after_ms", "upstream_http_retry_after_ms"),
    LogField("client_id", "gw_client_id"),
    LogField("limited_429s", "gw_429"),
    LogField("upstream_header_time", "upstream_header_time"),
    LogField("sent_http_content_type", "sent_http_content_type"),
    # "<prompt> <completion>" tokens as the answer reported them (gw.gateway.counted sets $gw_tokens in
    # the log phase); "" when the answer reported none (an estimate is not logged); absent (a line one
    # field shorter) when usage is not counted.
    LogField("tokens", "gw_tokens", counted=True),
)
# The line's fields by what they hold, in order.
FIELDS = tuple(f.name for f in LOG_FIELDS)
_LENGTH = len(LOG_FIELDS)  # a line of a tree that counts usage; one without has the uncounted fields only
_MARK = f"{LOG_TAG}: "
_MARK_BYTES = _MARK.encode()
_MARK_LENGTH = len(_MARK_BYTES)


def format_line(**values: str) -> bytes:
    """A datagram as nginx sends it (tests and benchmarks); fields not given are empty."""
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown log fields: {sorted(unknown)}")
    message = json.dumps([values.get(name, "") for name in FIELDS], separators=(",", ":"))
    return f"<190>Nov 23 11:00:00 {_MARK}{message}".encode()


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _milliseconds(seconds: str) -> float | None:
    try:
        return float(seconds) * 1000
    except ValueError:
        return None


def _status(text: str) -> int | None:
    code = _STATUS_CODES.get(text)  # the codes as nginx writes them: one lookup, no check or conversion
    if code is not None:
        return code
    return int(text) if text.isascii() and text.isdigit() else None  # "²" is a digit int() refuses


def parse_attempts(addresses: str, statuses: str, times: str) -> tuple[Attempt, ...]:
    if not addresses or addresses == "-":
        return ()
    if "," not in addresses and " : " not in addresses:  # the common case: one attempt
        return (_new(Attempt, (addresses, _status(statuses), _milliseconds(times))),)
    addrs = _SPLIT.split(addresses)
    codes = _SPLIT.split(statuses) if statuses else []
    durations = _SPLIT.split(times) if times else []
    attempts = []
    for index, address in enumerate(addrs):
        code = _status(codes[index]) if index < len(codes) else None
        seconds = _number(durations[index]) if index < len(durations) else None
        attempts.append(Attempt(address, code, None if seconds is None else seconds * 1000))
    return tuple(attempts)


def last_seconds_ms(text: str) -> float | None:
    """The last value of an nginx per-attempt time list ("0.010, 0.020 : 0.030") in ms; None if "-"."""
    return _milliseconds(text[text.rfind(" ") + 1 :]) if text else None


def parse_limited(text: str) -> tuple[Limited, ...]:
    """$gw_429: "<$upstream_addr so far>|<Retry-After>|<retry-after-ms>;" per 429 caught. The addresses so
    far end with the attempt that answered 429, so their count gives its index. Entries that do not
    parse are skipped (their 429 gets the default cooldown)."""
    if not text or text == "-":
        return ()
    found = []
    for entry in text.split(";"):
        addresses, _, headers = entry.partition("|")
        retry_after, bar, retry_after_ms = headers.rpartition("|")
        if addresses and bar:
            found.append(Limited(len(_SPLIT.split(addresses)) - 1, retry_after, retry_after_ms))
    return tuple(found)


_TOKEN_DIGITS = 12


def parse_tokens(text: str) -> tuple[int | None, int | None]:
    """$gw_tokens, "<prompt> <completion>" -> both counts; (None, None) when absent or malformed."""
    prompt, space, completion = text.partition(" ")
    if (  # [0-9]{1,12} [0-9]{1,12}: str methods, a tenth of the regular expression's cost (isdigit: not "")
        space
        and text.isascii()
        and prompt.isdigit()
        and completion.isdigit()
        and len(prompt) <= _TOKEN_DIGITS
        and len(completion) <= _TOKEN_DIGITS
    ):
        return int(prompt), int(completion)
    return None, None


_NO_TOKENS = (None, None)


def parse_datagram(data: bytes) -> LogRecord | None:
    """One syslog datagram (RFC 3164 framing from nginx) -> LogRecord, or None when it is not ours (a line
    of an older nginx's format too: a JSON object, during an upgrade's reload)."""
    start = data.find(_MARK_BYTES)
    if start < 0:
        return None
    body = data[start + _MARK_LENGTH :]
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:  # a value that is not UTF-8 (escape=json passes such bytes through): keep the record
            fields = orjson.loads(body.decode("utf-8", errors="replace"))
        except orjson.JSONDecodeError:
            return None
    if type(fields) is not list:
        return None
    try:
        return _record(fields)
    except (TypeError, AttributeError, ValueError):  # not nginx's: it writes every value as a string
        return None


def pool_keyed(
    records: Sequence[LogRecord], shared: frozenset[str], names: Mapping[str, str]
) -> Sequence[LogRecord]:
    """The records with each attempt at an address whose pools name different instances
    (GatewaySpec.pool_keyed_addresses) keyed "<pool>|<address>" where ``names`` (its address_names) has
    that key: the consumers look an attempt's instance up by its address, and one server registered once
    per model is told apart by the pool that answered. An attempt in an earlier pool of a fallback chain
    keeps its address (the line names only the last pool). Records without such attempts are the same
    objects."""
    out: list[LogRecord] | None = None
    for index, record in enumerate(records):
        attempts = record.attempts
        if not any(a.address in shared for a in attempts):
            continue
        pool = record.pool
        keyed = tuple(
            a._replace(address=key) if a.address in shared and (key := f"{pool}|{a.address}") in names else a
            for a in attempts
        )
        if out is None:
            out = list(records)
        out[index] = record._replace(attempts=keyed)
    return records if out is None else out


def _record(fields: list[Any]) -> LogRecord:
    """The record from the line's fields, by position (LOG_FIELDS' order; escape=json makes every value a
    string). A line of any other length raises ValueError."""
    if len(fields) == _LENGTH:
        t, rid, pool, model, st, rt, ua, us, urt, ra, ram, key, x429, uht, ct, tok = fields
        prompt, completion = parse_tokens(tok) if tok else _NO_TOKENS
    else:  # a tree that does not count usage: no tokens field
        t, rid, pool, model, st, rt, ua, us, urt, ra, ram, key, x429, uht, ct = fields
        prompt = completion = None
    try:  # nginx's times: numbers
        at, seconds = float(t), float(rt)
    except ValueError:
        at, seconds = _number(t) or 0.0, _number(rt) or 0.0
    # tuple.__new__: the NamedTuples' own __new__ is a Python function taking each field (a third of the cost)
    return _new(
        LogRecord,
        (
            at,
            rid,
            pool,
            model,
            _status(st) or 0,
            seconds * 1000,
            parse_attempts(ua, us, urt),
            ra,
            ram,
            key,
            parse_limited(x429) if x429 else (),
            last_seconds_ms(uht),
            ct,
            prompt,
            completion,
        ),
    )


def retry_after_seconds(retry_after: str, retry_after_ms: str, now: float) -> float | None:
    """Seconds to wait from Retry-After (delta seconds or HTTP-date) or retry-after-ms; None if absent."""
    ms = _number(retry_after_ms.strip()) if retry_after_ms and retry_after_ms != "-" else None
    if ms is not None and ms >= 0:
        return ms / 1000
    value = retry_after.strip() if retry_after else ""
    if not value or value == "-":
        return None
    seconds = _number(value)
    if seconds is not None:
        return max(0.0, seconds)
    with contextlib.suppress(TypeError, ValueError, IndexError):
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    return None


# A burst of requests must not overflow the socket: nginx drops what does not fit (measured: a unix
# datagram socket, whose queue holds 10 datagrams, lost 5-12 % of the records under load).
RECEIVE_BUFFER = 8 * 1024 * 1024
# Records are read in batches: after a wake-up the receiver drains the socket, then rests, so under load
# one event-loop wake-up serves tens of records (one wake-up per datagram cost the controller half a core
# at 6,000 requests/s). Passive health sees a record at most BATCH_INTERVAL_S later. A datagram in flight
# is charged to nginx's sending socket, whose buffer (net.core.wmem_default, 208 KB) holds ~160 lines: a
# worker past ~3,200 requests/s lost lines while the receiver rested 50 ms, one past ~16,000 while it
# rested 10 ms (27 % of them at 34,000 requests/s over two workers). So the receiver rests BATCH_INTERVAL_S
# while, at the rate of the last drain, that lets at most CALM_LINES lines per nginx worker arrive (half a
# worker's room), and otherwise only as long as lets BUSY_LINES arrive (a tenth: the rest of the room is for
# the times the controller is not scheduled at once on a busy machine). Not shorter than needed: each
# wake-up costs the controller ~50-90 us (measured, a loop of sleep and recv), so the short rests are for
# the rates that need them. The rate of the last drain says nothing of a burst after a pause: after one
# (and at the start) the rest starts at MIN_REST_S and at most doubles from one drain to the next.
BATCH_INTERVAL_S = 0.01
CALM_LINES = 80
BUSY_LINES = 16
MIN_REST_S = 0.0005
MAX_BATCH = 20_000
MAX_DATAGRAM = 65_535


Batch = Sequence[LogRecord]


def rest_after(drained: int, seconds: float, workers: int = 1, previous: float = BATCH_INTERVAL_S) -> float:
    """The receiver's rest after a drain of ``drained`` datagrams that came in ``seconds`` (while the drain
    before was handled and the receiver rested) from ``workers`` nginx workers: BATCH_INTERVAL_S while at that
    rate it lets in at most CALM_LINES per worker, else as long as lets in BUSY_LINES; at most twice the
    ``previous`` rest (0 after a pause), MIN_REST_S at least."""
    longest = min(BATCH_INTERVAL_S, max(MIN_REST_S, 2 * previous))
    if drained <= 0 or seconds <= 0:
        return longest
    per_worker = drained / seconds / max(1, workers)  # lines per second
    if per_worker * BATCH_INTERVAL_S <= CALM_LINES:
        return longest
    return max(MIN_REST_S, min(longest, BUSY_LINES / per_worker))


class Rests:
    """The receiver's rests drain after drain: rest_after with what it needs of the drains before."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers  # nginx's workers, each with its own send buffer of lines in flight
        self.rest = self.handled = 0.0

    def after(self, waited: float, drained: int, handled: float) -> float:
        """The rest after a drain of ``drained`` datagrams, the first of which the receiver ``waited`` for
        and which took ``handled`` seconds. This drain's datagrams came while the one before it was handled
        and while the receiver rested (the wait on an idle socket, which the first datagram ends, is not
        counted: the rate errs high); a wait longer than a whole rest is a pause, after which the next
        lines may come at any rate."""
        if waited > BATCH_INTERVAL_S:
            self.rest = self.handled = 0.0
        self.rest = rest_after(drained, self.handled + self.rest, self.workers, self.rest)
        self.handled = handled
        return self.rest


def each(sink: Callable[[LogRecord], None]) -> Callable[[Batch], None]:
    """A batch sink that hands the records to ``sink`` one by one; one that fails does not stop the rest."""

    def records(batch: Batch) -> None:
        for record in batch:
            try:
                sink(record)
            except Exception:  # one bad record must not stop the stream
                log.exception("log record handling failed")

    return records


class LogReceiver:
    """The syslog receiver (unix or loopback UDP datagrams): datagrams -> LogRecords -> sink, one list per
    drain of the socket (under load hundreds: the consumers loop over them with their lookups made once)."""

    def __init__(self, sock: socket.socket, sink: Callable[[Batch], None], workers: int = 1) -> None:
        self.sock = sock
        self.sink = sink
        self.rests = Rests(workers)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="log-receiver")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.sock.close()

    def handle(self, data: bytes) -> None:
        """One datagram (a batch of one)."""
        self.handle_all((data,))

    def handle_all(self, datagrams: Iterable[bytes]) -> None:
        """Parse ``datagrams`` and hand what is ours to the sink, in one list."""
        records = [record for record in map(parse_datagram, datagrams) if record is not None]
        if not records:
            return
        try:
            self.sink(records)
        except Exception:  # a bad batch must not stop the stream
            log.exception("log record handling failed")

    def drain(self, first: bytes | None = None) -> int:
        """Handle ``first`` and every datagram already queued (at most MAX_BATCH), as one batch; how many."""
        batch = [] if first is None else [first]
        recv = self.sock.recv
        for _ in range(MAX_BATCH):
            try:
                batch.append(recv(MAX_DATAGRAM))
            except (BlockingIOError, InterruptedError):
                break
        self.handle_all(batch)
        return len(batch)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            waiting = loop.time()
            first = await loop.sock_recv(self.sock, MAX_DATAGRAM)
            began = loop.time()
            drained = self.drain(first)
            await asyncio.sleep(self.rests.after(began - waiting, drained, loop.time() - began))


def bind_udp(host: str, port: int) -> socket.socket:
    """A loopback UDP socket, non-blocking, with a large receive buffer. Any local user can send to it."""
    host = host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        option = getattr(socket, "SO_RCVBUFFORCE", socket.SO_RCVBUF)
        try:  # root may exceed net.core.rmem_max
            sock.setsockopt(socket.SOL_SOCKET, option, RECEIVE_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


# A unix datagram socket queues at most net.unix.max_dgram_qlen datagrams (10 on a kernel without systemd's
# 512), fixed when the socket is made; past that nginx drops lines. Each nginx worker can have ~160 lines in
# flight (its send buffer), so the queue is never the limit at this length.
UNIX_QUEUE_LEN = 16384
QLEN_SYSCTL = Path("/proc/sys/net/unix/max_dgram_qlen")


@contextlib.contextmanager
def _deep_unix_queue(sysctl: Path = QLEN_SYSCTL) -> Iterator[None]:
    """Raise net.unix.max_dgram_qlen while the receiver's socket is made, and put it back at once: only
    that socket gets the long queue. Needs root; otherwise a warning says what will happen."""
    try:
        current = int(sysctl.read_text())
    except (OSError, ValueError):
        yield
        return
    if current >= UNIX_QUEUE_LEN:
        yield
        return
    try:
        sysctl.write_text(str(UNIX_QUEUE_LEN))
    except OSError:
        log.warning(
            "log stream: the unix socket will queue only %d lines (net.unix.max_dgram_qlen) and the"
            " controller cannot raise that for its socket: nginx drops access-log lines under load. Run the"
            " controller as root, or set net.unix.max_dgram_qlen to %d or more",
            current,
            UNIX_QUEUE_LEN,
        )
        yield
        return
    try:
        yield
    finally:
        sysctl.write_text(str(current))


def bind_unix(path: Path, group: int | None) -> socket.socket:
    """A unix datagram socket that only its owner and ``group`` (the nginx workers) may write to (0660;
    0600 without a group). A stale socket file from an earlier run is replaced."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    with _deep_unix_queue():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind(str(path))  # created under the umask (0755 with the usual 022): not writable by others
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, 0o660 if group is not None else 0o600)
    except OSError:
        sock.close()
        raise
    return sock


def bind(address: str, group: int | None = None) -> socket.socket:
    """The receiver's socket for "unix:/path" or "HOST:PORT" (UDP)."""
    if address.startswith("unix:"):
        return bind_unix(Path(address[5:]), group)
    host, _, port = address.rpartition(":")
    return bind_udp(host, int(port))


async def listen(address: str, sink: Callable[[LogRecord], None], group: int | None = None) -> LogReceiver:
    """Bind the receiver (see bind) and start reading, record by record; close() stops it."""
    return await listen_batches(address, each(sink), group)


async def listen_batches(
    address: str, sink: Callable[[Batch], None], group: int | None = None, workers: int = 1
) -> LogReceiver:
    """Bind the receiver (see bind) and start reading, a list of records per drain, from ``workers`` nginx
    workers; close() stops it."""
    receiver = LogReceiver(bind(address, group), sink, workers)
    receiver.start()
    return receiver
