"""regionwatch against a REAL Home Assistant Core (2024.3.3), end to end, through HA's own APIs.

Set-up (all on 127.0.0.1, started here): a mosquitto broker; Home Assistant headless, onboarded
and given the MQTT integration through its HTTP API (``tests/helpers/home_assistant.py``, which
installs it into a cached venv the first time); two GStreamer RTSP servers serving the sample
footage ("hall" at 2x, "yard" at 1x); ``regionwatch run`` on them with discovery on.

Checked through Home Assistant's REST API (and a websocket recorder of every state change):

1. the expected entities exist with their display names and device info;
2. states follow the events: the region's people count in HA goes through exactly the counts
   the daemon's events imply, the event entity fires once per event (type, region, track id,
   dwell), and the image entity serves the JPEG of the latest entry (its comment names the
   event; the same bytes are served by event id on the daemon's listener);
3. the detection switch pauses detection (detector runs stop, people 0) and resumes it, and the
   choice survives a restart;
4. availability: one camera's stream dies -> only its entities go unavailable (its stream sensor
   says disconnected); a clean stop and a SIGKILL (last will) make every entity unavailable;
5. renaming a region and disabling a camera remove the old entities from Home Assistant.

The run prints the entity list, a state timeline and the rename/orphan check (``pytest -s``),
and writes them as JSON to ``$REGIONWATCH_HA_REPORT`` when that is set.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.snapshots import COMMENT_PREFIX, jpeg_comment

from .conftest import free_port, wait_until

try:
    from helpers.home_assistant import HomeAssistant, HomeAssistantUnavailable, ensure_installed, read_timeline
    from helpers.rtsp import RtspServer, rtsp_server_unavailable
except ImportError:  # pragma: no cover - run from another rootdir
    pytest.skip("tests/helpers not importable", allow_module_level=True)

TABLE = [[360, 330], [560, 330], [560, 412], [360, 412]]

CONFIG = """
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
port = {mqtt_port}
client_id = "regionwatch"
topic_prefix = "regionwatch"
keepalive_s = 5
reconnect_min_s = 0.2
reconnect_max_s = 1.0
homeassistant_discovery = true
stats_interval_s = 2
[state]
dir = "{out}/state"
[metrics]
listen = "127.0.0.1:{http_port}"
[preview]
enabled = true
[[cameras]]
id = "hall"
name = "Hall"
url = "{hall}"
{live}
[[cameras.regions]]
id = "{region}"
name = "{region_name}"
polygon = {table}
[[cameras]]
id = "yard"
name = "Yard"
enabled = {yard_enabled}
url = "{yard}"
{live}
[[cameras.regions]]
id = "door"
name = "Front door"
polygon = {table}
"""
LIVE = ("open_timeout_s = 3\nread_timeout_s = 3\nstall_timeout_s = 3\nreconnect_base_s = 0.2\n"
        "reconnect_max_s = 1.0")

CAMERA_ENTITIES = {  # object id suffix -> friendly name suffix
    ("sensor", "people"): "People", ("binary_sensor", "stream"): "Stream", ("image", "snapshot"): "Last entry",
    ("event", "events"): "Region event", ("switch", "detection"): "Detection", ("sensor", "fps"): "Frame rate",
}
REGION_ENTITIES = {("binary_sensor", "occupied"): "occupied", ("sensor", "count"): "people",
                   ("image", "snapshot"): "last entry"}
SEES = {"people", "snapshot", "events"}  # camera entities that need the stream (besides region ones)


def expected_entities(cameras: dict[str, tuple[str, str, str]]) -> dict[str, str]:
    """entity id -> friendly name, for {camera: (camera name, region id, region name)}."""
    out = {}
    for cam, (cam_name, region, region_name) in cameras.items():
        for (domain, what), label in CAMERA_ENTITIES.items():
            out[f"{domain}.regionwatch_{cam}_{what}"] = f"{cam_name} {label}"
        for (domain, what), label in REGION_ENTITIES.items():
            out[f"{domain}.regionwatch_{cam}_{region}_{what}"] = f"{cam_name} {region_name} {label}"
    return out


def needs_stream(entity_id: str) -> bool:
    what = entity_id.split(".", 1)[1].split("_", 2)[2]
    return what in SEES or "_" in what  # region entities: "<region>_<what>"


class Daemon:
    """``regionwatch run`` as a subprocess; JSONL events and /metrics read back."""

    def __init__(self, exe: Path, tmp: Path, http_port: int):
        self.exe, self.tmp, self.http_port = exe, tmp, http_port
        self.proc: subprocess.Popen | None = None
        self.runs = 0
        self.env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0",
                    "YOLO_CONFIG_DIR": str(tmp / "yolo")}

    def start(self, config: str) -> None:
        self.runs += 1
        path = self.tmp / f"config{self.runs}.toml"
        path.write_text(config)
        self.log = self.tmp / f"run{self.runs}.log"
        self.proc = subprocess.Popen([str(self.exe), "run", "--config", str(path)], cwd=self.tmp, env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(60)

    def events(self) -> list[dict]:
        path = self.tmp / "events.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []

    def metric(self, name: str, **labels) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def collapse(values: list) -> list:
    out = []
    for v in values:
        if not out or out[-1] != v:
            out.append(v)
    return out


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the first run installs Home Assistant (a few minutes)
def test_home_assistant_end_to_end(mosquitto, footage, yolo_model, regionwatch_bin, tmp_path, record_property):
    t_start = time.monotonic()
    why = rtsp_server_unavailable()
    if why:
        pytest.skip(why)
    try:
        t0 = time.monotonic()
        venv = ensure_installed(log=lambda m: print(f"\n{m}"))
        install_s = time.monotonic() - t0
    except HomeAssistantUnavailable as e:
        pytest.skip(f"Home Assistant cannot be set up here: {e}")
    broker = mosquitto()
    report: dict = {"install_s": round(install_s, 1)}
    ha = HomeAssistant(venv, tmp_path / "ha", mqtt_port=broker.port)
    (tmp_path / "ha").mkdir()
    try:
        ha.start()
    except HomeAssistantUnavailable as e:
        ha.stop()
        pytest.skip(f"Home Assistant did not start: {e}")
    hall = RtspServer(footage, speed=2, mount="/hall")
    yard = RtspServer(footage, speed=1, mount="/yard")
    daemon = Daemon(regionwatch_bin, tmp_path, free_port())
    timeline_path = tmp_path / "timeline.jsonl"
    watcher = None
    try:
        report["ha_start_s"] = round(ha.started_s, 1)
        watcher = ha.watch(timeline_path)
        hall.start()
        yard.start()

        def config(region="table", region_name="Small table", yard_enabled="true"):
            return CONFIG.format(model=yolo_model, out=tmp_path, mqtt_port=broker.port, http_port=daemon.http_port,
                                 hall=hall.url(), yard=yard.url(), live=LIVE, region=region, region_name=region_name,
                                 table=json.dumps(TABLE), yard_enabled=yard_enabled)

        # -- 1. entities, names, device info ----------------------------------------------------------
        daemon.start(config())
        first = expected_entities({"hall": ("Hall", "table", "Small table"), "yard": ("Yard", "door", "Front door")})
        t0 = time.monotonic()
        ha.wait(lambda st: all(e in st and st[e]["state"] != "unavailable" for e in first), 180,
                "every entity, available")
        report["entities_available_after_start_s"] = round(time.monotonic() - t0, 1)
        states = ha.states()
        ours = sorted(e for e in states if "regionwatch" in e)
        assert ours == sorted(first), f"unexpected entity set: {sorted(set(ours) ^ set(first))}"
        names = {e: states[e]["attributes"].get("friendly_name") for e in ours}
        assert names == first
        report["entities"] = {e: names[e] for e in ours}
        device = {k: ha.template(f"{{{{ device_attr('sensor.regionwatch_hall_people', '{k}') }}}}")
                  for k in ("name", "manufacturer", "model", "sw_version", "configuration_url")}
        assert device["name"] == "Hall" and device["manufacturer"] == "regionwatch"
        assert device["sw_version"] == subprocess.run([str(regionwatch_bin), "--version"], capture_output=True,
                                                      text=True).stdout.split()[-1]
        assert device["model"] == f"{Path(yolo_model).name} + bytetrack", device
        assert device["configuration_url"] == f"http://127.0.0.1:{daemon.http_port}/"
        report["device"] = device
        assert states["binary_sensor.regionwatch_hall_stream"]["attributes"]["device_class"] == "connectivity"
        assert states["event.regionwatch_hall_events"]["attributes"]["event_types"] == ["entry", "exit"]

        # -- 2. states follow the events (the hall clip takes 70 s at 2x) --------------------------------
        def hall_table_entries():
            return [e for e in daemon.events() if e["camera"] == "hall" and e["region"] == "table"
                    and e["type"] == "entry"]

        assert wait_until(lambda: len(hall_table_entries()) >= 1, 120, 0.2), daemon.log_text()
        # The image entity serves the latest entry's JPEG; its comment names that event.
        def image_matches_latest_entry():
            entries = hall_table_entries()
            status, jpeg, ctype = ha.image("image.regionwatch_hall_table_snapshot")
            if status != 200 or not entries:
                return None
            return (jpeg, ctype, entries[-1]) if jpeg_comment(jpeg) == COMMENT_PREFIX + entries[-1]["id"] else None

        found = wait_until(lambda: image_matches_latest_entry() is not None, 30, 0.3)
        assert found, "image entity never served the latest entry snapshot"
        jpeg, ctype, entry = image_matches_latest_entry()
        assert ctype.startswith("image/jpeg") and jpeg[:2] == b"\xff\xd8"
        with urllib.request.urlopen(entry["snapshot_url"], timeout=10) as r:  # the same JPEG by event id
            assert r.read() == jpeg
        status, cam_jpeg, _ = ha.image("image.regionwatch_hall_snapshot")
        assert status == 200 and jpeg_comment(cam_jpeg).startswith(COMMENT_PREFIX)
        report["image_check"] = {"entity": "image.regionwatch_hall_table_snapshot", "bytes": len(jpeg),
                                 "event_id": entry["id"], "snapshot_url": entry["snapshot_url"]}

        # Let the clip play to its end (the hall stream then reconnects: a new pass begins).
        n_hall = lambda: len([e for e in daemon.events() if e["camera"] == "hall"])  # noqa: E731
        assert wait_until(lambda: n_hall() >= 8, 150, 0.5), daemon.log_text()
        fps = ha.wait(lambda st: float(st["sensor.regionwatch_hall_fps"]["state"] or 0) > 0
                      and st["sensor.regionwatch_hall_fps"], 30, "a frame rate")
        assert {"detector_ms", "frames_skipped", "people", "processed_fps"} <= set(fps["attributes"])

        # -- 3. the detection switch pauses detection --------------------------------------------------
        ha.call("switch", "turn_off", entity_id="switch.regionwatch_hall_detection")
        ha.wait(lambda st: st["switch.regionwatch_hall_detection"]["state"] == "off", 20, "switch off")
        ha.wait(lambda st: st["sensor.regionwatch_hall_people"]["state"] in ("0", "unavailable")
                and st["sensor.regionwatch_hall_table_count"]["state"] in ("0", "unavailable"), 20, "people 0")
        # A detector run that began before the switch may still finish: let it.
        settled = []
        assert wait_until(lambda: settled.append(daemon.metric("regionwatch_detector_runs_total", camera="hall"))
                          or settled[-4:] == [settled[-1]] * 4, 20, 0.5), settled
        runs_before = settled[-1]
        yard_before = daemon.metric("regionwatch_detector_runs_total", camera="yard")
        time.sleep(3.0)
        runs_after = daemon.metric("regionwatch_detector_runs_total", camera="hall")
        yard_after = daemon.metric("regionwatch_detector_runs_total", camera="yard")
        saved = json.loads((tmp_path / "state" / "detection.json").read_text())["cameras"]
        assert runs_after == runs_before
        assert yard_after > yard_before  # the other camera runs on
        assert saved == {"hall": False, "yard": True}
        ha.call("switch", "turn_on", entity_id="switch.regionwatch_hall_detection")
        ha.wait(lambda st: st["switch.regionwatch_hall_detection"]["state"] == "on", 20, "switch on")
        assert wait_until(lambda: daemon.metric("regionwatch_detector_runs_total", camera="hall") > runs_before, 20)
        report["switch_check"] = {"hall_detector_runs_in_3s_off": runs_after - runs_before,
                                  "yard_detector_runs_meanwhile": yard_after - yard_before, "saved": saved}

        # -- 4a. one camera's stream dies: only its entities go unavailable ------------------------------
        t0 = time.monotonic()
        yard.kill()
        ha.wait(lambda st: all(st[e]["state"] == "unavailable" for e in first if "_yard_" in e and needs_stream(e))
                and st["binary_sensor.regionwatch_yard_stream"]["state"] == "off", 30, "yard unavailable")
        report["stream_down_to_unavailable_s"] = round(time.monotonic() - t0, 2)
        st = ha.states()
        assert st["switch.regionwatch_yard_detection"]["state"] != "unavailable"
        assert st["sensor.regionwatch_hall_people"]["state"] != "unavailable"
        yard.start()
        ha.wait(lambda st: all(st[e]["state"] != "unavailable" for e in first if "_yard_" in e), 60,
                "yard available again")

        # -- 4b. clean stop: everything unavailable ---------------------------------------------------
        ha.call("switch", "turn_off", entity_id="switch.regionwatch_hall_detection")  # kept across the restart
        # Whoever was inside got their exit: wait until HA shows it (the hall stream may be between
        # two passes of the clip, and HA hides values while an entity is unavailable).
        ha.wait(lambda st: st["switch.regionwatch_hall_detection"]["state"] == "off"
                and st["sensor.regionwatch_hall_table_count"]["state"] == "0", 30, "switch off, nobody inside")
        t0 = time.monotonic()
        assert daemon.stop() == 0, daemon.log_text()
        ha.wait(lambda st: all(st[e]["state"] == "unavailable" for e in first), 30, "all unavailable after stop")
        report["stop_to_unavailable_s"] = round(time.monotonic() - t0, 2)
        run1_events = daemon.events()
        t_run1_end = time.time()

        # -- 4c. restart (switch still off), then SIGKILL: the last will ---------------------------------
        daemon.start(config())
        ha.wait(lambda st: st["sensor.regionwatch_yard_people"]["state"] != "unavailable", 180, "back after restart")
        assert ha.state("switch.regionwatch_hall_detection")["state"] == "off"
        time.sleep(2.0)
        assert daemon.metric("regionwatch_detector_runs_total", camera="hall") == 0  # paused since the start
        ha.call("switch", "turn_on", entity_id="switch.regionwatch_hall_detection")
        ha.wait(lambda st: st["switch.regionwatch_hall_detection"]["state"] == "on", 20, "switch on after restart")
        t0 = time.monotonic()
        daemon.stop(signal.SIGKILL)
        ha.wait(lambda st: all(st[e]["state"] == "unavailable" for e in first), 30, "all unavailable after SIGKILL")
        report["sigkill_to_unavailable_s"] = round(time.monotonic() - t0, 2)

        # -- 5. rename the region, disable the yard: the old entities are removed -----------------------
        daemon.start(config(region="desk", region_name="Desk", yard_enabled="false"))
        second = expected_entities({"hall": ("Hall", "desk", "Desk")})
        ha.wait(lambda st: all(e in st and st[e]["state"] != "unavailable" for e in second)
                and not any(e in st for e in set(first) - set(second)), 180, "renamed entities, old ones gone")
        ours = sorted(e for e in ha.states() if "regionwatch" in e)
        assert ours == sorted(second)
        removed = sorted(set(first) - set(second))
        report["rename_check"] = {"before": sorted(first), "after": ours, "removed": removed,
                                  "removed_seen_in_timeline": sorted({c["entity_id"] for c in read_timeline(timeline_path)
                                                                      if c["state"] is None})}
        assert set(report["rename_check"]["removed_seen_in_timeline"]) == set(removed)
        assert daemon.stop() == 0, daemon.log_text()
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
        if watcher is not None:
            watcher.terminate()
            watcher.wait(10)
        hall.stop()
        yard.stop()
        ha.stop()

    # -- the state timeline of run 1 against the daemon's events ------------------------------------
    timeline = read_timeline(timeline_path)
    hall_table = [e for e in run1_events if e["camera"] == "hall" and e["region"] == "table"]
    implied, n = ["0"], 0
    for e in hall_table:
        n += 1 if e["type"] == "entry" else -1
        implied.append(str(n))
    seen = collapse([c["state"] for c in timeline if c["entity_id"] == "sensor.regionwatch_hall_table_count"
                     and c["state"] not in ("unavailable", "unknown", None) and c["t"] <= t_run1_end])
    assert seen == collapse(implied), f"HA count states {seen} != the events' counts {collapse(implied)}"
    fired = []
    for c in timeline:
        if c["entity_id"] == "event.regionwatch_hall_events" and c["state"] not in ("unavailable", "unknown", None):
            eid = c["attributes"].get("event_id")
            if eid and eid not in fired:
                fired.append(eid)
    run1_hall = [e for e in run1_events if e["camera"] == "hall"]
    assert fired[:len(run1_hall)] == [e["id"] for e in run1_hall], "the event entity did not fire once per event"
    by_id = {e["id"]: e for e in run1_hall}
    for c in timeline:
        a = c["attributes"] or {}
        if c["entity_id"] == "event.regionwatch_hall_events" and a.get("event_id") in by_id:
            e = by_id[a["event_id"]]
            assert (a["event_type"], a["region"], a["track_id"], a.get("dwell_s")) == (
                e["type"], e["region"], e["track_id"], e.get("dwell_s"))
    # Latency: the frame's time (event "time") to the state change in HA.
    from datetime import datetime

    def ts(iso: str) -> float:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()

    latency = []
    for e in run1_hall:
        hits = [c["t"] for c in timeline if c["entity_id"] == "event.regionwatch_hall_events"
                and (c["attributes"] or {}).get("event_id") == e["id"]]
        if hits:
            latency.append(hits[0] - ts(e["time"]))
    report["events_run1"] = {"hall": len(run1_hall), "hall_table": len(hall_table),
                             "yard": len([e for e in run1_events if e["camera"] == "yard"])}
    report["count_states_in_ha"] = seen
    report["event_latency_s"] = {"median": round(statistics.median(latency), 2), "max": round(max(latency), 2),
                                 "n": len(latency)}
    keep = {"binary_sensor.regionwatch_hall_table_occupied", "sensor.regionwatch_hall_table_count",
            "sensor.regionwatch_hall_people", "switch.regionwatch_hall_detection",
            "binary_sensor.regionwatch_yard_stream", "sensor.regionwatch_yard_people",
            "event.regionwatch_hall_events", "image.regionwatch_hall_table_snapshot"}
    t_first = timeline[0]["t"]
    report["timeline"] = [
        f"{c['t'] - t_first:7.2f} {c['entity_id']} = {c['state']}"
        + (f" ({c['attributes'].get('event_type')} track {c['attributes'].get('track_id')})"
           if c["entity_id"].startswith("event.") and c["state"] not in (None, "unavailable") else "")
        for c in timeline if c["entity_id"] in keep or c["state"] is None
    ]
    report["duration_s"] = round(time.monotonic() - t_start, 1)
    text = json.dumps(report, indent=1)
    print(f"\nHOME ASSISTANT RUN:\n{text}")
    if os.environ.get("REGIONWATCH_HA_REPORT"):
        Path(os.environ["REGIONWATCH_HA_REPORT"]).write_text(text)
    for k in ("duration_s", "install_s", "ha_start_s", "stop_to_unavailable_s", "sigkill_to_unavailable_s",
              "stream_down_to_unavailable_s"):
        record_property(k, report[k])
