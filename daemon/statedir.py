"""The state directory: one lock for every configuration, integrity checks at start, and the
health of the stores kept in it (``seq.sqlite3``, ``outbox.sqlite3``, snapshots).

* :meth:`StateDir.open` makes sure the folder exists and is writable, takes an exclusive
  ``flock`` on ``state.lock`` (one daemon per folder, MQTT or not; the file names the holder's
  pid), and runs ``PRAGMA quick_check`` on both databases. A corrupt or empty database is moved
  aside as ``<name>.corrupt-<UTC time>`` (with its WAL) and named in an ERROR; it is never
  silently reset. The highest ``seq`` per camera still readable from it is kept in
  :attr:`StateDir.seq_floor`, so numbering continues above anything recoverable.
* :class:`StateHealth` is told by the stores when a write fails and when one succeeds again.
  Each failure is counted (``regionwatch_state_errors_total{store}``); the first of an episode is
  an ERROR naming the file and the last one a WARNING saying durability is back; while an episode
  lasts ``regionwatch_state_degraded{store}`` is 1 and ``/readyz`` says why it is not ready.
  Stores register a retry (``add_retry``) that a small thread calls every ``retry_every_s`` while
  an episode lasts, so durability comes back by itself when the disk does, events or not.

Example:
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> open(os.path.join(d, "seq.sqlite3"), "wb").close()   # a zero-byte database
    >>> state = StateDir.open(d)
    >>> sorted(n.split(".corrupt-")[0] for n in os.listdir(d) if ".corrupt-" in n)
    ['seq.sqlite3']
    >>> StateDir.open(d)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    daemon.statedir.StateLockedError: ... is in use by another regionwatch process (pid ...); one daemon per state folder
    >>> state.health.failed("seq", state.path / "seq.sqlite3", OSError(28, "No space left on device"))
    >>> state.health.problems()  # doctest: +ELLIPSIS
    ['state store seq cannot be written (... No space left on device)']
    >>> state.health.ok("seq"); state.health.problems()
    []
    >>> state.close()
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

DATABASES = ("seq.sqlite3", "outbox.sqlite3")
STORES = ("seq", "outbox", "snapshots")


class StateDirError(RuntimeError):
    """The state folder cannot be used (not a folder, not writable, locked)."""


class StateLockedError(StateDirError):
    """Another process holds the state folder."""


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``<name>.tmp`` and a rename: readers find the old file or
    the new one, never a part. On OSError (raised) the temporary file is removed."""
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _problem(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, sqlite3.Error) else str(exc)


class StateHealth:
    """Failure episodes of the state stores: counted, logged once per episode, shown on /readyz.

    Args:
        metrics: a :class:`daemon.ops.metrics.Metrics` or None.
        retry_every_s: how often the registered retries run while an episode lasts.
    """

    def __init__(self, metrics=None, *, retry_every_s: float = 5.0):
        self._metrics = metrics
        self._lock = threading.Lock()
        self._episodes: dict[str, dict] = {}
        self._retries: list = []
        self.retry_every_s = retry_every_s
        self._retrier: threading.Thread | None = None
        self._closed = threading.Event()
        if metrics is not None:
            for store in STORES:  # series exist at 0 before the first failure
                metrics.state_errors.labels(store=store)
                metrics.state_degraded.labels(store=store).set(0)

    def failed(self, store: str, path, exc: BaseException) -> None:
        """A write to ``store`` (at ``path``) failed with ``exc``; events go on without it."""
        problem = _problem(exc)
        with self._lock:
            episode = self._episodes.get(store)
            if episode is None:
                episode = self._episodes[store] = {"path": str(path), "problem": problem, "since": time.monotonic(),
                                                   "failures": 0}
            episode["failures"] += 1
            episode["problem"] = problem
            first = episode["failures"] == 1
        if self._metrics is not None:
            self._metrics.state_errors.labels(store=store).inc()
            self._metrics.state_degraded.labels(store=store).set(1)
        if first:
            log.error(
                "state store %s: cannot write %s (%s); events still go to every sink that can take them, "
                "but are not durable here until the disk recovers (retried with every event and every %g s)",
                store, path, problem, self.retry_every_s,
            )
            self._start_retrier()

    def add_retry(self, retry) -> Callable[[], None]:
        """``retry()`` is called every ``retry_every_s`` while any store's episode lasts. Returns
        the call that removes it (a closed store calls it, or a reload would keep it for good)."""
        with self._lock:
            self._retries.append(retry)

        def remove() -> None:
            with self._lock:
                if retry in self._retries:
                    self._retries.remove(retry)

        return remove

    def _start_retrier(self) -> None:
        with self._lock:
            if self._closed.is_set() or self._retrier is not None:
                return
            self._retrier = threading.Thread(target=self._retry_loop, name="state-retry", daemon=True)
            self._retrier.start()

    def _retry_loop(self) -> None:
        while not self._closed.wait(self.retry_every_s):
            with self._lock:
                retries = list(self._retries)
            for retry in retries:
                try:
                    retry()
                except Exception:
                    log.exception("state: retrying a failed write raised")
            with self._lock:
                if not self._episodes:  # decided under the lock: a new episode starts a new thread
                    self._retrier = None
                    return

    def close(self) -> None:
        """Stop retrying (the stores are closing)."""
        self._closed.set()

    def ok(self, store: str) -> None:
        """A write to ``store`` succeeded: ends its episode, if one was going on."""
        if store not in self._episodes:  # the common case, without the lock
            return
        with self._lock:
            episode = self._episodes.pop(store, None)
        if episode is None:
            return
        if self._metrics is not None:
            self._metrics.state_degraded.labels(store=store).set(0)
        log.warning(
            "state store %s: %s is writable again after %.0f s and %d failed write(s); durability resumed",
            store, episode["path"], time.monotonic() - episode["since"], episode["failures"],
        )

    def degraded(self, store: str) -> bool:
        return store in self._episodes

    def problems(self) -> list[str]:
        """Why the daemon is not ready because of its state stores (empty when all is well)."""
        with self._lock:
            return [f"state store {s} cannot be written ({e['path']}: {e['problem']})" for s, e in self._episodes.items()]


class StateDir:
    """The daemon's state folder, locked and checked; see the module docstring."""

    LOCK_NAME = "state.lock"

    def __init__(self, path: str | os.PathLike[str], *, metrics=None):
        self.path = Path(path)
        self.health = StateHealth(metrics)
        self.seq_floor: dict[str, int] = {}
        """Highest ``seq`` per camera found in the outbox and in databases that had to be moved
        aside: numbering continues above it."""
        self.moved_aside: list[Path] = []
        self._lock_file = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, metrics=None) -> StateDir:
        """Prepare, lock and check the folder (raises :class:`StateDirError`)."""
        state = cls(path, metrics=metrics)
        state.prepare()
        state.lock()
        try:
            state.check_databases()
        except BaseException:
            state.close()
            raise
        for camera, seq in state.outbox_seq_max().items():  # events waiting there already have numbers
            state.seq_floor[camera] = max(state.seq_floor.get(camera, 0), seq)
        return state

    # -- preconditions -------------------------------------------------------------------------
    def prepare(self) -> None:
        """The folder exists (created if needed) and a file can be written in it."""
        if self.path.exists() and not self.path.is_dir():
            raise StateDirError(f"{self.path} is a file, not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StateDirError(f"cannot create {self.path}: {_problem(e)}") from None
        try:
            with tempfile.NamedTemporaryFile(dir=self.path, prefix=".write-test-"):
                pass
        except OSError as e:
            raise StateDirError(f"{self.path} is not writable: {_problem(e)}") from None

    def lock(self) -> None:
        """Take the folder's exclusive lock for this process (released by :meth:`close` or exit)."""
        lock_path = self.path / self.LOCK_NAME
        try:
            f = open(lock_path, "a+")  # noqa: SIM115 (held until close)
        except OSError as e:
            raise StateDirError(f"cannot open {lock_path}: {_problem(e)}") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise StateLockedError(
                f"{self.path} is in use by another regionwatch process (pid {holder}); one daemon per state folder"
            ) from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
        except OSError:
            pass  # the lock is what matters; the pid is only for the message above
        self._lock_file = f

    # -- integrity -----------------------------------------------------------------------------
    def check_databases(self) -> None:
        """``PRAGMA quick_check`` both databases; move a corrupt or empty one aside (ERROR)."""
        for name in DATABASES:
            db = self.path / name
            if not db.exists():
                continue
            problem = "the file is empty (0 bytes)" if db.stat().st_size == 0 else self._quick_check(db)
            if problem is None:
                continue
            floor = self._salvage_seq(db)
            target = self._move_aside(db)
            for camera, seq in floor.items():
                self.seq_floor[camera] = max(self.seq_floor.get(camera, 0), seq)
            kept = f"; seq continues above {', '.join(f'{c} {s}' for c, s in sorted(floor.items()))}" if floor else ""
            log.error(
                "state: %s is damaged (%s); moved aside to %s and starting a new one%s. "
                "Events waiting in it are not delivered; inspect it with the sqlite3 CLI.",
                db, problem, target.name, kept,
            )

    @staticmethod
    def _quick_check(db: Path) -> str | None:
        try:
            con = sqlite3.connect(db, isolation_level=None)
            try:
                rows = [r[0] for r in con.execute("PRAGMA quick_check").fetchall()]
            finally:
                con.close()
        except sqlite3.Error as e:
            return str(e)
        return None if rows == ["ok"] else "; ".join(map(str, rows[:3]))

    @staticmethod
    def _salvage_seq(db: Path) -> dict[str, int]:
        """The highest ``seq`` per camera that can still be read from a damaged database."""
        query = {"seq.sqlite3": "SELECT camera, last FROM seq",
                 "outbox.sqlite3": "SELECT camera, MAX(seq) FROM outbox GROUP BY camera"}[db.name]
        found: dict[str, int] = {}
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                for camera, seq in con.execute(query):
                    if isinstance(camera, str) and isinstance(seq, int):
                        found[camera] = max(found.get(camera, 0), seq)
            finally:
                con.close()
        except sqlite3.Error:
            pass  # whatever was read before the damage is kept
        return found

    def _move_aside(self, db: Path) -> Path:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        target = db.with_name(f"{db.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = db.with_name(f"{db.name}.corrupt-{stamp}-{n}")
        os.replace(db, target)
        wal = db.with_name(db.name + "-wal")
        if wal.exists():  # the WAL belongs to the old file: a new database must not replay it
            os.replace(wal, target.with_name(target.name + "-wal"))
        db.with_name(db.name + "-shm").unlink(missing_ok=True)
        self.moved_aside.append(target)
        return target

    def outbox_seq_max(self) -> dict[str, int]:
        """The highest ``seq`` per camera in the (checked) outbox: numbering must stay above it."""
        db = self.path / "outbox.sqlite3"
        return self._salvage_seq(db) if db.exists() and db.stat().st_size else {}

    def close(self) -> None:
        """Stop retries and release the lock."""
        self.health.close()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
