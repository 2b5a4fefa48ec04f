"""The MQTT sink's Home Assistant side against a real mosquitto: every new topic and payload.

Discovery payloads (entities, names, availability, device), the discovery/retained-topic
lifecycle across configurations (renamed region, disabled camera, discovery off, new client id,
a run that never reached the broker), detection switch commands, people in view, stats, and the
snapshot that names its event on MQTT 3.1.1.
"""

from __future__ import annotations

import io
import json
import time

import cv2
import jinja2
import jsonschema
import numpy as np
import pytest
from PIL import Image

from daemon.config import CameraConfig, MqttSinkConfig, StateConfig
from daemon.events import Event, json_schema
from daemon.ops.metrics import Metrics
from daemon.sinks.mqtt import DeviceInfo, MqttSink, discovery_messages
from daemon.sinks.mqtt.discovery import EVENT_TEMPLATE
from daemon.sinks.mqtt.registry import TopicRegistry
from daemon.snapshots import COMMENT_PREFIX, SnapshotStore, jpeg_comment

from .conftest import wait_until
from .test_mqtt import PREFIX, Producer, mqtt_cfg

DP = "homeassistant"


def cam(cam_id: str, regions=("door",), *, name: str = "", enabled: bool = True, region_names=None) -> CameraConfig:
    names = region_names or {}
    return CameraConfig(id=cam_id, name=name, url=f"rtsp://127.0.0.1:9/{cam_id}", enabled=enabled,
                        regions=[{"id": r, "name": names.get(r, ""), "polygon": [[0, 0], [100, 0], [100, 100]]}
                                 for r in regions])


def retained_now(broker, collector) -> dict[str, bytes]:
    """What a new subscriber gets: the retained messages on the broker right now."""
    late = collector(broker)
    time.sleep(0.5)
    return {m.topic: m.payload for m in late.all() if m.retain}


def run_sink(broker, tmp_path, cameras, **kw) -> MqttSink:
    sink = MqttSink(mqtt_cfg(broker, **kw), StateConfig(dir=str(tmp_path / "state")), Metrics(), cameras,
                    device=DeviceInfo(sw_version="9.9.9"))
    assert wait_until(lambda: sink.connected, 10)
    assert sink.flush(10)
    return sink


def online(col, n: int = 1) -> bool:
    return [m.text for m in col.on(f"{PREFIX}/status")].count("online") >= n


# -- discovery payloads -------------------------------------------------------------------------
def test_discovery_entities_names_availability_and_device():
    cfg = MqttSinkConfig(client_id="rw box", topic_prefix="rw", qos=1)
    cams = [cam("hall", ("table",), name="Main hall", region_names={"table": "Small table"}), cam("off", enabled=False)]
    msgs = {t: json.loads(p) for t, p in discovery_messages(cfg, cams, DeviceInfo(
        sw_version="1.2.3", model="yolo + bytetrack", configuration_url="http://box:9108/")).items()}
    node = "rw_box"
    expected = {
        f"{DP}/sensor/{node}/hall_people/config": "People",
        f"{DP}/binary_sensor/{node}/hall_stream/config": "Stream",
        f"{DP}/image/{node}/hall_snapshot/config": "Last entry",
        f"{DP}/event/{node}/hall_events/config": "Region event",
        f"{DP}/switch/{node}/hall_detection/config": "Detection",
        f"{DP}/sensor/{node}/hall_fps/config": "Frame rate",
        f"{DP}/binary_sensor/{node}/hall_table_occupied/config": "Small table occupied",
        f"{DP}/sensor/{node}/hall_table_count/config": "Small table people",
        f"{DP}/image/{node}/hall_table_snapshot/config": "Small table last entry",
    }
    assert {t: m["name"] for t, m in msgs.items()} == expected  # the disabled camera has none
    for topic, m in msgs.items():
        what = topic.split("/")[3]
        assert m["unique_id"] == m["object_id"] == f"{node}_{what}"
        assert m["device"] == {"identifiers": [f"{node}_hall"], "name": "Main hall", "manufacturer": "regionwatch",
                               "model": "yolo + bytetrack", "sw_version": "1.2.3",
                               "configuration_url": "http://box:9108/"}
        assert m["availability_mode"] == "all" and m["qos"] == 1
        avail = [a["topic"] for a in m["availability"]]
        # What the camera sees needs its stream; the stream sensor, switch and frame rate do not.
        camera_independent = what in ("hall_stream", "hall_detection", "hall_fps")
        assert avail == (["rw/status"] if camera_independent else ["rw/status", "rw/hall/stream"]), topic
    sw = msgs[f"{DP}/switch/{node}/hall_detection/config"]
    assert (sw["command_topic"], sw["state_topic"], sw["payload_on"], sw["payload_off"]) == (
        "rw/hall/detection/set", "rw/hall/detection", "ON", "OFF")
    assert msgs[f"{DP}/image/{node}/hall_table_snapshot/config"]["image_topic"] == "rw/hall/table/snapshot"
    assert msgs[f"{DP}/image/{node}/hall_snapshot/config"]["image_topic"] == "rw/hall/snapshot"
    assert msgs[f"{DP}/sensor/{node}/hall_people/config"]["state_topic"] == "rw/hall/people"
    stream = msgs[f"{DP}/binary_sensor/{node}/hall_stream/config"]
    assert (stream["device_class"], stream["payload_on"], stream["payload_off"]) == ("connectivity", "online", "offline")
    ev = msgs[f"{DP}/event/{node}/hall_events/config"]
    assert ev["state_topic"] == "rw/hall/events" and ev["event_types"] == ["entry", "exit"]
    # Without a preview there is no configuration_url.
    plain = json.loads(next(iter(discovery_messages(cfg, cams, DeviceInfo(sw_version="1")).values())))
    assert "configuration_url" not in plain["device"]


def test_event_template_gives_home_assistant_an_event_type(tmp_path):
    """The event entity's value_template (Jinja, as HA renders it) on real event JSON."""
    prod = Producer(tmp_path)
    env = jinja2.Environment()
    for kind in ("entry", "exit"):
        event = prod.event("hall", "table", kind)
        out = json.loads(env.from_string(EVENT_TEMPLATE).render(value_json=json.loads(event.to_json())))
        assert out["event_type"] == kind and out["region"] == "table" and out["track_id"] == event.track_id
        assert out["event_id"] == event.id and out["seq"] == event.seq
        assert out["dwell_s"] == (2.5 if kind == "exit" else None)


# -- lifecycle: stale retained topics are cleared ---------------------------------------------------
def test_renamed_region_and_disabled_camera_are_cleared(mosquitto, collector, tmp_path):
    broker = mosquitto()
    col = collector(broker)
    hall = cam("hall", ("table",))
    sink = run_sink(broker, tmp_path, [hall, cam("yard")], homeassistant_discovery=True)
    sink.publish(Producer(tmp_path / "state").event("hall", "table"), b"\xff\xd8table\xff\xd9")
    sink.occupancy("hall", "table", 1)
    assert sink.flush(10)
    sink.close()
    before = retained_now(broker, collector)
    old = {t for t in before if "/hall_table_" in t or "/yard" in t or t.startswith(f"{PREFIX}/hall/table/")}
    assert len([t for t in old if t.startswith(DP)]) == 3 + 9  # table's 3 entities, the yard's 9
    assert before[f"{PREFIX}/hall/table/occupancy"] == b"1"
    assert TopicRegistry(tmp_path / "state").topics >= old

    # Next start: "table" is now "desk", the yard is disabled.
    sink = run_sink(broker, tmp_path, [cam("hall", ("desk",)), cam("yard", enabled=False)],
                    homeassistant_discovery=True)
    assert col.wait_for(lambda c: online(c, 2))
    sink.close()
    # Cleared: every retained topic the old config could produce and the new one does not (those
    # never published, such as the yard's stats here, cost an empty publish and nothing else).
    could = {f"{PREFIX}/yard/{t}" for t in ("stream", "people", "detection", "stats", "snapshot",
                                            "door/occupancy", "door/snapshot")}
    could |= {f"{PREFIX}/hall/table/occupancy", f"{PREFIX}/hall/table/snapshot"}
    cleared = {m.topic for m in col.all() if m.payload == b""}
    assert old <= cleared and cleared == old | could, sorted(cleared ^ (old | could))
    # The clears went out before "online", once.
    msgs = col.all()
    second_online = [i for i, m in enumerate(msgs) if m.topic == f"{PREFIX}/status" and m.text == "online"][1]
    assert all(i < second_online for i, m in enumerate(msgs) if m.payload == b"")
    after = retained_now(broker, collector)
    assert not old & set(after), "a cleared topic is still retained on the broker"
    assert f"{DP}/binary_sensor/regionwatch-test/hall_desk_occupied/config" in after
    registry = TopicRegistry(tmp_path / "state").topics
    assert set(after) <= registry and not old & registry  # the cleared ones are forgotten

    # A third start with the same config clears nothing.
    col2 = collector(broker, f"{DP}/#")
    sink = run_sink(broker, tmp_path, [cam("hall", ("desk",)), cam("yard", enabled=False)],
                    homeassistant_discovery=True)
    sink.close()
    assert not [m for m in col2.all() if m.payload == b""]


def test_discovery_off_and_new_client_id_clear_the_old_discovery(mosquitto, collector, tmp_path):
    broker = mosquitto()
    run_sink(broker, tmp_path, [cam("hall")], homeassistant_discovery=True, client_id="rw-a").close()
    disc_a = {t for t in retained_now(broker, collector) if t.startswith(DP)}
    assert len(disc_a) == 9 and all("/rw-a/" in t for t in disc_a)

    run_sink(broker, tmp_path, [cam("hall")], homeassistant_discovery=True, client_id="rw-b").close()
    disc_b = {t for t in retained_now(broker, collector) if t.startswith(DP)}
    assert disc_b == {t.replace("/rw-a/", "/rw-b/") for t in disc_a}

    run_sink(broker, tmp_path, [cam("hall")], homeassistant_discovery=False, client_id="rw-b").close()
    retained = retained_now(broker, collector)
    assert not [t for t in retained if t.startswith(DP)]
    assert retained[f"{PREFIX}/status"] == b"stopped"  # the state topics stay


def test_a_run_that_never_reached_the_broker_still_clears_next_time(mosquitto, collector, tmp_path):
    broker = mosquitto(persistence=True)
    run_sink(broker, tmp_path, [cam("hall", ("table",))], homeassistant_discovery=True).close()
    broker.stop()
    # Renamed while the broker is down: this run never publishes (nor clears) anything.
    sink = MqttSink(mqtt_cfg(broker, homeassistant_discovery=True), StateConfig(dir=str(tmp_path / "state")),
                    Metrics(), [cam("hall", ("desk",))])
    time.sleep(0.5)
    sink.close(timeout=0.5)
    reg = TopicRegistry(tmp_path / "state").topics
    assert any("hall_table_" in t for t in reg) and any("hall_desk_" in t for t in reg)  # both remembered
    broker.start()
    # Renamed again; the "table" topics from two runs ago are cleared now.
    run_sink(broker, tmp_path, [cam("hall", ("bench",))], homeassistant_discovery=True).close()
    retained = retained_now(broker, collector)
    assert not [t for t in retained if "table" in t or "desk" in t], sorted(retained)
    assert f"{PREFIX}/hall/bench/occupancy" in retained


# -- commands, people, stats -------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_detection_switch_commands_and_state(mosquitto, collector, tmp_path, protocol):
    broker = mosquitto()
    col = collector(broker)
    got: list[tuple[str, bool]] = []
    sink = MqttSink(mqtt_cfg(broker, protocol=protocol), StateConfig(dir=str(tmp_path / "state")), Metrics(),
                    [cam("hall"), cam("yard")], on_detection=lambda c, on: got.append((c, on)))
    sink.detection_state("hall", True)
    sink.detection_state("yard", False)
    assert col.wait_for(lambda c: online(c))
    pub = col.client
    pub.publish(f"{PREFIX}/hall/detection/set", b"OFF", qos=1).wait_for_publish(5)
    pub.publish(f"{PREFIX}/yard/detection/set", b" on\n", qos=1).wait_for_publish(5)
    pub.publish(f"{PREFIX}/nope/detection/set", b"OFF", qos=1).wait_for_publish(5)  # unknown camera
    pub.publish(f"{PREFIX}/hall/detection/set", b"MAYBE", qos=1).wait_for_publish(5)  # bad value
    assert wait_until(lambda: len(got) >= 2, 5)
    time.sleep(0.3)
    assert got == [("hall", False), ("yard", True)]
    # The sink publishes the state it is told (the app does, after switching).
    sink.detection_state("hall", False)
    assert col.wait_for(lambda c: [m.text for m in c.on(f"{PREFIX}/hall/detection")] == ["ON", "OFF"])
    assert [m.text for m in col.on(f"{PREFIX}/yard/detection")] == ["OFF"]
    sink.close()
    # A command left retained on the broker is stale: a restart must not act on it.
    pub.publish(f"{PREFIX}/hall/detection/set", b"ON", qos=1, retain=True).wait_for_publish(5)
    got.clear()
    sink = MqttSink(mqtt_cfg(broker, protocol=protocol), StateConfig(dir=str(tmp_path / "state")), Metrics(),
                    [cam("hall")], on_detection=lambda c, on: got.append((c, on)))
    assert col.wait_for(lambda c: online(c, 2))
    time.sleep(0.5)
    sink.close()
    assert got == []
    pub.publish(f"{PREFIX}/hall/detection/set", b"", qos=1, retain=True).wait_for_publish(5)


def test_people_in_view_and_stats(mosquitto, collector, tmp_path):
    broker = mosquitto()
    col = collector(broker)
    m = Metrics()
    m.frames_processed.labels("hall").inc(30)
    m.frames_skipped.labels("hall", "consumer_behind").inc(4)
    m.detector_seconds.labels("hall").observe(0.02)
    m.detector_seconds.labels("hall").observe(0.04)
    m.stream_fps.labels("hall").set(10.0)
    sink = MqttSink(mqtt_cfg(broker, stats_interval_s=0.3), StateConfig(dir=str(tmp_path / "state")), m,
                    [cam("hall")])
    assert col.wait_for(lambda c: online(c))
    sink.stream_state("hall", True)
    sink.detection_state("hall", True)
    sink.people("hall", 2)
    sink.people("hall", 2)  # unchanged: not re-sent

    def stats(c):
        return [json.loads(x.payload) for x in c.on(f"{PREFIX}/hall/stats")]

    assert col.wait_for(lambda c: any(s["people"] == 2 and s["stream"] == "online" for s in stats(c)), 10)
    sink.people("hall", 0)
    assert col.wait_for(lambda c: [x.text for x in c.on(f"{PREFIX}/hall/people")] == ["0", "2", "0"])
    assert col.wait_for(lambda c: len(stats(c)) >= 3, 10)
    sink.close()
    all_stats = stats(col)
    now = next(s for s in all_stats if s["people"] == 2)
    assert (now["camera"], now["fps"], now["frames_processed"], now["frames_skipped"], now["detection"]) == (
        "hall", 10.0, 30, 4, "ON")
    # The detector time is the mean over the interval: both runs fall in the first one.
    first, later = all_stats[0], all_stats[1:]
    assert first["detector_runs"] == 2 and first["detector_ms"] == pytest.approx(30.0)
    assert later and all(s["detector_runs"] == 0 and s["detector_ms"] is None and s["skipped"] == 0 for s in later)
    assert all(s["interval_s"] == pytest.approx(0.3, abs=0.25) for s in later)
    assert retained_now(broker, collector)[f"{PREFIX}/hall/stats"]  # retained


# -- snapshots on MQTT 3.1.1 -----------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_snapshot_names_its_event_without_mqtt5_properties(mosquitto, collector, tmp_path, protocol):
    broker = mosquitto()
    col = collector(broker)
    sink = MqttSink(mqtt_cfg(broker, protocol=protocol), StateConfig(dir=str(tmp_path / "state")), Metrics(),
                    [cam("hall", ("table", "door"))])
    store = SnapshotStore(tmp_path / "snaps", keep_days=1, keep_mb=10, base_url="http://cams.example:9108")
    ok, jpeg = cv2.imencode(".jpg", np.full((48, 64, 3), 128, np.uint8))
    prod = Producer(tmp_path / "state")
    events: list[Event] = []
    for region in ("table", "door", "table"):
        event, tagged = store.attach(prod.event("hall", region), jpeg.tobytes())
        sink.publish(event, tagged)
        events.append(event)
    assert sink.flush(10)
    sink.close()
    assert col.wait_for(lambda c: len(c.on(f"{PREFIX}/hall/table/snapshot")) == 2)
    table = col.on(f"{PREFIX}/hall/table/snapshot")
    door = col.on(f"{PREFIX}/hall/door/snapshot")
    latest = col.on(f"{PREFIX}/hall/snapshot")
    assert [jpeg_comment(m.payload) for m in table] == [COMMENT_PREFIX + events[0].id, COMMENT_PREFIX + events[2].id]
    assert [jpeg_comment(m.payload) for m in door] == [COMMENT_PREFIX + events[1].id]
    assert [jpeg_comment(m.payload) for m in latest] == [COMMENT_PREFIX + e.id for e in events]
    # Any JPEG reader sees the comment and still decodes the picture.
    img = Image.open(io.BytesIO(table[-1].payload))
    assert img.info["comment"] == (COMMENT_PREFIX + events[2].id).encode() and img.size == (64, 48)
    if protocol == "3.1.1":
        assert table[0].user_properties == {}
    else:
        assert table[0].user_properties["event_id"] == events[0].id
    # The event JSON says where its snapshot is kept, and is still a valid regionwatch.event/1.
    validator = jsonschema.Draft202012Validator(json_schema(), format_checker=jsonschema.FormatChecker())
    for m in col.on(f"{PREFIX}/hall/events"):
        e = json.loads(m.payload)
        validator.validate(e)
        assert e["snapshot_url"] == f"http://cams.example:9108/events/{e['id']}/snapshot.jpg"
        assert jpeg_comment(store.get(e["id"])) == COMMENT_PREFIX + e["id"]
