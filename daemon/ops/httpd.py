"""The daemon's one HTTP listener: ``/metrics``, ``/healthz``, ``/readyz`` and pluggable routes.

A stdlib :class:`~http.server.ThreadingHTTPServer` in a daemon thread, bound from
``[metrics] listen = "host:port"`` (``[::1]:9108`` for IPv6, port 0 for an ephemeral port,
read back from :attr:`OpsServer.port`). Other features add routes with :meth:`OpsServer.add_route`;
a route's handler takes a :class:`Request` and returns a :class:`Response` whose body is bytes or
an iterator of byte chunks (streamed as they come, e.g. an MJPEG preview, until the client
leaves or the server stops).

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

import json
import logging
import re
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)


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


@dataclass
class Request:
    """What a route handler sees."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any
    params: dict[str, str] = field(default_factory=dict)
    stopping: threading.Event = field(default_factory=threading.Event)
    """Set when the server shuts down: streaming bodies should end."""


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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    ops: OpsServer

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            # "[::]" means every address, IPv4 included where the host allows dual stack.
            try:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:
                pass
        super().server_bind()


class _RequestHandler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "regionwatch"

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http %s %s", self.address_string(), format % args)

    def _dispatch(self, head: bool) -> None:
        ops = self.server.ops
        url = urllib.parse.urlsplit(self.path)
        route, params = ops._match(url.path)
        if route is None:
            resp = Response.json({"error": "not found", "path": url.path}, 404)
        else:
            req = Request(self.command, url.path, urllib.parse.parse_qs(url.query), self.headers, params, ops._stopping)
            try:
                resp = route.handler(req)
            except Exception:
                log.exception("http handler for %s failed", route.template)
                resp = Response.json({"error": "internal error"}, 500)
        self._send(resp, head)

    def _send(self, resp: Response, head: bool) -> None:
        body = resp.body
        streaming = not isinstance(body, (bytes, bytearray, memoryview))
        try:
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.content_type)
            for k, v in resp.headers.items():
                self.send_header(k, v)
            if streaming:
                self.send_header("Cache-Control", "no-store")
                self.send_header("Connection", "close")
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if head:
                return
            if not streaming:
                self.wfile.write(body)
                return
            stopping = self.server.ops._stopping
            for chunk in body:  # type: ignore[union-attr]
                if stopping.is_set():
                    break
                self.wfile.write(chunk)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client went away
        finally:
            if streaming and isinstance(body, Iterator) and hasattr(body, "close"):
                body.close()  # type: ignore[union-attr]


class OpsServer:
    """One HTTP listener for metrics, health probes and the routes other features add.

    Args:
        listen: ``host:port`` as in ``[metrics] listen``.
        metrics: a :class:`daemon.ops.metrics.Metrics` (serves ``/metrics``) or None.
        health: a :class:`daemon.ops.health.Health` (serves ``/healthz`` and ``/readyz``) or None.
    """

    def __init__(self, listen: str, *, metrics=None, health=None):
        self.listen = listen
        self.host, self._requested_port = parse_listen(listen)
        self.metrics = metrics
        self.health = health
        self._routes: list[_Route] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
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

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Bind and serve in a daemon thread (raises OSError if the address is taken)."""
        if self._httpd is not None:
            raise RuntimeError("server already started")
        infos = socket.getaddrinfo(self.host or None, self._requested_port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family = infos[0][0]
        host = infos[0][4][0] if self.host else ("0.0.0.0" if family == socket.AF_INET else "::")
        server_cls = type("_BoundServer", (_Server,), {"address_family": family})
        httpd = server_cls((host, self._requested_port), _RequestHandler)
        httpd.ops = self
        self._httpd = httpd
        self._stopping.clear()
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="ops-http", daemon=True)
        self._thread.start()
        log.info("metrics and health on %s", self.url)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, end streaming responses and close the socket."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> OpsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        if self._httpd is None:
            raise RuntimeError("server not started")
        addr = self._httpd.server_address
        return str(addr[0]), int(addr[1])

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
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
