"""sd_notify over a real AF_UNIX datagram socket, and the unit file under systemd-analyze."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from daemon.ops.systemd import SystemdNotifier

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "regionwatch.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def notify_socket(tmp_path):
    """A bound datagram socket standing in for systemd's; yields (path, receive())."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)

    def receive() -> list[str]:
        return sock.recv(4096).decode().split("\n")

    def pending() -> bool:
        sock.setblocking(False)
        try:
            sock.recv(4096)
            return True
        except BlockingIOError:
            return False
        finally:
            sock.settimeout(2)

    receive.pending = pending
    yield str(path), receive
    sock.close()


def test_ready_then_rate_limited_watchdog(notify_socket):
    path, receive = notify_socket
    clock = Clock()
    n = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}, clock=clock)
    assert n.enabled and n.watchdog_interval_s == 2.0

    assert n.ready("models loaded")
    assert receive() == ["READY=1", "STATUS=models loaded"]

    assert n.watchdog()
    assert receive() == ["WATCHDOG=1"]
    clock.t += 0.9  # less than half of WatchdogSec: no ping
    assert not n.watchdog()
    assert not receive.pending()
    clock.t += 0.1
    assert n.watchdog()
    assert receive() == ["WATCHDOG=1"]
    assert n.watchdog(force=True)
    assert receive() == ["WATCHDOG=1"]

    assert n.status("2/2 cameras\nstreaming")  # one line only
    assert receive() == ["STATUS=2/2 cameras streaming"]
    assert n.extend_timeout(90)
    assert receive() == ["EXTEND_TIMEOUT_USEC=90000000"]
    assert n.stopping()
    assert receive() == ["STOPPING=1"]
    n.close()


def test_reloading_carries_the_monotonic_time_and_ready_ends_it(notify_socket):
    path, receive = notify_socket
    n = SystemdNotifier({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading("reloading the configuration")
    lines = receive()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert lines[0] == "RELOADING=1" and lines[2] == "STATUS=reloading the configuration"
    key, _, usec = lines[1].partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after  # systemd pairs it with the READY=1 below
    assert n.ready("1/1 cameras streaming")
    assert receive() == ["READY=1", "STATUS=1/1 cameras streaming"]


def test_from_process_environment(notify_socket, monkeypatch):
    path, receive = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = SystemdNotifier()
    assert n.ready() and receive() == ["READY=1"]
    assert n.watchdog() and receive() == ["WATCHDOG=1"]


def test_abstract_namespace_socket():
    name = f"regionwatch-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        n = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert sock.recv(1024) == b"READY=1"


def test_watchdog_for_another_pid_or_without_usec_is_off(notify_socket):
    path, receive = notify_socket
    other = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval_s is None and not other.watchdog()
    plain = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert not plain.watchdog()
    assert not receive.pending()


def test_noop_outside_systemd_and_never_raises(tmp_path):
    n = SystemdNotifier({})
    assert not n.enabled
    assert (n.ready(), n.status("x"), n.watchdog(), n.stopping()) == (False, False, False, False)
    gone = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "missing.sock"), "WATCHDOG_USEC": "1000000"})
    assert gone.enabled
    assert gone.ready() is False  # ENOENT: logged once, not raised
    assert gone.watchdog() is False
    assert SystemdNotifier({"NOTIFY_SOCKET": "relative/path"}).enabled is False


# -- the unit file -------------------------------------------------------------------------

def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def test_unit_declares_what_operations_rely_on():
    u = unit_settings()
    one = {k: v[-1] for k, v in u.items()}
    assert one["Service.Type"] == "notify"
    assert one["Service.ExecStart"] == "/opt/regionwatch/.venv/bin/regionwatch run --config /etc/regionwatch/config.toml"
    assert int(one["Service.WatchdogSec"]) >= 10
    assert one["Service.Restart"] == "on-failure"
    assert one["Service.ExecReload"] == "/bin/kill -HUP $MAINPID"  # systemctl reload: SIGHUP re-reads the config
    assert int(one["Unit.StartLimitBurst"]) > 0 and int(one["Unit.StartLimitIntervalSec"]) > 0
    assert one["Service.DynamicUser"] == "yes"
    assert set(one["Service.SupplementaryGroups"].split()) >= {"video", "render"}
    assert one["Service.StateDirectory"] == "regionwatch"
    assert one["Service.LoadCredential"].startswith("mqtt-password:")
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "NoNewPrivileges": "yes", "DevicePolicy": "closed"}.items():
        assert one[f"Service.{key}"] == value, key
    assert set(one["Service.RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    allowed = " ".join(u["Service.DeviceAllow"])
    assert "char-nvidia*" in allowed and "char-drm" in allowed  # the GPU device nodes stay reachable
    assert "Service.PrivateDevices" not in u and "Service.MemoryDenyWriteExecute" not in u


@pytest.fixture
def verifiable_unit(tmp_path) -> Path:
    """The unit with ExecStart pointing at a stand-in executable (verify checks it exists)."""
    if not SYSTEMD_ANALYZE:
        pytest.skip("systemd-analyze not installed (Debian: apt-get install systemd)")
    stand_in = tmp_path / "opt" / "regionwatch" / ".venv" / "bin" / "regionwatch"
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    text = UNIT.read_text()
    assert "/opt/regionwatch/.venv/bin/regionwatch" in text
    unit = tmp_path / "regionwatch.service"
    unit.write_text(text.replace("/opt/regionwatch/.venv/bin/regionwatch", str(stand_in)))
    return unit


def test_unit_passes_systemd_analyze_verify(verifiable_unit):
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(verifiable_unit)],
                       capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys or unparsable values; it only warns: so no output at all.
    assert r.returncode == 0, r.stderr
    unit_lines = [line for line in (r.stdout + r.stderr).splitlines() if "regionwatch" in line]
    assert unit_lines == [], "\n".join(unit_lines)


def test_the_verify_check_catches_mistakes(verifiable_unit):
    bad = verifiable_unit.with_name("bad.service")
    bad.write_text(verifiable_unit.read_text().replace("WatchdogSec=30", "WatchdogSec=thirty\nRestartSecs=5"))
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(bad)], capture_output=True, text=True, timeout=60)
    assert "Failed to parse" in r.stderr and "Unknown key" in r.stderr


def test_unit_sandbox_exposure_is_low(verifiable_unit):
    r = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(verifiable_unit)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout + r.stderr)
    if m is None:
        pytest.skip(f"systemd-analyze security --offline unsupported here: {r.stderr.strip()[:200]}")
    assert float(m.group(1)) <= 2.5, r.stdout  # "OK" band; 10 = no sandboxing at all
