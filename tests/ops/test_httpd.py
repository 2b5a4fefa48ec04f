"""The ops HTTP listener: /metrics, /healthz, /readyz, added routes, streaming, IPv6, shutdown,
and what nobody can do to it: idle sockets, slow or silent clients, non-reading streams, foreign Host
names, connection resets."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import struct
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.ops.health import Health
from daemon.ops.httpd import OpsServer, Response, parse_listen
from daemon.ops.metrics import Metrics


def get(url: str, headers: dict[str, str] | None = None, method: str = "GET"):
    """(status, headers, body) without raising on 4xx/5xx."""
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.fixture
def server():
    m, h = Metrics(), Health()
    srv = OpsServer("127.0.0.1:0", metrics=m, health=h)
    srv.start()
    yield srv
    srv.stop()


def test_parse_listen():
    assert parse_listen("127.0.0.1:9108") == ("127.0.0.1", 9108)
    assert parse_listen("[::1]:9108") == ("::1", 9108)
    assert parse_listen("[::]:0") == ("::", 0)
    assert parse_listen("localhost:80") == ("localhost", 80)
    assert parse_listen(":9108") == ("", 9108)
    for bad in ("9108", "::1:9108", "host:", "host:http", "host:70000"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_ephemeral_port_is_exposed(server):
    host, port = server.address
    assert host == "127.0.0.1" and port > 0 and server.port == port
    assert server.url == f"http://127.0.0.1:{port}"


def test_metrics_exposition_parses_and_carries_values(server):
    m = server.metrics
    m.frames_decoded.labels(camera="hall").inc(7)
    m.events.labels(camera="hall", region="table", type="entry").inc()
    m.detector_seconds.labels(camera="hall").observe(0.2)

    status, headers, body = get(server.url + "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert fams["regionwatch_frames_decoded"].type == "counter"
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert values[("regionwatch_frames_decoded_total", (("camera", "hall"),))] == 7
    assert values[("regionwatch_events_total", (("camera", "hall"), ("region", "table"), ("type", "entry")))] == 1
    assert values[("regionwatch_detector_seconds_count", (("camera", "hall"),))] == 1
    assert values[("regionwatch_detector_seconds_bucket", (("camera", "hall"), ("le", "0.25")))] == 1
    assert values[("regionwatch_detector_seconds_bucket", (("camera", "hall"), ("le", "0.1")))] == 0
    assert fams["process_resident_memory_bytes"].samples[0].value > 10e6


def test_metrics_openmetrics_on_request(server):
    status, headers, body = get(server.url + "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_probes_are_200_or_503_with_json(server):
    health = server.health
    status, headers, body = get(server.url + "/readyz")
    assert status == 503 and headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    assert doc["ok"] is False and doc["models_loaded"] is False

    health.set_models_loaded()
    health.set_streams(lambda: {"hall": "streaming"})
    status, _, body = get(server.url + "/readyz")
    assert status == 200 and json.loads(body)["ok"] is True

    status, _, body = get(server.url + "/healthz")
    assert status == 200 and json.loads(body)["status"] == "starting"
    health.beat()
    status, _, body = get(server.url + "/healthz")
    assert status == 200 and json.loads(body)["main_loop_age_s"] < 5

    health.heartbeat_timeout_s = 0.05
    time.sleep(0.1)
    status, _, body = get(server.url + "/healthz")
    assert status == 503 and json.loads(body)["status"] == "stalled"


def test_unknown_path_is_404_and_head_has_no_body(server):
    status, _, body = get(server.url + "/nope")
    assert status == 404 and json.loads(body)["error"] == "not found"
    status, headers, body = get(server.url + "/metrics", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 1000


def test_added_routes_with_params_prefixes_and_priority(server):
    server.add_route("/cameras/{camera}/latest.jpg", lambda r: Response(200, b"JPEG:" + r.params["camera"].encode(),
                                                                        "image/jpeg"))
    server.add_route("/cameras/", lambda r: Response.text("prefix:" + r.params["rest"]), prefix=True)
    server.add_route("/", lambda r: Response(200, b"<html>index</html>", "text/html"))
    server.add_route("/q", lambda r: Response.json(r.query))

    status, headers, body = get(server.url + "/cameras/hall%20a/latest.jpg")
    assert (status, headers["Content-Type"], body) == (200, "image/jpeg", b"JPEG:hall a")
    assert get(server.url + "/cameras/hall/other")[2] == b"prefix:hall/other"
    assert get(server.url + "/")[2] == b"<html>index</html>"
    assert json.loads(get(server.url + "/q?x=1&x=2")[2]) == {"x": ["1", "2"]}
    assert get(server.url + "/metrics")[0] == 200  # built-in routes still win
    with pytest.raises(ValueError):
        server.add_route("/", lambda r: Response())
    with pytest.raises(ValueError):
        server.add_route("no-slash", lambda r: Response())


def test_a_failing_handler_gives_500_and_the_server_keeps_serving(server):
    def boom(req):
        raise RuntimeError("handler bug")

    server.add_route("/boom", boom)
    status, _, body = get(server.url + "/boom")
    assert status == 500 and json.loads(body) == {"error": "internal error"}
    assert get(server.url + "/healthz")[0] == 200


def test_streaming_body_arrives_in_chunks_and_ends_on_stop():
    srv = OpsServer("127.0.0.1:0")
    produced = threading.Event()
    closed = threading.Event()

    def stream(req):
        def parts():
            try:
                i = 0
                while not req.stopping.is_set():
                    yield b"--frame\r\nContent-Type: text/plain\r\n\r\n" + str(i).encode() + b"\r\n"
                    i += 1
                    if i == 3:
                        produced.set()
                    time.sleep(0.02)
            finally:
                closed.set()

        return Response(200, parts(), "multipart/x-mixed-replace; boundary=frame")

    srv.add_route("/cameras/{camera}/preview.mjpeg", stream)
    srv.start()
    port = srv.port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/cameras/hall/preview.mjpeg")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("multipart/x-mixed-replace")
    first = resp.read1(4096)
    assert first.startswith(b"--frame\r\n")
    assert produced.wait(5)
    t0 = time.monotonic()
    srv.stop()
    rest = resp.read()  # the server ends the response: EOF instead of blocking forever
    assert b"--frame" in first + rest
    assert closed.wait(5), "the generator was not closed"
    assert time.monotonic() - t0 < 3
    conn.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def endless_stream(closed: threading.Event):
    """A route handler streaming 64 KiB chunks until the server stops; ``closed`` is set when its
    body is closed (the client left, or the server stopped)."""

    def stream(req):
        def parts():
            try:
                while not req.stopping.is_set():
                    yield b"x" * 65536
            finally:
                closed.set()

        return Response(200, parts(), "application/octet-stream")

    return stream


def test_streaming_ends_when_the_client_leaves():
    srv = OpsServer("127.0.0.1:0")
    closed = threading.Event()
    srv.add_route("/s", endless_stream(closed))
    with srv:
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(b"GET /s HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert s.recv(1024).startswith(b"HTTP/1.1 200")
        s.close()
        assert closed.wait(5), "the server kept producing for a client that left"
        assert get(srv.url + "/nothing")[0] == 404


def test_ipv6_listener():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this host")
    with OpsServer("[::1]:0", health=Health()) as srv:
        assert srv.address[0] == "::1"
        assert srv.url.startswith("http://[::1]:")
        assert get(srv.url + "/healthz")[0] == 200
        assert get(srv.url + "/metrics")[0] == 404  # no metrics given: no route


def test_address_in_use_raises_and_stop_is_idempotent():
    with OpsServer("127.0.0.1:0") as a:
        b = OpsServer(f"127.0.0.1:{a.port}")
        with pytest.raises(OSError):
            b.start()
    a.stop()
    with pytest.raises(RuntimeError):
        a.address


# -- nobody can tie the listener up (issue 12) ----------------------------------------------------
def timed_get(url: str) -> float:
    t0 = time.perf_counter()
    status, _, body = get(url)
    assert status == 200 and body
    return time.perf_counter() - t0


def test_300_idle_sockets_cost_no_threads_and_metrics_still_answer(server):
    """Probe: 300 idle sockets made 312 threads (+2.8 GB virtual) on the stdlib server, backlog 5."""
    timed_get(server.url + "/metrics")  # warm
    threads_before = threading.active_count()
    idle = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        half = [s for s in idle[:150]]
        for s in half:  # half of them start a request and never finish it
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(0.5)  # let the event loop accept them all
        took = sorted(timed_get(server.url + "/metrics") for _ in range(5))
        assert threading.active_count() <= threads_before, "idle connections must not cost threads"
        assert took[2] < 0.1, f"/metrics took {took} with 300 idle connections open"
        assert get(server.url + "/healthz")[0] == 200
    finally:
        for s in idle:
            s.close()


def _closed_by_server(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_read_timeout_closes_slow_and_silent_clients():
    with OpsServer("127.0.0.1:0", health=Health(), read_timeout_s=1.0, idle_timeout_s=60) as srv:
        silent = socket.create_connection(("127.0.0.1", srv.port))
        slow = socket.create_connection(("127.0.0.1", srv.port))
        slow.sendall(b"GET /healthz HTTP/1.1\r\n")
        t0 = time.monotonic()
        for _ in range(6):  # a header line every 0.5 s: active, but the request never completes
            slow.sendall(b"X-Slow: 1\r\n")
            time.sleep(0.5)
        assert _closed_by_server(slow, 3.0), "a request that never completes must be cut"
        assert _closed_by_server(silent, 3.0), "a connection that never sends a request must be cut"
        assert time.monotonic() - t0 < 8
        assert get(srv.url + "/healthz")[0] == 200


def test_write_timeout_closes_a_client_that_stopped_reading():
    srv = OpsServer("127.0.0.1:0", write_timeout_s=1.0)
    closed = threading.Event()
    srv.add_route("/s", endless_stream(closed))
    with srv:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", srv.port))
        s.sendall(b"GET /s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert closed.wait(20), "a stream nobody reads must be closed by the write timeout"
        assert get(srv.url + "/nothing")[0] == 404
        s.close()


def test_host_allow_list_stops_dns_rebinding():
    with OpsServer("127.0.0.1:0", health=Health(), allowed_hosts=["box.lan"]) as srv:
        def status(host: str) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
            conn.putrequest("GET", "/healthz", skip_host=True)
            conn.putheader("Host", host)
            conn.endheaders()
            code = conn.getresponse().status
            conn.close()
            return code

        for ok in (f"127.0.0.1:{srv.port}", f"localhost:{srv.port}", "[::1]", "box.lan", "BOX.LAN:9108", "10.0.0.7"):
            assert status(ok) == 200, ok
        for bad in ("evil.example", f"rebind.evil.example:{srv.port}", "box.lan.evil.example"):
            assert status(bad) == 421, bad
    with OpsServer("127.0.0.1:0", health=Health(), allowed_hosts=["*"]) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        conn.putrequest("GET", "/healthz", skip_host=True)
        conn.putheader("Host", "anything.example")
        conn.endheaders()
        assert conn.getresponse().status == 200


def test_client_resets_are_debug_lines_and_no_python_version_is_sent(caplog):
    srv = OpsServer("127.0.0.1:0")
    srv.add_route("/s", endless_stream(threading.Event()))
    srv.add_route("/t", lambda req: Response.text("t"))
    with caplog.at_level(logging.INFO), srv:
        status, headers, _ = get(srv.url + "/t")
        assert status == 200 and headers["Server"] == "regionwatch"
        for _ in range(5):  # read a little, then reset the connection (RST, not FIN)
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.sendall(b"GET /s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            s.recv(1000)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        time.sleep(1.0)
        assert get(srv.url + "/t")[0] == 200
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith("waitress")], caplog.text
    assert "Traceback" not in caplog.text


def test_only_get_and_head():
    with OpsServer("127.0.0.1:0", health=Health()) as srv:
        status, headers, _ = get(srv.url + "/healthz", method="POST")
        assert status == 405 and headers["Allow"] == "GET, HEAD"
