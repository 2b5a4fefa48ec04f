"""Entry snapshots by event id: every JPEG names its event, and the daemon keeps them for a while.

* :func:`tag_jpeg` writes ``regionwatch event <id>`` into the JPEG's comment (a COM segment that
  every viewer ignores), so a snapshot names its event on any transport, MQTT 3.1.1 included:
  ``PIL.Image.open(f).info["comment"]`` or ``exiftool -Comment`` read it back.
* :class:`SnapshotStore` keeps each entry snapshot as ``<state dir>/event-snapshots/<id>.jpg``
  for ``[snapshots] keep_days`` and at most ``keep_mb`` in all (oldest removed first), serves it
  on the HTTP listener at ``/events/<id>/snapshot.jpg``, and puts that link in the event's
  ``snapshot_url``.

Example:
    >>> import tempfile
    >>> from daemon.events import Event
    >>> jpeg = b"\\xff\\xd8\\xff\\xdb\\x00\\x04\\x00\\x00\\xff\\xd9"
    >>> store = SnapshotStore(tempfile.mkdtemp(), keep_days=1, keep_mb=1, base_url="http://cam-box:9108")
    >>> ev = Event("0b6f1c1e-8e4c-4f5e-9a53-2f1d3c4b5a69", 1, "entry", "hall", "table", 1, 10, 1.0,
    ...            "2024-01-01T00:00:00.000Z", [0, 0, 1, 1], [0.5, 1], 0.9)
    >>> ev, tagged = store.attach(ev, jpeg)
    >>> ev.snapshot_url
    'http://cam-box:9108/events/0b6f1c1e-8e4c-4f5e-9a53-2f1d3c4b5a69/snapshot.jpg'
    >>> jpeg_comment(tagged), store.get(ev.id) == tagged
    ('regionwatch event 0b6f1c1e-8e4c-4f5e-9a53-2f1d3c4b5a69', True)
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from daemon.events import Event
from daemon.ops.httpd import OpsServer, Request, Response
from daemon.statedir import write_atomic

log = logging.getLogger(__name__)

COMMENT_PREFIX = "regionwatch event "
ROUTE = "/events/{event_id}/snapshot.jpg"
_EVENT_ID = re.compile(r"\A[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


def tag_jpeg(jpeg: bytes, comment: str) -> bytes:
    """The same JPEG with a COM segment holding ``comment`` right after the start marker.

    Returns ``jpeg`` unchanged when it is not a JPEG (no SOI marker).
    """
    if jpeg[:2] != b"\xff\xd8":
        return jpeg
    data = comment.encode("utf-8")[:65533]
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(data) + 2) + data + jpeg[2:]


def jpeg_comment(jpeg: bytes) -> str | None:
    """The first COM segment of a JPEG (None when there is none)."""
    i = 2
    while i + 4 <= len(jpeg) and jpeg[i] == 0xFF:
        marker = jpeg[i + 1]
        if marker == 0xDA:  # start of scan: no more headers
            return None
        size = struct.unpack(">H", jpeg[i + 2:i + 4])[0]
        if marker == 0xFE:
            return jpeg[i + 4:i + 2 + size].decode("utf-8", "replace")
        i += 2 + size
    return None


class SnapshotStore:
    """Keeps entry snapshots by event id on disk, bounded by age and total size; serves them.

    Args:
        directory: where the JPEGs go (created).
        keep_days, keep_mb: retention bounds; the oldest snapshots go first.
        base_url: the listener's public base URL; None keeps nothing (there is no one to serve).
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep_days: float, keep_mb: float,
                 base_url: str | None, clock: Callable[[], float] = time.time):
        self.dir = Path(directory)
        self.max_age_s = keep_days * 86400.0
        self.max_bytes = int(keep_mb * 1024 * 1024)
        self.base_url = base_url
        self._clock = clock
        self._lock = threading.Lock()
        self._index: collections.OrderedDict[str, tuple[float, int]] = collections.OrderedDict()
        self._bytes = 0
        if base_url is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            found = []
            for entry in os.scandir(self.dir):
                if entry.name.endswith(".jpg") and _EVENT_ID.match(entry.name[:-4]):
                    st = entry.stat()
                    found.append((st.st_mtime, entry.name[:-4], st.st_size))
            for mtime, event_id, size in sorted(found):
                self._index[event_id] = (mtime, size)
                self._bytes += size
            removed = self.prune()
            log.info("snapshot store %s: %d snapshot(s), %.1f MiB (%d expired removed)", self.dir,
                     len(self._index), self._bytes / 2**20, removed)

    @property
    def keeping(self) -> bool:
        return self.base_url is not None

    def url(self, event_id: str) -> str:
        return f"{self.base_url}{ROUTE.format(event_id=event_id)}"

    def attach(self, event: Event, jpeg: bytes | None) -> tuple[Event, bytes | None]:
        """Tag the snapshot with the event id, keep it, and link it from the event."""
        if jpeg is None:
            return event, None
        jpeg = tag_jpeg(bytes(jpeg), COMMENT_PREFIX + event.id)
        if self.keeping and _EVENT_ID.match(event.id):
            try:
                self.put(event.id, jpeg)
                event = dataclasses.replace(event, snapshot_url=self.url(event.id))
            except OSError as e:  # a full disk must not cost the event
                log.warning("cannot keep the snapshot of event %s: %s", event.id, e)
        return event, jpeg

    def put(self, event_id: str, jpeg: bytes) -> None:
        write_atomic(self.dir / f"{event_id}.jpg", jpeg)
        with self._lock:
            old = self._index.pop(event_id, None)
            self._bytes += len(jpeg) - (old[1] if old else 0)
            self._index[event_id] = (self._clock(), len(jpeg))
        self.prune()

    def get(self, event_id: str) -> bytes | None:
        if not _EVENT_ID.match(event_id):
            return None
        self.prune()  # expired ones go even when no new entry comes
        with self._lock:
            if event_id not in self._index:
                return None
        try:
            return (self.dir / f"{event_id}.jpg").read_bytes()
        except OSError:
            return None

    def prune(self) -> int:
        """Remove snapshots older than ``keep_days``, then the oldest until under ``keep_mb``."""
        cutoff = self._clock() - self.max_age_s
        doomed = []
        with self._lock:
            while self._index:
                event_id, (mtime, size) = next(iter(self._index.items()))
                if mtime >= cutoff and self._bytes <= self.max_bytes:
                    break
                del self._index[event_id]
                self._bytes -= size
                doomed.append(event_id)
        for event_id in doomed:
            try:
                os.unlink(self.dir / f"{event_id}.jpg")
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("cannot remove old snapshot %s: %s", event_id, e)
        return len(doomed)

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    # -- HTTP -------------------------------------------------------------------------------
    def mount(self, server: OpsServer) -> None:
        server.add_route(ROUTE, self.serve)

    def serve(self, req: Request) -> Response:
        jpeg = self.get(req.params.get("event_id", ""))
        if jpeg is None:
            return Response.json({"error": "no snapshot kept for this event id"}, 404)
        return Response(200, jpeg, "image/jpeg", {"X-Content-Type-Options": "nosniff",
                                                  "Cache-Control": "private, max-age=86400, immutable"})
