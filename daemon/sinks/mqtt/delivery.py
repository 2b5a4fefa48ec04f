"""The MQTT delivery thread: the only thread that publishes.

paho's network thread (``loop_start``) only hands its callbacks over through a queue. This
thread then, per connection: publishes the stale-topic clears, discovery and retained state
(:class:`~daemon.sinks.mqtt.retained.RetainedState`), waits until the broker acknowledged all of
it, publishes ``online``, then replays the events waiting in the
:class:`~daemon.sinks.outbox.Outbox` in order (at most ``EVENT_WINDOW`` unacknowledged), deletes
each from the outbox when the broker acknowledges it, and sends retained changes as they come.
Incoming messages on the subscribed topics (commands) are passed to ``on_message``.

It works on explicit collaborators only (client, outbox, retained state, topics); the sink
reads its :attr:`Delivery.link` and :attr:`Delivery.connected`.

Example (needs a broker, so not run as a doctest):

    delivery = Delivery(client, outbox, retained, topics, qos=1, props=PublishProps(True),
                        metrics=metrics, broker="127.0.0.1:1883", password_hint="$PW")
    delivery.start(); client.connect_async(...); client.loop_start()
    ...
    delivery.stop(timeout=5.0)
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from daemon.sinks.mqtt.credentials import AUTH_REFUSALS
from daemon.sinks.mqtt.props import PublishProps
from daemon.sinks.mqtt.retained import Retained, RetainedState
from daemon.sinks.mqtt.topics import MqttTopics
from daemon.sinks.outbox import Outbox

log = logging.getLogger(__package__)


class Client(mqtt.Client):
    """paho client that remembers why the last connection attempt failed (for the logs)."""

    last_error: BaseException | None = None

    def reconnect(self) -> mqtt.MQTTErrorCode:
        try:
            return super().reconnect()
        except OSError as e:
            self.last_error = e
            raise


class Delivery:
    """Publishes retained state and outbox events over one paho client (see the module doc)."""

    EVENT_WINDOW = 256
    """Events handed to paho but not yet acknowledged (paho itself keeps 20 on the wire)."""
    PRUNE_EVERY_S = 10.0
    FAIL_LOG_EVERY_S = 60.0
    SINK = "mqtt"

    def __init__(
        self,
        client: Client,
        outbox: Outbox,
        retained: RetainedState,
        topics: MqttTopics,
        *,
        qos: int,
        props: PublishProps,
        metrics,
        broker: str,
        password_hint: str,
        subscriptions: tuple[str, ...] = (),
        on_message: Callable[[str, bytes], None] | None = None,
        on_online: Callable[[], None] | None = None,
    ):
        self.client, self.outbox, self.retained, self.topics = client, outbox, retained, topics
        self.qos, self.props, self.metrics = qos, props, metrics
        self.broker, self.password_hint = broker, password_hint
        self.subscriptions = subscriptions
        self.on_message, self.on_online = on_message, on_online
        self._q: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self.link = "connecting"
        """``connecting`` (no attempt finished yet), ``up``, or ``down`` (failed or lost since)."""
        self.connected = False
        # Connection-scoped state (reset on every connect/disconnect).
        self.inflight: dict[int, tuple[str, Any]] = {}  # mid -> ("event", rowid) | ("retained", topic) | ...
        self.events_inflight = 0
        self.barrier: set[int] = set()  # retained re-publish to be acknowledged before "online"
        self.cursor = 0  # highest outbox row id handed to paho on this connection
        self.online_sent = False
        self.fail_count = 0
        self.last_fail_log = -float("inf")
        self.last_prune = time.monotonic()
        self.stopping = False
        self.announce_stop = True
        self.stopped_mid: int | None = None
        self.stop_deadline = 0.0
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_connect_fail = self._on_connect_fail
        client.on_message = self._on_message
        self._thread = threading.Thread(target=self._run, name="mqtt-delivery", daemon=True)

    # -- control (any thread) ---------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._q.put(("wake",))

    def stop(self, timeout: float, *, announce: bool = True) -> None:
        """Publish ``stopped`` once everything before it is acknowledged (at most 2 s), then end.
        ``announce=False``: end without ``stopped`` (another sink takes over at once)."""
        self._q.put(("stop", announce))
        self._thread.join(timeout)

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

    def _on_message(self, client, userdata, msg) -> None:
        self._q.put(("message", msg.topic, bytes(msg.payload), bool(msg.retain)))

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                self._loop()
                return
            except Exception:  # never die silently; the outbox keeps every event meanwhile
                log.exception("MQTT delivery failed; retrying in 1 s")
                time.sleep(1.0)

    def _loop(self) -> None:
        while True:
            try:
                items = [self._q.get(timeout=0.25)]
            except queue.Empty:
                items = []
            while True:
                try:
                    items.append(self._q.get_nowait())
                except queue.Empty:
                    break
            acked: list[int] = []
            for item in items:
                self._handle(item, acked)
            if acked:
                self.outbox.remove(acked)
            if self.connected:
                self._pump()
            if self.stopping:
                if not self.announce_stop:
                    return
                if self.connected and self.stopped_mid is None and not self.barrier:
                    info = self.client.publish(self.topics.status, b"stopped", qos=self.qos, retain=True,
                                               properties=self.props.text())
                    self.stopped_mid = info.mid
                    self.inflight[info.mid] = ("status", "stopped")
                done = self.stopped_mid is not None and self.stopped_mid not in self.inflight
                if done or not self.connected or time.monotonic() > self.stop_deadline:
                    return
            now = time.monotonic()
            if now - self.last_prune >= self.PRUNE_EVERY_S:
                self.last_prune = now
                self.outbox.prune()

    def _handle(self, item: tuple, acked: list[int]) -> None:
        kind = item[0]
        if kind == "ack":
            self._acked(item[1], item[2], acked)
        elif kind == "connect":
            self._reset()
            self.connected, self.link = True, "up"
            state = self.retained.connected()  # the whole current state replaces any queued changes
            self.metrics.mqtt_connected.set(1)
            log.info("MQTT connected to %s%s; %d event(s) to deliver", self.broker,
                     f" after {self.fail_count} failed attempt(s)" if self.fail_count else "", len(self.outbox))
            self.fail_count = 0
            self.last_fail_log = -float("inf")
            for topic in self.subscriptions:
                self.client.subscribe(topic, qos=min(self.qos, 1))
            self._publish_retained(state, barrier=True)
        elif kind == "disconnect":
            if self.connected:
                log.warning("MQTT connection to %s lost (%s); %d event(s) kept in the outbox, reconnecting",
                            self.broker, item[1], len(self.outbox))
            self._reset()
            self.connected, self.link = False, "down"
            self.retained.disconnected()
            self.metrics.mqtt_connected.set(0)
        elif kind == "refused":
            self.link = "down"
            reason = item[1]
            hint = f" - check sinks.mqtt.username and the password ({self.password_hint})" if reason in AUTH_REFUSALS else ""
            self._log_failure(logging.ERROR, f"MQTT broker {self.broker} refused the connection: {reason}{hint}")
        elif kind == "connect_fail":
            self.link = "down"
            self._log_failure(logging.WARNING, f"cannot connect to MQTT broker {self.broker}: {item[1]}")
        elif kind == "message":
            _, topic, payload, retain = item
            if retain:  # a command left retained on the broker is stale: never replay it
                log.warning("ignoring retained MQTT command on %s (publish commands without retain)", topic)
            elif self.on_message is not None:
                try:
                    self.on_message(topic, payload)
                except Exception:
                    log.exception("MQTT command on %s failed", topic)
        elif kind == "stop":
            self.stopping, self.announce_stop = True, item[1]
            self.stop_deadline = time.monotonic() + 2.0

    def _acked(self, mid: int, reason, acked: list[int]) -> None:
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
                self.metrics.outbox_dropped.labels(reason="rejected").inc()
                self.metrics.sink_publish.labels(sink=self.SINK, result="rejected").inc()
            else:
                self.metrics.sink_publish.labels(sink=self.SINK, result="delivered").inc()
            acked.append(what[1])
        elif failed:
            log.warning("MQTT broker rejected %s: %s", what[1], reason)
        if what[0] == "status" and what[1] == "online" and self.on_online is not None:
            self.on_online()

    def _reset(self) -> None:
        self.inflight.clear()
        self.barrier.clear()
        self.events_inflight = 0
        self.cursor = 0
        self.online_sent = False

    def _log_failure(self, level: int, message: str) -> None:
        self.fail_count += 1
        now = time.monotonic()
        text = (f"{message} (attempt {self.fail_count}, retrying with backoff; "
                f"{len(self.outbox)} event(s) kept in the outbox)")
        if now - self.last_fail_log >= self.FAIL_LOG_EVERY_S:
            self.last_fail_log = now
            log.log(level, text)
        else:
            log.debug(text)

    def _publish_retained(self, todo: list[Retained], *, barrier: bool = False) -> None:
        for topic, payload, props in todo:
            info = self.client.publish(topic, payload, qos=self.qos, retain=True, properties=props)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                return  # connection gone: the next connect re-publishes the current state
            self.inflight[info.mid] = ("retained", topic)
            if barrier:
                self.barrier.add(info.mid)

    def _pump(self) -> None:
        if not self.online_sent:
            if self.barrier:
                return  # retained state not acknowledged yet
            info = self.client.publish(self.topics.status, b"online", qos=self.qos, retain=True,
                                       properties=self.props.text())
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                return
            self.inflight[info.mid] = ("status", "online")
            self.online_sent = True
        free = self.EVENT_WINDOW - self.events_inflight
        if free > 0:
            for item in self.outbox.after(self.cursor, free):
                props = self.props.make("application/json", [("event_id", item.event_id), ("seq", str(item.seq))])
                info = self.client.publish(self.topics.events(item.camera), item.payload, qos=self.qos,
                                           retain=False, properties=props)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    return  # connection gone: everything is replayed on the next connect
                self.inflight[info.mid] = ("event", item.rowid)
                self.events_inflight += 1
                self.cursor = item.rowid
        updates = self.retained.take_updates()
        if updates:
            self._publish_retained(updates)
