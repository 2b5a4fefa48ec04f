"""deploy/: the Grafana dashboard and provisioning, prometheus.yml, mosquitto.conf, Dockerfile, compose.

Docker cannot run on these machines: the compose file and Dockerfile are checked statically
(and with ``docker compose config`` where the compose plugin is installed). prometheus.yml and
every dashboard expression are checked by ``promtool`` (Debian's ``prometheus`` package); the
mosquitto config runs in a real broker.
"""

from __future__ import annotations

import getpass
import re
import shutil
import socket
import subprocess
import time
import tomllib
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml

from daemon.config import Settings
from daemon.ops.metrics import Metrics

from .dashboard import ROOT, load_dashboard, panels, queries, substitute

DEPLOY = ROOT / "deploy"
MODEL = ROOT / ".." / "shared" / "assets" / "models" / "yolov8n_int8.onnx"
PROMTOOL = shutil.which("promtool")
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
DOCKER = shutil.which("docker")

# Files the operator creates before `docker compose up` (secrets, password hashes, weights).
OPERATOR_CREATED = {"models", "mosquitto.passwd", "secrets/mqtt-password", "secrets/grafana-admin-password"}


def exported_sample_names() -> set[str]:
    """Every sample name the daemon can export (from the metric objects' types)."""
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_count", "_sum", "_created"],
                "gauge": [""], "info": ["_info"], "summary": ["_count", "_sum"]}
    names = set()
    for fam in Metrics().registry.collect():
        names |= {fam.name + s for s in suffixes.get(fam.type, [""])}
    return names


# -- Grafana dashboard ---------------------------------------------------------------------

def test_dashboard_structure():
    dash = load_dashboard()
    assert dash["uid"] == "regionwatch" and dash["title"] == "regionwatch"
    tvars = {v["name"]: v for v in dash["templating"]["list"]}
    assert tvars["datasource"]["type"] == "datasource" and tvars["datasource"]["query"] == "prometheus"
    assert tvars["camera"]["includeAll"] and tvars["camera"]["allValue"] == ".*"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels(dash):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
    # No two panels overlap on the 24-column grid.
    cells: dict[tuple[int, int], str] = {}
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_dashboard_has_the_panels_operators_need():
    exprs = " ".join(e for _, e in queries(load_dashboard()))
    for metric in ("regionwatch_stream_up", "regionwatch_frames_decoded_total", "regionwatch_decode_seconds_bucket",
                   "regionwatch_detector_seconds_bucket", "regionwatch_tracker_step_seconds_bucket",
                   "regionwatch_people_tracked", "regionwatch_region_occupancy", "regionwatch_events_total",
                   "regionwatch_frames_skipped_total", "regionwatch_outbox_events", "regionwatch_mqtt_connected",
                   "process_resident_memory_bytes", "regionwatch_gpu_memory_allocated_bytes",
                   # fleet: per-replica view (cameras per shard, CPU per camera, outbox depth)
                   "regionwatch_cameras", "regionwatch_cameras_configured", "regionwatch_shard_info",
                   "process_cpu_seconds_total"):
        assert metric in exprs, f"no panel shows {metric}"
    fleet = " ".join(q for _, q in queries(load_dashboard()) if "regionwatch_shard_info" in q)
    for metric in ("regionwatch_cameras ", "process_cpu_seconds_total", "regionwatch_outbox_events"):
        assert metric in fleet, f"no per-replica (shard-labelled) panel shows {metric}"
    assert exprs.count("histogram_quantile(0.95") == 3 and exprs.count("histogram_quantile(0.5,") == 3


def test_dashboard_queries_only_use_exported_metrics():
    known = exported_sample_names()
    for where, expr in queries(load_dashboard()):
        for name in re.findall(r"\b((?:regionwatch|process)_[a-z0-9_]+)", expr):
            assert name in known, f"{where}: {name} is not exported by daemon/ops/metrics.py"


def test_dashboard_queries_are_valid_promql(tmp_path):
    if not PROMTOOL:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:q{i}", "expr": substitute(expr)} for i, (_, expr) in enumerate(queries(load_dashboard()))
    ]}]}
    f = tmp_path / "rules.yml"
    f.write_text(yaml.safe_dump(rules))
    r = subprocess.run([PROMTOOL, "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules['groups'][0]['rules'])} rules found" in r.stdout


def test_substitute_rejects_unknown_variables():
    with pytest.raises(AssertionError):
        substitute('up{instance=~"$instance"}')


def test_grafana_provisioning_matches_compose():
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/regionwatch.yaml").read_text())
    (provider,) = prov["providers"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    dash_mount = next(v for v in mounts if v.startswith("./grafana/regionwatch-dashboard.json:"))
    target = dash_mount.split(":")[1]
    assert Path(target).parent == Path(provider["options"]["path"])
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


# -- Prometheus ----------------------------------------------------------------------------

def test_prometheus_yml_is_valid_and_scrapes_the_daemon():
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "regionwatch")
    assert job["static_configs"][0]["targets"] == ["regionwatch:9108"]
    if not PROMTOOL:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    r = subprocess.run([PROMTOOL, "check", "config", str(DEPLOY / "prometheus.yml")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


# -- compose, Dockerfile, container config -------------------------------------------------

def test_compose_file():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"regionwatch", "mosquitto", "prometheus", "grafana"}
    assert (DEPLOY / services["regionwatch"]["build"]["context"] / services["regionwatch"]["build"]["dockerfile"]
            ).resolve() == (DEPLOY / "Dockerfile").resolve()
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                rel = src[2:]
                assert (DEPLOY / rel).exists() or rel in OPERATOR_CREATED, f"{name}: missing {src}"
            else:
                assert src in compose["volumes"], f"{name}: undeclared volume {src}"
        for secret in svc.get("secrets", []):
            assert compose["secrets"][secret]["file"][2:] in OPERATOR_CREATED
    # The daemon's config is the one in deploy/, the scrape target its listener.
    assert "./regionwatch.toml:/etc/regionwatch/config.toml:ro" in services["regionwatch"]["volumes"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    assert "./mosquitto.conf:/mosquitto/config/mosquitto.conf:ro" in services["mosquitto"]["volumes"]


def test_docker_compose_config():
    if not DOCKER or subprocess.run([DOCKER, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed here; compose.yaml was checked statically")
    r = subprocess.run([DOCKER, "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_dockerfile_matches_the_repository_and_compose():
    text = (DEPLOY / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        *sources, _dest = line.split()
        for src in sources:
            if "*" not in src:
                assert (ROOT / src).exists(), f"COPY source {src} missing"
    assert re.search(r"^EXPOSE 9108$", text, re.M)
    assert 'CMD ["run", "--config", "/etc/regionwatch/config.toml"]' in text
    assert re.search(r"^USER regionwatch$", text, re.M), "the container must not run as root"
    assert "/healthz" in text  # HEALTHCHECK


def test_container_config_is_a_valid_config():
    data = tomllib.loads((DEPLOY / "regionwatch.toml").read_text())
    assert data["metrics"]["listen"] == "0.0.0.0:9108"  # reachable by Prometheus in the compose network
    assert "regionwatch" in data["metrics"]["allowed_hosts"]  # the Host header Prometheus sends
    assert data["sinks"]["mqtt"]["host"] == "mosquitto"
    assert data["sinks"]["mqtt"]["password_file"] == "/run/secrets/mqtt-password"
    if not MODEL.exists():
        pytest.skip(f"model not found at {MODEL} (shared assets absent)")
    data["detector"]["model"] = str(MODEL)  # /models/... exists only in the container
    s = Settings(**data)
    assert s.cameras[0].regions[0].id == "table"


# -- mosquitto -----------------------------------------------------------------------------

def test_mosquitto_conf_runs_in_a_real_broker_and_requires_login(tmp_path):
    if not Path(MOSQUITTO).exists():
        pytest.skip(f"mosquitto not installed ({MOSQUITTO}); apt-get install mosquitto")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    passwd = tmp_path / "mosquitto.passwd"
    subprocess.run([MOSQUITTO_PASSWD, "-c", "-b", str(passwd), "regionwatch", "s3cret"], check=True,
                   capture_output=True)
    text = (DEPLOY / "mosquitto.conf").read_text()
    # Same file, container paths and port swapped for this test's.
    text = text.replace("/mosquitto/config/mosquitto.passwd", str(passwd))
    text = text.replace("/mosquitto/data/", f"{tmp_path}/")
    text = re.sub(r"^listener 1883$", f"listener {port} 127.0.0.1", text, flags=re.M)
    assert f"listener {port} 127.0.0.1" in text
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"user {getpass.getuser()}\n" + text)
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read().decode(errors="replace")

        def connect(user, password):
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            if user:
                c.username_pw_set(user, password)
            rc = c.connect("127.0.0.1", port, keepalive=5)
            result = {}
            c.on_connect = lambda cl, ud, flags, reason, props: result.setdefault("reason", reason)
            deadline = time.monotonic() + 5
            while "reason" not in result and time.monotonic() < deadline:
                c.loop(timeout=0.1)
            c.disconnect()
            return rc, result.get("reason")

        rc, reason = connect("regionwatch", "s3cret")
        assert rc == 0 and reason is not None and not reason.is_failure
        _, reason = connect(None, None)
        assert reason is not None and reason.is_failure  # anonymous clients are refused
        _, reason = connect("regionwatch", "wrong")
        assert reason is not None and reason.is_failure
    finally:
        proc.terminate()
        proc.wait(10)
