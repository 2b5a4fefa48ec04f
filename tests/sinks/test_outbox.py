"""The durable MQTT outbox: order, acknowledgement, bounds, fsync policy, crash safety."""

from __future__ import annotations

import logging
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from daemon.ops.metrics import Metrics
from daemon.sinks.outbox import Outbox, OutboxLockedError


def put(box: Outbox, camera: str, seq: int) -> int:
    return box.put(event_id=f"{camera}-{seq}", camera=camera, seq=seq, payload=f'{{"seq":{seq}}}'.encode())


def test_keeps_insertion_order_and_removes_only_acknowledged(tmp_path):
    box = Outbox(tmp_path)
    rows = [put(box, cam, seq) for seq in (1, 2, 3) for cam in ("hall", "yard")]
    assert [(i.camera, i.seq) for i in box.after(0)] == [
        ("hall", 1), ("yard", 1), ("hall", 2), ("yard", 2), ("hall", 3), ("yard", 3)]
    assert box.after(0)[0].payload == b'{"seq":1}'
    assert [i.rowid for i in box.after(rows[3], limit=10)] == rows[4:]
    assert [i.rowid for i in box.after(0, limit=2)] == rows[:2]
    assert box.remove([rows[1], rows[4]]) == 2
    assert box.remove([rows[1]]) == 0  # a second ack for the same row changes nothing
    assert [i.event_id for i in box.after(0)] == ["hall-1", "hall-2", "yard-2", "yard-3"]
    assert len(box) == 4
    box.close()


def test_survives_reopen_and_new_rows_sort_after_old(tmp_path):
    box = Outbox(tmp_path)
    for seq in range(1, 4):
        put(box, "hall", seq)
    box.remove([box.after(0)[0].rowid])
    box.close()
    box = Outbox(tmp_path)
    put(box, "hall", 4)
    assert [i.seq for i in box.after(0)] == [2, 3, 4]
    assert len(box) == 3
    box.close()


def test_survives_sigkill_of_the_writer(tmp_path):
    """A process that stored events and was SIGKILLed right after: nothing is lost (fsync=normal)."""
    code = textwrap.dedent(f"""
        import os, signal
        from daemon.sinks.outbox import Outbox
        box = Outbox({str(tmp_path)!r}, fsync="normal")
        for seq in range(1, 201):
            box.put(event_id=f"e{{seq}}", camera="hall", seq=seq, payload=b"{{}}")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    box = Outbox(tmp_path)  # the dead process's lock is gone with it
    assert [i.seq for i in box.after(0, limit=1000)] == list(range(1, 201))
    box.close()


def test_max_events_drops_oldest_counts_and_logs(tmp_path, caplog):
    m = Metrics()
    box = Outbox(tmp_path, max_events=10, metrics=m)
    with caplog.at_level(logging.WARNING, logger="daemon.sinks.outbox"):
        for seq in range(1, 16):
            put(box, "hall", seq)
        box.close()  # flushes the rate-limited drop summary
    assert m.registry.get_sample_value("regionwatch_outbox_dropped_total", {"reason": "max_events"}) == 5
    text = caplog.text
    assert "max_events=10" in text and "hall seq 1" in text and "hall seq 2-5" in text
    box = Outbox(tmp_path, max_events=10, metrics=m)
    assert [i.seq for i in box.after(0)] == list(range(6, 16))
    assert m.registry.get_sample_value("regionwatch_outbox_events") == 10
    box.close()


def test_max_age_drops_old_events(tmp_path, caplog):
    now = [1000.0]
    m = Metrics()
    box = Outbox(tmp_path, max_age_s=60, metrics=m, clock=lambda: now[0])
    put(box, "hall", 1)
    put(box, "yard", 7)
    now[0] += 30
    put(box, "hall", 2)
    now[0] += 31  # the first two are now 61 s old
    with caplog.at_level(logging.WARNING, logger="daemon.sinks.outbox"):
        assert box.prune() == 2
    assert [i.seq for i in box.after(0)] == [2]
    assert m.registry.get_sample_value("regionwatch_outbox_dropped_total", {"reason": "max_age"}) == 2
    assert m.registry.get_sample_value("regionwatch_outbox_events") == 1
    assert "max_age_s=60" in caplog.text and "hall seq 1, yard seq 7" in caplog.text
    box.close()


def test_expired_events_are_dropped_on_open(tmp_path):
    box = Outbox(tmp_path, max_age_s=3600, clock=lambda: 0.0)
    put(box, "hall", 1)
    box.close()
    box = Outbox(tmp_path, max_age_s=3600, clock=lambda: 7200.0)
    assert len(box) == 0
    box.close()


@pytest.mark.parametrize(("policy", "synchronous"), [("full", 2), ("normal", 1), ("off", 0)])
def test_fsync_policy_maps_to_sqlite_synchronous_in_wal_mode(tmp_path, policy, synchronous):
    box = Outbox(tmp_path, fsync=policy)
    assert box._db.execute("PRAGMA synchronous").fetchone()[0] == synchronous
    assert box._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    box.close()
    with pytest.raises(ValueError, match="fsync"):
        Outbox(tmp_path, fsync="sometimes")


def test_one_process_per_state_dir(tmp_path):
    box = Outbox(tmp_path)
    with pytest.raises(OutboxLockedError, match="in use by another regionwatch process"):
        Outbox(tmp_path)
    box.close()
    Outbox(tmp_path).close()  # released on close


def test_database_is_plain_sqlite_for_inspection(tmp_path):
    """Operators can inspect pending events with the sqlite3 CLI while the daemon runs."""
    box = Outbox(tmp_path)
    put(box, "hall", 1)
    with sqlite3.connect(tmp_path / "outbox.sqlite3") as db:
        assert db.execute("SELECT camera, seq, event_id FROM outbox").fetchall() == [("hall", 1, "hall-1")]
    box.close()
    with pytest.raises(RuntimeError, match="closed"):
        put(box, "hall", 2)
