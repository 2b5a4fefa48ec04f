"""Print each event as one JSON line on standard output, flushed per event.

Example:
    >>> import io
    >>> from daemon.events import Event
    >>> buf = io.StringIO()
    >>> StdoutSink(buf).publish(Event("id-1", 1, "entry", "hall", "table", 1, 10, 1.0,
    ...     "2024-01-01T00:00:00.000Z", [0, 0, 1, 1], [0.5, 1], 0.9))
    >>> buf.getvalue().startswith('{"id":"id-1"')
    True
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from daemon.events import Event
from daemon.sinks.base import Sink


class StdoutSink(Sink):
    name = "stdout"

    def __init__(self, stream: TextIO | None = None):
        self._stream = stream or sys.stdout
        self._lock = threading.Lock()

    def publish(self, event: Event, snapshot: bytes | None = None) -> None:
        with self._lock:
            self._stream.write(event.to_json() + "\n")
            self._stream.flush()
