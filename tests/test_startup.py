"""``regionwatch run`` refuses, before any model loads, what cannot work on this machine: every
problem is a ``section.key: problem`` line and exit 2, never a traceback after the model load.

To prove "before the model loads", these runs point ``detector.model`` at a file that is not a
model: had the daemon got as far as loading it, it would have exited 1 ("cannot load").
"""

from __future__ import annotations

import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from helpers.smallfs import mount_small_fs

CONFIG = """
[detector]
model = "{model}"
[sinks.jsonl]
path = "{jsonl}"
[sinks.stdout]
enabled = false
[state]
dir = "{state}"
[metrics]
listen = "{listen}"
[[cameras]]
id = "hall"
url = "{footage}"
realtime = true
"""


def write_config(tmp: Path, footage: Path, model: Path, **kw) -> Path:
    values = {"jsonl": tmp / "events.jsonl", "state": tmp / "state", "listen": "127.0.0.1:0", **kw}
    cfg = tmp / "config.toml"
    cfg.write_text(textwrap.dedent(CONFIG.format(model=model, footage=footage, **values)))
    return cfg


def run(regionwatch_bin: Path, cfg: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(regionwatch_bin), "run", "--config", str(cfg)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def not_a_model(tmp_path) -> Path:
    bad = tmp_path / "not-a-model.onnx"
    bad.write_bytes(b"garbage")
    return bad


def test_state_dir_that_is_a_file(tmp_path, footage, not_a_model, regionwatch_bin):
    (tmp_path / "state").write_text("oops")
    r = run(regionwatch_bin, write_config(tmp_path, footage, not_a_model))
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [f"state.dir: {tmp_path / 'state'} is a file, not a folder"]


def test_read_only_state_dir(tmp_path, footage, not_a_model, regionwatch_bin):
    import helpers.smallfs as smallfs

    fs = mount_small_fs(tmp_path / "state")
    if fs is None:
        pytest.skip(f"cannot mount a tmpfs to make read-only ({smallfs.last_error})")
    try:
        r0 = subprocess.run(["mount", "-o", "remount,ro", str(fs.path)], capture_output=True, text=True)
        if r0.returncode:
            pytest.skip(f"cannot remount read-only: {r0.stderr.strip()}")
        r = run(regionwatch_bin, write_config(tmp_path, footage, not_a_model))
    finally:
        fs.unmount()
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [f"state.dir: {fs.path} is not writable: Read-only file system"]


def test_jsonl_path_that_is_a_folder_and_a_taken_port(tmp_path, footage, not_a_model, regionwatch_bin):
    (tmp_path / "events.jsonl").mkdir()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = run(regionwatch_bin, write_config(tmp_path, footage, not_a_model, listen=f"127.0.0.1:{port}"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [
        f"sinks.jsonl.path: {tmp_path / 'events.jsonl'} is a folder, not a file",
        f"metrics.listen: cannot listen on 127.0.0.1:{port}: Address already in use",
    ]


def test_port_out_of_range_is_a_config_error(tmp_path, footage, not_a_model, regionwatch_bin):
    r = run(regionwatch_bin, write_config(tmp_path, footage, not_a_model, listen="127.0.0.1:99999"))
    assert r.returncode == 2 and r.stderr.splitlines() == ["metrics.listen: port out of range in '127.0.0.1:99999'"]


@pytest.mark.slow
def test_two_daemons_on_one_state_dir(tmp_path, footage, yolo_model, regionwatch_bin):
    """Probe 4: with MQTT off nothing locked the folder, and two daemons interleaved their seq."""
    cfg = write_config(tmp_path, footage, yolo_model)
    first = subprocess.Popen([str(regionwatch_bin), "run", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / "state" / "state.lock"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            time.sleep(0.1)
        assert lock.read_text().strip() == str(first.pid)
        t0 = time.monotonic()
        second = run(regionwatch_bin, cfg)
        assert second.returncode == 2, second.stderr
        assert second.stderr.splitlines() == [
            f"state.dir: {tmp_path / 'state'} is in use by another regionwatch process (pid {first.pid}); "
            "one daemon per state folder"
        ]
        assert time.monotonic() - t0 < 30  # refused before loading anything
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err[-2000:]
    assert "ERROR" not in err  # the second daemon disturbed nothing of the first one's
