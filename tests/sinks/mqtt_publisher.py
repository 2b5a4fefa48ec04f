"""Test helper process: drives a real MqttSink with real Event objects, so tests can SIGKILL it.

    python tests/sinks/mqtt_publisher.py SPEC.json

SPEC (JSON): ``mqtt`` ([sinks.mqtt] keys), ``state`` ([state] keys), ``cameras`` (ids),
``count`` (events to produce, -1 = until killed), ``interval_s``, ``produced`` (a file: one
``camera seq id`` line is appended after each ``publish`` returns, i.e. once the event is in the
outbox), ``flush_s`` (how long to wait for delivery before closing).
Prints ``READY`` once the sink exists and ``DONE <produced>`` after a clean close.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from daemon.config import CameraConfig, MqttSinkConfig, StateConfig
from daemon.events import EventFactory, RegionTransition
from daemon.ops.metrics import Metrics
from daemon.sinks.mqtt import MqttSink
from daemon.state import SeqStore


def main(spec_path: str) -> int:
    spec = json.loads(open(spec_path).read())
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    cameras = [
        CameraConfig(id=cam, url=f"rtsp://127.0.0.1:9/{cam}",
                     regions=[{"id": "door", "polygon": [[0, 0], [100, 0], [100, 100]]}])
        for cam in spec["cameras"]
    ]
    state = StateConfig(**spec["state"])
    sink = MqttSink(MqttSinkConfig(**spec["mqtt"]), state, Metrics(), cameras)
    factory = EventFactory(SeqStore(state.dir, synchronous=state.fsync))
    for cam in cameras:
        sink.stream_state(cam.id, True)
    print("READY", flush=True)
    produced = open(spec["produced"], "a", encoding="utf-8")
    n, count = 0, spec["count"]
    while count < 0 or n < count:
        cam = cameras[n % len(cameras)].id
        kind = "entry" if (n // len(cameras)) % 2 == 0 else "exit"
        t = RegionTransition(kind, cam, "door", n, n, n / 10, time.time(), (10.0, 10.0, 50.0, 90.0),
                             (30.0, 90.0), 0.9, dwell_s=None if kind == "entry" else 1.0,
                             reason=None if kind == "entry" else "left_region")
        event = factory.make(t)
        sink.publish(event, b"\xff\xd8\xff\xe0 fake jpeg " + event.id.encode() if kind == "entry" else None)
        sink.occupancy(cam, "door", 1 if kind == "entry" else 0)
        produced.write(f"{event.camera} {event.seq} {event.id}\n")
        produced.flush()
        n += 1
        time.sleep(spec.get("interval_s", 0.01))
    sink.flush(spec.get("flush_s", 10.0))
    sink.close()
    print(f"DONE {n}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
