"""A local fleet: three ``regionwatch run --shard i/3`` processes, nine file cameras, one mosquitto.

Real processes (the installed CLI, the real YOLO ONNX model, ByteTrack) on a 70-frame cut of the
sample footage (frames 55..124, a visitor steps into the table region and is still inside when the
clip ends: one entry and one ``track_lost`` exit per camera), publishing to one real broker.

* Shards 0 and 2 run normally: each camera's events arrive exactly once, numbered 1, 2 by the
  replica that runs it.
* Shard 1 first runs with the broker unreachable (its port points at a closed one, like a network
  partition), so its events pile up in its outbox; it is SIGKILLed (by PID) as soon as an event is
  stored, mid-stream (its cameras are paced in real time so there is a mid-stream to kill in).
  Restarted with the broker reachable, it delivers the outbox and then its new run's events,
  numbered on from where it stopped: every id exactly once, ``seq`` 1..n without gaps.

Also checked: the three replicas connected with their own client ids and left their own retained
status topics, each state dir numbered only its own cameras, and ``check-config --shard`` lists
the same split. Kept CPU-cheap (about 30 CPU-seconds): 70 frames, the detector once per second,
snapshots off. ``pytest -s`` prints cameras per shard and events per camera.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import textwrap
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from helpers.video import cut_clip

from daemon.config import CameraConfig, FleetConfig, MqttSinkConfig, StateConfig, load_settings
from daemon.events import EventFactory, RegionTransition
from daemon.fleet import FleetPlan, Shard, assign, owner
from daemon.ops.metrics import Metrics
from daemon.sinks.mqtt import MqttSink
from daemon.state import SeqStore

from .conftest import free_port, wait_until

pytestmark = pytest.mark.slow

CAMERAS = [f"cam-{i:02d}" for i in range(1, 10)]
SHARDS = 3
KILLED = 1  # the shard that is killed and restarted
PREFIX = "regionwatch"
CLIP_FRAMES = (55, 125)  # the visitor's feet cross into the region at frame 72 of the footage


def fleet_config(tmp: Path, clip: Path, model: Path, broker_port: int, realtime: set[str]) -> Path:
    cams = ""
    for cid in CAMERAS:
        # Real-time pacing (with room to queue) for the cameras of the shard that gets killed.
        pace = "realtime = true\nqueue_frames = 256\n" if cid in realtime else ""
        cams += textwrap.dedent(f"""
            [[cameras]]
            id = "{cid}"
            url = "{clip}"
            """) + pace + textwrap.dedent("""
            [[cameras.regions]]
            id = "table"
            polygon = [[360, 330], [560, 330], [560, 412], [360, 412]]
            """)
    cfg = tmp / "fleet.toml"
    cfg.write_text(textwrap.dedent(f"""
        [detector]
        model = "{model}"
        interval_s = 1.0
        [sinks.stdout]
        enabled = false
        [sinks.jsonl]
        path = "events.jsonl"
        [sinks.mqtt]
        enabled = true
        host = "127.0.0.1"
        port = {broker_port}
        client_id = "rw-fleet"
        topic_prefix = "{PREFIX}"
        snapshots = false
        reconnect_min_s = 0.1
        reconnect_max_s = 0.5
        [state]
        dir = "state"
        [metrics]
        enabled = false
        """) + cams)
    return cfg


def outbox_rows(state: Path) -> list[tuple[str, str, int]]:
    db = state / "outbox.sqlite3"
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
    try:
        return con.execute("SELECT event_id, camera, seq FROM outbox ORDER BY rowid").fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        con.close()


def start(regionwatch_bin: Path, cfg: Path, shard: int, log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([str(regionwatch_bin), "run", "--config", str(cfg), "--shard", f"{shard}/{SHARDS}"],
                            cwd=cfg.parent, stdout=subprocess.DEVNULL, stderr=log.open("ab"),
                            env={**os.environ, **env})


def test_local_fleet_delivers_every_camera_once_and_a_killed_replica_its_outbox(
        tmp_path, footage, yolo_model, regionwatch_bin, mosquitto, collector):
    t0 = time.monotonic()
    clip = tmp_path / "clip.mp4"
    cut_clip(footage, clip, CLIP_FRAMES[1], start=CLIP_FRAMES[0], crf=18)
    broker = mosquitto()
    col = collector(broker, f"{PREFIX}/#")
    owners = assign(CAMERAS, SHARDS)
    assert all(owners.values()), f"a shard with no camera makes a weak test: {owners}"
    cfg = fleet_config(tmp_path, clip, yolo_model, broker.port, realtime=set(owners[KILLED]))

    # What the user sees first: check-config lists the same split.
    for i in range(SHARDS):
        r = subprocess.run([str(regionwatch_bin), "check-config", str(cfg), "--shard", f"{i}/{SHARDS}"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert f"runs {len(owners[i])} of 9 cameras: {', '.join(owners[i])}" in r.stdout

    logs = {i: tmp_path / f"shard-{i}.log" for i in range(SHARDS)}
    procs = {i: start(regionwatch_bin, cfg, i, logs[i]) for i in range(SHARDS) if i != KILLED}
    # The killed shard cannot reach the broker: a closed port.
    procs[KILLED] = start(regionwatch_bin, cfg, KILLED, logs[KILLED], REGIONWATCH_SINKS__MQTT__PORT=str(free_port()))
    killed_state = tmp_path / "state" / f"shard-{KILLED}"
    try:
        assert wait_until(lambda: outbox_rows(killed_state) or procs[KILLED].poll() is not None, 120, 0.02)
        assert procs[KILLED].poll() is None, "shard finished before it could be killed:\n" + logs[KILLED].read_text()
        procs[KILLED].send_signal(signal.SIGKILL)
        assert procs[KILLED].wait(10) == -signal.SIGKILL
        stranded = outbox_rows(killed_state)  # what the crash left behind, undelivered
        assert stranded and {cam for _, cam, _ in stranded} <= set(owners[KILLED])

        for i in procs:
            if i != KILLED:
                assert procs[i].wait(180) == 0, logs[i].read_text()
        procs[KILLED] = start(regionwatch_bin, cfg, KILLED, logs[KILLED])  # broker reachable now
        assert procs[KILLED].wait(180) == 0, logs[KILLED].read_text()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)

    def events() -> list[dict]:
        out = []
        for m in col.all():
            if m.topic.endswith("/events"):
                e = json.loads(m.payload)
                assert m.topic == f"{PREFIX}/{e['camera']}/events" and m.user_properties["seq"] == str(e["seq"])
                out.append(e)
        return out

    # Shards 0 and 2: entry and exit per camera; the killed shard: its stranded events plus a full run.
    expected = 2 * len(CAMERAS) + len(stranded)
    assert col.wait_for(lambda c: len(events()) >= expected, 30), (len(events()), expected, broker.log_text())
    time.sleep(0.5)  # anything beyond the expected count (a duplicate) would show up now
    got = events()
    ids = Counter(e["id"] for e in got)
    assert all(n == 1 for n in ids.values()), [i for i, n in ids.items() if n > 1]
    assert len(got) == expected

    by_camera: dict[str, list[dict]] = defaultdict(list)
    for e in got:
        by_camera[e["camera"]].append(e)
    assert sorted(by_camera) == CAMERAS
    for cam, evs in by_camera.items():
        seqs = sorted(e["seq"] for e in evs)
        assert seqs == list(range(1, len(evs) + 1)), (cam, seqs)  # its own numbering, no gap, no repeat
        if cam in owners[KILLED]:
            stranded_here = [eid for eid, c, _ in stranded if c == cam]
            assert set(stranded_here) <= set(ids)  # the crash's outbox arrived after the restart
            assert [e["type"] for e in sorted(evs, key=lambda e: e["seq"])][len(stranded_here):] == ["entry", "exit"]
        else:
            assert [e["type"] for e in sorted(evs, key=lambda e: e["seq"])] == ["entry", "exit"], cam
    # The same clip gives the same events on every camera, whichever replica ran it.
    shapes = {(e["type"], e["frame"], e.get("reason")) for e in got}
    assert len(shapes) == 2, shapes

    # Each replica numbered only its own cameras, in its own state dir.
    for i in range(SHARDS):
        con = sqlite3.connect(tmp_path / "state" / f"shard-{i}" / "seq.sqlite3")
        assert sorted(r[0] for r in con.execute("SELECT camera FROM seq")) == sorted(owners[i])
        con.close()
        assert (tmp_path / f"events-shard-{i}.jsonl").exists()
    # Own client ids (the broker allows one connection per id) and own retained status topics.
    log = broker.log_text()
    for i in range(SHARDS):
        assert f" as rw-fleet-{i} " in log, log
        assert [m.text for m in col.on(f"{PREFIX}/shard/{i}/status")][-1] == "stopped"
    assert not col.on(f"{PREFIX}/status")

    print(f"\nlocal fleet ({time.monotonic() - t0:.0f} s wall, load {os.getloadavg()[0]:.1f}): "
          f"{len(got)} events, {len(stranded)} stranded in shard {KILLED}'s outbox by SIGKILL and delivered")
    for i in range(SHARDS):
        counts = ", ".join(f"{c}: {len(by_camera[c])} (seq {', '.join(str(e['seq']) for e in sorted(by_camera[c], key=lambda e: e['seq']))})"
                           for c in owners[i])
        print(f"  shard {i}/{SHARDS} ({len(owners[i])} cameras): {counts}")


def test_sink_of_a_shard_uses_its_own_client_id_status_topic_and_discovery_availability(
        tmp_path, mosquitto, collector):
    broker = mosquitto()
    col = collector(broker, "#")
    clip = tmp_path / "v.mp4"
    clip.write_bytes(b"")
    cam = CameraConfig(id="hall", url=str(clip), regions=[{"id": "table", "polygon": [[0, 0], [9, 0], [9, 9]]}])
    cfg = MqttSinkConfig(enabled=True, port=broker.port, client_id="rw", topic_prefix="site",
                         homeassistant_discovery=True)
    sink = MqttSink(cfg, StateConfig(dir=str(tmp_path / "state")), Metrics(), [cam], shard=Shard(4, 5))
    try:
        assert col.wait_for(lambda c: [m.text for m in c.on("site/shard/4/status")] == ["online"], 10)
    finally:
        sink.close()
    assert col.wait_for(lambda c: [m.text for m in c.on("site/shard/4/status")][-1] == "stopped", 10)
    assert " as rw-4 " in broker.log_text()
    discovery = [json.loads(m.payload) for m in col.all() if m.topic.startswith("homeassistant/")]
    assert discovery and all(d["availability"][0]["topic"] == "site/shard/4/status" for d in discovery)
    # Entity ids come from the fleet-wide client id: a camera keeps its entities when it moves.
    ids = {d["unique_id"] for d in discovery}
    assert {"rw_hall_table_occupied", "rw_hall_table_count", "rw_hall_people"} <= ids
    assert all(i.startswith("rw_hall_") for i in ids)
    assert not col.on("site/status")


def test_a_replica_never_clears_the_topics_of_cameras_other_replicas_now_run(tmp_path, mosquitto, collector):
    """Fleet resized: "yard" moved from this replica to another. Restarting, this replica clears
    its own stale topics (a removed region) but leaves yard's discovery and state alone."""
    broker = mosquitto()
    clip = tmp_path / "v.mp4"
    clip.write_bytes(b"")
    poly = [[0, 0], [9, 0], [9, 9]]
    hall = CameraConfig(id="hall", url=str(clip), regions=[{"id": "table", "polygon": poly}, {"id": "door", "polygon": poly}])
    yard = CameraConfig(id="yard", url=str(clip), regions=[{"id": "gate", "polygon": poly}])
    cfg = MqttSinkConfig(enabled=True, port=broker.port, client_id="rw", topic_prefix="site",
                         homeassistant_discovery=True)
    state = StateConfig(dir=str(tmp_path / "state"))
    before = MqttSink(cfg, state, Metrics(), [hall, yard], shard=Shard(0, 2))
    before.close()
    col = collector(broker, "#")
    hall_now = CameraConfig(id="hall", url=str(clip), regions=[{"id": "table", "polygon": poly}])
    after = MqttSink(cfg, state, Metrics(), [hall_now], shard=Shard(0, 3), elsewhere=("yard",))
    try:
        assert col.wait_for(lambda c: [m.text for m in c.on("site/shard/0/status")][-1:] == ["online"], 10)
    finally:
        after.close()
    cleared = {m.topic for m in col.all() if m.payload == b""}  # an empty retained message clears a topic
    assert "site/hall/door/occupancy" in cleared
    assert "homeassistant/binary_sensor/rw/hall_door_occupied/config" in cleared
    assert not [t for t in cleared if "yard" in t], cleared


def test_growing_the_fleet_old_replica_still_delivers_a_moved_cameras_outbox(tmp_path, mosquitto, collector):
    """N=2 -> 3 with the broker down before the resize: shard 0 still delivers the events it stored
    for a camera that shard 2 now runs, and forgets that camera's numbering (README, "When a
    camera moves to another replica")."""
    ids = ["yard", "hall", "door", "dock", "gate", "lobby", "parking-east", "cam-17"]
    stays = next(c for c in ids if owner(c, 2) == 0 and owner(c, 3) == 0)
    moves = next(c for c in ids if owner(c, 2) == 0 and owner(c, 3) == 2)
    (tmp_path / "m.onnx").write_bytes(b"")
    (tmp_path / "v.mp4").write_bytes(b"")
    cams = "".join(f'[[cameras]]\nid = "{c}"\nurl = "v.mp4"\n' for c in (stays, moves))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[detector]\nmodel = "m.onnx"\n[state]\ndir = "state"\n[fleet]\nshard = "0/2"\n{cams}')
    settings = load_settings(cfg)
    broker = mosquitto()
    col = collector(broker, f"{PREFIX}/+/events")
    mqtt = MqttSinkConfig(enabled=True, port=free_port(), client_id="rw", topic_prefix=PREFIX,  # unreachable
                          reconnect_min_s=0.1, reconnect_max_s=0.5)

    def transition(cam: str, n: int) -> RegionTransition:
        return RegionTransition("entry", cam, "table", n, n, n / 10, time.time(), (1.0, 2.0, 3.0, 4.0),
                                (2.0, 4.0), 0.9)

    plan = FleetPlan.of(settings)
    assert [c.id for c in plan.settings.cameras] == [stays, moves]
    seq = SeqStore(plan.settings.state.dir)
    sink = MqttSink(mqtt, plan.settings.state, Metrics(), plan.settings.cameras, shard=plan.shard)
    produced = []
    for n in range(2):
        for cam in (stays, moves):
            e = EventFactory(seq).make(transition(cam, n))
            sink.publish(e)
            produced.append((e.camera, e.seq, e.id))
    sink.close(timeout=1)
    seq.close()
    assert not col.all()  # nothing got through: all four are in shard 0's outbox

    settings.fleet = FleetConfig(shard="0/3")  # the fleet grows; shard 0 restarts
    plan = FleetPlan.of(settings)
    assert [c.id for c in plan.settings.cameras] == [stays] and moves in plan.others
    seq = SeqStore(plan.settings.state.dir)
    assert plan.release(seq) == [moves]
    sink = MqttSink(mqtt.model_copy(update={"port": broker.port}), plan.settings.state, Metrics(),
                    plan.settings.cameras, shard=plan.shard)
    try:
        assert col.wait_for(lambda c: len(c.all()) == 4, 15), broker.log_text()
    finally:
        sink.close()
    got = sorted((e["camera"], e["seq"], e["id"]) for e in (json.loads(m.payload) for m in col.all()))
    assert got == sorted(produced)  # the moved camera's stored events came from its old replica
    assert seq.next(stays) == 3 and seq.next(moves) == 1  # were it to come back, it would start at 1
    seq.close()
