"""daemon/ops/signals.py with real signals sent to this process: SIGHUP reloads in a thread of its
own, one reload at a time, coalesced, and a stop signal is handled meanwhile."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from daemon.ops.signals import SignalHandling


def test_sighup_reloads_one_at_a_time_and_a_stop_is_handled_meanwhile(caplog):
    caplog.set_level(logging.INFO, "regionwatch")
    began, release, stopped = threading.Event(), threading.Event(), threading.Event()
    runs: list[str] = []

    def reload() -> None:
        runs.append(threading.current_thread().name)
        began.set()
        assert release.wait(10)

    sigs = SignalHandling(on_stop=stopped.set, on_reload=reload)
    sigs.install()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        assert began.wait(5)
        began.clear()
        for _ in range(3):  # while the first reload runs: they make one more reload, not three
            os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)  # not held up by the reload
        assert stopped.wait(5) and sigs.exit_code == 0
        assert runs == ["reload"]
        release.set()
        assert began.wait(5)
        time.sleep(0.3)
        assert runs == ["reload", "reload"]
        os.kill(os.getpid(), signal.SIGHUP)  # after a stop signal: ignored
        time.sleep(0.3)
        assert runs == ["reload", "reload"]
    finally:
        release.set()
        sigs.uninstall()
    assert caplog.text.count("received SIGHUP: reloading the configuration") == 4
    assert "received SIGHUP: ignored (stopping)" in caplog.text


def test_a_failing_reload_is_logged_and_the_next_one_still_runs(caplog):
    done = threading.Event()
    calls: list[int] = []

    def reload() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("boom")
        done.set()

    sigs = SignalHandling(on_stop=lambda: None, on_reload=reload)
    sigs.install()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "configuration reload failed" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGHUP)
        assert done.wait(5)
    finally:
        sigs.uninstall()
    assert "configuration reload failed; the daemon keeps running" in caplog.text and "ValueError: boom" in caplog.text


def test_without_a_reload_callback_sighup_is_only_logged(caplog):
    sigs = SignalHandling(on_stop=lambda: None)
    sigs.handle(signal.SIGHUP)
    assert "received SIGHUP: ignored (this command does not reload its configuration)" in caplog.text
    assert sigs.exit_code is None
