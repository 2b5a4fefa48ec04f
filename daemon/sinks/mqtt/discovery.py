"""Home Assistant MQTT discovery: the config message of every entity regionwatch offers.

Each camera is one device. Its entities (``{node}`` is the client id made topic-safe, entity ids
come from ``object_id`` = ``{node}_{camera}_{what}``):

================  ===========================  ===================================================
platform          what                         reads / writes
================  ===========================  ===================================================
sensor            people in view               ``{prefix}/{camera}/people``
binary_sensor     stream (connectivity)        ``{prefix}/{camera}/stream``
image             latest entry snapshot        ``{prefix}/{camera}/snapshot`` (JPEG)
event             entry / exit                 ``{prefix}/{camera}/events`` (region, track id, dwell)
switch            detection on / off           ``{prefix}/{camera}/detection`` (+ ``/set``)
sensor            frame rate (diagnostic)      ``{prefix}/{camera}/stats`` (all stats as attributes)
binary_sensor     per region: occupied         ``{prefix}/{camera}/{region}/occupancy``
sensor            per region: people           ``{prefix}/{camera}/{region}/occupancy``
image             per region: latest entry     ``{prefix}/{camera}/{region}/snapshot`` (JPEG)
================  ===========================  ===================================================

Availability (:func:`availability`): every entity needs the daemon ``online``; what the camera
sees (people, snapshots, events, regions) also needs that camera's stream ``online``
(``availability_mode: all``). The stream sensor itself, the detection switch and the frame rate
stay available while the daemon runs, so a dead camera shows as "disconnected", not "unavailable".

Example:
    >>> import tempfile, os
    >>> from daemon.config import CameraConfig, MqttSinkConfig
    >>> f = os.path.join(tempfile.mkdtemp(), "v.mp4"); open(f, "w").close()
    >>> cam = CameraConfig(id="hall", name="Hall", url=f,
    ...                    regions=[{"id": "table", "polygon": [[0, 0], [9, 0], [9, 9]]}])
    >>> msgs = discovery_messages(MqttSinkConfig(), [cam], DeviceInfo(sw_version="0.1.0"))
    >>> sorted(t.split("/", 2)[1] + "/" + t.split("/")[3] for t in msgs)[:4]
    ['binary_sensor/hall_stream', 'binary_sensor/hall_table_occupied', 'event/hall_events', 'image/hall_snapshot']
    >>> import json; json.loads(msgs["homeassistant/switch/regionwatch/hall_detection/config"])["command_topic"]
    'regionwatch/hall/detection/set'
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from daemon.config import CameraConfig, MqttSinkConfig
from daemon.fleet import Shard
from daemon.sinks.mqtt.topics import MqttTopics, node_id

EVENT_TEMPLATE = (
    "{{ {'event_type': value_json.type, 'region': value_json.region, 'track_id': value_json.track_id,"
    " 'dwell_s': value_json.get('dwell_s'), 'reason': value_json.get('reason'), 'event_id': value_json.id,"
    " 'seq': value_json.seq, 'snapshot_url': value_json.get('snapshot_url')} | tojson }}"
)
"""Home Assistant's MQTT event entity wants ``event_type``; the rest become event attributes."""


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What Home Assistant shows about each camera's device."""

    sw_version: str
    model: str = "regionwatch"
    manufacturer: str = "regionwatch"
    configuration_url: str | None = None


def availability(topics: MqttTopics, camera: str | None = None) -> dict[str, Any]:
    """The availability block: the daemon's status topic, and the camera's stream when given.

    The one place availability topics come from (a sharded fleet changes the status topic here).

    Example:
        >>> [a["topic"] for a in availability(MqttTopics("rw"), "hall")["availability"]]
        ['rw/status', 'rw/hall/stream']
    """
    avail: list[dict[str, str]] = [
        # "stopped" (clean shutdown) and "offline" (last will) both mean unavailable.
        {"topic": topics.status, "value_template": "{{ 'online' if value == 'online' else 'offline' }}"}
    ]
    if camera is not None:
        avail.append({"topic": topics.stream(camera), "payload_available": "online",
                      "payload_not_available": "offline"})
    return {"availability": avail, "availability_mode": "all"}


def discovery_messages(cfg: MqttSinkConfig, cameras: list[CameraConfig], device: DeviceInfo,
                       shard: Shard | None = None) -> dict[str, bytes]:
    """Discovery topic → retained JSON config, for every enabled camera and region.

    Availability follows this replica's status topic (``shard``); node and unique ids use the
    fleet-wide ``client_id``, so a camera that moves to another replica keeps its entities.
    """
    topics = MqttTopics(cfg.topic_prefix, shard)
    node = node_id(cfg.client_id)
    origin = {"name": "regionwatch", "sw": device.sw_version}
    out: dict[str, bytes] = {}

    def add(platform: str, cam: CameraConfig, what: str, config: dict[str, Any], *, stream: bool = True) -> None:
        uid = f"{node}_{cam.id}_{what}"
        dev = {"identifiers": [f"{node}_{cam.id}"], "name": cam.display_name, "manufacturer": device.manufacturer,
               "model": device.model, "sw_version": device.sw_version}
        if device.configuration_url:
            dev["configuration_url"] = device.configuration_url
        body = {**config, "unique_id": uid, "object_id": uid, "device": dev, "origin": origin,
                "qos": cfg.qos, **availability(topics, cam.id if stream else None)}
        out[f"{cfg.discovery_prefix}/{platform}/{node}/{cam.id}_{what}/config"] = json.dumps(body).encode()

    for cam in cameras:
        if not cam.enabled:
            continue
        add("sensor", cam, "people", {
            "name": "People", "state_topic": topics.people(cam.id), "unit_of_measurement": "people",
            "state_class": "measurement", "icon": "mdi:account-group"})
        add("binary_sensor", cam, "stream", {
            "name": "Stream", "state_topic": topics.stream(cam.id), "device_class": "connectivity",
            "payload_on": "online", "payload_off": "offline", "entity_category": "diagnostic"}, stream=False)
        add("image", cam, "snapshot", {
            "name": "Last entry", "image_topic": topics.snapshot(cam.id), "content_type": "image/jpeg"})
        add("event", cam, "events", {
            "name": "Region event", "state_topic": topics.events(cam.id), "event_types": ["entry", "exit"],
            "value_template": EVENT_TEMPLATE, "icon": "mdi:walk"})
        add("switch", cam, "detection", {
            "name": "Detection", "state_topic": topics.detection(cam.id), "command_topic": topics.detection_set(cam.id),
            "payload_on": "ON", "payload_off": "OFF", "icon": "mdi:motion-sensor", "entity_category": "config"},
            stream=False)
        add("sensor", cam, "fps", {
            "name": "Frame rate", "state_topic": topics.stats(cam.id), "value_template": "{{ value_json.fps }}",
            "json_attributes_topic": topics.stats(cam.id), "unit_of_measurement": "fps",
            "state_class": "measurement", "entity_category": "diagnostic", "icon": "mdi:speedometer"}, stream=False)
        for region in cam.regions:
            occupancy = topics.occupancy(cam.id, region.id)
            add("binary_sensor", cam, f"{region.id}_occupied", {
                "name": f"{region.display_name} occupied", "state_topic": occupancy, "device_class": "occupancy",
                "value_template": "{{ 'ON' if (value | int(0)) > 0 else 'OFF' }}"})
            add("sensor", cam, f"{region.id}_count", {
                "name": f"{region.display_name} people", "state_topic": occupancy, "unit_of_measurement": "people",
                "state_class": "measurement", "icon": "mdi:account-multiple"})
            add("image", cam, f"{region.id}_snapshot", {
                "name": f"{region.display_name} last entry", "image_topic": topics.region_snapshot(cam.id, region.id),
                "content_type": "image/jpeg"})
    return out
