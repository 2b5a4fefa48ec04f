"""Durable per-camera event sequence numbers, kept in the state directory.

``seq`` increases by one per event per camera and survives restarts, so a consumer can spot a
gap. Stored in SQLite (WAL); each allocation is one small committed write. The numbers are
counted in memory and written through: when the write fails (full disk, I/O error, read-only
file system) the number is still handed out, the failure goes to
:class:`~daemon.statedir.StateHealth`, and the unsaved numbers are written with the next write
that works. Numbering starts above ``floor`` (what could be recovered from a damaged database or
is still waiting in the outbox).

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> s = SeqStore(d)
    >>> s.next("hall"), s.next("hall"), s.next("yard")
    (1, 2, 1)
    >>> s.close(); SeqStore(d).next("hall")
    3
    >>> SeqStore(tempfile.mkdtemp(), floor={"hall": 41}).next("hall")
    42
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path

from daemon.statedir import StateHealth

log = logging.getLogger(__name__)

_UPSERT = "INSERT INTO seq(camera, last) VALUES (?, ?) ON CONFLICT(camera) DO UPDATE SET last = MAX(last, excluded.last)"


class SeqStore:
    """Allocates increasing sequence numbers per camera, persisted in ``<dir>/seq.sqlite3``.

    Args:
        state_dir: the state folder.
        synchronous: ``[state] fsync`` ("full", "normal", "off").
        health: where write failures and recoveries are reported (store ``"seq"``).
        floor: per camera, a number already used elsewhere; numbering continues above it.
    """

    def __init__(self, state_dir: str | Path, *, synchronous: str = "normal", health: StateHealth | None = None,
                 floor: Mapping[str, int] | None = None):
        path = Path(state_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / "seq.sqlite3"
        self._health = health or StateHealth()
        self._lock = threading.Lock()
        self._closed = False
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.execute("CREATE TABLE IF NOT EXISTS seq (camera TEXT PRIMARY KEY, last INTEGER NOT NULL)")
        self._last: dict[str, int] = {c: int(n) for c, n in self._db.execute("SELECT camera, last FROM seq")}
        raised = {c: int(n) for c, n in (floor or {}).items() if int(n) > self._last.get(c, 0)}
        if raised:
            log.warning("seq continues above the numbers recovered for %s",
                        ", ".join(f"{c} ({n})" for c, n in sorted(raised.items())))
            self._last.update(raised)
        self._unsaved: set[str] = set(raised)
        if self._unsaved:
            self._save_locked()
        self._unretry = self._health.add_retry(self.retry)

    def next(self, camera: str) -> int:
        """Return the next sequence number for ``camera`` (1 for its first event). Never fails
        because of the disk: an unsaved number is written with the next write that works."""
        with self._lock:
            if self._closed:
                raise RuntimeError("seq store is closed")
            n = self._last.get(camera, 0) + 1
            self._last[camera] = n
            self._unsaved.add(camera)
            self._save_locked()
            return n

    def _save_locked(self) -> bool:
        rows = [(c, self._last[c]) for c in sorted(self._unsaved)]
        try:
            if len(rows) == 1:
                self._db.execute(_UPSERT, rows[0])
            else:
                self._db.execute("BEGIN")
                self._db.executemany(_UPSERT, rows)
                self._db.execute("COMMIT")
        except (sqlite3.Error, OSError) as e:
            if self._db.in_transaction:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            self._health.failed("seq", self.path, e)
            return False
        self._unsaved.clear()
        self._health.ok("seq")
        return True

    def retry(self) -> None:
        """Write numbers that could not be saved (called now and then while the disk fails)."""
        with self._lock:
            if self._unsaved and not self._closed:
                self._save_locked()

    def cameras(self) -> list[str]:
        """Cameras that have a number here (fleet: to forget the ones that moved to another shard)."""
        with self._lock:
            return sorted(self._last)

    def forget(self, cameras: list[str]) -> None:
        """Drop these cameras' numbering: their next event here gets ``seq`` 1 again."""
        with self._lock:
            for c in cameras:
                self._last.pop(c, None)
                self._unsaved.discard(c)
            try:
                self._db.executemany("DELETE FROM seq WHERE camera = ?", [(c,) for c in cameras])
            except (sqlite3.Error, OSError) as e:  # the disk fails: forgotten here; the file keeps the old count
                self._health.failed("seq", self.path, e)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            if self._unsaved and not self._save_locked():
                log.error(
                    "seq numbers up to %s were never written to %s: after a restart they may be handed out again "
                    "(consumers still tell the events apart by id)",
                    ", ".join(f"{c} {self._last[c]}" for c in sorted(self._unsaved)), self.path,
                )
            self._unretry()
            self._closed = True
            self._db.close()
