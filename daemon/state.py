"""Durable per-camera event sequence numbers, kept in the state directory.

``seq`` increases by one per event per camera and survives restarts, so a consumer can spot a
gap. Stored in SQLite (WAL); each allocation is one small committed transaction.

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> s = SeqStore(d)
    >>> s.next("hall"), s.next("hall"), s.next("yard")
    (1, 2, 1)
    >>> s.close(); SeqStore(d).next("hall")
    3
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path


class SeqStore:
    """Allocates increasing sequence numbers per camera, persisted in ``<dir>/seq.sqlite3``."""

    def __init__(self, state_dir: str | Path, *, synchronous: str = "normal"):
        path = Path(state_dir)
        path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path / "seq.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.execute("CREATE TABLE IF NOT EXISTS seq (camera TEXT PRIMARY KEY, last INTEGER NOT NULL)")

    def next(self, camera: str) -> int:
        """Return the next sequence number for ``camera`` (1 for its first event)."""
        with self._lock:
            row = self._db.execute(
                "INSERT INTO seq(camera, last) VALUES (?, 1) "
                "ON CONFLICT(camera) DO UPDATE SET last = last + 1 RETURNING last",
                (camera,),
            ).fetchone()
            return int(row[0])

    def cameras(self) -> list[str]:
        """Cameras that have a number here (fleet: to forget the ones that moved to another shard)."""
        with self._lock:
            return [row[0] for row in self._db.execute("SELECT camera FROM seq ORDER BY camera")]

    def forget(self, cameras: list[str]) -> None:
        """Drop these cameras' numbering: their next event here gets ``seq`` 1 again."""
        with self._lock:
            self._db.executemany("DELETE FROM seq WHERE camera = ?", [(c,) for c in cameras])

    def close(self) -> None:
        with self._lock:
            self._db.close()
