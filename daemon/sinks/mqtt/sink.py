"""The MQTT sink: what the pipeline calls; it puts together the parts of this package.

* events go to the durable :class:`~daemon.sinks.outbox.Outbox` first, then the
  :class:`~daemon.sinks.mqtt.delivery.Delivery` thread publishes them;
* everything retained (stream, occupancy, people, detection switch, snapshots, stats, discovery)
  lives in a :class:`~daemon.sinks.mqtt.retained.RetainedState`;
* retained topics of an earlier configuration are cleared at start
  (:class:`~daemon.sinks.mqtt.registry.TopicRegistry`);
* detection commands (``{prefix}/{camera}/detection/set``) are passed to ``on_detection``.

Example (needs a broker, so not run as a doctest):

    sink = MqttSink(settings.sinks.mqtt, settings.state, Metrics(), settings.cameras,
                    device=DeviceInfo(sw_version="0.1.0"), on_detection=app.set_detection)
    sink.stream_state("hall", True)
    sink.publish(event, snapshot=jpeg_bytes)
    sink.occupancy("hall", "table", 1)
    sink.close()   # flushes, publishes "stopped", disconnects
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping

import paho.mqtt.client as mqtt

from daemon import __version__
from daemon.config import CameraConfig, MqttSinkConfig, StateConfig
from daemon.events import Event
from daemon.fleet import Shard, client_id
from daemon.sinks.base import Sink
from daemon.sinks.mqtt.credentials import MqttConfigError, password_source, read_password, tls_context
from daemon.sinks.mqtt.delivery import Client, Delivery
from daemon.sinks.mqtt.discovery import DeviceInfo, discovery_messages
from daemon.sinks.mqtt.props import PublishProps
from daemon.sinks.mqtt.registry import TopicRegistry
from daemon.sinks.mqtt.retained import RetainedState
from daemon.sinks.mqtt.stats import CameraStats
from daemon.sinks.mqtt.topics import MqttTopics, node_id
from daemon.sinks.outbox import Outbox

log = logging.getLogger(__package__)

DetectionCallback = Callable[[str, bool], None]
"""``on_detection(camera, enabled)``: a detection switch command arrived for ``camera``."""


class MqttSink(Sink):
    """Durable MQTT sink (see the package docstring for topics and guarantees)."""

    name = "mqtt"

    def __init__(
        self,
        cfg: MqttSinkConfig,
        state: StateConfig,
        metrics,
        cameras: list[CameraConfig],
        *,
        environ: Mapping[str, str] | None = None,
        device: DeviceInfo | None = None,
        on_detection: DetectionCallback | None = None,
        shard: Shard | None = None,
        elsewhere: Collection[str] = (),
        state_dir=None,
        start: bool = True,
    ):
        self.cfg = cfg
        self.shard = shard  # [fleet]: this replica's client id and status topic (daemon/fleet.py)
        self.topics = MqttTopics(cfg.topic_prefix, shard)
        self._metrics = metrics
        self._cameras = [c for c in cameras if c.enabled]
        self._on_detection = on_detection
        self.props = PublishProps(cfg.protocol == "5")
        password = read_password(cfg, environ)  # before anything is opened: a config error stops us early
        self.outbox = Outbox(
            state.dir,
            max_events=state.outbox_max_events,
            max_age_s=state.outbox_max_age_s,
            fsync=state.fsync,
            metrics=metrics,
            state=state_dir,  # the daemon's locked StateDir (None: the outbox locks the folder itself)
        )
        self.retained = RetainedState()
        self._closing = False
        self._closed = False

        # Retained topics: those of an earlier configuration are cleared first, then discovery,
        # then the state (every connect re-publishes them in this order).
        discovery = (discovery_messages(cfg, self._cameras, device or DeviceInfo(sw_version=__version__), shard)
                     if cfg.homeassistant_discovery else {})
        produced = self.retained_topics() | set(discovery)
        self.registry = TopicRegistry(state.dir)
        # Cameras other replicas of a fleet run now (it was resized): their topics are theirs.
        stale = [t for t in self.registry.stale(produced) if not self._camera_topic(t, elsewhere)]
        if stale:
            log.info("clearing %d retained MQTT topic(s) the configuration no longer produces, e.g. %s",
                     len(stale), stale[0])
        self.registry.remember(produced)  # before publishing: a crash now still clears them next time
        self._produced = produced
        for topic in stale:
            self.retained.set(topic, b"", self.props.text())
        for topic, payload in discovery.items():
            self.retained.set(topic, payload, self.props.json())
        for cam in self._cameras:
            self.retained.set(self.topics.stream(cam.id), b"offline", self.props.text())
            self.retained.set(self.topics.people(cam.id), b"0", self.props.text())
            for region in cam.regions:
                self.retained.set(self.topics.occupancy(cam.id, region.id), b"0", self.props.text())

        metrics.mqtt_connected.set(0)
        for result in ("queued", "delivered", "rejected"):  # series exist before the first event
            metrics.sink_publish.labels(sink=self.name, result=result)
        for reason in ("max_events", "max_age", "rejected"):
            metrics.outbox_dropped.labels(reason=reason)

        try:
            client = self._make_client(password)
        except (OSError, ValueError) as e:
            self.outbox.close()
            raise MqttConfigError(f"sinks.mqtt.tls: {e}") from None
        self._client = client
        self.delivery = Delivery(
            client, self.outbox, self.retained, self.topics, qos=cfg.qos, props=self.props, metrics=metrics,
            broker=f"{cfg.host}:{cfg.port}", password_hint=password_source(cfg),
            subscriptions=(self.topics.detection_commands,), on_message=self._command, on_online=self._online,
        )
        self.delivery.start()
        self._stats_stop = threading.Event()
        self._stats_thread: threading.Thread | None = None
        if cfg.stats_interval_s > 0:
            self._stats = CameraStats(metrics)
            self._stats_thread = threading.Thread(target=self._stats_loop, name="mqtt-stats", daemon=True)
            self._stats_thread.start()
        self._started = False
        if start:
            self.start()

    def start(self) -> None:
        """Connect to the broker (once). A sink built with ``start=False`` (a configuration reload)
        is first told the current state, so its first connection publishes that, not defaults."""
        if self._started:
            return
        self._started = True
        cfg = self.cfg
        self._client.connect_async(cfg.host, cfg.port, cfg.keepalive_s,
                                   **({"clean_start": True} if self.props.v5 else {}))
        self._client.loop_start()
        log.info(
            "MQTT sink: broker %s:%d (MQTT %s%s), topic prefix %r, %d event(s) waiting in the outbox",
            cfg.host, cfg.port, cfg.protocol, ", TLS" if cfg.tls.enabled else "", self.topics.prefix,
            len(self.outbox),
        )

    def _camera_topic(self, topic: str, cameras: Collection[str]) -> bool:
        """Whether ``topic`` (state or discovery) belongs to one of ``cameras``."""
        node = node_id(self.cfg.client_id)
        return any(topic.startswith(f"{self.topics.prefix}/{c}/") or f"/{node}/{c}_" in topic for c in cameras)

    def retained_topics(self) -> set[str]:
        """Every retained topic this configuration produces (besides discovery)."""
        t = self.topics
        out = {t.status}
        for cam in self._cameras:
            out |= {t.stream(cam.id), t.people(cam.id), t.detection(cam.id), t.stats(cam.id)}
            if self.cfg.snapshots:
                out.add(t.snapshot(cam.id))
            for region in cam.regions:
                out.add(t.occupancy(cam.id, region.id))
                if self.cfg.snapshots:
                    out.add(t.region_snapshot(cam.id, region.id))
        return out

    # -- Sink interface ---------------------------------------------------------------------
    def publish(self, event: Event, snapshot: bytes | None = None) -> None:
        """Store the event durably, then let the delivery thread publish it.

        Raises if the event cannot be stored (disk full, sink closed): the caller counts and logs it.
        """
        self.outbox.put(event_id=event.id, camera=event.camera, seq=event.seq, payload=event.to_json().encode())
        self._metrics.sink_publish.labels(sink=self.name, result="queued").inc()
        if snapshot is not None and self.cfg.snapshots:
            jpeg = bytes(snapshot)
            props = self.props.make("image/jpeg", [("event_id", event.id), ("camera", event.camera),
                                                   ("region", event.region), ("seq", str(event.seq))])
            self.retained.set(self.topics.snapshot(event.camera), jpeg, props, force=True)
            self.retained.set(self.topics.region_snapshot(event.camera, event.region), jpeg, props, force=True)
        self.delivery.wake()

    def occupancy(self, camera: str, region: str, count: int) -> None:
        self._set(self.topics.occupancy(camera, region), str(int(count)).encode())

    def stream_state(self, camera: str, online: bool) -> None:
        self._set(self.topics.stream(camera), b"online" if online else b"offline")

    def people(self, camera: str, count: int) -> None:
        self._set(self.topics.people(camera), str(int(count)).encode())

    def detection_state(self, camera: str, enabled: bool) -> None:
        self._set(self.topics.detection(camera), b"ON" if enabled else b"OFF")

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait (at most ``timeout`` s) until every event is acknowledged by the broker.

        Events are already durable when ``publish`` returns; this only waits for delivery, and
        returns at once (False) while the broker is unreachable. True when the outbox is empty.
        """
        if not self._started:
            return len(self.outbox) == 0  # never connected: nothing to wait for
        deadline = time.monotonic() + timeout
        while True:
            if len(self.outbox) == 0 and self.retained.idle:
                return True
            if self.delivery.link == "down" or time.monotonic() >= deadline or self._closed:
                return False
            time.sleep(0.02)

    def close(self, timeout: float = 5.0, *, handover: bool = False) -> None:
        """Deliver what can be delivered within ``timeout``, mark streams offline, publish
        ``stopped`` and disconnect. Undelivered events stay in the outbox for the next start.

        ``handover``: a new sink takes over at once (configuration reload): streams are not marked
        offline and ``stopped`` is not published (Home Assistant's entities stay available); the
        clean disconnect sends no last will. The new sink delivers what is left in the outbox."""
        if self._closing:
            return
        self._closing = True
        self._stats_stop.set()
        deadline = time.monotonic() + timeout
        while self._started and self.delivery.link == "connecting" and time.monotonic() < deadline:
            time.sleep(0.02)  # just started: let the first connection attempt finish
        self.flush(max(0.0, deadline - time.monotonic()))
        if not handover:
            for cam in self._cameras:
                self.retained.set(self.topics.stream(cam.id), b"offline", self.props.text())
        self.delivery.stop(timeout + 5, announce=not handover)
        try:
            self._client.drop_out_messages()
            self._client.disconnect()
        finally:
            self._client.loop_stop()
        if self._stats_thread is not None:
            self._stats_thread.join(2.0)
        self._closed = True
        self._metrics.mqtt_connected.set(0)
        self.outbox.close()
        pending = len(self.outbox)  # after close: what is kept on disk for the next start
        if handover:
            log.info("MQTT sink closed for the configuration reload; %d event(s) left in the outbox for the new one",
                     pending)
        elif pending:
            log.warning("MQTT sink closed with %d undelivered event(s) kept in the outbox for the next start", pending)
        else:
            log.info("MQTT sink closed; outbox empty")

    HANDOVER_WAIT_S = 1.0
    """How long a handover waits for acknowledgements: events wait meanwhile (a reload holds
    them), and whatever is not acknowledged goes out again from the new sink (the outbox)."""

    def handover(self) -> None:
        """Close for a new MQTT sink that takes over at once: see :meth:`close` (``handover``)."""
        self.close(self.HANDOVER_WAIT_S, handover=True)

    @property
    def connected(self) -> bool:
        return self.delivery.connected and not self._closed

    # -- helpers ---------------------------------------------------------------------------
    def _set(self, topic: str, payload: bytes) -> None:
        if self.retained.set(topic, payload, self.props.text()):
            self.delivery.wake()

    def _command(self, topic: str, payload: bytes) -> None:
        """A message on a subscribed topic (delivery thread): detection on/off for a camera."""
        camera = self.topics.command_camera(topic)
        value = payload.decode("utf-8", "replace").strip().upper()
        if camera not in {c.id for c in self._cameras}:
            log.warning("MQTT detection command for unknown camera on %s ignored", topic)
        elif value not in ("ON", "OFF"):
            log.warning("MQTT detection command on %s must be ON or OFF, got %r; ignored", topic, value[:20])
        elif self._on_detection is None:
            log.warning("MQTT detection command on %s ignored: nothing to switch here", topic)
        else:
            log.info("MQTT command: detection %s for camera %s", value, camera)
            self._on_detection(camera, value == "ON")

    def _online(self) -> None:
        """``online`` was acknowledged: the stale topics are cleared on the broker for good."""
        self.retained.forget_cleared()
        self.registry.replace(self._produced)

    def _stats_loop(self) -> None:
        cams = [c.id for c in self._cameras]

        def extra(cam: str) -> dict:
            people = self.retained.get(self.topics.people(cam))
            return {"people": int(people) if people else 0,
                    "detection": (self.retained.get(self.topics.detection(cam)) or b"ON").decode(),
                    "stream": (self.retained.get(self.topics.stream(cam)) or b"offline").decode()}

        while not self._stats_stop.wait(self.cfg.stats_interval_s):
            try:
                for cam, stats in self._stats.sample(cams, extra).items():
                    self.retained.set(self.topics.stats(cam), json.dumps(stats).encode(), self.props.json())
                self.delivery.wake()
            except Exception:
                log.exception("MQTT stats failed")

    def _make_client(self, password: str | None) -> Client:
        cfg = self.cfg
        client = Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id(cfg.client_id, self.shard),
            protocol=mqtt.MQTTv5 if self.props.v5 else mqtt.MQTTv311,
            clean_session=None if self.props.v5 else True,
        )
        client.suppress_exceptions = True
        client.reconnect_delay_set(cfg.reconnect_min_s, max(cfg.reconnect_min_s, cfg.reconnect_max_s))
        if cfg.username or password is not None:
            if not cfg.username and not self.props.v5:
                log.warning("sinks.mqtt: a password without a username is not allowed by MQTT 3.1.1")
            client.username_pw_set(cfg.username or None, password)
        if cfg.tls.enabled:
            client.tls_set_context(tls_context(cfg.tls))
        client.will_set(self.topics.status, b"offline", qos=cfg.qos, retain=True)
        return client
