"""Append one JSON event per line to a file, flushed (and fsynced) per event.

With ``snapshots_dir`` set, the entry snapshot JPEG is written beside it as
``<snapshots_dir>/<camera>/<event id>.jpg`` and its path is put in the event's ``snapshot``.
The snapshots live in the state folder: when that disk fails the event is still written, without
``snapshot``, and the failure goes to ``health`` (a :class:`~daemon.statedir.StateHealth`).

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
import tempfile
import threading
from pathlib import Path

from daemon.events import Event
from daemon.sinks.base import Sink
from daemon.statedir import StateHealth, write_atomic


class JsonlSink(Sink):
    name = "jsonl"

    def __init__(self, path: str | Path, *, snapshots_dir: str | Path | None = None, fsync: bool = True,
                 health: StateHealth | None = None):
        self.path = Path(path)
        self._health = health or StateHealth()
        self._unretry = self._health.add_retry(self._probe_snapshots)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._snapshots = Path(snapshots_dir) if snapshots_dir else None
        self._fsync = fsync
        self._lock = threading.Lock()

    def publish(self, event: Event, snapshot: bytes | None = None) -> None:
        if snapshot is not None and self._snapshots is not None:
            target = self._write_snapshot(event, snapshot)
            if target is not None:
                event = dataclasses.replace(event, snapshot=str(target))
        with self._lock:
            self._file.write(event.to_json() + "\n")
            self._file.flush()
            if self._fsync:
                os.fsync(self._file.fileno())

    def _write_snapshot(self, event: Event, snapshot: bytes) -> Path | None:
        folder = self._snapshots / event.camera
        target = folder / f"{event.id}.jpg"
        try:
            write_atomic(target, snapshot)
        except OSError as e:  # the state disk failed: the event itself must still be written
            self._health.failed("snapshots", folder, e)
            return None
        self._health.ok("snapshots")
        return target

    def _probe_snapshots(self) -> None:
        """While snapshot writes fail: is the folder writable again? (Ends the episode without
        waiting for the next entry.)"""
        if self._snapshots is None or not self._health.degraded("snapshots"):
            return
        try:
            self._snapshots.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self._snapshots, prefix=".probe-") as f:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError:
            return
        self._health.ok("snapshots")

    def flush(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()

    def close(self) -> None:
        self._unretry()
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                self._file.close()
