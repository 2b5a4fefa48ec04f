"""The MQTT sink against a real mosquitto broker: topics, outages, crashes, TLS, credentials.

Delivery checks compare the events *produced* (``publish`` returned, so the event is in the
outbox) with those a subscriber *received*: every produced id must arrive, ``seq`` must be
contiguous per camera and first arrivals in ``seq`` order (QoS 1 may duplicate; consumers dedupe
by id). The outage and crash tests print their counts (``pytest -s``) and record them as
test properties (``--junitxml``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from daemon.config import CameraConfig, MqttSinkConfig, StateConfig
from daemon.events import EventFactory, RegionTransition
from daemon.ops.metrics import Metrics
from daemon.sinks.mqtt import MqttConfigError, MqttSink, read_password
from daemon.state import SeqStore

from .conftest import wait_until

REPO = Path(__file__).resolve().parents[2]
PUBLISHER = Path(__file__).with_name("mqtt_publisher.py")
PREFIX = "rw"
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00 not really a picture \xff\xd9"


def camera(cam_id: str, regions=("door",)) -> CameraConfig:
    return CameraConfig(id=cam_id, url=f"rtsp://127.0.0.1:9/{cam_id}",
                        regions=[{"id": r, "polygon": [[0, 0], [100, 0], [100, 100]]} for r in regions])


def mqtt_cfg(broker, **kw) -> MqttSinkConfig:
    base = dict(enabled=True, host="127.0.0.1", port=broker.port, client_id="regionwatch-test",
                topic_prefix=PREFIX, keepalive_s=5, reconnect_min_s=0.1, reconnect_max_s=0.5)
    return MqttSinkConfig(**{**base, **kw})


class Producer:
    """Makes real events through EventFactory (seq from a SeqStore in the state dir)."""

    def __init__(self, state_dir: Path):
        self.factory = EventFactory(SeqStore(state_dir))
        self.produced: list = []
        self.n = 0

    def event(self, cam: str, region: str = "door", kind: str = "entry"):
        self.n += 1
        t = RegionTransition(kind, cam, region, self.n, self.n * 3, self.n / 10, time.time(),
                             (10.0, 20.0, 50.0, 90.0), (30.0, 90.0), 0.87,
                             dwell_s=None if kind == "entry" else 2.5,
                             reason=None if kind == "entry" else "left_region")
        e = self.factory.make(t)
        self.produced.append(e)
        return e


def event_messages(col) -> list[dict]:
    return [json.loads(m.payload) for m in col.all() if m.topic.endswith("/events")]


def check_delivery(produced: list[tuple[str, int, str]], received: list[dict],
                   burned: set[tuple[str, int]] = frozenset()) -> dict:
    """Every produced (camera, seq, id) arrived; per camera seq has no gap and arrives in order.

    ``burned``: (camera, seq) numbers allocated but never stored, see :func:`state_at_kill`.
    """
    got_ids = {e["id"] for e in received}
    missing = [p for p in produced if p[2] not in got_ids]
    assert not missing, f"{len(missing)} produced event(s) never arrived, e.g. {missing[:5]}"
    by_cam: dict[str, list[int]] = {}
    seen: set[str] = set()
    for e in received:
        if e["id"] not in seen:
            seen.add(e["id"])
            by_cam.setdefault(e["camera"], []).append(e["seq"])
    for cam, seqs in by_cam.items():
        assert seqs == sorted(seqs), f"{cam}: first arrivals out of seq order: {seqs}"
        expected = [n for n in range(seqs[0], seqs[-1] + 1) if (cam, n) not in burned]
        assert seqs == expected, f"{cam}: seq gap in {seqs}"
    ids = [p[2] for p in produced]
    assert len(set(ids)) == len(ids)
    return {"produced": len(produced), "delivered": len(received), "unique": len(got_ids),
            "duplicates": len(received) - len(got_ids)}


def metric(m: Metrics, name: str, labels: dict | None = None) -> float | None:
    return m.registry.get_sample_value(name, labels or {})


# -- round trip -------------------------------------------------------------------------------
@pytest.mark.parametrize(("protocol", "qos"), [("5", 1), ("3.1.1", 1), ("5", 2), ("3.1.1", 0)])
def test_round_trip_of_every_topic(mosquitto, collector, tmp_path, protocol, qos):
    broker = mosquitto()
    col = collector(broker)
    m = Metrics()
    cams = [camera("hall", ("table", "door")), camera("yard")]
    sink = MqttSink(mqtt_cfg(broker, protocol=protocol, qos=qos, homeassistant_discovery=True),
                    StateConfig(dir=str(tmp_path / "state")), m, cams)
    assert col.wait_for(lambda c: [x.text for x in c.on(f"{PREFIX}/status")] == ["online"])
    assert metric(m, "regionwatch_mqtt_connected") == 1
    prod = Producer(tmp_path / "state")
    sink.stream_state("hall", True)
    entry = prod.event("hall", "table")
    sink.publish(entry, JPEG)
    sink.occupancy("hall", "table", 1)
    exit_ = prod.event("hall", "table", "exit")
    sink.publish(exit_, None)
    sink.occupancy("hall", "table", 0)
    yard = prod.event("yard")
    sink.publish(yard, JPEG + b"2")
    assert sink.flush(10)
    assert metric(m, "regionwatch_outbox_events") == 0
    assert metric(m, "regionwatch_sink_publish_total", {"sink": "mqtt", "result": "queued"}) == 3
    assert metric(m, "regionwatch_sink_publish_total", {"sink": "mqtt", "result": "delivered"}) == 3
    sink.close()
    assert metric(m, "regionwatch_mqtt_connected") == 0
    assert col.wait_for(lambda c: [x.text for x in c.on(f"{PREFIX}/status")] == ["online", "stopped"])

    # Events: the exact JSON of Event.to_json(), never retained.
    ev = col.on(f"{PREFIX}/hall/events")
    assert [json.loads(x.payload) for x in ev] == [entry.to_dict(), exit_.to_dict()]
    assert [json.loads(x.payload) for x in col.on(f"{PREFIX}/yard/events")] == [yard.to_dict()]
    assert ev[0].payload == entry.to_json().encode()
    assert all(x.qos == min(qos, 1) for x in ev)  # granted subscription QoS is 1
    # Occupancy: retained counts, initial 0 for every region, then the changes.
    assert [x.text for x in col.on(f"{PREFIX}/hall/table/occupancy")] == ["0", "1", "0"]
    assert [x.text for x in col.on(f"{PREFIX}/hall/door/occupancy")] == ["0"]
    assert [x.text for x in col.on(f"{PREFIX}/yard/door/occupancy")] == ["0"]
    # Stream: offline until the source reports, online, offline again on clean close.
    assert [x.text for x in col.on(f"{PREFIX}/hall/stream")] == ["offline", "online", "offline"]
    assert [x.text for x in col.on(f"{PREFIX}/yard/stream")] == ["offline"]
    # Snapshot: the JPEG bytes; MQTT 5 names the event in user properties.
    snaps = col.on(f"{PREFIX}/hall/snapshot")
    assert [x.payload for x in snaps] == [JPEG]
    assert [x.payload for x in col.on(f"{PREFIX}/yard/snapshot")] == [JPEG + b"2"]
    if protocol == "5":
        assert snaps[0].user_properties["event_id"] == entry.id
        assert snaps[0].content_type == "image/jpeg"
        assert ev[0].user_properties == {"event_id": entry.id, "seq": "1"}
        assert ev[0].content_type == "application/json"
    else:
        assert snaps[0].user_properties == {}
    # Per region: the latest entry snapshot, on both protocols (the JPEG's comment names the event
    # in the daemon; here the sink gets plain bytes).
    assert [x.payload for x in col.on(f"{PREFIX}/hall/table/snapshot")] == [JPEG]
    assert [x.payload for x in col.on(f"{PREFIX}/yard/door/snapshot")] == [JPEG + b"2"]
    assert col.on(f"{PREFIX}/hall/door/snapshot") == []
    # People in view start at 0 for every camera.
    assert [x.text for x in col.on(f"{PREFIX}/hall/people")] == ["0"]
    # Home Assistant discovery: per camera and per region (contents: tests/sinks/test_mqtt_ha.py).
    disc = {x.topic: json.loads(x.payload) for x in col.all() if x.topic.startswith("homeassistant/")}
    per_camera = [("sensor", "people"), ("binary_sensor", "stream"), ("image", "snapshot"), ("event", "events"),
                  ("switch", "detection"), ("sensor", "fps")]
    per_region = [("binary_sensor", "occupied"), ("sensor", "count"), ("image", "snapshot")]
    assert sorted(disc) == sorted(
        [f"homeassistant/{kind}/regionwatch-test/{cam}_{region}_{suffix}/config"
         for cam, region in (("hall", "table"), ("hall", "door"), ("yard", "door"))
         for kind, suffix in per_region]
        + [f"homeassistant/{kind}/regionwatch-test/{cam}_{suffix}/config"
           for cam in ("hall", "yard") for kind, suffix in per_camera]
    )
    b = disc["homeassistant/binary_sensor/regionwatch-test/hall_table_occupied/config"]
    assert b["state_topic"] == f"{PREFIX}/hall/table/occupancy" and b["device_class"] == "occupancy"
    assert [a["topic"] for a in b["availability"]] == [f"{PREFIX}/status", f"{PREFIX}/hall/stream"]
    s = disc["homeassistant/sensor/regionwatch-test/hall_table_count/config"]
    assert s["state_topic"] == f"{PREFIX}/hall/table/occupancy" and s["unique_id"] != b["unique_id"]
    # Discovery (with the rest of the retained state) is acknowledged before "online".
    topics = [x.topic for x in col.all()]
    assert topics.index(f"{PREFIX}/status") > max(topics.index(t) for t in disc)
    # Retained state as a late subscriber sees it.
    late = collector(broker)
    assert late.wait_for(lambda c: len(c.on(f"{PREFIX}/hall/snapshot")) == 1
                         and len(c.on(f"{PREFIX}/status")) == 1)
    retained = {x.topic: x for x in late.all()}
    assert all(x.retain for x in retained.values())
    assert retained[f"{PREFIX}/status"].text == "stopped"
    assert retained[f"{PREFIX}/hall/table/occupancy"].text == "0"
    assert retained[f"{PREFIX}/hall/snapshot"].payload == JPEG
    assert not any(t.endswith("/events") for t in retained)


# -- broker outage --------------------------------------------------------------------------
def test_broker_outage_loses_nothing(mosquitto, collector, tmp_path, record_property):
    broker = mosquitto(persistence=True)  # the subscriber's session survives the broker restart
    col = collector(broker, f"{PREFIX}/#")
    m = Metrics()
    sink = MqttSink(mqtt_cfg(broker), StateConfig(dir=str(tmp_path / "state")), m,
                    [camera("hall"), camera("yard")])
    sink.stream_state("hall", True)
    prod = Producer(tmp_path / "state")
    stop = threading.Event()

    def produce():
        i = 0
        while not stop.is_set():
            cam = ("hall", "yard")[i % 2]
            sink.publish(prod.event(cam), JPEG if i % 10 == 0 else None)
            i += 1
            time.sleep(0.01)

    worker = threading.Thread(target=produce)
    worker.start()
    try:
        assert col.wait_for(lambda c: len(event_messages(c)) >= 50)
        broker.stop()
        assert wait_until(lambda: metric(m, "regionwatch_mqtt_connected") == 0, 5)
        n_before = len(prod.produced)
        time.sleep(2.0)
        depth_during = metric(m, "regionwatch_outbox_events")
        assert depth_during >= 50, "events produced during the outage wait in the outbox"
        n_down = len(prod.produced) - n_before
        broker.start()
        n_restart = len(prod.produced)
        assert wait_until(lambda: metric(m, "regionwatch_mqtt_connected") == 1, 10)
        # keep producing while the backlog drains, until 20 fresh events got through too
        assert col.wait_for(lambda c: len({e["id"] for e in event_messages(c)}) >= n_restart + 20, 20)
    finally:
        stop.set()
        worker.join()
    assert sink.flush(20)
    sink.close()
    assert col.wait_for(lambda c: {e["id"] for e in event_messages(c)} >= {e.id for e in prod.produced}, 20)
    stats = check_delivery([(e.camera, e.seq, e.id) for e in prod.produced], event_messages(col))
    # "online" again after the reconnect, once the retained state was re-published.
    statuses = [x.text for x in col.on(f"{PREFIX}/status")]
    # (mosquitto sends our will, "offline", when it shuts down)
    assert [x for x in statuses if x != "offline"] == ["online", "online", "stopped"], statuses
    msgs = col.all()
    second_online = [i for i, x in enumerate(msgs) if x.topic == f"{PREFIX}/status" and x.text == "online"][1]
    republished = [i for i, x in enumerate(msgs) if x.topic == f"{PREFIX}/hall/stream" and x.text == "online"]
    assert len(republished) == 2 and republished[1] < second_online
    stats["produced_during_outage"] = n_down
    print(f"\nOUTAGE: {stats}")
    for k, v in stats.items():
        record_property(k, v)


def test_outbox_bound_drops_oldest_while_broker_is_down(mosquitto, collector, tmp_path, caplog):
    broker = mosquitto(persistence=True)  # the collector's subscription survives the restart
    col = collector(broker)
    broker.stop()
    m = Metrics()
    state = StateConfig(dir=str(tmp_path / "state"), outbox_max_events=10)
    with caplog.at_level(logging.WARNING, logger="daemon.sinks.outbox"):
        sink = MqttSink(mqtt_cfg(broker), state, m, [camera("hall")])
        prod = Producer(tmp_path / "state")
        for _ in range(15):
            sink.publish(prod.event("hall"))
        assert metric(m, "regionwatch_outbox_dropped_total", {"reason": "max_events"}) == 5
        assert metric(m, "regionwatch_outbox_events") == 10
        assert "max_events=10" in caplog.text and "hall seq 1" in caplog.text
        broker.start()
        assert col.wait_for(lambda c: len(event_messages(c)) >= 10, 15)
        assert sink.flush(10)
        sink.close()
    assert [e["seq"] for e in event_messages(col)] == list(range(6, 16))  # the gap is visible in seq


# -- crash of the publishing process -------------------------------------------------------
def start_publisher(tmp_path: Path, broker, name: str, count: int, **mqtt_kw) -> tuple[subprocess.Popen, Path]:
    spec = {
        "mqtt": {"enabled": True, "port": broker.port, "client_id": "regionwatch-crash", "topic_prefix": PREFIX,
                 "keepalive_s": 5, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5, **mqtt_kw},
        "state": {"dir": str(tmp_path / "state")},
        "cameras": ["hall", "yard"],
        "count": count,
        "interval_s": 0.01,
        "produced": str(tmp_path / "produced.txt"),
        "flush_s": 20,
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(PUBLISHER), str(path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=open(tmp_path / f"{name}.log", "wb"))
    assert proc.stdout.readline().strip() == b"READY", (tmp_path / f"{name}.log").read_text()
    return proc, tmp_path / "produced.txt"


def read_produced(path: Path) -> list[tuple[str, int, str]]:
    out = []
    for line in path.read_text().splitlines():
        cam, seq, eid = line.split()
        out.append((cam, int(seq), eid))
    return out


def pending_in_outbox(state_dir: Path) -> int:
    with sqlite3.connect(state_dir / "outbox.sqlite3") as db:
        return db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]


def state_at_kill(state_dir: Path, produced: list[tuple[str, int, str]], delivered: list[dict]):
    """What a killed process left: the events that must still arrive, and burned seq numbers.

    Must arrive: every event whose ``publish`` returned (``produced``) and every event stored in
    the outbox (it may have been killed before recording it). A kill between numbering an event
    (SeqStore) and storing it burns that one number: no sink ever saw that event, but consumers
    see a gap. At most one such number per kill (the publisher is one thread).
    """
    with sqlite3.connect(state_dir / "outbox.sqlite3") as db:
        stored = [tuple(r) for r in db.execute("SELECT camera, seq, event_id FROM outbox ORDER BY rowid")]
    with sqlite3.connect(state_dir / "seq.sqlite3") as db:
        last = dict(db.execute("SELECT camera, last FROM seq").fetchall())
    must = {p[2]: p for p in [*produced, *stored]}
    known = {(c, n) for c, n, _ in must.values()} | {(e["camera"], e["seq"]) for e in delivered}
    burned = {(cam, n) for cam, n in last.items() if (cam, n) not in known}
    assert len(burned) <= 1, f"seq numbers allocated but never stored: {burned}"
    return sorted(must.values(), key=lambda p: (p[0], p[1])), burned, len(stored)


def test_sigkill_then_restart_delivers_pending(mosquitto, collector, tmp_path, record_property):
    broker = mosquitto(persistence=True)
    col = collector(broker, f"{PREFIX}/#")
    proc, produced_path = start_publisher(tmp_path, broker, "run1", count=-1)
    try:
        assert col.wait_for(lambda c: len(event_messages(c)) >= 30, 15)
        broker.stop()  # events now pile up in the outbox...
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGKILL)  # ...and the publisher dies with them undelivered
        proc.wait(10)
    produced = read_produced(produced_path)
    delivered_before = event_messages(col)
    must, burned, pending = state_at_kill(tmp_path / "state", produced, delivered_before)
    assert pending >= 30, f"only {pending} events were pending at the crash"
    broker.start()
    proc, _ = start_publisher(tmp_path, broker, "run2", count=10)  # same state dir: drains, then adds 10
    assert proc.wait(60) == 0, (tmp_path / "run2.log").read_text()
    assert col.wait_for(lambda c: [x.text for x in c.on(f"{PREFIX}/status")][-1:] == ["stopped"], 10)
    must_all = {p[2]: p for p in [*must, *read_produced(produced_path)]}.values()
    assert col.wait_for(lambda c: {e["id"] for e in event_messages(c)} >= {p[2] for p in must_all}, 20)
    # seq continues across the restart (SeqStore): no gap except a burned number, if any.
    stats = check_delivery(list(must_all), event_messages(col), burned)
    assert pending_in_outbox(tmp_path / "state") == 0
    stats.update(produced_run1=len(produced), stored_run1=len(must), pending_at_kill=pending,
                 delivered_before_kill=len({e["id"] for e in delivered_before}), burned_seq=len(burned))
    print(f"\nCRASH: {stats}")
    for k, v in stats.items():
        record_property(k, v)


def test_last_will_when_publisher_is_killed(mosquitto, collector, tmp_path):
    broker = mosquitto()
    col = collector(broker, f"{PREFIX}/#")
    proc, produced_path = start_publisher(tmp_path, broker, "run1", count=-1)
    try:
        assert col.wait_for(lambda c: len(event_messages(c)) >= 20, 15)
        assert [x.text for x in col.on(f"{PREFIX}/status")] == ["online"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert col.wait_for(lambda c: [x.text for x in c.on(f"{PREFIX}/status")] == ["online", "offline"], 10)
    late = collector(broker, f"{PREFIX}/status")  # the will is retained
    assert late.wait_for(lambda c: [x.text for x in c.on(f"{PREFIX}/status")] == ["offline"])
    # Whatever was in flight at the kill is delivered by the next start.
    must, burned, _ = state_at_kill(tmp_path / "state", read_produced(produced_path), event_messages(col))
    proc, _ = start_publisher(tmp_path, broker, "run2", count=0)
    assert proc.wait(60) == 0, (tmp_path / "run2.log").read_text()
    assert col.wait_for(lambda c: {e["id"] for e in event_messages(c)} >= {p[2] for p in must}, 20)
    check_delivery(must, event_messages(col), burned)
    assert col.wait_for(lambda c: [x.text for x in c.on(f"{PREFIX}/status")] == ["online", "offline", "online",
                                                                                 "stopped"]), (
        [x.text for x in col.on(f"{PREFIX}/status")], (tmp_path / "run2.log").read_text())


# -- TLS and credentials ---------------------------------------------------------------------
def test_tls_with_test_ca_client_cert_and_password_file(mosquitto, collector, tmp_path, pki):
    broker = mosquitto(users={"rw": "correct horse", "watcher": "w"}, tls=pki, require_certificate=True)
    col = collector(broker, username="watcher", password="w", tls=pki)
    creds = tmp_path / "credentials"  # as systemd's LoadCredential= would provide it
    creds.mkdir()
    (creds / "mqtt-password").write_text("correct horse\n")
    tls = {"enabled": True, "ca_file": pki["ca"], "cert_file": pki["client_cert"], "key_file": pki["client_key"]}
    m = Metrics()
    sink = MqttSink(mqtt_cfg(broker, username="rw", password_file="mqtt-password", tls=tls),
                    StateConfig(dir=str(tmp_path / "state")), m, [camera("hall")],
                    environ={"CREDENTIALS_DIRECTORY": str(creds)})
    prod = Producer(tmp_path / "state")
    for _ in range(5):
        sink.publish(prod.event("hall"))
    assert sink.flush(10)
    assert metric(m, "regionwatch_mqtt_connected") == 1
    sink.close()
    assert col.wait_for(lambda c: len(event_messages(c)) == 5)
    check_delivery([(e.camera, e.seq, e.id) for e in prod.produced], event_messages(col))
    assert "correct horse" not in broker.log_text()


def test_tls_untrusted_broker_is_refused_with_a_clear_error(mosquitto, tmp_path, pki, caplog):
    broker = mosquitto(tls=pki)
    m = Metrics()
    with caplog.at_level(logging.WARNING, logger="daemon.sinks.mqtt"):
        sink = MqttSink(mqtt_cfg(broker, tls={"enabled": True, "ca_file": pki["other_ca"]}),
                        StateConfig(dir=str(tmp_path / "state")), m, [camera("hall")])
        sink.publish(Producer(tmp_path / "state").event("hall"))
        assert wait_until(lambda: "certificate verify failed" in caplog.text, 10), caplog.text
        assert metric(m, "regionwatch_mqtt_connected") == 0
        sink.close(timeout=0.1)
    # insecure = true skips verification (and says so): the same broker is then accepted.
    with caplog.at_level(logging.WARNING, logger="daemon.sinks.mqtt"):
        sink = MqttSink(mqtt_cfg(broker, tls={"enabled": True, "ca_file": pki["other_ca"], "insecure": True}),
                        StateConfig(dir=str(tmp_path / "state")), m, [camera("hall")])
        assert "NOT verified" in caplog.text
        assert sink.flush(10)  # the event kept from the refused attempt is delivered now
        sink.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_wrong_password_logs_clear_error_keeps_retrying_loses_nothing(mosquitto, collector, tmp_path, pki, caplog,
                                                                      protocol):
    wrong = "hunter2-wrong"
    broker = mosquitto(users={"rw": "right", "watcher": "w"}, tls=pki)
    col = collector(broker, username="watcher", password="w", tls=pki)
    caplog.set_level(logging.DEBUG, logger="daemon.sinks.mqtt")
    m = Metrics()
    sink = MqttSink(mqtt_cfg(broker, protocol=protocol, username="rw", password_env="RW_TEST_PW",
                             tls={"enabled": True, "ca_file": pki["ca"]}),
                    StateConfig(dir=str(tmp_path / "state")), m, [camera("hall")],
                    environ={"RW_TEST_PW": wrong})
    prod = Producer(tmp_path / "state")
    for _ in range(5):
        sink.publish(prod.event("hall"))

    def refusals():
        return [r for r in caplog.records if "refused the connection" in r.getMessage()]

    assert wait_until(lambda: len(refusals()) >= 3, 15), caplog.text  # it keeps retrying
    first = refusals()[0]
    assert first.levelno == logging.ERROR
    assert "Bad user name or password" in first.getMessage() or "Not authorized" in first.getMessage()
    assert "check sinks.mqtt.username and the password ($RW_TEST_PW)" in first.getMessage()
    assert metric(m, "regionwatch_mqtt_connected") == 0
    assert metric(m, "regionwatch_outbox_events") == 5
    assert event_messages(col) == []
    # The operator fixes the broker's side; the sink's next retry gets in and delivers everything.
    broker.set_password("rw", wrong)
    assert col.wait_for(lambda c: len(event_messages(c)) == 5, 15), broker.log_text()
    assert sink.flush(10)
    sink.close()
    check_delivery([(e.camera, e.seq, e.id) for e in prod.produced], event_messages(col))
    assert any("after" in r.getMessage() and "failed attempt" in r.getMessage() for r in caplog.records)
    assert wrong not in caplog.text and wrong not in broker.log_text()


def test_password_sources(tmp_path, monkeypatch):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt").write_text("from-credentials\n")
    (tmp_path / "pw.txt").write_text("from-file")
    env = {"CREDENTIALS_DIRECTORY": str(creds), "REGIONWATCH_MQTT_PASSWORD": "from-env"}
    assert read_password(MqttSinkConfig(), env) == "from-env"
    assert read_password(MqttSinkConfig(password_file="mqtt"), env) == "from-credentials"
    assert read_password(MqttSinkConfig(password_file=str(tmp_path / "pw.txt")), env) == "from-file"
    monkeypatch.chdir(tmp_path)
    assert read_password(MqttSinkConfig(password_file="pw.txt"), env) == "from-file"  # not in creds: path
    # config.py makes "mqtt" absolute (beside the config file); not readable there → credential
    assert read_password(MqttSinkConfig(password_file=str(tmp_path / "etc" / "mqtt")), env) == "from-credentials"
    with pytest.raises(MqttConfigError, match="password_file: not found"):
        read_password(MqttSinkConfig(password_file="nope"), env)
    with pytest.raises(MqttConfigError):  # a config problem stops the sink before anything opens
        MqttSink(MqttSinkConfig(password_file="nope"), StateConfig(dir=str(tmp_path / "s")), Metrics(), [])
    assert not (tmp_path / "s" / "outbox.sqlite3").exists()


# -- the whole daemon ------------------------------------------------------------------------
DAEMON_CONFIG = """
[detector]
model = "{model}"
interval_s = 0.5
imgsz = 320
[tracker]
backend = "bytetrack"
[sinks.jsonl]
path = "{out}/events.jsonl"
[sinks.stdout]
enabled = false
[sinks.mqtt]
enabled = true
port = {port}
client_id = "regionwatch-daemon"
topic_prefix = "{prefix}"
keepalive_s = 5
reconnect_min_s = 0.2
reconnect_max_s = 1.0
[state]
dir = "{out}/state"
[metrics]
enabled = false
[[cameras]]
id = "hall"
url = "{footage}"
[[cameras.regions]]
id = "table"
polygon = [[360, 330], [560, 330], [560, 412], [360, 412]]
"""


def jsonl_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_daemon_sigkill_during_outage_then_restart_delivers_pending(
    mosquitto, collector, tmp_path, footage, yolo_model, regionwatch_bin, record_property
):
    """`regionwatch run` on the real footage: the broker goes down, events pile up in the outbox,
    the daemon is SIGKILLed; the next start delivers them. Killing that one shows the last will."""
    broker = mosquitto(persistence=True)
    col = collector(broker, f"{PREFIX}/#")
    cfg = tmp_path / "config.toml"
    cfg.write_text(DAEMON_CONFIG.format(model=yolo_model, out=tmp_path, port=broker.port, prefix=PREFIX,
                                        footage=footage))
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "YOLO_CONFIG_DIR": str(tmp_path / "yolo")}
    jsonl = tmp_path / "events.jsonl"

    def run(name: str) -> subprocess.Popen:
        return subprocess.Popen([str(regionwatch_bin), "run", "--config", str(cfg)], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{name}.log", "wb"))

    proc = run("run1")
    try:
        assert col.wait_for(lambda c: len(event_messages(c)) >= 1, 180), (tmp_path / "run1.log").read_text()
        broker.stop()
        n_at_stop = len(jsonl_events(jsonl))
        # The next event (an exit, ~11 s of video later) is produced while the broker is down.
        assert wait_until(lambda: len(jsonl_events(jsonl)) > n_at_stop, 180, 0.2), (tmp_path / "run1.log").read_text()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    # The MQTT sink comes first in the daemon's sinks, so every event in the JSONL file was
    # stored in the outbox before the JSONL sink wrote it.
    produced = [(e["camera"], e["seq"], e["id"]) for e in jsonl_events(jsonl)]
    delivered_before = event_messages(col)
    must, burned, pending = state_at_kill(tmp_path / "state", produced, delivered_before)
    assert pending >= 1

    broker.start()
    proc = run("run2")
    try:
        assert col.wait_for(lambda c: {e["id"] for e in event_messages(c)} >= {p[2] for p in must}, 120), (
            tmp_path / "run2.log").read_text()
        assert col.wait_for(lambda c: [x.text for x in c.on(f"{PREFIX}/status")][-1:] == ["online"], 10)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert col.wait_for(lambda c: [x.text for x in c.on(f"{PREFIX}/status")][-1:] == ["offline"], 10)
    run1 = {p[2] for p in must}
    stats = check_delivery(must, [e for e in event_messages(col) if e["id"] in run1], burned)
    assert "Traceback" not in (tmp_path / "run2.log").read_text()
    stats.update(produced_run1=len(produced), stored_run1=len(must), pending_at_kill=pending,
                 delivered_before_kill=len({e["id"] for e in delivered_before}), burned_seq=len(burned))
    print(f"\nDAEMON CRASH: {stats}")
    for k, v in stats.items():
        record_property(k, v)
