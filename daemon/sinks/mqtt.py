"""MQTT sink: durable event delivery, retained status / occupancy / stream state, snapshots.

Events are committed to an :class:`~daemon.sinks.outbox.Outbox` in the state directory before
they are published, and deleted only when the broker acknowledges them, so a broker outage or a
daemon crash loses nothing (QoS 1 may deliver an event twice; consumers dedupe by ``id``).

Topics (``{prefix}`` is ``[sinks.mqtt] topic_prefix``, default ``regionwatch``):

* ``{prefix}/status``: retained. Last will ``offline``; ``online`` after every (re)connect once
  the retained state below has been re-published (and acknowledged); ``stopped`` on clean close.
* ``{prefix}/{camera}/events``: each event as JSON (not retained), in ``seq`` order per camera.
* ``{prefix}/{camera}/{region}/occupancy``: retained number of people inside (``"0"``, ``"2"``).
* ``{prefix}/{camera}/snapshot``: retained JPEG of the latest entry; MQTT 5 user property
  ``event_id`` names its event. Best effort: kept in memory only, not in the outbox.
* ``{prefix}/{camera}/stream``: retained ``online`` / ``offline``.
* Optional Home Assistant discovery under ``{discovery_prefix}/binary_sensor/...`` and
  ``{discovery_prefix}/sensor/...`` (one of each per region), retained.

Threads: paho's network thread (``loop_start``) only hands callbacks to a queue; one delivery
thread owns all publishing, in-flight bookkeeping and outbox deletes.

Example (needs a broker, so not run as a doctest):

    sink = MqttSink(settings.sinks.mqtt, settings.state, Metrics(), settings.cameras)
    sink.stream_state("hall", True)
    sink.publish(event, snapshot=jpeg_bytes)
    sink.occupancy("hall", "table", 1)
    sink.close()   # flushes, publishes "stopped", disconnects
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import re
import ssl
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.config import CameraConfig, MqttSinkConfig, StateConfig
from daemon.events import Event
from daemon.sinks.base import Sink
from daemon.sinks.outbox import Outbox

log = logging.getLogger(__name__)

# v5 reason codes / v3.1.1 CONNACK codes meaning "your credentials are wrong".
_AUTH_REFUSALS = {"Bad user name or password", "Not authorized", "Bad username or password"}


class MqttConfigError(RuntimeError):
    """A problem with ``[sinks.mqtt]`` found when the sink starts (e.g. unreadable password)."""


def read_password(cfg: MqttSinkConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The broker password: from ``password_file`` if set, else from the env var ``password_env``.

    Under systemd (``LoadCredential=mqtt-password:...``) the file is also looked up by name in
    ``$CREDENTIALS_DIRECTORY``: first for a relative ``password_file``, and as the fallback when
    an absolute one is missing or unreadable by the service user. One trailing newline is
    stripped. The password itself never appears in errors or logs.

    Example:
        >>> read_password(MqttSinkConfig(password_env="PW"), {"PW": "s3cret"})
        's3cret'
        >>> read_password(MqttSinkConfig(), {}) is None
        True
    """
    env = os.environ if environ is None else environ
    if cfg.password_file:
        path = Path(cfg.password_file)
        creds = env.get("CREDENTIALS_DIRECTORY", "")
        if not creds:
            candidates = [path]
        elif path.is_absolute():
            candidates = [path, Path(creds) / path.name]
        else:
            candidates = [Path(creds) / path, path]
        problem = "not found"
        for candidate in candidates:
            if not candidate.is_file():
                continue
            try:
                return candidate.read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
            except OSError as e:
                problem = f"cannot read {candidate}: {e.strerror or e}"
        where = " or ".join(str(c) for c in candidates)
        raise MqttConfigError(f"sinks.mqtt.password_file: {problem} (looked for {where})")
    if cfg.password_env and env.get(cfg.password_env):
        return env[cfg.password_env]
    return None


def _password_source(cfg: MqttSinkConfig) -> str:
    return f"password_file {cfg.password_file}" if cfg.password_file else f"${cfg.password_env}"


class MqttTopics:
    """Topic names under a prefix.

    Example:
        >>> t = MqttTopics("regionwatch")
        >>> t.status, t.events("hall"), t.occupancy("hall", "table")
        ('regionwatch/status', 'regionwatch/hall/events', 'regionwatch/hall/table/occupancy')
    """

    def __init__(self, prefix: str):
        self.prefix = prefix.rstrip("/")

    @property
    def status(self) -> str:
        return f"{self.prefix}/status"

    def events(self, camera: str) -> str:
        return f"{self.prefix}/{camera}/events"

    def occupancy(self, camera: str, region: str) -> str:
        return f"{self.prefix}/{camera}/{region}/occupancy"

    def snapshot(self, camera: str) -> str:
        return f"{self.prefix}/{camera}/snapshot"

    def stream(self, camera: str) -> str:
        return f"{self.prefix}/{camera}/stream"


def homeassistant_discovery(cfg: MqttSinkConfig, cameras: list[CameraConfig]) -> dict[str, bytes]:
    """Home Assistant discovery messages (topic → JSON): per region an occupancy binary sensor
    and a people-count sensor, both fed by the retained occupancy topic.

    Example:
        >>> import tempfile, os
        >>> f = os.path.join(tempfile.mkdtemp(), "v.mp4"); open(f, "w").close()
        >>> cam = CameraConfig(id="hall", url=f, regions=[{"id": "table", "polygon": [[0, 0], [9, 0], [9, 9]]}])
        >>> sorted(homeassistant_discovery(MqttSinkConfig(), [cam]))
        ['homeassistant/binary_sensor/regionwatch/hall_table_occupied/config', 'homeassistant/sensor/regionwatch/hall_table_count/config']
    """
    topics = MqttTopics(cfg.topic_prefix)
    node = re.sub(r"[^A-Za-z0-9_-]", "_", cfg.client_id) or "regionwatch"
    availability = [
        {"topic": topics.status, "value_template": "{{ 'online' if value == 'online' else 'offline' }}"}
    ]
    out: dict[str, bytes] = {}
    for cam in cameras:
        if not cam.enabled:
            continue
        device = {
            "identifiers": [f"{node}_{cam.id}"],
            "name": f"{cam.id} (regionwatch)",
            "manufacturer": "regionwatch",
            "model": "region watcher",
        }
        for region in cam.regions:
            base = f"{node}_{cam.id}_{region.id}"
            state_topic = topics.occupancy(cam.id, region.id)
            common = {"state_topic": state_topic, "availability": availability, "device": device,
                      "origin": {"name": "regionwatch"}}
            out[f"{cfg.discovery_prefix}/binary_sensor/{node}/{cam.id}_{region.id}_occupied/config"] = json.dumps(
                {**common, "name": f"{region.id} occupied", "unique_id": f"{base}_occupied",
                 "device_class": "occupancy",
                 "value_template": "{{ 'ON' if (value | int(0)) > 0 else 'OFF' }}"}
            ).encode()
            out[f"{cfg.discovery_prefix}/sensor/{node}/{cam.id}_{region.id}_count/config"] = json.dumps(
                {**common, "name": f"{region.id} people", "unique_id": f"{base}_count",
                 "state_class": "measurement", "unit_of_measurement": "people", "icon": "mdi:account-multiple"}
            ).encode()
    return out


class _Client(mqtt.Client):
    """paho client that remembers why the last connection attempt failed (for the logs)."""

    last_error: BaseException | None = None

    def reconnect(self) -> mqtt.MQTTErrorCode:
        try:
            return super().reconnect()
        except OSError as e:
            self.last_error = e
            raise


class MqttSink(Sink):
    """Durable MQTT sink (see the module docstring for topics and guarantees)."""

    name = "mqtt"

    EVENT_WINDOW = 256
    """Events handed to paho but not yet acknowledged (paho itself keeps 20 on the wire)."""
    PRUNE_EVERY_S = 10.0
    FAIL_LOG_EVERY_S = 60.0

    def __init__(
        self,
        cfg: MqttSinkConfig,
        state: StateConfig,
        metrics,
        cameras: list[CameraConfig],
        *,
        environ: Mapping[str, str] | None = None,
        state_dir=None,
    ):
        self.cfg = cfg
        self.topics = MqttTopics(cfg.topic_prefix)
        self._metrics = metrics
        self._v5 = cfg.protocol == "5"
        self._cameras = [c for c in cameras if c.enabled]
        password = read_password(cfg, environ)  # before anything is opened: a config error stops us early
        self.outbox = Outbox(
            state.dir,
            max_events=state.outbox_max_events,
            max_age_s=state.outbox_max_age_s,
            fsync=state.fsync,
            metrics=metrics,
            state=state_dir,  # the daemon's locked StateDir (None: the outbox locks the folder itself)
        )
        self._q: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._state_lock = threading.Lock()
        # Retained state: the current value per topic (re-published on every connect) and, while
        # connected, the changes not yet sent (every change is published, in order).
        self._retained: dict[str, tuple[bytes, Properties | None]] = {}
        self._updates: collections.deque[tuple[str, bytes, Properties | None]] = collections.deque()
        self._connected = False
        self._link = "connecting"  # "up" / "down" (a connection failed or was lost since the last success)
        self._closing = False
        self._closed = False
        for cam in self._cameras:
            self._set_retained(self.topics.stream(cam.id), b"offline", wake=False)
            for region in cam.regions:
                self._set_retained(self.topics.occupancy(cam.id, region.id), b"0", wake=False)
        if cfg.homeassistant_discovery:
            for topic, payload in homeassistant_discovery(cfg, self._cameras).items():
                self._set_retained(topic, payload, self._props("application/json"), wake=False)
        metrics.mqtt_connected.set(0)
        for result in ("queued", "delivered", "rejected"):  # series exist before the first event
            metrics.sink_publish.labels(sink=self.name, result=result)
        for reason in ("max_events", "max_age", "rejected"):
            metrics.outbox_dropped.labels(reason=reason)

        try:
            self._client = self._make_client(password)
        except (OSError, ValueError) as e:
            self.outbox.close()
            raise MqttConfigError(f"sinks.mqtt.tls: {e}") from None
        self._worker = threading.Thread(target=self._run, name="mqtt-delivery", daemon=True)
        self._worker.start()
        self._client.connect_async(
            cfg.host, cfg.port, cfg.keepalive_s, **({"clean_start": True} if self._v5 else {})
        )
        self._client.loop_start()
        log.info(
            "MQTT sink: broker %s:%d (MQTT %s%s), topic prefix %r, %d event(s) waiting in the outbox",
            cfg.host, cfg.port, cfg.protocol, ", TLS" if cfg.tls.enabled else "", self.topics.prefix,
            len(self.outbox),
        )

    # -- Sink interface ---------------------------------------------------------------------
    def publish(self, event: Event, snapshot: bytes | None = None) -> None:
        """Store the event durably, then let the delivery thread publish it.

        Raises if the event cannot be stored (disk full, sink closed): the caller counts and logs it.
        """
        self.outbox.put(event_id=event.id, camera=event.camera, seq=event.seq, payload=event.to_json().encode())
        self._metrics.sink_publish.labels(sink=self.name, result="queued").inc()
        if snapshot is not None and self.cfg.snapshots:
            props = self._props("image/jpeg", [("event_id", event.id), ("camera", event.camera),
                                               ("seq", str(event.seq))])
            self._set_retained(self.topics.snapshot(event.camera), bytes(snapshot), props, wake=False, force=True)
        self._q.put(("wake",))

    def occupancy(self, camera: str, region: str, count: int) -> None:
        self._set_retained(self.topics.occupancy(camera, region), str(int(count)).encode(), self._props("text/plain"))

    def stream_state(self, camera: str, online: bool) -> None:
        self._set_retained(self.topics.stream(camera), b"online" if online else b"offline", self._props("text/plain"))

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait (at most ``timeout`` s) until every event is acknowledged by the broker.

        Events are already durable when ``publish`` returns; this only waits for delivery, and
        returns at once (False) while the broker is unreachable. True when the outbox is empty.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._state_lock:
                idle = not self._updates
            if len(self.outbox) == 0 and idle:
                return True
            if self._link == "down" or time.monotonic() >= deadline or self._closed:
                return False
            time.sleep(0.02)

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what can be delivered within ``timeout``, mark streams offline, publish
        ``stopped`` and disconnect. Undelivered events stay in the outbox for the next start."""
        if self._closing:
            return
        self._closing = True
        deadline = time.monotonic() + timeout
        while self._link == "connecting" and time.monotonic() < deadline:
            time.sleep(0.02)  # just started: let the first connection attempt finish
        self.flush(max(0.0, deadline - time.monotonic()))
        for cam in self._cameras:
            self._set_retained(self.topics.stream(cam.id), b"offline", self._props("text/plain"), wake=False)
        self._q.put(("stop",))
        self._worker.join(timeout + 5)
        try:
            self._client.drop_out_messages()
            self._client.disconnect()
        finally:
            self._client.loop_stop()
        self._closed = True
        self._connected = False
        self._metrics.mqtt_connected.set(0)
        self.outbox.close()
        pending = len(self.outbox)  # after close: what is kept on disk for the next start
        if pending:
            log.warning("MQTT sink closed with %d undelivered event(s) kept in the outbox for the next start", pending)
        else:
            log.info("MQTT sink closed; outbox empty")

    @property
    def connected(self) -> bool:
        return self._connected

    # -- helpers ---------------------------------------------------------------------------
    def _props(self, content_type: str, user: list[tuple[str, str]] | None = None) -> Properties | None:
        if not self._v5:
            return None
        p = Properties(PacketTypes.PUBLISH)
        p.ContentType = content_type
        if content_type != "image/jpeg":
            p.PayloadFormatIndicator = 1  # UTF-8 text
        if user:
            p.UserProperty = user
        return p

    def _set_retained(self, topic: str, payload: bytes, props: Properties | None = None, *, wake: bool = True,
                      force: bool = False) -> None:
        """Set the current retained value of ``topic``; queue it for sending if connected (while
        disconnected only the latest value is kept: every connect re-publishes the whole state)."""
        if props is None and self._v5:
            props = self._props("text/plain")
        with self._state_lock:
            previous = self._retained.get(topic)
            if previous is not None and previous[0] == payload and not force:
                return  # unchanged: nothing to send
            self._retained[topic] = (payload, props)
            if self._connected:
                self._updates.append((topic, payload, props))
        if wake:
            self._q.put(("wake",))

    def _make_client(self, password: str | None) -> _Client:
        cfg = self.cfg
        client = _Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            clean_session=None if self._v5 else True,
        )
        client.suppress_exceptions = True
        client.reconnect_delay_set(cfg.reconnect_min_s, max(cfg.reconnect_min_s, cfg.reconnect_max_s))
        if cfg.username or password is not None:
            if not cfg.username and not self._v5:
                log.warning("sinks.mqtt: a password without a username is not allowed by MQTT 3.1.1")
            client.username_pw_set(cfg.username or None, password)
        if cfg.tls.enabled:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.tls.ca_file or None)
            if cfg.tls.cert_file:
                ctx.load_cert_chain(cfg.tls.cert_file, cfg.tls.key_file or None)
            if cfg.tls.insecure:
                log.warning("sinks.mqtt.tls.insecure = true: the broker's certificate is NOT verified")
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            client.tls_set_context(ctx)
        client.will_set(self.topics.status, b"offline", qos=cfg.qos, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_connect_fail = self._on_connect_fail
        return client

    # -- paho callbacks (network thread): hand over to the delivery thread -----------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._q.put(("refused", str(reason_code)))
            return
        # Forget paho's own unacknowledged messages: the delivery thread re-publishes every
        # pending event from the outbox, in order, on each new connection.
        client.drop_out_messages()
        self._q.put(("connect",))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._q.put(("disconnect", str(reason_code)))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._q.put(("ack", mid, reason_code))

    def _on_connect_fail(self, client, userdata) -> None:
        err = client.last_error
        self._q.put(("connect_fail", f"{type(err).__name__}: {err}" if err else "connection failed"))

    # -- delivery thread -------------------------------------------------------------------
    def _run(self) -> None:
        delivery = _Delivery(self)
        while True:
            try:
                delivery.run()
                return
            except Exception:  # never die silently; the outbox keeps every event meanwhile
                log.exception("MQTT delivery failed; retrying in 1 s")
                time.sleep(1.0)


class _Delivery:
    """State of the delivery thread: in-flight messages, replay cursor, connection phase."""

    def __init__(self, sink: MqttSink):
        self.s = sink
        self.client = sink._client
        self.inflight: dict[int, tuple[str, Any]] = {}  # mid -> ("event", rowid) | ("retained", topic) | ...
        self.events_inflight = 0
        self.barrier: set[int] = set()  # retained re-publish to be acknowledged before "online"
        self.cursor = 0  # highest outbox row id handed to paho on this connection
        self.connected = False
        self.online_sent = False
        self.fail_count = 0
        self.last_fail_log = -float("inf")
        self.last_prune = time.monotonic()
        self.stopping = False
        self.stopped_mid: int | None = None
        self.stop_deadline = 0.0

    def run(self) -> None:
        s = self.s
        while True:
            try:
                items = [s._q.get(timeout=0.25)]
            except queue.Empty:
                items = []
            while True:
                try:
                    items.append(s._q.get_nowait())
                except queue.Empty:
                    break
            acked: list[int] = []
            for item in items:
                self.handle(item, acked)
            if acked:
                s.outbox.remove(acked)
            if self.connected:
                self.pump()
            if self.stopping:
                if self.connected and self.stopped_mid is None and not self.barrier:
                    info = self.client.publish(s.topics.status, b"stopped", qos=s.cfg.qos, retain=True,
                                               properties=s._props("text/plain"))
                    self.stopped_mid = info.mid
                    self.inflight[info.mid] = ("status", "stopped")
                done = self.stopped_mid is not None and self.stopped_mid not in self.inflight
                if done or not self.connected or time.monotonic() > self.stop_deadline:
                    return
            now = time.monotonic()
            if now - self.last_prune >= s.PRUNE_EVERY_S:
                self.last_prune = now
                s.outbox.prune()

    def handle(self, item: tuple, acked: list[int]) -> None:
        s, kind = self.s, item[0]
        if kind == "ack":
            _, mid, reason = item
            what = self.inflight.pop(mid, None)
            if what is None:
                return
            self.barrier.discard(mid)
            failed = getattr(reason, "is_failure", False)
            if what[0] == "event":
                self.events_inflight -= 1
                if failed:
                    # The broker accepted the packet but refused the message (e.g. ACL): retrying
                    # would not help, so drop it loudly rather than block or loop.
                    log.error("MQTT broker rejected event (outbox row %d): %s; dropped", what[1], reason)
                    s._metrics.outbox_dropped.labels(reason="rejected").inc()
                    s._metrics.sink_publish.labels(sink=s.name, result="rejected").inc()
                else:
                    s._metrics.sink_publish.labels(sink=s.name, result="delivered").inc()
                acked.append(what[1])
            elif failed:
                log.warning("MQTT broker rejected %s: %s", what[1], reason)
        elif kind == "connect":
            self.reset()
            self.connected = True
            with s._state_lock:  # the whole current state replaces any queued changes
                s._connected, s._link = True, "up"
                s._updates.clear()
                state = [(t, p, props) for t, (p, props) in s._retained.items()]
            s._metrics.mqtt_connected.set(1)
            log.info(
                "MQTT connected to %s:%d%s; %d event(s) to deliver",
                s.cfg.host, s.cfg.port,
                f" after {self.fail_count} failed attempt(s)" if self.fail_count else "",
                len(s.outbox),
            )
            self.fail_count = 0
            self.last_fail_log = -float("inf")
            self.publish_retained(state, barrier=True)
        elif kind == "disconnect":
            if self.connected:
                log.warning(
                    "MQTT connection to %s:%d lost (%s); %d event(s) kept in the outbox, reconnecting",
                    s.cfg.host, s.cfg.port, item[1], len(s.outbox),
                )
            self.reset()
            self.connected = False
            with s._state_lock:
                s._connected, s._link = False, "down"
                s._updates.clear()
            s._metrics.mqtt_connected.set(0)
        elif kind == "refused":
            s._link = "down"
            reason = item[1]
            hint = ""
            if reason in _AUTH_REFUSALS:
                hint = f" - check sinks.mqtt.username and the password ({_password_source(s.cfg)})"
            self.log_failure(logging.ERROR, f"MQTT broker {s.cfg.host}:{s.cfg.port} refused the connection: "
                                            f"{reason}{hint}")
        elif kind == "connect_fail":
            s._link = "down"
            self.log_failure(logging.WARNING, f"cannot connect to MQTT broker {s.cfg.host}:{s.cfg.port}: {item[1]}")
        elif kind == "stop":
            self.stopping = True
            self.stop_deadline = time.monotonic() + 2.0

    def reset(self) -> None:
        self.inflight.clear()
        self.barrier.clear()
        self.events_inflight = 0
        self.cursor = 0
        self.online_sent = False

    def log_failure(self, level: int, message: str) -> None:
        self.fail_count += 1
        now = time.monotonic()
        pending = len(self.s.outbox)
        text = f"{message} (attempt {self.fail_count}, retrying with backoff; {pending} event(s) kept in the outbox)"
        if now - self.last_fail_log >= self.s.FAIL_LOG_EVERY_S:
            self.last_fail_log = now
            log.log(level, text)
        else:
            log.debug(text)

    def publish_retained(self, todo: list[tuple[str, bytes, Properties | None]], *, barrier: bool = False) -> bool:
        s = self.s
        for topic, payload, props in todo:
            info = self.client.publish(topic, payload, qos=s.cfg.qos, retain=True, properties=props)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                return False  # connection gone: the next connect re-publishes the current state
            self.inflight[info.mid] = ("retained", topic)
            if barrier:
                self.barrier.add(info.mid)
        return True

    def pump(self) -> None:
        s = self.s
        if not self.online_sent:
            if self.barrier:
                return  # retained state not acknowledged yet
            info = self.client.publish(s.topics.status, b"online", qos=s.cfg.qos, retain=True,
                                       properties=s._props("text/plain"))
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                return
            self.inflight[info.mid] = ("status", "online")
            self.online_sent = True
        free = s.EVENT_WINDOW - self.events_inflight
        if free > 0:
            for item in s.outbox.after(self.cursor, free):
                props = None
                if s._v5:
                    props = s._props("application/json", [("event_id", item.event_id), ("seq", str(item.seq))])
                info = self.client.publish(s.topics.events(item.camera), item.payload, qos=s.cfg.qos,
                                           retain=False, properties=props)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    return  # connection gone: everything is replayed on the next connect
                self.inflight[info.mid] = ("event", item.rowid)
                self.events_inflight += 1
                self.cursor = item.rowid
        with s._state_lock:
            updates = list(s._updates)
            s._updates.clear()
        if updates:
            self.publish_retained(updates)
