"""Retained state of the MQTT sink: the current value of every retained topic.

Writers (the pipeline, the sink) set values from any thread; the delivery thread publishes. Every
(re)connect re-publishes the whole current state, in the order the topics were first set; while
connected, each change is also queued to be sent once, in order. While disconnected only the
latest value per topic is kept.

Example:
    >>> state = RetainedState()
    >>> state.set("rw/hall/stream", b"offline")
    True
    >>> state.set("rw/hall/stream", b"offline")   # unchanged: nothing to send
    False
    >>> [t for t, _, _ in state.connected()]
    ['rw/hall/stream']
    >>> state.set("rw/hall/stream", b"online"), [(t, p) for t, p, _ in state.take_updates()]
    (True, [('rw/hall/stream', b'online')])
"""

from __future__ import annotations

import collections
import threading
from typing import Any

Retained = tuple[str, bytes, Any]
"""(topic, payload, MQTT 5 properties or None)."""


class RetainedState:
    """Current retained values plus the changes not yet sent on this connection. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, tuple[bytes, Any]] = {}
        self._updates: collections.deque[Retained] = collections.deque()
        self._connected = False

    def set(self, topic: str, payload: bytes, props: Any = None, *, force: bool = False) -> bool:
        """Set the value of ``topic``; True when it has to be sent (changed, or ``force``)."""
        with self._lock:
            previous = self._values.get(topic)
            if previous is not None and previous[0] == payload and not force:
                return False
            self._values[topic] = (payload, props)
            if self._connected:
                self._updates.append((topic, payload, props))
            return True

    def get(self, topic: str) -> bytes | None:
        with self._lock:
            value = self._values.get(topic)
            return None if value is None else value[0]

    def forget_cleared(self) -> list[str]:
        """Drop the topics whose value is empty (cleared on the broker and acknowledged once):
        later connects need not clear them again. Returns them."""
        with self._lock:
            gone = [t for t, (p, _) in self._values.items() if p == b""]
            for t in gone:
                del self._values[t]
            return gone

    # -- delivery thread --------------------------------------------------------------------
    def connected(self) -> list[Retained]:
        """A connection is up: the whole current state replaces any queued changes."""
        with self._lock:
            self._connected = True
            self._updates.clear()
            return [(t, p, props) for t, (p, props) in self._values.items()]

    def disconnected(self) -> None:
        with self._lock:
            self._connected = False
            self._updates.clear()

    def take_updates(self) -> list[Retained]:
        """The changes queued since the last call (in order), removed from the queue."""
        with self._lock:
            out = list(self._updates)
            self._updates.clear()
            return out

    @property
    def idle(self) -> bool:
        """No change waits to be handed to the client."""
        with self._lock:
            return not self._updates
