"""SIGHUP re-reads the configuration of a running daemon (``regionwatch run``, the real model, a
real mosquitto with Home Assistant discovery on, JSONL), with nothing lost on the way.

Three file cameras paced in real time play a 13 s cut of the footage at half size (frames 55..184,
384x216: a visitor steps into the table region at 1.7 s and is still inside at the end). Once each
camera reported the entry:

1. An invalid configuration arrives: each ``section.key: problem`` is logged, nothing changes.
2. A valid one: ``door`` removed (its visitor gets an exit at once), ``gate``'s region renamed
   ``table`` → ``counter`` (restarted: exit from ``table``, then its file again, entry into
   ``counter``), ``yard`` added, ``hall`` unchanged: it keeps running untouched (the same track,
   no exit/entry pair, every frame processed once).

The MQTT sink is rebuilt: ``door``'s and ``gate/table``'s retained topics and Home Assistant
entities are cleared, ``yard``'s and ``gate/counter``'s announced; the daemon never looks
``stopped`` or ``offline`` on the way, and ``hall``'s stream and occupancy stay what they are.
The run ends by itself (file cameras), exit 0. About 20 CPU-seconds (half-size frames, the
detector once a second).
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest
from helpers.video import cut_clip

from .conftest import free_port, wait_until
from .test_daemon_resilience import http_get, metric_value
from .test_mqtt import event_messages, jsonl_events

pytestmark = pytest.mark.slow

PREFIX = "rw"
CLIP = (55, 185)  # footage frames: the visitor's feet cross into the table region at frame 72
FRAMES = CLIP[1] - CLIP[0]
SIZE = (384, 216)  # half the footage's size: a quarter of the decoding and drawing
TABLE = "[[180, 165], [280, 165], [280, 206], [180, 206]]"

HEAD = """
[detector]
model = "{model}"
interval_s = 1.0
tracking_interval_s = 1.0
imgsz = 320
[sinks.stdout]
enabled = false
[sinks.jsonl]
path = "events.jsonl"
[sinks.mqtt]
enabled = true
port = {port}
client_id = "rw-reload"
topic_prefix = "{prefix}"
homeassistant_discovery = true
snapshots = false
reconnect_min_s = 0.2
reconnect_max_s = 1.0
[state]
dir = "state"
[metrics]
listen = "127.0.0.1:{metrics_port}"
linger_s = 5
"""


def camera(cid: str, clip: Path, region: str = "table") -> str:
    # Real-time pacing with room to queue: no frame is skipped on a busy machine.
    return textwrap.dedent(f"""
        [[cameras]]
        id = "{cid}"
        url = "{clip}"
        realtime = true
        queue_frames = 256
        [[cameras.regions]]
        id = "{region}"
        polygon = {TABLE}
        """)


def write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_sighup_applies_a_valid_config_restarting_only_what_changed_and_ignores_an_invalid_one(
        tmp_path, footage, yolo_model, regionwatch_bin, mosquitto, collector):
    clip = tmp_path / "clip.mp4"
    cut_clip(footage, clip, CLIP[1], start=CLIP[0], crf=18, size=SIZE)
    broker = mosquitto()
    col = collector(broker, "#")
    metrics_port = free_port()
    head = HEAD.format(model=yolo_model, port=broker.port, prefix=PREFIX, metrics_port=metrics_port)
    cfg = tmp_path / "config.toml"
    write(cfg, head + camera("hall", clip) + camera("door", clip) + camera("gate", clip))
    log = tmp_path / "daemon.log"
    proc = subprocess.Popen([str(regionwatch_bin), "run", "--config", str(cfg)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    text = lambda: log.read_text(errors="replace")
    events = lambda: jsonl_events(tmp_path / "events.jsonl")
    try:
        assert wait_until(lambda: {e["camera"] for e in events()} == {"hall", "door", "gate"}, 240, 0.05), text()
        before = events()
        assert [e["type"] for e in before] == ["entry"] * 3  # everyone is inside

        # 1. Invalid: two problems, each logged as section.key: problem; nothing changes.
        write(cfg, head.replace("imgsz = 320", "imgsz = 320\nconfidence = 2")
              + camera("hall", clip) + camera("door", clip).replace(TABLE, "[[0, 0], [5, 5]]"))
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "configuration reload rejected" in text(), 30, 0.05), text()
        errors = [line.split(": ", 1)[1] for line in text().splitlines() if " ERROR " in line]
        assert errors == [
            f"configuration reload rejected: {cfg} has 2 problem(s); the daemon keeps running unchanged",
            "detector.confidence: Input should be less than 1",
            "cameras.1.regions.0.polygon: a polygon needs at least 3 points, got 2",
        ], text()
        assert proc.poll() is None and events() == before

        # 2. Valid: door removed, gate's region renamed, yard added, hall unchanged.
        write(cfg, head + camera("hall", clip) + camera("gate", clip, "counter") + camera("yard", clip))
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "configuration reloaded:" in text(), 60, 0.05), text()
        reloaded_at = {e["camera"]: e["frame"] for e in events() if e["type"] == "exit"}
        _, scrape = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
        # (Else this machine is too slow for the test: hall's clip ended during the reload.)
        assert metric_value(scrape, 'regionwatch_stream_up{camera="hall"}') == 1, text()
        # The run ends by itself once every file is done; the listener lingers for a last scrape.
        assert wait_until(lambda: "serving metrics" in text(), 120, 0.1), text()[-3000:]
        status, scrape = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert proc.wait(60) == 0, text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log_text = text()
    assert "Traceback" not in log_text
    assert ("configuration reloaded: cameras started: yard; stopped: door; restarted: gate; unchanged: hall; "
            "sinks rebuilt: mqtt") in log_text

    by_cam: dict[str, list[dict]] = {}
    for e in events():
        by_cam.setdefault(e["camera"], []).append(e)
    summary = {c: [(e["type"], e["region"], e["track_id"], e["frame"], e.get("reason")) for e in evs]
               for c, evs in by_cam.items()}
    # hall: untouched by the reload: one visit, the same track, its exit only at the end of the clip.
    hall = by_cam["hall"]
    assert [e["type"] for e in hall] == ["entry", "exit"] and hall[0]["track_id"] == hall[1]["track_id"], summary
    assert hall[1]["frame"] >= FRAMES - 10 and hall[1]["reason"] == "track_lost", summary
    # door: removed: drained, so its visitor's exit came at the reload (not at the end of its file).
    door = by_cam["door"]
    assert [e["type"] for e in door] == ["entry", "exit"] and door[1]["reason"] == "track_lost", summary
    assert door[1]["frame"] < FRAMES - 20 and reloaded_at["door"] == door[1]["frame"], summary
    # gate: restarted: exit from 'table' at the reload, then its file again: entry into 'counter'.
    gate = by_cam["gate"]
    assert [(e["type"], e["region"]) for e in gate] == [
        ("entry", "table"), ("exit", "table"), ("entry", "counter"), ("exit", "counter")], summary
    assert gate[1]["frame"] < FRAMES - 20 and gate[2]["frame"] < 40, summary  # its file from the start again
    # yard: added: a whole visit.
    assert [(e["type"], e["region"]) for e in by_cam["yard"]] == [("entry", "table"), ("exit", "table")], summary
    for evs in by_cam.values():  # numbering goes on per camera across the reload: no gap, no repeat
        assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1)), summary

    # Every frame of hall was processed exactly once (a restart would read its file again); gate's
    # file was read twice (partly, then whole); no frame skipped.
    assert status == 200, scrape
    frames = lambda cam: metric_value(scrape, f'regionwatch_frames_processed_total{{camera="{cam}"}}')
    assert frames("hall") == FRAMES and frames("yard") == FRAMES, scrape
    assert FRAMES < frames("gate") < 2 * FRAMES and frames("door") < FRAMES
    assert metric_value(scrape, "regionwatch_frames_skipped_total") == 0
    assert metric_value(scrape, 'regionwatch_config_reloads_total{result="applied"}') == 1
    assert metric_value(scrape, 'regionwatch_config_reloads_total{result="rejected"}') == 1
    assert metric_value(scrape, "regionwatch_config_last_reload_successful") == 1
    assert 'regionwatch_region_occupancy{camera="gate",region="table"}' not in scrape  # gone with the region
    assert 'regionwatch_region_occupancy{camera="gate",region="counter"} 0.0' in scrape

    # MQTT: every event delivered; the daemon never looked stopped or offline before the end.
    assert col.wait_for(lambda c: {e["id"] for e in event_messages(c)} >= {e["id"] for e in events()}, 30)
    statuses = [m.text for m in col.on(f"{PREFIX}/status")]
    assert statuses[-1] == "stopped" and "stopped" not in statuses[:-1] and "offline" not in statuses, statuses
    assert statuses.count("online") == 2  # the first connection, then the rebuilt sink's
    # hall's stream and occupancy were told to the new sink before it connected: no flicker.
    stream = [m.text for m in col.on(f"{PREFIX}/hall/stream")]
    assert stream[-1] == "offline" and "offline" not in stream[stream.index("online"):-1], stream
    occupancy = [m.text for m in col.on(f"{PREFIX}/hall/table/occupancy")]
    assert occupancy[-1] == "0" and "0" not in occupancy[occupancy.index("1"):-1], occupancy

    def last(suffix: str) -> bytes | None:
        found = [m.payload for m in col.all() if m.topic.endswith(suffix)]
        return found[-1] if found else None

    # Retained topics and Home Assistant entities of what is gone are cleared; the new ones announced.
    for gone in ("/door/stream", "/door/people", "/door/table/occupancy", "/gate/table/occupancy",
                 "/door_people/config", "/gate_table_occupied/config", "/gate_table_count/config"):
        assert last(gone) == b"", gone
    for new in ("/yard/table/occupancy", "/gate/counter/occupancy", "/yard_people/config",
                "/gate_counter_occupied/config"):
        assert last(new), new
    assert b'"name": "counter occupied"' in last("/gate_counter_occupied/config")
    print(f"\nRELOAD: {summary}")
