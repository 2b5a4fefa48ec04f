"""The daemon's one HTTP listener: ``/metrics``, ``/healthz``, ``/readyz`` and pluggable routes.

Served by `waitress <https://docs.pylonsproject.org/projects/waitress/>`_ in a daemon thread,
bound from ``[metrics] listen = "host:port"`` (``[::1]:9108`` for IPv6, port 0 for an ephemeral
port, read back from :attr:`OpsServer.port`). Other features add routes with
:meth:`OpsServer.add_route`; a route's handler takes a :class:`Request` and returns a
:class:`Response` whose body is bytes or an iterator of byte chunks (streamed as they come, e.g.
an MJPEG preview, until the client leaves or the server stops).

Nobody can tie the listener up: waitress accepts connections on one event loop and runs
requests on a fixed pool of worker threads, so idle sockets cost a file descriptor, not a
thread. On top of waitress's idle timeout (``idle_timeout_s``, between requests on a keep-alive
connection) the server closes a connection that takes longer than ``read_timeout_s`` to send its
request (or sends nothing), and one whose response has not moved for ``write_timeout_s`` (a
client that stopped reading). At most ``max_connections`` are open at once (further ones wait in
the kernel's backlog). A ``Host`` header that names neither this machine's loopback names, an IP
address, the listen host nor ``[metrics] allowed_hosts`` gets 421, so a DNS-rebinding web page
cannot read the cameras. Errors go through logging; a client that resets its connection is a
DEBUG line, not a traceback.

(The module is ``httpd``, not ``http``: a file named ``http.py`` shadows the standard library's
``http`` package whenever its folder lands on ``sys.path``, as with ``python -m doctest`` or
pytest's default import mode.)

Example:
    >>> import urllib.request
    >>> from daemon.ops.metrics import Metrics
    >>> from daemon.ops.health import Health
    >>> srv = OpsServer("127.0.0.1:0", metrics=Metrics(), health=Health())
    >>> srv.add_route("/cameras/{camera}/hello", lambda req: Response.text(f"hi {req.params['camera']}"))
    >>> srv.start()
    >>> urllib.request.urlopen(f"{srv.url}/cameras/hall/hello").read()
    b'hi hall'
    >>> b"process_resident_memory_bytes" in urllib.request.urlopen(f"{srv.url}/metrics").read()
    True
    >>> srv.stop()
"""

from __future__ import annotations

import http
import ipaddress
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from wsgiref.headers import Headers

from prometheus_client.exposition import choose_encoder
from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import WSGITask

from daemon.ops.links import host_url

log = logging.getLogger(__name__)

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


def parse_listen(listen: str) -> tuple[str, int]:
    """Split ``host:port`` (IPv6 as ``[addr]:port``; empty host = all IPv4 interfaces).

    Example:
        >>> parse_listen("127.0.0.1:9108"), parse_listen("[::1]:0"), parse_listen(":9108")
        (('127.0.0.1', 9108), ('::1', 0), ('', 9108))
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address must be host:port, got {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"IPv6 addresses must be bracketed, as in [::1]:9108; got {listen!r}")
    p = int(port)
    if not 0 <= p <= 65535:
        raise ValueError(f"port out of range in {listen!r}")
    return host, p


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket for ``host:port``; raises OSError (e.g. port taken).

    ``""`` binds every IPv4 address; ``"::"`` every address, IPv4 included where the host allows
    dual stack.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    if not host:
        family, addr = socket.AF_INET, ("0.0.0.0", port)
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and addr[0] == "::":
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:
                pass
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class Request:
    """What a route handler sees."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any
    """Case-insensitive: ``headers.get("Accept")``."""
    params: dict[str, str] = field(default_factory=dict)
    stopping: threading.Event = field(default_factory=threading.Event)
    """Set when the server shuts down: streaming bodies should end."""
    abort: Callable[[], None] = lambda: None
    """Close this request's connection now (e.g. to evict a stream whose client stopped reading)."""


@dataclass
class Response:
    """A status, headers and a body (bytes, or an iterator of chunks to stream)."""

    status: int = 200
    body: bytes | Iterable[bytes] = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode(), "text/plain; charset=utf-8")

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(obj, sort_keys=True).encode() + b"\n", "application/json")


Handler = Callable[[Request], Response]


@dataclass(frozen=True)
class _Route:
    template: str
    pattern: re.Pattern[str]
    handler: Handler
    prefix: bool


def _compile(template: str, prefix: bool) -> re.Pattern[str]:
    if not template.startswith("/"):
        raise ValueError(f"route must start with '/': {template!r}")
    parts = re.split(r"(\{[A-Za-z_][A-Za-z0-9_]*\})", template)
    rx = "".join(f"(?P<{p[1:-1]}>[^/]+)" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(rx + ("(?P<rest>.*)" if prefix else "") + r"\Z")


class HostCheck:
    """Which ``Host`` header values the listener answers.

    Example:
        >>> check = HostCheck("0.0.0.0", ["box.lan"])
        >>> [check("localhost:9108"), check("[::1]:9108"), check("10.1.2.3:9108"), check("box.lan")]
        [True, True, True, True]
        >>> check("evil.example:9108"), check(None)
        (False, True)
    """

    def __init__(self, listen_host: str, allowed: Iterable[str] = ()):
        names = {n.lower() for n in allowed}
        self.any = "*" in names
        self.names = names | set(LOOPBACK_NAMES) | ({listen_host.lower()} if listen_host else set())

    def __call__(self, host_header: str | None) -> bool:
        if host_header is None or self.any:
            return True  # HTTP/1.0 without Host: no browser sends that
        host = host_header.strip().lower()
        if host.startswith("["):
            host = host[1:host.find("]")] if "]" in host else host
        else:
            host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        host = host.rstrip(".")
        try:
            ipaddress.ip_address(host)
            return True  # an address literal cannot be re-bound to another name
        except ValueError:
            return host in self.names


class _QuietClientResets(logging.Filter):
    """waitress logs a client that went away as a traceback (ERROR) or an INFO line; demote them to
    DEBUG without the traceback, and drop them unless DEBUG is on for this module."""

    _RESETS = (ConnectionError, TimeoutError)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, self._RESETS) or record.getMessage().startswith("Client disconnected"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            if exc is not None:
                record.msg, record.args = f"{record.getMessage()}: {type(exc).__name__}: {exc}", None
                record.exc_info, record.exc_text = None, None
            return log.isEnabledFor(logging.DEBUG)
        return True


_QUIET = _QuietClientResets()


class _Task(WSGITask):
    """A waitress task that gives the application a way to close its own connection."""

    def get_environment(self) -> dict:
        environ = super().get_environment()
        channel, server = self.channel, self.channel.server
        environ["regionwatch.abort"] = lambda: server.trigger.pull_trigger(channel.handle_close)
        return environ


class _Channel(HTTPChannel):
    task_class = _Task


class _Server(TcpWSGIServer):
    """waitress's TCP server plus read and write timeouts, checked by its maintenance pass."""

    channel_class = _Channel

    def __init__(self, app, sock: socket.socket, adj: Adjustments, *, read_timeout_s: float, write_timeout_s: float):
        self.read_timeout_s = read_timeout_s
        self.write_timeout_s = write_timeout_s
        sockinfo = (sock.family, sock.type, sock.proto, sock.getsockname())
        super().__init__(app, {}, True, sock, adj=adj, sockinfo=sockinfo, bind_socket=False)

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # idle keep-alive connections: adj.channel_timeout
        for channel in list(self.active_channels.values()):
            if channel.requests:
                # A response is being produced: stalled when output waits and nothing was sent lately.
                if channel.total_outbufs_len and now - channel.last_activity > self.write_timeout_s:
                    log.debug("http %s: client stopped reading for %.0f s; closing", channel.addr[0], self.write_timeout_s)
                    channel.handle_close()
                continue
            partial = channel.request
            if partial is None:
                # Connected but silent since the start: a request that never began.
                if channel.last_activity == channel.creation_time and now - channel.creation_time > self.read_timeout_s:
                    log.debug("http %s: no request within %.0f s; closing", channel.addr[0], self.read_timeout_s)
                    channel.handle_close()
                continue
            started = getattr(channel, "_rw_partial", None)
            if started is None or started[0] is not partial:
                channel._rw_partial = (partial, now)
            elif now - started[1] > self.read_timeout_s:
                log.debug("http %s: request not complete within %.0f s; closing", channel.addr[0], self.read_timeout_s)
                channel.handle_close()


class _Body:
    """A streamed response body: ends when the server stops; closing it closes the handler's iterator."""

    def __init__(self, source: Iterable[bytes], stopping: threading.Event):
        self._source, self._it, self._stopping = source, iter(source), stopping

    def __iter__(self) -> _Body:
        return self

    def __next__(self) -> bytes:
        if self._stopping.is_set():
            raise StopIteration
        return next(self._it)

    def close(self) -> None:
        close = getattr(self._source, "close", None)
        if close is not None:
            close()


class OpsServer:
    """One HTTP listener for metrics, health probes and the routes other features add.

    Args:
        listen: ``host:port`` as in ``[metrics] listen``.
        metrics: a :class:`daemon.ops.metrics.Metrics` (serves ``/metrics``) or None.
        health: a :class:`daemon.ops.health.Health` (serves ``/healthz`` and ``/readyz``) or None.
        allowed_hosts: extra ``Host`` names to answer (``[metrics] allowed_hosts``; ``"*"``: any).
        threads: worker threads for short requests; :meth:`reserve_threads` adds some for streams.
        max_connections, idle_timeout_s, read_timeout_s, write_timeout_s: see the module docstring.
    """

    def __init__(self, listen: str, *, metrics=None, health=None, allowed_hosts: Iterable[str] = (),
                 threads: int = 4, max_connections: int = 512, idle_timeout_s: float = 30.0,
                 read_timeout_s: float = 10.0, write_timeout_s: float = 10.0):
        self.listen = listen
        self.host, self._requested_port = parse_listen(listen)
        self.metrics = metrics
        self.health = health
        self.host_check = HostCheck(self.host, allowed_hosts)
        self.threads = threads
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.read_timeout_s = read_timeout_s
        self.write_timeout_s = write_timeout_s
        self._reserved = 0
        self._routes: list[_Route] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._address: tuple[str, int] | None = None
        if metrics is not None:
            self.add_route("/metrics", self._metrics)
        if health is not None:
            self.add_route("/healthz", lambda req: self._probe(health.healthz()))
            self.add_route("/readyz", lambda req: self._probe(health.readyz()))

    # -- routes ---------------------------------------------------------------------------
    def add_route(self, path: str, handler: Handler, *, prefix: bool = False) -> None:
        """Serve GET/HEAD on ``path`` with ``handler``.

        ``{name}`` segments match one path segment and arrive in ``request.params``; with
        ``prefix=True`` anything after ``path`` matches too (in ``params["rest"]``). Exact
        routes win over prefix routes, longer templates over shorter ones.
        """
        route = _Route(path, _compile(path, prefix), handler, prefix)
        with self._lock:
            if any(r.template == path and r.prefix == prefix for r in self._routes):
                raise ValueError(f"route already registered: {path}")
            self._routes.append(route)
            self._routes.sort(key=lambda r: (r.prefix, -len(r.template)))

    def reserve_threads(self, n: int) -> None:
        """Add ``n`` worker threads: one per long-lived stream a route may serve at once, so streams
        never hold the threads that ``/metrics`` needs (before or after :meth:`start`)."""
        self._reserved += int(n)
        if self._server is not None:
            self._server.task_dispatcher.set_thread_count(self.threads + self._reserved)

    def _match(self, path: str) -> tuple[_Route | None, dict[str, str]]:
        with self._lock:
            routes = list(self._routes)
        for r in routes:
            m = r.pattern.match(path)
            if m:
                return r, {k: urllib.parse.unquote(v) for k, v in m.groupdict().items()}
        return None, {}

    def _metrics(self, req: Request) -> Response:
        encoder, content_type = choose_encoder(req.headers.get("Accept"))
        return Response(200, encoder(self.metrics.registry), content_type)

    @staticmethod
    def _probe(result: tuple[bool, dict[str, Any]]) -> Response:
        ok, detail = result
        return Response.json({"ok": ok, **detail}, 200 if ok else 503)

    # -- WSGI -----------------------------------------------------------------------------
    def _respond(self, environ: dict) -> Response:
        method = environ["REQUEST_METHOD"]
        url = urllib.parse.urlsplit(environ.get("REQUEST_URI") or environ.get("PATH_INFO", "/"))
        if not self.host_check(environ.get("HTTP_HOST")):
            log.debug("http %s: Host %r not allowed", environ.get("REMOTE_ADDR"), environ.get("HTTP_HOST"))
            return Response.json({"error": "host not allowed (see [metrics] allowed_hosts)"}, 421)
        if method not in ("GET", "HEAD"):
            return Response(405, b"", headers={"Allow": "GET, HEAD"})
        route, params = self._match(url.path)
        if route is None:
            return Response.json({"error": "not found", "path": url.path}, 404)
        headers = Headers([(k[5:].replace("_", "-").title(), v) for k, v in environ.items() if k.startswith("HTTP_")])
        req = Request(method, url.path, urllib.parse.parse_qs(url.query), headers, params, self._stopping,
                      environ.get("regionwatch.abort", lambda: None))
        try:
            return route.handler(req)
        except Exception:
            log.exception("http handler for %s failed", route.template)
            return Response.json({"error": "internal error"}, 500)

    def _wsgi(self, environ: dict, start_response) -> Iterable[bytes]:
        resp = self._respond(environ)
        body = resp.body
        headers = [("Content-Type", resp.content_type), *resp.headers.items()]
        if isinstance(body, (bytes, bytearray, memoryview)):
            headers.append(("Content-Length", str(len(body))))
            start_response(f"{resp.status} {http.HTTPStatus(resp.status).phrase}", headers)
            return [] if environ["REQUEST_METHOD"] == "HEAD" else [bytes(body)]
        headers.append(("Cache-Control", "no-store"))
        start_response(f"{resp.status} {http.HTTPStatus(resp.status).phrase}", headers)
        stream = _Body(body, self._stopping)
        if environ["REQUEST_METHOD"] == "HEAD":
            stream.close()
            return []
        return stream

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Bind and serve in a daemon thread (raises OSError if the address is taken)."""
        if self._server is not None:
            raise RuntimeError("server already started")
        sock = bind_socket(self.host, self._requested_port)
        adj = Adjustments(
            threads=self.threads + self._reserved,
            connection_limit=self.max_connections,
            backlog=1024,
            channel_timeout=self.idle_timeout_s,
            cleanup_interval=1,
            asyncore_use_poll=True,  # select() cannot watch descriptors above 1024
            outbuf_high_watermark=256 * 1024,  # a non-reading client blocks its stream after this
            outbuf_overflow=1024 * 1024,
            max_request_header_size=64 * 1024,
            max_request_body_size=64 * 1024,
            ident="regionwatch",
            expose_tracebacks=False,
            log_socket_errors=True,  # demoted to DEBUG by _QuietClientResets
        )
        waitress_log = logging.getLogger("waitress")
        if _QUIET not in waitress_log.filters:
            waitress_log.addFilter(_QUIET)
        try:
            server = _Server(self._wsgi, sock, adj, read_timeout_s=self.read_timeout_s,
                             write_timeout_s=self.write_timeout_s)
        except BaseException:
            sock.close()
            raise
        self._address = tuple(sock.getsockname()[:2])  # type: ignore[assignment]
        self._server = server
        self._stopping.clear()
        self._thread = threading.Thread(target=server.run, name="ops-http", daemon=True)
        self._thread.start()
        log.info("metrics and health on %s", self.url)

    def stop(self, timeout: float = 5.0, *, grace_s: float = 1.5) -> None:
        """Stop serving: streamed responses end (within ``grace_s``, so clients see a complete
        response), then every connection and the listening socket are closed."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        grace_end = time.monotonic() + min(grace_s, timeout)
        while time.monotonic() < grace_end and any(
            ch.requests or ch.total_outbufs_len for ch in list(server.active_channels.values())
        ):
            time.sleep(0.02)  # responses finishing and being flushed

        trigger = server.trigger

        def close_everything() -> None:  # runs in the event-loop thread
            for channel in list(server.active_channels.values()):
                channel.handle_close()  # wakes a worker blocked on a full output buffer
            for obj in list(server._map.values()):
                if obj is server:
                    wasyncore.dispatcher.close(server)  # the listening socket (server.close shuts the trigger too)
                elif obj is not trigger:
                    obj.close()
            # The trigger only leaves the map (the loop ends when it is empty); it is closed once
            # the loop and the workers are gone. Closed here, the thread that queued this thunk may
            # still be inside pull_trigger (the loop can run the thunk on a worker's earlier pull)
            # and would write to a closed, or reused, descriptor.
            trigger.del_channel()

        trigger.pull_trigger(close_everything)
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._thread.join(timeout)
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=max(0.0, deadline - time.monotonic()))
        trigger.close()

    def __enter__(self) -> OpsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        if self._server is None or self._address is None:
            raise RuntimeError("server not started")
        return str(self._address[0]), int(self._address[1])

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def url(self) -> str:
        """Base URL to reach the listener (wildcard binds are given as loopback)."""
        host, port = self.address
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return host_url(host, port)

