"""A TCP proxy in front of etcd that loses the replies of writes etcd has applied.

calicnm's etcd client talks gRPC: HTTP/2 with prior knowledge, one TCP connection per
endpoint carrying every call as a stream.  :class:`EtcdProxy` forwards such connections
byte for byte, and reads enough of the client's side to know each stream's method: HTTP/2
frame headers, and the HPACK header blocks (:class:`HeaderDecoder`) of ``HEADERS`` and
``CONTINUATION`` frames.  When a request to one of the chosen methods (by default etcd's
writes, :data:`WRITE_METHODS`) has been fully sent (``END_STREAM``), a :class:`DropPolicy`
decides whether its reply is to be lost.  If so, the first frame etcd sends on that stream
is not forwarded: the proxy cuts the whole connection instead (both sockets shut down).
etcd answers a unary call only once its handler returned, so the write had been applied
(or its compare had failed) by then, and the client sees only a broken connection: an
ambiguous commit.  Every other call in flight on that connection breaks with it.  A
policy may follow some drops with a blackout (new connections closed at once for a
while), so that the client's retries cannot find out in time what became of the write.

:class:`ProxyProcess` runs the same proxy as ``python -m lab.etcd_proxy`` in a network
namespace (the fabric's, where the datacenter etcd listens), steered through a control
file and reporting through a stats file, both JSON, in its work directory.

Limits, chosen on purpose: Huffman-coded header strings are not decoded.  calicnm's client
(gRPC core) sends its header values as plain literals; a connection whose headers cannot
be decoded (e.g. from ``etcdctl``, whose Go client Huffman-codes) is counted in
``blind_connections`` and forwarded untouched, never cut.  Everything here is bounded: at
most ``max_connections`` connections (two threads each), and :meth:`EtcdProxy.stop` shuts
every socket down and joins every thread with a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Self

from lab.netns import Netns
from lab.paths import REPO
from lab.procs import Cleanup, HarnessError, Managed, Process

__all__ = [
    "WRITE_METHODS",
    "DropPolicy",
    "EtcdProxy",
    "HeaderDecoder",
    "HpackError",
    "HuffmanCoded",
    "ProxyProcess",
    "main",
]

_log = logging.getLogger(__name__)

WRITE_METHODS = frozenset(
    {"/etcdserverpb.KV/Txn", "/etcdserverpb.KV/Put", "/etcdserverpb.KV/DeleteRange"}
)
"""The gRPC methods of etcd that change data (as calicnm's client uses them)."""

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""What an HTTP/2 client sends before its first frame."""

# HTTP/2 frame types and flags (RFC 7540 section 6).
_DATA = 0x0
_HEADERS = 0x1
_RST_STREAM = 0x3
_CONTINUATION = 0x9
_END_STREAM = 0x1
_END_HEADERS = 0x4
_PADDED = 0x8
_PRIORITY = 0x20
_FRAME_HEADER = 9

STOP_TIMEOUT = 5.0
"""Bound on joining one thread in :meth:`EtcdProxy.stop`."""
RECENT_DROPS = 100
"""How many drops the stats list individually (the counters count all)."""


# --------------------------------------------------------------------------------------------
# HPACK (RFC 7541), decoding only, without Huffman


class HpackError(ValueError):
    """A header block this decoder cannot make sense of."""


class HuffmanCoded(HpackError):
    """A Huffman-coded string: not decoded here (see the module's docstring)."""


_STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = tuple(
    (name.encode(), value.encode())
    for name, value in (
        (":authority", ""),
        (":method", "GET"),
        (":method", "POST"),
        (":path", "/"),
        (":path", "/index.html"),
        (":scheme", "http"),
        (":scheme", "https"),
        (":status", "200"),
        (":status", "204"),
        (":status", "206"),
        (":status", "304"),
        (":status", "400"),
        (":status", "404"),
        (":status", "500"),
        ("accept-charset", ""),
        ("accept-encoding", "gzip, deflate"),
        ("accept-language", ""),
        ("accept-ranges", ""),
        ("accept", ""),
        ("access-control-allow-origin", ""),
        ("age", ""),
        ("allow", ""),
        ("authorization", ""),
        ("cache-control", ""),
        ("content-disposition", ""),
        ("content-encoding", ""),
        ("content-language", ""),
        ("content-length", ""),
        ("content-location", ""),
        ("content-range", ""),
        ("content-type", ""),
        ("cookie", ""),
        ("date", ""),
        ("etag", ""),
        ("expect", ""),
        ("expires", ""),
        ("from", ""),
        ("host", ""),
        ("if-match", ""),
        ("if-modified-since", ""),
        ("if-none-match", ""),
        ("if-range", ""),
        ("if-unmodified-since", ""),
        ("last-modified", ""),
        ("link", ""),
        ("location", ""),
        ("max-forwards", ""),
        ("proxy-authenticate", ""),
        ("proxy-authorization", ""),
        ("range", ""),
        ("referer", ""),
        ("refresh", ""),
        ("retry-after", ""),
        ("server", ""),
        ("set-cookie", ""),
        ("strict-transport-security", ""),
        ("transfer-encoding", ""),
        ("user-agent", ""),
        ("vary", ""),
        ("via", ""),
        ("www-authenticate", ""),
    )
)
_ENTRY_OVERHEAD = 32
_DEFAULT_TABLE_SIZE = 4096
_MAX_TABLE_SIZE = 1 << 20
_MAX_INTEGER = 1 << 32


class HeaderDecoder:
    """The decoding side of one HPACK context (one direction of one connection).

    :meth:`decode` must see every header block of that direction, in order, since blocks
    add to the dynamic table that later blocks refer to.  It raises :class:`HpackError`
    (:class:`HuffmanCoded` for a Huffman-coded string); the context is then unusable.
    """

    def __init__(self, max_size: int = _DEFAULT_TABLE_SIZE) -> None:
        self._entries: deque[tuple[bytes, bytes]] = deque()  # newest first
        self._size = 0
        self._max = max_size

    @property
    def table_size(self) -> int:
        """The dynamic table's size as HPACK counts it (names, values, 32 per entry)."""
        return self._size

    @property
    def table(self) -> list[tuple[bytes, bytes]]:
        """The dynamic table, newest entry first."""
        return list(self._entries)

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        headers: list[tuple[bytes, bytes]] = []
        pos = 0
        while pos < len(block):
            first = block[pos]
            if first & 0x80:  # indexed field
                index, pos = _integer(block, pos, 7)
                headers.append(self._lookup(index))
            elif first & 0x40:  # literal, added to the table
                header, pos = self._literal(block, pos, 6)
                headers.append(header)
                self._add(header)
            elif first & 0x20:  # dynamic table size update
                size, pos = _integer(block, pos, 5)
                if size > _MAX_TABLE_SIZE:
                    raise HpackError(f"table size update to {size}")
                self._max = size
                self._evict(0)
            else:  # literal without indexing (0000) or never indexed (0001)
                header, pos = self._literal(block, pos, 4)
                headers.append(header)
        return headers

    def _literal(self, block: bytes, pos: int, prefix: int) -> tuple[tuple[bytes, bytes], int]:
        index, pos = _integer(block, pos, prefix)
        if index:
            name = self._lookup(index)[0]
        else:
            name, pos = _string(block, pos)
        value, pos = _string(block, pos)
        return (name, value), pos

    def _lookup(self, index: int) -> tuple[bytes, bytes]:
        if index <= 0:
            raise HpackError("header index 0")
        if index <= len(_STATIC_TABLE):
            return _STATIC_TABLE[index - 1]
        dynamic = index - len(_STATIC_TABLE) - 1
        if dynamic >= len(self._entries):
            raise HpackError(f"header index {index} beyond the table")
        return self._entries[dynamic]

    def _add(self, header: tuple[bytes, bytes]) -> None:
        size = len(header[0]) + len(header[1]) + _ENTRY_OVERHEAD
        self._evict(size)
        if size <= self._max:  # an entry larger than the table empties it and is not kept
            self._entries.appendleft(header)
            self._size += size

    def _evict(self, room: int) -> None:
        while self._entries and self._size + room > self._max:
            name, value = self._entries.pop()
            self._size -= len(name) + len(value) + _ENTRY_OVERHEAD


def _integer(data: bytes, pos: int, prefix: int) -> tuple[int, int]:
    """An HPACK integer with a ``prefix``-bit prefix at ``data[pos]``; (value, next pos)."""
    if pos >= len(data):
        raise HpackError("header block ends inside an integer")
    limit = (1 << prefix) - 1
    value = data[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        if pos >= len(data):
            raise HpackError("header block ends inside an integer")
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if value > _MAX_INTEGER:
            raise HpackError("header integer too large")
        if not byte & 0x80:
            return value, pos


def _string(data: bytes, pos: int) -> tuple[bytes, int]:
    if pos >= len(data):
        raise HpackError("header block ends before a string")
    huffman = bool(data[pos] & 0x80)
    length, pos = _integer(data, pos, 7)
    if pos + length > len(data):
        raise HpackError("header string runs past the block")
    if huffman:
        raise HuffmanCoded("a Huffman-coded header string")
    return bytes(data[pos : pos + length]), pos + length


# --------------------------------------------------------------------------------------------
# which replies to lose


@dataclass(frozen=True)
class DropPolicy:
    """Which replies of the chosen methods to lose, and what follows a loss.

    ``every``: every ``every``-th such request since the policy was set (0: none by count);
    ``probability``: each other one with this chance; ``limit``: at most this many drops
    under this policy (``None``: no limit).  ``blackouts``: after every
    ``blackout_every``-th drop, the proxy closes every new connection at once for that
    many seconds (the values are used in turn), so the client's retry cannot learn in
    time what became of its write.  The default loses nothing."""

    every: int = 0
    probability: float = 0.0
    limit: int | None = None
    seed: int | None = None
    blackouts: tuple[float, ...] = ()
    blackout_every: int = 1

    def __post_init__(self) -> None:
        if self.every < 0 or not 0.0 <= self.probability <= 1.0 or self.blackout_every < 1:
            raise ValueError(f"bad drop policy {self}")
        if (self.limit is not None and self.limit < 0) or any(b < 0 for b in self.blackouts):
            raise ValueError(f"bad drop policy {self}")

    @property
    def active(self) -> bool:
        return (self.every > 0 or self.probability > 0) and self.limit != 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["blackouts"] = list(self.blackouts)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DropPolicy:
        limit = data.get("limit")
        seed = data.get("seed")
        return cls(
            every=int(data.get("every", 0)),
            probability=float(data.get("probability", 0.0)),
            limit=None if limit is None else int(limit),
            seed=None if seed is None else int(seed),
            blackouts=tuple(float(b) for b in data.get("blackouts", ())),
            blackout_every=int(data.get("blackout_every", 1)),
        )


class _Decider:
    """A policy with its own counts (they start again when the policy changes)."""

    def __init__(self, policy: DropPolicy) -> None:
        self.policy = policy
        self.seen = 0
        self.dropped = 0
        self.cuts = 0
        self._rng = random.Random(policy.seed)

    def decide(self) -> bool:
        self.seen += 1
        policy = self.policy
        if not policy.active or (policy.limit is not None and self.dropped >= policy.limit):
            return False
        hit = (policy.every > 0 and self.seen % policy.every == 0) or (
            policy.probability > 0 and self._rng.random() < policy.probability
        )
        if hit:
            self.dropped += 1
        return hit

    def blackout_after_cut(self) -> float:
        """A reply was just lost: seconds of blackout to follow (0: none)."""
        self.cuts += 1
        policy = self.policy
        if not policy.blackouts or self.cuts % policy.blackout_every:
            return 0.0
        return policy.blackouts[(self.cuts // policy.blackout_every - 1) % len(policy.blackouts)]


# --------------------------------------------------------------------------------------------
# the proxy


class _Stats:
    """The proxy's counters, behind one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connections = 0
        self.open = 0
        self.refused = 0
        self.upstream_failures = 0
        self.blind_connections = 0
        self.requests = 0
        self.chosen = 0
        self.doomed = 0
        self.dropped = 0
        self.collateral = 0
        self.blackouts = 0
        self.blackout_refused = 0
        self.blackout_until = 0.0
        """``time.monotonic()`` until which new connections are closed at once."""
        self.methods: dict[str, int] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_DROPS)
        self.version = 0
        """Bumped on every change (the stats file is rewritten when it moves)."""

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "connections": self.connections,
                "open": self.open,
                "refused": self.refused,
                "upstream_failures": self.upstream_failures,
                "blind_connections": self.blind_connections,
                "requests": self.requests,
                "chosen": self.chosen,
                "doomed": self.doomed,
                "dropped": self.dropped,
                "collateral": self.collateral,
                "blackouts": self.blackouts,
                "blackout_refused": self.blackout_refused,
                "in_blackout": time.monotonic() < self.blackout_until,
                "methods": dict(self.methods),
                "recent_drops": list(self.recent),
            }


class _Link:
    """One client connection and its upstream connection, pumped by two threads."""

    def __init__(self, proxy: EtcdProxy, number: int, client: socket.socket) -> None:
        self.proxy = proxy
        self.number = number
        self.client = client
        self.server: socket.socket | None = None
        self.lock = threading.Lock()
        self.closed = False
        self.blind = False
        self.paths: dict[int, str] = {}
        self.inflight: set[int] = set()
        self.doomed: set[int] = set()
        self.decoder = HeaderDecoder()
        self._headers: tuple[int, bytearray, bool] | None = None
        self.threads: list[threading.Thread] = []

    # ---- lifecycle --------------------------------------------------------------------

    def run(self) -> None:
        """Connect upstream, then pump both directions (the calling thread does one)."""
        try:
            server = socket.create_connection(self.proxy.upstream, self.proxy.connect_timeout)
        except OSError as exc:
            _log.warning("connection %d: upstream %s: %s", self.number, self.proxy.upstream, exc)
            with self.proxy.counters.lock:
                self.proxy.counters.upstream_failures += 1
                self.proxy.counters.version += 1
            self.close()
            return
        server.settimeout(None)
        for sock in (self.client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.lock:
            self.server = server
            closed = self.closed
        if closed:  # stopped while connecting
            self.close()
            return
        back = threading.Thread(
            target=self._pump_from_server, name=f"etcd-proxy-{self.number}-s2c", daemon=True
        )
        self.threads.append(back)
        back.start()
        self._pump_from_client()

    def close(self) -> None:
        """Shut both sockets down (idempotent); the pumps then end on their own."""
        with self.lock:
            first = not self.closed
            self.closed = True
            sockets = [s for s in (self.client, self.server) if s is not None]
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if first:
            _log.debug("connection %d closed", self.number)

    def alive(self) -> bool:
        """Is a pump of it (or its start) still running?"""
        return not self.threads or any(t.is_alive() for t in self.threads)

    def release(self) -> None:
        """Free both sockets: only once both pumps ended (or were given up on)."""
        self.close()
        for sock in (self.client, self.server):
            if sock is not None:
                sock.close()

    # ---- client to etcd ---------------------------------------------------------------

    def _pump_from_client(self) -> None:
        assert self.server is not None
        buf = bytearray()
        preface = True
        try:
            while True:
                data = self.client.recv(65536)
                if not data:
                    break
                if self.blind and not preface:
                    self.server.sendall(data)
                    continue
                buf += data
                if preface:
                    if len(buf) < len(PREFACE):
                        continue
                    preface = False
                    if bytes(buf[: len(PREFACE)]) != PREFACE:
                        self._go_blind("no HTTP/2 preface")
                        self.server.sendall(bytes(buf))
                        buf.clear()
                        continue
                    start = len(PREFACE)
                else:
                    start = 0
                used = start
                for pos, end, ftype, flags, stream in _frames(buf, start):
                    self._from_client(ftype, flags, stream, bytes(buf[pos + _FRAME_HEADER : end]))
                    used = end
                self.server.sendall(bytes(buf[:used]))
                del buf[:used]
        except OSError:
            pass
        finally:
            self.close()

    def _from_client(self, ftype: int, flags: int, stream: int, payload: bytes) -> None:
        if self.blind:
            return
        if ftype == _HEADERS:
            fragment = self._header_fragment(flags, payload)
            if fragment is None:
                return
            self._headers = (stream, bytearray(fragment), bool(flags & _END_STREAM))
            if flags & _END_HEADERS:
                self._headers_done()
        elif ftype == _CONTINUATION:
            if self._headers is None or self._headers[0] != stream:
                self._go_blind("CONTINUATION without HEADERS")
                return
            self._headers[1].extend(payload)
            if flags & _END_HEADERS:
                self._headers_done()
        elif ftype == _DATA:
            if flags & _END_STREAM:
                self._request_sent(stream)
        elif ftype == _RST_STREAM:
            with self.lock:
                self.paths.pop(stream, None)
                self.inflight.discard(stream)
                self.doomed.discard(stream)

    def _header_fragment(self, flags: int, payload: bytes) -> bytes | None:
        pos, end = 0, len(payload)
        if flags & _PADDED:
            if not payload:
                self._go_blind("empty padded HEADERS")
                return None
            pos, end = 1, len(payload) - payload[0]
        if flags & _PRIORITY:
            pos += 5
        if pos > end:
            self._go_blind("bad HEADERS padding")
            return None
        return payload[pos:end]

    def _headers_done(self) -> None:
        assert self._headers is not None
        stream, block, end_stream = self._headers
        self._headers = None
        try:
            headers = self.decoder.decode(bytes(block))
        except HpackError as exc:
            self._go_blind(str(exc))
            return
        path = next((v for k, v in headers if k == b":path"), b"").decode(errors="replace")
        with self.lock:
            self.paths[stream] = path
            self.inflight.add(stream)
        if end_stream:
            self._request_sent(stream)

    def _request_sent(self, stream: int) -> None:
        """The client's side of ``stream`` is complete: decide about its reply."""
        with self.lock:
            path = self.paths.pop(stream, "")
        proxy = self.proxy
        doom = False
        with proxy.counters.lock:
            proxy.counters.requests += 1
            proxy.counters.methods[path] = proxy.counters.methods.get(path, 0) + 1
            if path in proxy.methods:
                proxy.counters.chosen += 1
                doom = proxy.decider.decide()
                if doom:
                    proxy.counters.doomed += 1
            proxy.counters.version += 1
        if doom:
            with self.lock:
                self.doomed.add(stream)
                self.paths[stream] = path
            _log.debug(
                "connection %d: the reply to %s (stream %d) will be lost", *self._who(stream)
            )

    def _who(self, stream: int) -> tuple[int, str, int]:
        return self.number, self.paths.get(stream, "?"), stream

    def _go_blind(self, why: str) -> None:
        if self.blind:
            return
        self.blind = True
        _log.warning(
            "connection %d: cannot follow its requests (%s); forwarding only", self.number, why
        )
        with self.proxy.counters.lock:
            self.proxy.counters.blind_connections += 1
            self.proxy.counters.version += 1

    # ---- etcd to client ---------------------------------------------------------------

    def _pump_from_server(self) -> None:
        assert self.server is not None
        buf = bytearray()
        try:
            while True:
                data = self.server.recv(65536)
                if not data:
                    break
                buf += data
                used, doomed = 0, None
                for _start, end, ftype, flags, stream in _frames(buf, 0):
                    if self._from_server(ftype, flags, stream):
                        doomed = stream
                        break
                    used = end
                # Forward what came before the first frame of a doomed stream, then cut.
                if used:
                    self.client.sendall(bytes(buf[:used]))
                    del buf[:used]
                if doomed is not None:
                    self._cut(doomed)
                    break
        except OSError:
            pass
        finally:
            self.close()

    def _from_server(self, ftype: int, flags: int, stream: int) -> bool:
        """Note one frame from etcd; True if it belongs to a doomed stream."""
        with self.lock:
            if stream in self.doomed:
                return True
            if (ftype in (_HEADERS, _DATA) and flags & _END_STREAM) or ftype == _RST_STREAM:
                self.inflight.discard(stream)
        return False

    def _cut(self, stream: int) -> None:
        with self.lock:
            path = self.paths.get(stream, "?")
            others = len(self.inflight - {stream})
        self.close()
        proxy = self.proxy
        with proxy.counters.lock:
            proxy.counters.dropped += 1
            proxy.counters.collateral += others
            blackout = proxy.decider.blackout_after_cut()
            if blackout:
                proxy.counters.blackouts += 1
                proxy.counters.blackout_until = time.monotonic() + blackout
            proxy.counters.recent.append(
                {"time": time.time(), "connection": self.number, "stream": stream, "method": path}
            )
            proxy.counters.version += 1
        _log.info(
            "connection %d: lost the reply to %s (stream %d), cutting %d other call(s)%s",
            self.number,
            path,
            stream,
            others,
            f"; no new connection for {blackout:.1f}s" if blackout else "",
        )


def _frames(buf: bytearray, start: int) -> Iterator[tuple[int, int, int, int, int]]:
    """The whole HTTP/2 frames in ``buf`` from ``start``: (start, end, type, flags, stream)."""
    pos = start
    while len(buf) - pos >= _FRAME_HEADER:
        end = pos + _FRAME_HEADER + int.from_bytes(buf[pos : pos + 3], "big")
        if end > len(buf):
            return
        stream = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        yield pos, end, buf[pos + 3], buf[pos + 4], stream
        pos = end


def _address(text: str) -> tuple[str, int]:
    """``host:port`` (or ``http://host:port``) as a socket address."""
    text = text.removeprefix("http://").rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{text!r} is not host:port")
    return host.strip("[]"), int(port)


class EtcdProxy(Managed):
    """The proxy, in this process: an accept thread plus two threads per connection.

    :meth:`start` binds ``listen`` (port 0: a free one; see :attr:`url`) and returns once
    it accepts.  :meth:`set_policy` changes which replies are lost from the next request
    on.  :meth:`stats` returns the counters: ``connections`` (accepted), ``open``,
    ``requests`` (request streams the client completed), ``chosen`` (those to the chosen
    methods), ``doomed`` (whose reply was to be lost), ``dropped`` (replies actually
    withheld, each cutting its connection), ``collateral`` (other calls in flight on a cut
    connection, watches included), ``blackouts`` and ``blackout_refused`` (connections
    closed at once during one), ``blind_connections``, ``methods`` (requests per method)
    and ``recent_drops``.  :meth:`stop` is idempotent and bounded.
    """

    def __init__(
        self,
        upstream: str | tuple[str, int],
        listen: str | tuple[str, int] = ("127.0.0.1", 0),
        policy: DropPolicy | None = None,
        methods: Iterable[str] = WRITE_METHODS,
        max_connections: int = 128,
        connect_timeout: float = 5.0,
    ) -> None:
        self.upstream = _address(upstream) if isinstance(upstream, str) else upstream
        self.listen = _address(listen) if isinstance(listen, str) else listen
        self.methods = frozenset(methods)
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.counters = _Stats()
        self.decider = _Decider(policy or DropPolicy())
        self._listener: socket.socket | None = None
        self._bound: tuple[str, int] | None = None
        self._stop = threading.Event()
        self._accepter: threading.Thread | None = None
        self._links: list[_Link] = []
        self._links_lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the real port once started)."""
        return self._bound or self.listen

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> Self:
        if self._listener is not None:
            raise HarnessError("etcd proxy already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(self.listen)
            listener.listen(64)
            listener.settimeout(0.2)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        host, port = listener.getsockname()[:2]
        self._bound = (str(host), int(port))
        self._accepter = threading.Thread(target=self._accept, name="etcd-proxy", daemon=True)
        self._accepter.start()
        _log.info("etcd proxy on %s:%d -> %s:%d", *self.address, *self.upstream)
        return self

    def set_policy(self, policy: DropPolicy) -> None:
        with self.counters.lock:
            self.decider = _Decider(policy)
            self.counters.blackout_until = 0.0
            self.counters.version += 1
        _log.info("drop policy now %s", policy)

    @property
    def policy(self) -> DropPolicy:
        return self.decider.policy

    def stats(self) -> dict[str, Any]:
        """The counters (see the class docstring) and the policy in force."""
        snap = self.counters.snapshot()
        snap["policy"] = self.decider.policy.to_json()
        return snap

    def _accept(self) -> None:
        assert self._listener is not None
        number = 0
        while not self._stop.is_set():
            try:
                client, _peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                time.sleep(0.1)
                continue
            client.settimeout(None)
            number += 1
            with self.counters.lock:
                dark = time.monotonic() < self.counters.blackout_until
                self.counters.blackout_refused += dark
                self.counters.version += 1
            if dark:
                _log.debug("connection %d closed at once: blackout", number)
                client.close()
                continue
            with self._links_lock:
                self._links = [link for link in self._links if link.alive()]
                full = len(self._links) >= self.max_connections
                if not full:
                    link = _Link(self, number, client)
                    self._links.append(link)
            with self.counters.lock:
                self.counters.connections += 1
                self.counters.refused += full
                self.counters.version += 1
            if full:
                _log.warning("connection %d refused: %d open", number, self.max_connections)
                client.close()
                continue
            thread = threading.Thread(
                target=self._serve, args=(link,), name=f"etcd-proxy-{number}-c2s", daemon=True
            )
            link.threads.append(thread)
            thread.start()

    def _serve(self, link: _Link) -> None:
        with self.counters.lock:
            self.counters.open += 1
        try:
            link.run()
        finally:
            for thread in link.threads:
                if thread is not threading.current_thread():
                    thread.join(timeout=STOP_TIMEOUT)
            link.release()
            with self.counters.lock:
                self.counters.open -= 1
                self.counters.version += 1

    def stop(self) -> None:
        """Stop accepting, cut every connection, join every thread (each bounded)."""
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        if self._accepter is not None:
            self._accepter.join(timeout=STOP_TIMEOUT)
        with self._links_lock:
            links = list(self._links)
        for link in links:
            link.close()
        deadline = time.monotonic() + STOP_TIMEOUT
        for link in links:
            for thread in list(link.threads):
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        stuck = [t.name for link in links for t in link.threads if t.is_alive()]
        if stuck or (self._accepter is not None and self._accepter.is_alive()):
            raise HarnessError(f"etcd proxy threads did not end: {stuck}")

    _open = start

    def _close(self, raise_errors: bool) -> None:
        cleanup = Cleanup("etcd proxy")
        cleanup.step("stop", self.stop)
        cleanup.finish(raise_errors)


# --------------------------------------------------------------------------------------------
# as a process: ``python -m lab.etcd_proxy``, steered through files

CONTROL_FILE = "control.json"
STATS_FILE = "stats.json"
READY_TIMEOUT = 30.0


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` with ``data`` atomically (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def serve(
    listen: str,
    upstream: str,
    state_dir: Path,
    methods: Iterable[str] = WRITE_METHODS,
    poll: float = 0.1,
) -> int:
    """Run a proxy until SIGTERM/SIGINT: the policy is read from ``state_dir``'s
    control file whenever its ``generation`` changes; the stats file (counters, the
    policy and the generation in force, ``ready``) is rewritten whenever they change."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    control_path = state_dir / CONTROL_FILE
    stats_path = state_dir / STATS_FILE
    control = _read_json(control_path) or {}
    generation = int(control.get("generation", 0))
    proxy = EtcdProxy(
        upstream,
        listen,
        policy=DropPolicy.from_json(control.get("policy", {})),
        methods=methods,
    )
    proxy.start()

    def write_stats(final: bool = False) -> None:
        snap = proxy.stats()
        host, port = proxy.address
        snap.update(ready=not final, stopped=final, generation=generation)
        snap.update(listen=f"{host}:{port}", pid=os.getpid())
        _write_json(stats_path, snap)

    written = proxy.counters.version
    write_stats()
    try:
        while not stop.wait(poll):
            control = _read_json(control_path) or {}
            wanted = int(control.get("generation", generation))
            if wanted != generation:
                generation = wanted
                proxy.set_policy(DropPolicy.from_json(control.get("policy", {})))
            if proxy.counters.version != written:
                written = proxy.counters.version
                write_stats()
    finally:
        proxy.stop()
        write_stats(final=True)
    return 0


class ProxyProcess(Managed):
    """``python -m lab.etcd_proxy`` in ``netns`` (``None``: this namespace).

    Its files are in ``workdir``: ``proxy.log`` (one line per drop), the control file
    and the stats file.  :meth:`start` waits (at most 30 s) until it listens, and on any
    failure stops it again and raises :class:`~lab.procs.HarnessError`.
    :meth:`set_policy` returns once the proxy confirms the new policy; :meth:`stats`
    reads its counters (see :class:`EtcdProxy`); after :meth:`stop` they are final.
    :meth:`stop` sends SIGTERM (SIGKILL after 10 s) and is idempotent.
    """

    def __init__(
        self,
        upstream: str,
        listen: str,
        workdir: Path,
        netns: Netns | None = None,
        policy: DropPolicy | None = None,
        methods: Sequence[str] = tuple(sorted(WRITE_METHODS)),
    ) -> None:
        self.upstream = upstream
        self.listen = listen
        self.workdir = workdir
        self.netns = netns
        self.methods = tuple(methods)
        self._policy = policy or DropPolicy()
        self._generation = 0
        self.proc: Process | None = None

    @property
    def url(self) -> str:
        host, port = _address(self.listen)
        return f"http://{host}:{port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "proxy.log"

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "lab.etcd_proxy", "--listen", self.listen]
        argv += ["--upstream", self.upstream, "--state-dir", str(self.workdir)]
        for method in self.methods:
            argv += ["--method", method]
        return argv

    def start(self) -> Self:
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            (self.workdir / STATS_FILE).unlink(missing_ok=True)
            self._write_control()
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            self.proc = Process(
                self.argv(), self.log_path, netns=self.netns, env=env, cwd=REPO, name="etcd-proxy"
            ).start()
            self._wait(lambda s: bool(s.get("ready")), READY_TIMEOUT, "to listen")
        except BaseException:
            self.cleanup(raise_errors=False)
            raise
        return self

    def _write_control(self) -> None:
        _write_json(
            self.workdir / CONTROL_FILE,
            {"generation": self._generation, "policy": self._policy.to_json()},
        )

    def _wait(self, check: Any, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats is not None and check(stats):
                return stats
            if self.proc is None or not self.proc.is_running():
                tail = self.proc.log_tail(20) if self.proc else ""
                raise HarnessError(f"etcd proxy exited before {what}:\n{tail}")
            if time.monotonic() >= deadline:
                raise HarnessError(f"etcd proxy did not {what} in {timeout:.0f}s: {stats}")
            time.sleep(0.05)

    def set_policy(self, policy: DropPolicy, timeout: float = 15.0) -> None:
        self._generation += 1
        self._policy = policy
        self._write_control()
        gen = self._generation
        self._wait(lambda s: s.get("generation") == gen, timeout, "take the new policy")

    def stats(self) -> dict[str, Any] | None:
        """The latest counters it wrote (``None`` before the first write)."""
        return _read_json(self.workdir / STATS_FILE)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(signal.SIGTERM, timeout=10)

    def cleanup(self, raise_errors: bool = True) -> None:
        cleanup = Cleanup(f"etcd proxy {self.listen}")
        cleanup.step("stopping it", self.stop)
        cleanup.finish(raise_errors)

    _open = start
    _close = cleanup


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lab.etcd_proxy",
        description="A TCP proxy in front of etcd that can lose the replies of writes.",
    )
    parser.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    parser.add_argument("--upstream", required=True, help="etcd's HOST:PORT")
    parser.add_argument("--state-dir", required=True, type=Path, help="control and stats files")
    parser.add_argument(
        "--method",
        action="append",
        help="a gRPC method whose replies may be lost (default: etcd's writes)",
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stdout,
    )
    args.state_dir.mkdir(parents=True, exist_ok=True)
    return serve(args.listen, args.upstream, args.state_dir, args.method or WRITE_METHODS)


if __name__ == "__main__":
    sys.exit(main())
