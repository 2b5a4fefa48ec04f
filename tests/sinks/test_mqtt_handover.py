"""The MQTT sink handed over to a new one (a configuration reload), with a real mosquitto.

A reload moves the sink to another broker port while the old broker never answers (a hung
broker: TCP accepted, not a word back). The event stored for the old one waits in the durable
outbox and goes out from the new sink; the new sink is told the current state before it connects,
so its first connection publishes that, not the defaults; neither sink ever says ``stopped``.
"""

from __future__ import annotations

import time

from daemon.config import StateConfig
from daemon.ops.metrics import Metrics
from daemon.sinks.mqtt import MqttSink

from .test_daemon_resilience import Blackhole
from .test_mqtt import PREFIX, Producer, camera, mqtt_cfg


class Port:
    def __init__(self, port: int):
        self.port = port


def test_handover_to_a_new_sink_delivers_what_is_left_and_publishes_the_current_state(
        mosquitto, collector, tmp_path):
    broker = mosquitto()
    col = collector(broker, f"{PREFIX}/#")
    state = StateConfig(dir=str(tmp_path / "state"))
    producer = Producer(tmp_path / "state")
    hole = Blackhole()
    try:
        old = MqttSink(mqtt_cfg(Port(hole.port)), state, Metrics(), [camera("hall")])
        event = producer.event("hall")
        old.publish(event)  # durable in the outbox; the hung broker never takes it
        old.stream_state("hall", True)
        old.handover()  # waits its flush timeout for the hung broker, then leaves
    finally:
        hole.close()
    assert len(old.outbox) == 1

    new = MqttSink(mqtt_cfg(broker), state, Metrics(), [camera("hall")], start=False)
    new.stream_state("hall", True)
    new.occupancy("hall", "door", 2)
    new.people("hall", 3)
    time.sleep(0.5)
    assert col.messages == []  # not connected before start(): nothing, not even the defaults
    new.start()
    assert col.wait_for(lambda c: [e.text for e in c.on(f"{PREFIX}/status")] == ["online"], 10)
    assert col.wait_for(lambda c: len(c.on(f"{PREFIX}/hall/events")) == 1, 10)
    assert col.on(f"{PREFIX}/hall/events")[0].payload == event.to_json().encode()
    assert [m.text for m in col.on(f"{PREFIX}/hall/stream")] == ["online"]  # never the default "offline"
    assert [m.text for m in col.on(f"{PREFIX}/hall/door/occupancy")] == ["2"]
    assert [m.text for m in col.on(f"{PREFIX}/hall/people")] == ["3"]
    new.handover()
    assert len(new.outbox) == 0
    assert [m.text for m in col.on(f"{PREFIX}/status")] == ["online"]  # a handover is not a stop
    assert [m.text for m in col.on(f"{PREFIX}/hall/stream")] == ["online"]
