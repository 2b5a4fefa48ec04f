"""Ops: the hooks the app calls, seen from outside (HTTP probes and sd_notify datagrams)."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import pytest

from daemon.config import MetricsConfig
from daemon.ops.metrics import Metrics
from daemon.ops.runtime import Ops


def probe(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Cam:
    def __init__(self, id, regions=()):
        self.id, self.regions = id, [type("R", (), {"id": r})() for r in regions]


@pytest.fixture
def notify(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(3)
    yield str(path), lambda: sock.recv(4096).decode().split("\n")
    sock.close()


def test_lifecycle_over_http_and_notify(notify):
    path, receive = notify
    states = {"hall": "connecting"}
    ops = Ops(MetricsConfig(listen="127.0.0.1:0", linger_s=0.3), Metrics(),
              env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}, status_every_s=0)
    ops.start(lambda: states)
    url = ops.server.url
    assert receive() == ["STATUS=loading models"]
    status, body = probe(url + "/readyz")
    assert status == 503 and body["models_loaded"] is False
    assert probe(url + "/healthz")[0] == 200  # alive while loading

    ops.loaded("models loaded (yolov8n_int8.onnx, bytetrack)")
    assert receive() == ["READY=1", "STATUS=models loaded (yolov8n_int8.onnx, bytetrack)"]
    assert probe(url + "/readyz")[0] == 503  # no camera streams yet
    states["hall"] = "streaming"
    assert probe(url + "/readyz")[0] == 200

    ops.metrics.frames_processed.labels("hall").inc(12)
    ops.metrics.events.labels("hall", "table", "entry").inc()
    ops.tick()
    assert receive() == ["WATCHDOG=1"]
    assert receive() == ["STATUS=1/1 cameras streaming, 12 frames, 1 events"]
    status, body = probe(url + "/healthz")
    assert status == 200 and body["main_loop_age_s"] < 5

    ops.finished()
    t0 = time.monotonic()
    ops.begin_stop()
    assert receive() == ["STOPPING=1", "STATUS=1/1 cameras streaming, 12 frames, 1 events (not ready)"]
    assert probe(url + "/readyz")[0] == 503
    ops.close()
    assert time.monotonic() - t0 >= 0.3  # lingered for a last scrape
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/healthz", timeout=2)
    ops.close()  # idempotent


def test_no_linger_unless_the_run_finished_and_disabled_listener():
    ops = Ops(MetricsConfig(listen="127.0.0.1:0", linger_s=30), Metrics(), env={})
    ops.start(dict)
    t0 = time.monotonic()
    ops.close()  # stopped by a signal: no linger
    assert time.monotonic() - t0 < 5

    off = Ops(MetricsConfig(enabled=False), Metrics(), env={})
    off.start(dict)
    assert off.server is None
    off.loaded()
    off.tick()
    off.close()


def test_init_series_creates_zero_series():
    m = Metrics()
    ops = Ops(MetricsConfig(enabled=False), m, env={})
    ops.init_series([Cam("hall", ["table", "door"])], ["jsonl"])
    text = m.exposition().decode()
    for line in (
        'regionwatch_events_total{camera="hall",region="door",type="exit"} 0.0',
        'regionwatch_frames_skipped_total{camera="hall",reason="consumer_behind"} 0.0',
        'regionwatch_stream_reconnects_total{camera="hall"} 0.0',
        'regionwatch_sink_publish_total{result="error",sink="jsonl"} 0.0',
    ):
        assert line in text


def test_a_taken_port_is_a_clear_startup_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ops = Ops(MetricsConfig(listen=f"127.0.0.1:{port}"), Metrics(), env={})
        with pytest.raises(RuntimeError, match=f"metrics.listen 127.0.0.1:{port}: cannot listen: Address already in use"):
            ops.start(dict)
        ops.close()  # still safe after a failed start
