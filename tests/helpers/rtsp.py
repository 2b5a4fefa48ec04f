"""Start, kill, hang and resume the GStreamer RTSP test server (``tests/rtsp_server.py``).

The server runs under the SYSTEM python (``/usr/bin/python3``), which has python3-gi and the
GstRtspServer typelib; the project's virtualenv does not. It binds 127.0.0.1 only.

Example (not run here: it starts a process)::

    with RtspServer(FOOTAGE, speed=4) as srv:
        url = srv.url()                  # rtsp://127.0.0.1:<port>/cam
        srv.pause(); srv.resume()        # SIGSTOP / SIGCONT: a hung server
        srv.kill(); srv.start()          # killed, then back on the same port
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

SYSTEM_PYTHON = "/usr/bin/python3"
SERVER_SCRIPT = Path(__file__).resolve().parents[1] / "rtsp_server.py"


def rtsp_server_unavailable() -> str | None:
    """Why the RTSP test server cannot run here, or None if it can."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} not found (the RTSP test server needs the system python with python3-gi)"
    probe = (
        "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
        "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
        "assert Gst.ElementFactory.find('rtph264pay') and Gst.ElementFactory.find('qtdemux')"
    )
    r = subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, text=True, timeout=60)
    if r.returncode:
        return (
            "GStreamer RTSP server not usable with the system python (install python3-gi, "
            "gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-good and -bad): "
            + (r.stderr.strip().splitlines() or ["?"])[-1]
        )
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RtspServer:
    """One ``tests/rtsp_server.py`` process serving ``file`` on ``rtsp://127.0.0.1:<port><mount>``."""

    def __init__(
        self,
        file: str | os.PathLike[str],
        *,
        port: int = 0,
        mount: str = "/cam",
        speed: float = 1.0,
        user: str = "",
        password: str = "",
        defer_mount: bool = False,
    ):
        self.file = str(file)
        self.port = port
        self.mount = mount
        self.speed = speed
        self.user = user
        self.password = password
        self.defer_mount = defer_mount
        self.proc: subprocess.Popen | None = None
        self._stderr = None

    def start(self, timeout: float = 15.0) -> RtspServer:
        """Start (or restart, on the same port) and wait until it listens."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        cmd = [SYSTEM_PYTHON, str(SERVER_SCRIPT), "--file", self.file, "--port", str(self.port)]
        cmd += ["--mount", self.mount, "--speed", str(self.speed)]
        if self.user:
            cmd += ["--user", self.user, "--password", self.password]
        if self.defer_mount:
            cmd += ["--defer-mount"]
        deadline = time.monotonic() + timeout
        while True:  # a just-killed server's port can take a moment to be bindable again
            # stderr goes to a file, not a pipe: nobody reads it while the server runs, and a full
            # pipe would hang the server mid-test.
            self._stderr = tempfile.TemporaryFile("w+")
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
            line = self._read_line(deadline)
            if line.startswith("READY "):
                self.port = int(line.split()[1].rsplit(":", 1)[1].split("/", 1)[0])
                return self
            err = self._reap()
            if time.monotonic() > deadline or "cannot listen" not in err:
                raise RuntimeError(f"RTSP test server did not start: {line!r} {err[-2000:]}")
            time.sleep(0.2)

    def _read_line(self, deadline: float) -> str:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            while time.monotonic() < deadline:
                if sel.select(timeout=0.1):
                    return self.proc.stdout.readline().strip()
                if self.proc.poll() is not None:
                    return ""
            return ""
        finally:
            sel.close()

    def _reap(self) -> str:
        if self.proc is None:
            return ""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)
        err = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            err = self._stderr.read()
            self._stderr.close()
            self._stderr = None
        return err

    def url(self, user: str | None = None, password: str | None = None, mount: str | None = None) -> str:
        """The stream URL (with percent-encoded credentials when given)."""
        auth = f"{quote(user, safe='')}:{quote(password or '', safe='')}@" if user else ""
        return f"rtsp://{auth}127.0.0.1:{self.port}{mount or self.mount}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-stream (the kernel resets its connections)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a paused process must be able to die
            self.proc.kill()
        self._reap()

    def pause(self) -> None:
        """SIGSTOP: the server hangs with its connections open."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def add_mount(self) -> None:
        """With ``defer_mount``: the mount appears (until then clients get 404)."""
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._read_line(deadline).startswith("MOUNTED"):
                return
        raise RuntimeError("RTSP test server did not confirm the mount")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self._reap()
        self.proc = None

    def __enter__(self) -> RtspServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
