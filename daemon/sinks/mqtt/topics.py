"""MQTT topic names: every topic regionwatch publishes or listens to, in one place.

``{prefix}`` is ``[sinks.mqtt] topic_prefix``. Camera and region ids are safe in topics (the
config allows only ``[A-Za-z0-9_-]``), so no escaping is needed.

A fleet replica ([fleet] shard) has its own status topic (its last will), see
:func:`daemon.fleet.status_topic`.

Example:
    >>> from daemon.fleet import Shard
    >>> t = MqttTopics("regionwatch")
    >>> t.status, t.events("hall"), t.occupancy("hall", "table")
    ('regionwatch/status', 'regionwatch/hall/events', 'regionwatch/hall/table/occupancy')
    >>> MqttTopics("regionwatch", Shard(2, 3)).status
    'regionwatch/shard/2/status'
    >>> t.detection_set("hall"), t.command_camera("regionwatch/hall/detection/set")
    ('regionwatch/hall/detection/set', 'hall')
"""

from __future__ import annotations

import re

from daemon.fleet import Shard, status_topic


class MqttTopics:
    """Topic names under a prefix (``shard``: this replica of a fleet, for its status topic)."""

    def __init__(self, prefix: str, shard: Shard | None = None):
        self.prefix = prefix.rstrip("/")
        self.shard = shard

    # -- daemon ---------------------------------------------------------------------------
    @property
    def status(self) -> str:
        """Retained ``online`` / ``offline`` (last will) / ``stopped``, per replica of a fleet."""
        return status_topic(self.prefix, self.shard)

    # -- per camera -----------------------------------------------------------------------
    def events(self, camera: str) -> str:
        return f"{self.prefix}/{camera}/events"

    def stream(self, camera: str) -> str:
        return f"{self.prefix}/{camera}/stream"

    def snapshot(self, camera: str) -> str:
        """The latest entry snapshot of the camera, whatever the region."""
        return f"{self.prefix}/{camera}/snapshot"

    def people(self, camera: str) -> str:
        return f"{self.prefix}/{camera}/people"

    def detection(self, camera: str) -> str:
        """Retained ``ON`` / ``OFF``: whether detection runs on the camera."""
        return f"{self.prefix}/{camera}/detection"

    def detection_set(self, camera: str) -> str:
        """Commands: ``ON`` / ``OFF`` switch detection on the camera."""
        return f"{self.detection(camera)}/set"

    @property
    def detection_commands(self) -> str:
        """Subscription filter for every camera's detection command topic."""
        return self.detection_set("+")

    def command_camera(self, topic: str) -> str | None:
        """The camera a detection command topic is for (None for any other topic)."""
        m = re.fullmatch(re.escape(self.prefix) + r"/([^/]+)/detection/set", topic)
        return m.group(1) if m else None

    def stats(self, camera: str) -> str:
        return f"{self.prefix}/{camera}/stats"

    # -- per region -----------------------------------------------------------------------
    def occupancy(self, camera: str, region: str) -> str:
        return f"{self.prefix}/{camera}/{region}/occupancy"

    def region_snapshot(self, camera: str, region: str) -> str:
        """The latest entry snapshot of one region."""
        return f"{self.prefix}/{camera}/{region}/snapshot"


def node_id(client_id: str) -> str:
    """The Home Assistant discovery node id for a client id (topic-level safe).

    Example:
        >>> node_id("regionwatch"), node_id("rw/box 1")
        ('regionwatch', 'rw_box_1')
    """
    return re.sub(r"[^A-Za-z0-9_-]", "_", client_id) or "regionwatch"
