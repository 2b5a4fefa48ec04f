"""Durable outbox of serialized events waiting for a broker acknowledgement.

Every event is committed to ``<state dir>/outbox.sqlite3`` *before* it is handed to the network,
and is deleted only when the broker acknowledges it (PUBACK for QoS 1, PUBCOMP for QoS 2, a
successful socket write for QoS 0). Rows keep insertion order, which is ``seq`` order per camera,
so after a reconnect or a restart the sink re-publishes them in the order they were produced.

The database uses SQLite's write-ahead log. ``[state] fsync`` maps onto ``PRAGMA synchronous``:

* ``full``: every commit (one per event) is fsynced; nothing acknowledged to the pipeline is lost
  even on power loss or a kernel crash. Costs one fsync per event.
* ``normal`` (default): each commit reaches the operating system before ``put`` returns, so a
  crashed or SIGKILLed daemon loses nothing; the WAL is fsynced at checkpoints, so a power loss
  may lose the last few events committed since then (the database stays consistent).
* ``off``: no fsync at all; survives a process crash, but a power loss may lose or corrupt the
  outbox.

The outbox is bounded by ``max_events`` and ``max_age_s``: when a bound is hit the *oldest*
events are dropped, counted in ``regionwatch_outbox_dropped_total{reason=...}`` and logged with
their camera and ``seq`` range (consumers also see the gap in ``seq``). Only one process may use
an outbox at a time (an exclusive ``flock`` on ``outbox.lock``).

Example:
    >>> import tempfile
    >>> box = Outbox(tempfile.mkdtemp(), max_events=100)
    >>> first = box.put(event_id="e1", camera="hall", seq=1, payload=b'{"seq":1}')
    >>> _ = box.put(event_id="e2", camera="hall", seq=2, payload=b'{"seq":2}')
    >>> [item.seq for item in box.after(0)], len(box)
    ([1, 2], 2)
    >>> box.remove([first]), [item.event_id for item in box.after(0)]
    (1, ['e2'])
    >>> box.close()
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

FsyncPolicy = Literal["full", "normal", "off"]
SYNCHRONOUS: dict[str, str] = {"full": "FULL", "normal": "NORMAL", "off": "OFF"}
"""``[state] fsync`` → SQLite ``PRAGMA synchronous`` (in WAL mode)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    rowid    INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT    NOT NULL,
    camera   TEXT    NOT NULL,
    seq      INTEGER NOT NULL,
    created  REAL    NOT NULL,
    payload  BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_created ON outbox(created);
"""


class OutboxLockedError(RuntimeError):
    """Another process holds the outbox of this state directory."""


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One stored event: its row id (delivery order), identity and serialized JSON."""

    rowid: int
    event_id: str
    camera: str
    seq: int
    created: float
    payload: bytes


def _seq_ranges(rows: list[tuple[str, int]]) -> str:
    """``[("hall", 1), ("hall", 2), ("yard", 7)]`` → ``'hall seq 1-2, yard seq 7'``."""
    spans: dict[str, list[int]] = {}
    for camera, seq in rows:
        lo_hi = spans.setdefault(camera, [seq, seq])
        lo_hi[0], lo_hi[1] = min(lo_hi[0], seq), max(lo_hi[1], seq)
    return ", ".join(f"{c} seq {lo}" if lo == hi else f"{c} seq {lo}-{hi}" for c, (lo, hi) in sorted(spans.items()))


class Outbox:
    """A bounded, ordered, crash-safe queue of serialized events in SQLite.

    Thread-safe: ``put`` is called by the pipeline, ``after``/``remove`` by the delivery thread.
    ``metrics`` (a :class:`daemon.ops.metrics.Metrics`) is optional; when given, ``outbox_depth``
    and ``outbox_dropped`` are kept up to date.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        max_events: int = 100_000,
        max_age_s: float = 7 * 86400,
        fsync: FsyncPolicy = "normal",
        metrics=None,
        clock: Callable[[], float] = time.time,
        drop_log_interval_s: float = 60.0,
    ):
        if fsync not in SYNCHRONOUS:
            raise ValueError(f"fsync must be one of {sorted(SYNCHRONOUS)}, got {fsync!r}")
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "outbox.sqlite3"
        self.max_events = int(max_events)
        self.max_age_s = float(max_age_s)
        self.fsync = fsync
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._lock_file = open(self.dir / "outbox.lock", "a+")  # noqa: SIM115 (held until close)
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise OutboxLockedError(
                f"the MQTT outbox in {self.dir} is in use by another process (one daemon per state dir)"
            ) from None
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={SYNCHRONOUS[fsync]}")
        self._db.executescript(_SCHEMA)
        self._count = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        # Drops are logged at once, then summarised at most every drop_log_interval_s.
        self._drop_log_interval_s = drop_log_interval_s
        self._drop_last_log = -float("inf")
        self._drop_pending: dict[str, list] = {}
        self._closed = False
        if self._count:
            log.info("MQTT outbox %s holds %d undelivered event(s) from a previous run", self.path, self._count)
        self.prune()
        self._update_depth()

    # -- writing ---------------------------------------------------------------------------
    def put(self, *, event_id: str, camera: str, seq: int, payload: bytes) -> int:
        """Store one event durably (per the fsync policy) and return its row id.

        If this takes the outbox over ``max_events``, the oldest events are dropped (and logged).
        """
        with self._lock:
            self._check_open()
            rowid = self._db.execute(
                "INSERT INTO outbox(event_id, camera, seq, created, payload) VALUES (?, ?, ?, ?, ?)",
                (event_id, camera, int(seq), self._clock(), bytes(payload)),
            ).lastrowid
            self._count += 1
            if self._count > self.max_events:
                self._drop_oldest_locked(self._count - self.max_events)
            self._update_depth()
            return int(rowid)

    def remove(self, rowids: Iterable[int]) -> int:
        """Delete acknowledged events; returns how many were still there."""
        ids = [(int(r),) for r in rowids]
        if not ids:
            return 0
        with self._lock:
            self._check_open()
            before = self._db.total_changes
            self._db.execute("BEGIN")
            try:
                self._db.executemany("DELETE FROM outbox WHERE rowid = ?", ids)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            removed = self._db.total_changes - before
            self._count -= removed
            self._update_depth()
            return removed

    def prune(self) -> int:
        """Drop events older than ``max_age_s`` (and flush the drop log); returns how many."""
        with self._lock:
            if self._closed:
                return 0
            cutoff = self._clock() - self.max_age_s
            rows = self._db.execute(
                "SELECT rowid, camera, seq FROM outbox WHERE created < ? ORDER BY rowid", (cutoff,)
            ).fetchall()
            if rows:
                self._delete_locked(rows, "max_age")
            self._flush_drop_log_locked(force=False)
            self._update_depth()
            return len(rows)

    # -- reading ---------------------------------------------------------------------------
    def after(self, rowid: int, limit: int = 1000) -> list[OutboxItem]:
        """Up to ``limit`` events with a row id greater than ``rowid``, oldest first."""
        with self._lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT rowid, event_id, camera, seq, created, payload FROM outbox "
                "WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (int(rowid), int(limit)),
            ).fetchall()
        return [OutboxItem(r[0], r[1], r[2], r[3], r[4], bytes(r[5])) for r in rows]

    def __len__(self) -> int:
        with self._lock:
            return self._count

    def close(self) -> None:
        """Log any pending drop summary, close the database and release the directory lock."""
        with self._lock:
            if self._closed:
                return
            self._flush_drop_log_locked(force=True)
            self._closed = True
            self._db.close()
            self._lock_file.close()  # releases the flock

    # -- internals ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("outbox is closed")

    def _drop_oldest_locked(self, n: int) -> None:
        rows = self._db.execute("SELECT rowid, camera, seq FROM outbox ORDER BY rowid LIMIT ?", (n,)).fetchall()
        self._delete_locked(rows, "max_events")

    def _delete_locked(self, rows: list[tuple[int, str, int]], reason: str) -> None:
        self._db.execute("BEGIN")
        try:
            self._db.executemany("DELETE FROM outbox WHERE rowid = ?", [(r[0],) for r in rows])
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._count -= len(rows)
        if self._metrics is not None:
            self._metrics.outbox_dropped.labels(reason=reason).inc(len(rows))
        self._drop_pending.setdefault(reason, []).extend((r[1], r[2]) for r in rows)
        self._flush_drop_log_locked(force=False)

    def _flush_drop_log_locked(self, *, force: bool) -> None:
        if not self._drop_pending:
            return
        now = time.monotonic()
        if not force and now - self._drop_last_log < self._drop_log_interval_s:
            return
        self._drop_last_log = now
        bound = {"max_events": f"max_events={self.max_events}", "max_age": f"max_age_s={self.max_age_s:g}"}
        for reason, rows in self._drop_pending.items():
            log.warning(
                "MQTT outbox bound %s hit: dropped %d oldest undelivered event(s) (%s); "
                "subscribers will see a gap in seq",
                bound.get(reason, reason),
                len(rows),
                _seq_ranges(rows),
            )
        self._drop_pending.clear()

    def _update_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.outbox_depth.set(self._count)
