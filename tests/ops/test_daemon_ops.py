"""The daemon operated like a service, end to end, in one shared run on the sample footage.

One module-scoped run of ``python -m daemon run`` (the real CLI, real YOLO ONNX model, ByteTrack,
the 1394-frame clip) with:

* ``NOTIFY_SOCKET`` / ``WATCHDOG_USEC`` pointing at a datagram socket bound by the test,
* a poller hitting ``/readyz``, ``/healthz`` and ``/metrics`` over HTTP during the whole run
  (``[metrics] linger_s`` keeps the listener up a few seconds after the file is done, so the
  final counts can be scraped),
* a real mosquitto broker (password login, the password read from a credentials file) for the
  MQTT sink,
* a real Prometheus server (Debian's ``/usr/bin/prometheus``) on loopback scraping the daemon
  every second; afterwards every PromQL expression of the Grafana dashboard is evaluated through
  Prometheus' HTTP API.

Needs ../shared/assets (footage and model) and mosquitto, and for the Prometheus test the
``prometheus`` package; tests skip with a clear message otherwise. Run with ``-s`` to see a sample scrape and
the values the dashboard's queries returned.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .dashboard import ROOT, load_dashboard, queries, substitute

ASSETS = ROOT / ".." / "shared" / "assets"
FOOTAGE = ASSETS / "footage" / "one-by-one-person-detection.mp4"
MODEL = ASSETS / "models" / "yolov8n_int8.onnx"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
FRAMES_IN_FILE = 1394
WATCHDOG_USEC = 2_000_000  # WatchdogSec=2 for this run: a ping at least every second
RATE_INTERVAL = "20s"  # $__rate_interval (a busy CI machine may go seconds between detector runs)

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from an exposition, via prometheus_client's parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def total(values: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in values.items() if n == name and all(dict(lab).get(k) == x for k, x in labels.items()))


@dataclass
class Run:
    tmp: Path
    port: int
    returncode: int | None = None
    stderr: str = ""
    started: float = 0.0
    ended: float = 0.0
    probes: list[tuple[float, str, int, dict]] = field(default_factory=list)  # (time, path, status, body)
    scrapes: list[tuple[float, str]] = field(default_factory=list)  # (time, exposition text)
    notify: list[tuple[float, list[str]]] = field(default_factory=list)
    prometheus_url: str | None = None
    prometheus_error: str = ""

    @property
    def events_path(self) -> Path:
        return self.tmp / "events.jsonl"

    def final_scrape(self) -> dict:
        return samples(self.scrapes[-1][1])


def write_config(tmp: Path, port: int, mqtt_port: int) -> Path:
    cfg = tmp / "config.toml"
    cfg.write_text(f"""
[detector]
model = "{MODEL.resolve()}"
interval_s = 2.0  # fewer detector runs keep the test lean; still 10 events on this clip

[sinks.stdout]
enabled = false

[sinks.jsonl]
path = "{tmp / 'events.jsonl'}"

[sinks.mqtt]
enabled = true
host = "127.0.0.1"
port = {mqtt_port}
client_id = "regionwatch-ops-test"
username = "regionwatch"
password_file = "{tmp / 'credentials' / 'mqtt-password'}"

[state]
dir = "{tmp / 'state'}"

[metrics]
listen = "127.0.0.1:{port}"
linger_s = 4

[[cameras]]
id = "hall"
url = "{FOOTAGE.resolve()}"

[[cameras.regions]]
id = "table"
polygon = [[300, 250], [470, 250], [470, 400], [300, 400]]
""")
    return cfg


def start_mosquitto(tmp: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    passwd = tmp / "mosquitto.passwd"
    subprocess.run([MOSQUITTO_PASSWD, "-c", "-b", str(passwd), "regionwatch", "ops-test-pw"], check=True,
                   capture_output=True)
    (tmp / "credentials").mkdir()
    (tmp / "credentials" / "mqtt-password").write_text("ops-test-pw\n")
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous false\n"
                    f"password_file {passwd}\nlog_dest file {tmp / 'mosquitto.log'}\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"mosquitto did not start (exit {proc.poll()})")


def start_prometheus(tmp: Path, target_port: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    (tmp / "prometheus.yml").write_text(f"""
global:
  scrape_interval: 1s
  scrape_timeout: 900ms
scrape_configs:
  - job_name: regionwatch
    static_configs:
      - targets: ["127.0.0.1:{target_port}"]
""")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "prometheus.log", "wb"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {(tmp / 'prometheus.log').read_text()[-2000:]}")
        try:
            if http_get(url + "/-/ready", 1)[0] == 200:
                return proc, url
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("prometheus did not become ready in 30 s")


def prom_query(base: str, expr: str, at: float) -> list[dict]:
    q = urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
    status, body = http_get(f"{base}/api/v1/query?{q}", 10)
    doc = json.loads(body)
    assert status == 200 and doc["status"] == "success", f"{expr}: {doc}"
    result = doc["data"]["result"]
    return result if isinstance(result, list) else [{"metric": {}, "value": result}]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    for p in (FOOTAGE, MODEL):
        if not p.exists():
            pytest.skip(f"{p} not found (the shared assets folder ../shared/assets is absent)")
    if not Path(MOSQUITTO).exists():
        pytest.skip(f"mosquitto not installed ({MOSQUITTO}); Debian: apt-get install mosquitto")
    tmp = tmp_path_factory.mktemp("daemon-ops")
    r = Run(tmp, free_port())
    broker, mqtt_port = start_mosquitto(tmp)
    cfg = write_config(tmp, r.port, mqtt_port)

    prom = None
    if Path(PROMETHEUS).exists():
        try:
            prom, r.prometheus_url = start_prometheus(tmp, r.port)
        except RuntimeError as e:
            r.prometheus_error = str(e)
    else:
        r.prometheus_error = f"prometheus not installed ({PROMETHEUS}); Debian: apt-get install prometheus"

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp / "notify.sock"))
    sock.settimeout(0.2)
    done = threading.Event()

    def listen_notify() -> None:
        while not done.is_set():
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            r.notify.append((time.time(), data.decode().split("\n")))  # stamped on arrival

    def poll() -> None:
        base = f"http://127.0.0.1:{r.port}"
        n = 0
        while not done.is_set():
            for path in ("/readyz", "/healthz"):
                try:
                    asked = time.time()  # the answer reflects a state at or after this moment
                    status, body = http_get(base + path, 1)
                    r.probes.append((asked, path, status, json.loads(body)))
                except OSError:
                    pass
            if n % 3 == 0:
                try:
                    status, body = http_get(base + "/metrics", 2)
                    if status == 200:
                        r.scrapes.append((time.time(), body.decode()))
                except OSError:
                    pass
            n += 1
            time.sleep(0.2)

    env = dict(os.environ, NOTIFY_SOCKET=str(tmp / "notify.sock"), WATCHDOG_USEC=str(WATCHDOG_USEC),
               YOLO_OFFLINE="1", YOLO_AUTOINSTALL="0", YOLO_CONFIG_DIR=str(tmp / "yolo"))
    env.pop("WATCHDOG_PID", None)
    threads = [threading.Thread(target=listen_notify, daemon=True), threading.Thread(target=poll, daemon=True)]
    for t in threads:
        t.start()
    r.started = time.time()
    with open(tmp / "daemon.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(cfg)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=log)
        try:
            r.returncode = proc.wait(timeout=480)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    r.ended = time.time()
    done.set()
    for t in threads:
        t.join(5)
    sock.close()
    r.stderr = (tmp / "daemon.log").read_text(errors="replace")
    yield r
    broker.terminate()
    broker.wait(10)
    if prom is not None:
        prom.terminate()
        try:
            prom.wait(15)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()


def test_daemon_ran_and_was_scraped(run):
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(run.scrapes) > 20, "too few /metrics scrapes during the run"


def test_metrics_families_and_counts_agree_with_the_run(run):
    text = run.scrapes[-1][1]  # taken after the file was done (listener lingers)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in {
        "regionwatch_frames_decoded": "counter", "regionwatch_frames_skipped": "counter",
        "regionwatch_frames_processed": "counter", "regionwatch_frames_buffered": "gauge",
        "regionwatch_stream_up": "gauge", "regionwatch_stream_reconnects": "counter",
        "regionwatch_decode_seconds": "histogram", "regionwatch_detector_seconds": "histogram",
        "regionwatch_tracker_step_seconds": "histogram", "regionwatch_detector_runs": "counter",
        "regionwatch_people_tracked": "gauge", "regionwatch_region_occupancy": "gauge",
        "regionwatch_events": "counter", "regionwatch_sink_publish": "counter",
        "regionwatch_outbox_events": "gauge", "regionwatch_mqtt_connected": "gauge",
        "process_resident_memory_bytes": "gauge", "regionwatch_build_info": "gauge", "regionwatch_ready": "gauge",
        "regionwatch_main_loop_heartbeat_timestamp_seconds": "gauge",
    }.items():
        assert name in families, f"family {name} missing from /metrics"
        assert families[name].type == kind, name
    v = samples(text)
    lines = run.events_path.read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert events, "the run produced no events: nothing to compare"

    assert total(v, "regionwatch_frames_decoded_total", camera="hall") == FRAMES_IN_FILE
    assert total(v, "regionwatch_frames_processed_total", camera="hall") == FRAMES_IN_FILE
    assert total(v, "regionwatch_decode_seconds_count", camera="hall") == FRAMES_IN_FILE
    assert total(v, "regionwatch_events_total") == len(lines)
    for kind in ("entry", "exit"):
        assert total(v, "regionwatch_events_total", camera="hall", region="table", type=kind) == sum(
            e["type"] == kind for e in events), kind
    assert total(v, "regionwatch_sink_publish_total", sink="jsonl", result="ok") == len(lines)
    assert total(v, "regionwatch_sink_publish_total", result="error") == 0
    # MQTT: every event reached the broker before shutdown; the outbox is empty.
    assert total(v, "regionwatch_sink_publish_total", sink="mqtt", result="delivered") == len(lines)
    assert total(v, "regionwatch_outbox_events") == 0
    assert total(v, "regionwatch_outbox_dropped_total") == 0
    assert any(total(samples(t), "regionwatch_mqtt_connected") == 1 for _, t in run.scrapes)
    runs = total(v, "regionwatch_detector_runs_total", camera="hall")
    assert runs == total(v, "regionwatch_detector_seconds_count", camera="hall")
    # detector.interval_s = 2 s finds newcomers (>= 70 runs on the 139.4 s clip); while someone is
    # tracked it runs every tracking_interval_s (0.3 s), still far from every frame.
    assert 70 <= runs <= FRAMES_IN_FILE / 2
    assert total(v, "regionwatch_frames_skipped_total") == 0  # files are lossless
    assert total(v, "regionwatch_region_occupancy", camera="hall", region="table") == 0  # everyone left
    assert total(v, "process_resident_memory_bytes") > 50e6
    build = next(dict(lab) for (n, lab), _ in v.items() if n == "regionwatch_build_info")
    assert build["backend"] == "bytetrack" and build["detector_model"] == "yolov8n_int8.onnx" and build["version"]
    # Nothing identifying leaks into labels: no paths or URLs.
    for (_, lab), _ in v.items():
        for key, value in lab:
            assert "/" not in value or key in ("le",), (key, value)

    # While running, the counters only grew and readiness was exported.
    decoded = [total(samples(t), "regionwatch_frames_decoded_total") for _, t in run.scrapes]
    assert decoded == sorted(decoded) and decoded[0] < FRAMES_IN_FILE
    assert any(total(samples(t), "regionwatch_ready") == 1 for _, t in run.scrapes)
    assert total(v, "regionwatch_ready") == 0  # the final scrape is during shutdown

    print("\n--- sample scrape (regionwatch_* families, final values) ---")
    print("\n".join(line for line in text.splitlines()
                    if line.startswith(("regionwatch_", "process_resident")) and "_bucket" not in line
                    and "_created" not in line))


def test_readyz_not_ready_before_models_load_and_ready_after(run):
    ready = [(t, s, b) for t, p, s, b in run.probes if p == "/readyz"]
    assert ready, "no /readyz answer at all"
    t0, status0, body0 = ready[0]
    assert status0 == 503 and body0["models_loaded"] is False and body0["ok"] is False
    first_ok = next(i for i, (_, s, _) in enumerate(ready) if s == 200)
    assert all(s == 503 for _, s, _ in ready[:first_ok])
    loading = [b for _, _, b in ready[:first_ok] if not b["models_loaded"]]
    # (Loading the detector takes well under a second with the direct runtimes: one answer suffices.)
    assert loading, "the not-ready window before models loaded was not observed"
    assert ready[first_ok][2]["models_loaded"] is True and ready[first_ok][2]["cameras"] == {"hall": "streaming"}
    # READY=1 reached "systemd" after the last "models not loaded" answer, about when /readyz said 200.
    t_ready = next(t for t, msg in run.notify if "READY=1" in msg)
    last_unloaded = max(t for t, _, b in ready if not b["models_loaded"])
    assert last_unloaded <= t_ready <= ready[first_ok][0] + 1.0
    # At the end (file done, listener lingering): not ready any more, still healthy.
    assert ready[-1][1] == 503 and "stopping" in ready[-1][2]["reasons"]
    health = [(s, b) for _, p, s, b in run.probes if p == "/healthz"]
    assert health and all(s == 200 for s, _ in health), [b for s, b in health if s != 200][:3]
    print(f"\n/readyz: {first_ok} x 503 (first: {body0}) then 200 {ready[first_ok][2]}")


def test_sd_notify_ready_then_watchdog_status_and_stopping(run):
    kinds = [msg[0].split("=")[0] for _, msg in run.notify]
    assert kinds[0] == "STATUS" and run.notify[0][1] == ["STATUS=loading models"]
    i_ready = kinds.index("READY")
    assert "WATCHDOG" not in kinds[:i_ready]
    pings = [t for t, msg in run.notify if msg == ["WATCHDOG=1"]]
    assert len(pings) >= 10
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert max(gaps) < WATCHDOG_USEC / 1e6, f"a watchdog gap of {max(gaps):.2f} s would have killed the service"
    # Rate-limited to one per half interval (the main loop turns every 0.5 s, twice as often).
    t_ready = run.notify[i_ready][0]
    t_stop = next(t for t, msg in run.notify if msg[0] == "STOPPING=1")
    assert len(pings) <= (t_stop - t_ready) / (WATCHDOG_USEC / 2e6) + 2
    statuses = [msg[0] for _, msg in run.notify if msg[0].startswith("STATUS=")]
    assert any("1/1 cameras streaming" in s for s in statuses), statuses[:5]
    assert kinds.count("STOPPING") == 1
    stop = next(msg for _, msg in run.notify if msg[0] == "STOPPING=1")
    assert f"{FRAMES_IN_FILE} frames" in stop[1]
    print(f"\nsd_notify: {len(run.notify)} messages, {len(pings)} WATCHDOG=1 (gap {min(gaps):.2f}-{max(gaps):.2f} s); "
          f"READY: {run.notify[i_ready][1]}; STOPPING: {stop}")


def test_prometheus_scrapes_and_every_dashboard_query_returns_data(run):
    if run.prometheus_url is None:
        pytest.skip(run.prometheus_error)
    base = run.prometheus_url
    # Evaluate as a Grafana panel looking at the run's busiest moment would: the last scrape
    # of ours while frames were still being processed (every rate window has activity).
    busy = [t for t, text in run.scrapes if 0 < total(samples(text), "regionwatch_frames_processed_total") < FRAMES_IN_FILE]
    assert busy, "no scrape saw the pipeline at work"
    at = busy[-1]
    time.sleep(max(0.0, run.ended + 2 - time.time()))  # let the last scrapes land

    up = prom_query(base, 'up{job="regionwatch"}', at)
    assert up and float(up[0]["value"][1]) == 1, "Prometheus did not scrape the daemon"
    # Prometheus saw the same final count the run produced.
    final = prom_query(base, "max_over_time(regionwatch_frames_decoded_total[10m])", run.ended)
    assert float(final[0]["value"][1]) == FRAMES_IN_FILE

    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    report, empty = [], []
    for where, expr in queries(load_dashboard()):
        result = prom_query(base, substitute(expr, RATE_INTERVAL), at)
        values = [float(r["value"][1]) for r in result]
        if "gpu_memory" in expr and not cuda:
            # Honest absence: no CUDA here, so no GPU series (not a made-up zero).
            assert result == [], f"{where}: GPU series exported on a host without CUDA: {result}"
            report.append((where, "(no CUDA on this host: empty, as designed)"))
            continue
        if not result:
            empty.append(f"{where}: {expr}")
            continue
        assert all(not math.isnan(x) for x in values), f"{where}: NaN in {result}"
        shown = ", ".join(
            f"{ {k: v for k, v in r['metric'].items() if k not in ('instance', 'job', '__name__')} }={float(r['value'][1]):.4g}"
            for r in result[:4])
        report.append((where, shown))
    assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)
    print(f"\n--- dashboard queries at t={at:.0f} (run {run.started:.0f}..{run.ended:.0f}, "
          f"$__rate_interval={RATE_INTERVAL}) ---")
    for where, shown in report:
        print(f"{where}: {shown}")
