"""The state folder under real failures: a 1 MiB tmpfs filled during a run, SQLite's own page
limit, corrupted and zero-byte databases. Nothing is mocked: the errors come from the kernel
(ENOSPC) and from SQLite (SQLITE_FULL, "database disk image is malformed")."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from pathlib import Path

import pytest
from helpers import wait_until
from helpers.smallfs import mount_small_fs

from daemon.events import Event
from daemon.ops.health import Health
from daemon.ops.metrics import Metrics
from daemon.sinks.jsonl import JsonlSink
from daemon.sinks.outbox import Outbox
from daemon.state import SeqStore
from daemon.statedir import StateDir, StateLockedError


@pytest.fixture
def small_fs(tmp_path):
    import helpers.smallfs as smallfs

    fs = mount_small_fs(tmp_path / "state")
    if fs is None:
        pytest.skip(f"cannot mount a small tmpfs here ({smallfs.last_error}); "
                    "test_outbox_survives_sqlite_full_without_a_mount covers the outbox with SQLite's page limit")
    yield fs
    fs.unmount()


def errors(m: Metrics, store: str) -> float:
    return m.registry.get_sample_value("regionwatch_state_errors_total", {"store": store}) or 0.0


def event(camera: str, seq: int, eid: str | None = None) -> Event:
    return Event(eid or f"{camera}-{seq}", seq, "entry", camera, "door", 1, seq, seq / 10,
                 "2024-01-01T00:00:00.000Z", [0, 0, 1, 1], [0.5, 1], 0.9)


def test_seq_outbox_and_snapshots_ride_out_a_full_disk(small_fs, tmp_path, caplog):
    """Probe 1 of issue 12: with the state disk full, SeqStore.next() raised and every event was lost."""
    m = Metrics()
    state = StateDir.open(small_fs.path, metrics=m)
    state.health.retry_every_s = 0.2
    health = Health()
    health.add_check(state.health.problems)
    seq = SeqStore(small_fs.path, health=state.health)
    box = Outbox(small_fs.path, metrics=m, state=state)
    jsonl = JsonlSink(tmp_path / "events.jsonl", snapshots_dir=small_fs.path / "snapshots", health=state.health)

    def produce(camera: str) -> tuple[int, int]:
        n = seq.next(camera)
        e = event(camera, n)
        jsonl.publish(e, b"\xff\xd8 jpeg " * 300)
        return n, box.put(event_id=e.id, camera=camera, seq=n, payload=e.to_json().encode())

    before = [produce("hall") for _ in range(3)]
    box.remove([before[0][1]])  # the broker acknowledged the first one
    assert errors(m, "seq") == errors(m, "outbox") == 0 and health.readyz()[1].get("reasons", []) == ["models not loaded", "no camera streaming"]

    with caplog.at_level(logging.WARNING):
        assert small_fs.fill() > 0 and small_fs.free_bytes() == 0
        during = [produce("hall") for _ in range(5)]  # nothing raises
        assert [n for n, _ in before + during] == list(range(1, 9))
        assert box.in_memory >= 1 and len(box) == 7
        assert [i.seq for i in box.after(0)] == list(range(2, 9))  # disk rows, then memory rows, in order
        assert errors(m, "seq") >= 1 and errors(m, "outbox") >= 1 and errors(m, "snapshots") >= 1
        assert m.registry.get_sample_value("regionwatch_state_degraded", {"store": "outbox"}) == 1
        ok, detail = health.readyz()
        assert not ok and any("state store outbox cannot be written" in r and "outbox.sqlite3" in r
                              for r in detail["reasons"])
        box.remove([r for _, r in during[:2]] + [before[1][1]])  # acks while full: memory rows and a disk row
        assert [i.seq for i in box.after(0)] == [3, 6, 7, 8]
        # One ERROR per store and episode, naming the file, however many writes failed.
        first = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert sum("seq.sqlite3" in r.getMessage() for r in first) == 1
        assert sum("outbox.sqlite3" in r.getMessage() for r in first) == 1
        assert errors(m, "seq") >= 5

        small_fs.free()
        # Durability comes back by itself (the retry thread), without another event.
        assert wait_until(lambda: not state.health.problems(), 10), state.health.problems()
        assert box.in_memory == 0
        assert "durability resumed" in caplog.text
    assert health.readyz()[1]["reasons"] == ["models not loaded", "no camera streaming"]
    after = produce("hall")
    assert after[0] == 9

    lines = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["seq"] for e in lines] == list(range(1, 10))  # the JSONL file on the healthy disk got every event
    assert all("snapshot" in e for e in lines[:3]) and not any("snapshot" in e for e in lines[3:8])
    jsonl.close()
    box.close()
    seq.close()
    state.close()
    # What survives a restart is exactly what was not acknowledged, in order, and seq goes on.
    state = StateDir.open(small_fs.path)
    box = Outbox(small_fs.path, state=state)
    assert [i.seq for i in box.after(0)] == [3, 6, 7, 8, 9]
    assert SeqStore(small_fs.path, health=state.health, floor=state.seq_floor).next("hall") == 10
    box.close()
    state.close()


def test_events_held_in_memory_at_shutdown_are_reported_lost(small_fs, caplog):
    state = StateDir.open(small_fs.path)
    box = Outbox(small_fs.path, state=state)
    box.put(event_id="a", camera="hall", seq=1, payload=b"{}")
    small_fs.fill()
    box.put(event_id="b", camera="hall", seq=2, payload=b"{}")
    with caplog.at_level(logging.ERROR):
        box.close()
    assert "1 undelivered event(s) were held only in memory" in caplog.text and "hall seq 2" in caplog.text
    assert len(box) == 1  # what the next start finds
    state.close()


def test_outbox_survives_sqlite_full_without_a_mount(tmp_path, caplog):
    """The same path with SQLite's own limit (works without root): max_page_count pins the database size."""
    m = Metrics()
    state = StateDir.open(tmp_path, metrics=m)
    box = Outbox(tmp_path, metrics=m, state=state)
    big = b"x" * 6000  # bigger than a page: every insert needs new pages
    box.put(event_id="a", camera="hall", seq=1, payload=big)
    pages = box._db.execute("PRAGMA page_count").fetchone()[0]
    box._db.execute(f"PRAGMA max_page_count = {pages}")
    with caplog.at_level(logging.ERROR):
        rows = [box.put(event_id=f"e{n}", camera="hall", seq=n, payload=big) for n in range(2, 6)]
    assert box.in_memory == 4 and errors(m, "outbox") >= 4
    assert "database or disk is full" in caplog.text
    assert [i.seq for i in box.after(0)] == [1, 2, 3, 4, 5]
    box.remove(rows[:1])
    box._db.execute("PRAGMA max_page_count = 1073741823")
    box.retry()
    assert box.in_memory == 0 and not state.health.problems()
    assert [r[0] for r in sqlite3.connect(tmp_path / "outbox.sqlite3").execute("SELECT seq FROM outbox")] == [1, 3, 4, 5]
    box.close()
    state.close()


def corrupt(db: Path) -> None:
    """Overwrite the middle of the file (its b-tree pages) with garbage, as a bad disk would."""
    size = db.stat().st_size
    with open(db, "r+b") as f:
        f.seek(4096)
        f.write(os.urandom(max(4096, size - 8192)))


def fill_outbox(path: Path, camera: str, seqs: range) -> None:
    box = Outbox(path)
    for n in seqs:
        box.put(event_id=f"{camera}-{n}", camera=camera, seq=n, payload=b"{}" * 500)
    box.close()


def test_zero_byte_seq_database_is_moved_aside_and_seq_continues(tmp_path, caplog):
    """Probe 3: a zero-byte seq.sqlite3 silently restarted numbering at 1."""
    s = SeqStore(tmp_path)
    for _ in range(7):
        s.next("hall")
    s.close()
    fill_outbox(tmp_path, "hall", range(5, 8))  # 5-7 still wait for the broker
    (tmp_path / "seq.sqlite3").write_bytes(b"")
    (tmp_path / "seq.sqlite3-wal").unlink(missing_ok=True)
    with caplog.at_level(logging.ERROR):
        state = StateDir.open(tmp_path)
    moved = [p.name for p in tmp_path.iterdir() if p.name.startswith("seq.sqlite3.corrupt-")]
    assert len(moved) == 1
    assert f"{tmp_path / 'seq.sqlite3'} is damaged (the file is empty (0 bytes)); moved aside to {moved[0]}" in caplog.text
    assert SeqStore(tmp_path, health=state.health, floor=state.seq_floor).next("hall") == 8
    state.close()


@pytest.mark.parametrize("damage", ["corrupt", "zero-byte", "not-a-database"])
def test_damaged_outbox_is_moved_aside_named_and_replaced(tmp_path, caplog, damage):
    """Probe 3: a corrupt outbox was not noticed at start; every new event then failed for MQTT."""
    fill_outbox(tmp_path, "hall", range(1, 200))
    db = tmp_path / "outbox.sqlite3"
    for extra in ("-wal", "-shm"):
        assert not (tmp_path / f"outbox.sqlite3{extra}").exists()  # a clean close checkpoints the WAL
    if damage == "corrupt":
        corrupt(db)
    elif damage == "zero-byte":
        db.write_bytes(b"")
    else:
        with open(db, "r+b") as f:
            f.write(b"definitely not SQLite")
    with caplog.at_level(logging.ERROR):
        state = StateDir.open(tmp_path)
    moved = sorted(p for p in tmp_path.iterdir()
                   if p.name.startswith("outbox.sqlite3.corrupt-") and not p.name.endswith("-wal"))
    assert len(moved) == 1
    assert (moved[0].stat().st_size == 0) == (damage == "zero-byte")  # kept as it was, for inspection
    assert "outbox.sqlite3 is damaged" in caplog.text and moved[0].name in caplog.text
    box = Outbox(tmp_path, state=state)  # a new, empty outbox that works
    assert len(box) == 0
    box.put(event_id="new", camera="hall", seq=500, payload=b"{}")
    assert [i.event_id for i in box.after(0)] == ["new"]
    box.close()
    state.close()


def test_a_healthy_state_folder_is_left_alone(tmp_path, caplog):
    fill_outbox(tmp_path, "hall", range(1, 4))
    s = SeqStore(tmp_path)
    s.next("hall")
    s.close()

    def files():  # SQLite's -wal and -shm come and go with connections
        return sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(("-wal", "-shm")))

    before = files()
    with caplog.at_level(logging.WARNING):
        state = StateDir.open(tmp_path)
    assert caplog.text == "" and files() == before
    assert state.seq_floor == {"hall": 3}
    state.close()


def test_one_lock_for_every_configuration(tmp_path):
    """Probe 4: without MQTT nothing locked the folder; two daemons interleaved their seq numbers."""
    first = StateDir.open(tmp_path)
    with pytest.raises(StateLockedError, match=rf"in use by another regionwatch process \(pid {os.getpid()}\)"):
        StateDir.open(tmp_path)
    first.close()
    StateDir.open(tmp_path).close()


def test_bounds_still_apply_while_the_database_is_full(tmp_path, caplog):
    m = Metrics()
    state = StateDir.open(tmp_path, metrics=m)
    box = Outbox(tmp_path, max_events=3, metrics=m, state=state)
    big = b"x" * 6000
    for n in (1, 2):
        box.put(event_id=f"e{n}", camera="hall", seq=n, payload=big)
    box._db.execute(f"PRAGMA max_page_count = {box._db.execute('PRAGMA page_count').fetchone()[0]}")
    with caplog.at_level(logging.WARNING):
        for n in range(3, 7):
            box.put(event_id=f"e{n}", camera="hall", seq=n, payload=big)
        assert [i.seq for i in box.after(0)] == [4, 5, 6] and len(box) == 3  # the oldest went, disk or memory
        box.close()
    assert m.registry.get_sample_value("regionwatch_outbox_dropped_total", {"reason": "max_events"}) == 3
    assert "hall seq 1-3" in caplog.text or ("hall seq 1" in caplog.text and "hall seq 2-3" in caplog.text)
    state.close()
