"""MQTT sink: durable event delivery, retained state, snapshots, stats, Home Assistant discovery.

Events are committed to an :class:`~daemon.sinks.outbox.Outbox` in the state directory before
they are published, and deleted only when the broker acknowledges them, so a broker outage or a
daemon crash loses nothing (QoS 1 may deliver an event twice; consumers dedupe by ``id``).

Topics (``{prefix}`` is ``[sinks.mqtt] topic_prefix``, default ``regionwatch``; all retained
except events):

* ``{prefix}/status``: last will ``offline``; ``online`` after every (re)connect once the
  retained state below has been re-published (and acknowledged); ``stopped`` on clean close.
* ``{prefix}/{camera}/events``: each event as JSON (not retained), in ``seq`` order per camera.
* ``{prefix}/{camera}/stream``: ``online`` / ``offline``.
* ``{prefix}/{camera}/people``: people in view now.
* ``{prefix}/{camera}/detection``: ``ON`` / ``OFF``; commands on ``{prefix}/{camera}/detection/set``.
* ``{prefix}/{camera}/stats``: JSON stats every ``stats_interval_s``.
* ``{prefix}/{camera}/snapshot`` and ``{prefix}/{camera}/{region}/snapshot``: JPEG of the latest
  entry (the JPEG's comment names the event id, so it works on MQTT 3.1.1 too).
* ``{prefix}/{camera}/{region}/occupancy``: people inside the region (``"0"``, ``"2"``).
* Home Assistant discovery (:mod:`~daemon.sinks.mqtt.discovery`).

Modules, one job each: :mod:`~daemon.sinks.mqtt.credentials` (password, TLS),
:mod:`~daemon.sinks.mqtt.topics` (names), :mod:`~daemon.sinks.mqtt.discovery` (Home Assistant),
:mod:`~daemon.sinks.mqtt.retained` (current retained values), :mod:`~daemon.sinks.mqtt.registry`
(retained topics remembered across runs), :mod:`~daemon.sinks.mqtt.delivery` (the publishing
thread), :mod:`~daemon.sinks.mqtt.stats`, :mod:`~daemon.sinks.mqtt.sink` (the sink).

Example:
    >>> MqttTopics("regionwatch").region_snapshot("hall", "table")
    'regionwatch/hall/table/snapshot'
"""

from daemon.sinks.mqtt.credentials import MqttConfigError, read_password
from daemon.sinks.mqtt.discovery import DeviceInfo, discovery_messages
from daemon.sinks.mqtt.sink import MqttSink
from daemon.sinks.mqtt.topics import MqttTopics

__all__ = ["DeviceInfo", "MqttConfigError", "MqttSink", "MqttTopics", "discovery_messages", "read_password"]
