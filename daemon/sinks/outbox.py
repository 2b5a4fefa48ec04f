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
a state folder at a time (:class:`~daemon.statedir.StateDir`: an exclusive ``flock`` on
``state.lock``); an outbox opened on its own takes that lock itself.

When the disk fails (full, I/O error, read-only), the outbox never refuses an event: it keeps new
events in memory, in order, under the same row ids, and delivery goes on from there. Deletes of
acknowledged events that fail are remembered and skipped. Every failure is reported to
:class:`~daemon.statedir.StateHealth` (counted, logged once per episode, ``/readyz`` not ready).
With each new event and every few seconds the outbox tries again: the events held in memory are
written to the database (with their row ids, so order and acknowledgements are unaffected) and
durability resumes. Events still only in memory when the daemon stops are lost, and logged so.

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

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Literal

from daemon.statedir import StateDir, StateLockedError

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


class OutboxLockedError(StateLockedError):
    """Another process holds the state folder of this outbox."""


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


_DISK_ERRORS = (sqlite3.Error, OSError)


class Outbox:
    """A bounded, ordered, crash-safe queue of serialized events in SQLite (in memory while the
    disk fails).

    Thread-safe: ``put`` is called by the pipeline, ``after``/``remove`` by the delivery thread.
    ``metrics`` (a :class:`daemon.ops.metrics.Metrics`) is optional; when given, ``outbox_depth``,
    ``outbox_memory`` and ``outbox_dropped`` are kept up to date. ``state_dir`` is the daemon's
    locked :class:`~daemon.statedir.StateDir`; without it the outbox locks the folder itself.
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
        state: StateDir | None = None,
    ):
        if fsync not in SYNCHRONOUS:
            raise ValueError(f"fsync must be one of {sorted(SYNCHRONOUS)}, got {fsync!r}")
        self.dir = Path(state_dir)
        self.path = self.dir / "outbox.sqlite3"
        self.max_events = int(max_events)
        self.max_age_s = float(max_age_s)
        self.fsync = fsync
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._own_state = state is None
        if state is None:
            try:
                state = StateDir.open(self.dir, metrics=metrics)
            except StateLockedError as e:
                raise OutboxLockedError(f"the MQTT outbox: {e}") from None
        self._state = state
        self._health = state.health
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={SYNCHRONOUS[fsync]}")
            self._db.executescript(_SCHEMA)
            self._count = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
            # Row ids are handed out here (not by SQLite), so events kept in memory while the disk
            # fails keep their place in the order and their id when they are written later.
            top = self._db.execute(
                "SELECT MAX(COALESCE((SELECT MAX(rowid) FROM outbox), 0),"
                " COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0))"
            ).fetchone()[0]
        except BaseException:
            if self._own_state:
                state.close()
            raise
        self._next_rowid = int(top) + 1
        self._memory: dict[int, OutboxItem] = {}  # rowid -> event not yet written (disk failing)
        self._tombstones: set[int] = set()  # rowids acknowledged, but not yet deleted from the database
        # Drops are logged at once, then summarised at most every drop_log_interval_s.
        self._drop_log_interval_s = drop_log_interval_s
        self._drop_last_log = -float("inf")
        self._drop_pending: dict[str, list] = {}
        self._closed = False
        if self._count:
            log.info("MQTT outbox %s holds %d undelivered event(s) from a previous run", self.path, self._count)
        self._unretry = self._health.add_retry(self.retry)
        self.prune()
        self._update_depth()

    # -- writing ---------------------------------------------------------------------------
    def put(self, *, event_id: str, camera: str, seq: int, payload: bytes) -> int:
        """Store one event durably (per the fsync policy) and return its row id.

        When the database cannot be written the event is kept in memory (and the failure
        reported); it never raises for the disk. If this takes the outbox over ``max_events``,
        the oldest events are dropped (and logged).
        """
        with self._lock:
            self._check_open()
            item = OutboxItem(self._next_rowid, event_id, camera, int(seq), self._clock(), bytes(payload))
            self._next_rowid += 1
            if self._memory:
                self._flush_memory_locked()  # older events first, so rows stay in order
            if self._memory or not self._write_locked([item]):
                self._memory[item.rowid] = item
            self._count += 1
            if self._count > self.max_events:
                self._drop_oldest_locked(self._count - self.max_events)
            self._update_depth()
            return item.rowid

    def remove(self, rowids: Iterable[int]) -> int:
        """Delete acknowledged events; returns how many were still there."""
        ids = {int(r) for r in rowids}
        if not ids:
            return 0
        with self._lock:
            self._check_open()
            in_memory = ids & self._memory.keys()
            for rowid in in_memory:
                del self._memory[rowid]
            removed = len(in_memory) + self._delete_locked(sorted(ids - in_memory - self._tombstones))
            self._count = max(0, self._count - removed)
            self._update_depth()
            return removed

    def prune(self) -> int:
        """Drop events older than ``max_age_s`` (and flush the drop log); returns how many."""
        with self._lock:
            if self._closed:
                return 0
            cutoff = self._clock() - self.max_age_s
            try:
                rows = [r for r in self._db.execute(
                    "SELECT rowid, camera, seq FROM outbox WHERE created < ? ORDER BY rowid", (cutoff,)
                ).fetchall() if r[0] not in self._tombstones]
            except _DISK_ERRORS as e:
                self._health.failed("outbox", self.path, e)
                rows = []
            rows += [(i.rowid, i.camera, i.seq) for i in self._memory.values() if i.created < cutoff]
            if rows:
                self._drop_locked(rows, "max_age")
            self._flush_drop_log_locked(force=False)
            self._update_depth()
            return len(rows)

    def retry(self) -> None:
        """Write the events held in memory and apply pending deletes, if the disk works again."""
        with self._lock:
            if self._closed or not (self._memory or self._tombstones):
                return
            self._flush_memory_locked()
            self._update_depth()

    # -- reading ---------------------------------------------------------------------------
    def after(self, rowid: int, limit: int = 1000) -> list[OutboxItem]:
        """Up to ``limit`` events with a row id greater than ``rowid``, oldest first."""
        with self._lock:
            self._check_open()
            try:
                rows = self._db.execute(
                    "SELECT rowid, event_id, camera, seq, created, payload FROM outbox "
                    "WHERE rowid > ? ORDER BY rowid LIMIT ?",
                    (int(rowid), int(limit) + len(self._tombstones)),
                ).fetchall()
            except _DISK_ERRORS as e:
                # Unreadable: what is in memory still goes out now. The cursor then passes the
                # unread rows; they go out after the next reconnect (or restart), in order again.
                self._health.failed("outbox", self.path, e)
                rows = []
            items = [OutboxItem(r[0], r[1], r[2], r[3], r[4], bytes(r[5])) for r in rows if r[0] not in self._tombstones]
            items += [i for i in self._memory.values() if i.rowid > rowid]
        items.sort(key=lambda i: i.rowid)
        return items[: int(limit)]

    def __len__(self) -> int:
        """Events waiting (after :meth:`close`: those kept on disk for the next start)."""
        with self._lock:
            return self._count

    @property
    def in_memory(self) -> int:
        """Events held only in memory because the database could not be written."""
        with self._lock:
            return len(self._memory)

    def close(self) -> None:
        """Write what is held in memory if possible (else log what is lost), log any pending drop
        summary, close the database and release the folder's lock if the outbox took it."""
        with self._lock:
            if self._closed:
                return
            if self._memory or self._tombstones:
                self._flush_memory_locked()
            if self._memory:
                log.error(
                    "MQTT outbox: %d undelivered event(s) were held only in memory because %s could not be "
                    "written; they are lost (%s)",
                    len(self._memory), self.path, _seq_ranges([(i.camera, i.seq) for i in self._memory.values()]),
                )
                self._count -= len(self._memory)  # len() now tells what the next start will find
            if self._tombstones:
                log.warning("MQTT outbox: %d delivered event(s) could not be deleted from %s and will be delivered "
                            "again after the next start (consumers dedupe by id)", len(self._tombstones), self.path)
            self._flush_drop_log_locked(force=True)
            self._unretry()
            self._closed = True
            self._db.close()
            if self._own_state:
                self._state.close()

    # -- internals ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("outbox is closed")

    def _write_locked(self, items: list[OutboxItem]) -> bool:
        """Insert ``items`` (with their row ids) in one transaction; False (reported) if the disk fails."""
        try:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO outbox(rowid, event_id, camera, seq, created, payload) VALUES (?, ?, ?, ?, ?, ?)",
                [astuple(i) for i in items],
            )
            self._db.execute("COMMIT")
        except _DISK_ERRORS as e:
            self._rollback_locked()
            self._health.failed("outbox", self.path, e)
            return False
        self._health.ok("outbox")
        return True

    def _flush_memory_locked(self) -> None:
        if self._tombstones:
            self._delete_locked(sorted(self._tombstones))
        if self._memory and self._write_locked(list(self._memory.values())):
            self._memory.clear()

    def _delete_locked(self, rowids: list[int]) -> int:
        """Delete rows from the database; rows that cannot be deleted now become tombstones
        (skipped by :meth:`after`, deleted later). Returns how many rows this removes from the queue
        (callers other than the tombstone flush pass rows that are not tombstones yet)."""
        if not rowids:
            return 0
        try:
            before = self._db.total_changes
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM outbox WHERE rowid = ?", [(r,) for r in rowids])
            self._db.execute("COMMIT")
            deleted = self._db.total_changes - before
        except _DISK_ERRORS as e:
            self._rollback_locked()
            self._health.failed("outbox", self.path, e)
            self._tombstones.update(rowids)
            return len(rowids)  # assumed present: the queue forgets them, the disk catches up later
        self._tombstones.difference_update(rowids)
        self._health.ok("outbox")
        return deleted

    def _rollback_locked(self) -> None:
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _drop_oldest_locked(self, n: int) -> None:
        rows: list[tuple[int, str, int]] = []
        try:
            rows = [r for r in self._db.execute(
                "SELECT rowid, camera, seq FROM outbox ORDER BY rowid LIMIT ?", (n + len(self._tombstones),)
            ).fetchall() if r[0] not in self._tombstones][:n]
        except _DISK_ERRORS as e:
            self._health.failed("outbox", self.path, e)
        if len(rows) < n:  # memory rows are newer than every database row
            rows += [(i.rowid, i.camera, i.seq) for i in sorted(self._memory.values(), key=lambda i: i.rowid)][: n - len(rows)]
        self._drop_locked(rows, "max_events")

    def _drop_locked(self, rows: list[tuple[int, str, int]], reason: str) -> None:
        on_disk = []
        for r in rows:
            if self._memory.pop(r[0], None) is None:
                on_disk.append(r[0])
        self._delete_locked(on_disk)
        self._count = max(0, self._count - len(rows))
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
            self._metrics.outbox_memory.set(len(self._memory))
