"""Append one JSON event per line to a file, flushed (and fsynced) per event.

With ``snapshots_dir`` set, the entry snapshot JPEG is written beside it as
``<snapshots_dir>/<camera>/<event id>.jpg`` and its path is put in the event's ``snapshot``.

Example:
    >>> import tempfile, json, os
    >>> from daemon.events import Event
    >>> path = os.path.join(tempfile.mkdtemp(), "events.jsonl")
    >>> sink = JsonlSink(path)
    >>> sink.publish(Event("id-1", 1, "entry", "hall", "table", 1, 10, 1.0,
    ...     "2024-01-01T00:00:00.000Z", [0, 0, 1, 1], [0.5, 1], 0.9))
    >>> sink.close()
    >>> json.loads(open(path).readline())["region"]
    'table'
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path

from daemon.events import Event
from daemon.sinks.base import Sink


class JsonlSink(Sink):
    name = "jsonl"

    def __init__(self, path: str | Path, *, snapshots_dir: str | Path | None = None, fsync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._snapshots = Path(snapshots_dir) if snapshots_dir else None
        self._fsync = fsync
        self._lock = threading.Lock()

    def publish(self, event: Event, snapshot: bytes | None = None) -> None:
        if snapshot is not None and self._snapshots is not None:
            folder = self._snapshots / event.camera
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{event.id}.jpg"
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(snapshot)
            os.replace(tmp, target)
            event = dataclasses.replace(event, snapshot=str(target))
        with self._lock:
            self._file.write(event.to_json() + "\n")
            self._file.flush()
            if self._fsync:
                os.fsync(self._file.fileno())

    def flush(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                self._file.close()
