"""The whole daemon (``regionwatch run`` on the real footage, real model, real mosquitto) when its
state disk fills up during the run, and when it gets signals other than one SIGTERM.

* Full disk: ``[state] dir`` on a 1 MiB tmpfs that the test fills after the first event and frees
  a few events later; the JSONL file is on a healthy disk. Every event must reach the JSONL file
  and the broker, ``seq`` must stay gapless, the episode must be counted, flip ``/readyz`` and be
  logged once with the path, and durability must come back by itself.
* SIGHUP with an unchanged file reloads nothing (tests/sinks/test_reload.py covers real changes);
  SIGUSR1 stops gracefully (exit events, ``stopped`` status, exit 138); a second SIGTERM ends a
  shutdown stuck on a broker that never answers within 2 s.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers.smallfs import mount_small_fs

from .conftest import free_port, wait_until
from .test_mqtt import event_messages, jsonl_events

PREFIX = "rw"

CONFIG = """
[detector]
model = "{model}"
interval_s = 0.5
imgsz = 320
[tracker]
backend = "bytetrack"
[sinks.jsonl]
path = "{out}/events.jsonl"
snapshots = true
[sinks.stdout]
enabled = false
[sinks.mqtt]
enabled = true
port = {port}
client_id = "regionwatch-resilience"
topic_prefix = "{prefix}"
keepalive_s = 5
reconnect_min_s = 0.2
reconnect_max_s = 1.0
[state]
dir = "{state}"
[metrics]
listen = "127.0.0.1:{metrics_port}"
[[cameras]]
id = "hall"
url = "{footage}"
realtime = {realtime}
[[cameras.regions]]
id = "table"
polygon = [[360, 330], [560, 330], [560, 412], [360, 412]]
"""


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def metric_value(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


class Daemon:
    def __init__(self, tmp: Path, regionwatch_bin: Path, **fmt):
        self.tmp = tmp
        self.metrics_port = free_port()
        self.cfg = tmp / "config.toml"
        self.cfg.write_text(CONFIG.format(out=tmp, prefix=PREFIX, metrics_port=self.metrics_port, **fmt))
        self.log = tmp / "daemon.log"
        env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "YOLO_CONFIG_DIR": str(tmp / "yolo")}
        self.proc = subprocess.Popen([str(regionwatch_bin), "run", "--config", str(self.cfg)], cwd=tmp, env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))
        self.jsonl = tmp / "events.jsonl"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def events(self) -> list[dict]:
        return jsonl_events(self.jsonl)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def daemon_factory(tmp_path, footage, yolo_model, regionwatch_bin):
    made: list[Daemon] = []

    def make(**fmt) -> Daemon:
        fmt.setdefault("state", tmp_path / "state")
        fmt.setdefault("realtime", "false")
        d = Daemon(tmp_path, regionwatch_bin, model=yolo_model, footage=footage, **fmt)
        made.append(d)
        return d

    yield make
    for d in made:
        d.kill()


@pytest.mark.slow
def test_a_full_state_disk_during_the_run_loses_no_event(mosquitto, collector, daemon_factory, tmp_path):
    """Probe 1 of issue 12: every event from every sink was lost; the log said only 'frame N failed'."""
    import helpers.smallfs as smallfs

    fs = mount_small_fs(tmp_path / "state")
    if fs is None:
        pytest.skip(f"cannot mount a small tmpfs here ({smallfs.last_error}); tests/test_state.py covers the "
                    "stores with SQLite's page limit")
    try:
        broker = mosquitto()
        col = collector(broker, f"{PREFIX}/#")
        d = daemon_factory(port=broker.port, state=fs.path)
        assert wait_until(lambda: len(d.events()) >= 1, 240, 0.1), d.text()
        fs.fill()
        n_full = len(d.events())
        # The next events (an exit, then the next visitor's entry) happen on a full disk.
        assert wait_until(lambda: len(d.events()) >= n_full + 2, 120, 0.1), d.text()
        status, body = http_get(d.url + "/readyz")
        assert status == 503 and "state store" in body and str(fs.path) in body, (status, body)
        _, metrics = http_get(d.url + "/metrics")
        assert metric_value(metrics, "regionwatch_state_errors_total") >= 2
        assert metric_value(metrics, 'regionwatch_state_degraded{store="outbox"}') == 1
        fs.free()
        assert wait_until(lambda: http_get(d.url + "/readyz")[0] == 200, 30, 0.2), http_get(d.url + "/readyz")
        assert d.proc.wait(300) == 0, d.text()[-3000:]
    finally:
        fs.unmount()
    events = d.events()
    log = d.text()
    assert len(events) == 12, [(e["type"], e["frame"]) for e in events]
    assert [e["seq"] for e in events] == list(range(1, 13))  # no gap, no repeat
    assert col.wait_for(lambda c: {e["id"] for e in event_messages(c)} >= {e["id"] for e in events}, 30)
    assert [x.text for x in col.on(f"{PREFIX}/status")][-1] == "stopped"
    # Logged once per store and episode, with the path; then durability resumed.
    assert log.count("state store outbox: cannot write") == 1 and f"{fs.path}/outbox.sqlite3" in log
    assert log.count("state store seq: cannot write") == 1
    assert "durability resumed" in log
    assert "failed (" not in log and "Traceback" not in log  # no 'frame N failed (k in a row)'
    assert any("snapshot" not in e for e in events if e["type"] == "entry")  # no room for that JPEG
    print(f"\nFULL DISK: {len(events)} events, seq 1-{events[-1]['seq']}, all delivered to MQTT and JSONL")


@pytest.mark.slow
def test_sighup_keeps_running_and_sigusr1_stops_with_exit_events_and_stopped(mosquitto, collector, daemon_factory):
    """Probe 6: SIGHUP and SIGUSR1 killed the daemon at once: no exit events, no 'stopped'."""
    broker = mosquitto()
    col = collector(broker, f"{PREFIX}/#")
    d = daemon_factory(port=broker.port, realtime="true")
    assert wait_until(lambda: any(e["type"] == "entry" for e in d.events()), 240, 0.1), d.text()
    d.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "configuration reloaded" in d.text(), 30, 0.1), d.text()
    assert d.proc.poll() is None, d.text()
    assert "configuration reloaded: nothing to rebuild (no change)" in d.text()
    assert [x.text for x in col.on(f"{PREFIX}/status")][-1:] == ["online"]
    d.proc.send_signal(signal.SIGUSR1)
    assert d.proc.wait(60) == 128 + signal.SIGUSR1, d.text()[-3000:]
    events = d.events()
    assert [e["type"] for e in events] == ["entry", "exit"] and events[-1]["reason"] == "track_lost"
    assert col.wait_for(lambda c: {e["id"] for e in event_messages(c)} == {e["id"] for e in events}, 10)
    assert [x.text for x in col.on(f"{PREFIX}/status")][-1] == "stopped"
    assert [x.text for x in col.on(f"{PREFIX}/hall/table/occupancy")][-1] == "0"
    assert "received SIGUSR1: stopping gracefully" in d.text() and "Traceback" not in d.text()


class Blackhole:
    """A TCP server that accepts connections and never says a word (a hung broker)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.mark.slow
def test_a_second_sigterm_forces_exit_within_2_s(daemon_factory):
    """Probe 6: a second SIGTERM did not hurry the shutdown."""
    hole = Blackhole()
    try:
        d = daemon_factory(port=hole.port, realtime="true")
        assert wait_until(lambda: "running: cameras hall" in d.text(), 240, 0.1), d.text()
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the shutdown now waits for a broker that never answers (up to ~10 s)
        assert d.proc.poll() is None
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        code = d.proc.wait(30)
        took = time.monotonic() - t0
    finally:
        hole.close()
    assert took < 2.0, f"exit took {took:.2f} s after the second SIGTERM"
    assert code == 128 + signal.SIGTERM, d.text()[-2000:]
    assert "received SIGTERM again: exiting within 1.5 s" in d.text()
    assert "MQTT sink closed" not in d.text()  # it was forced: the sink was still waiting
