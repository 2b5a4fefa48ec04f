"""The live preview: routes on a real listener fed with real frames, then the real daemon in Chromium.

* In-process: a :class:`~daemon.ops.httpd.OpsServer` on loopback with the preview mounted, fed with
  the sample footage's frames by a thread (as a pipeline would): latest.jpg, the index page, the
  MJPEG stream (parsed part by part, each part decoded with OpenCV), the rate cap, the client limit.
* End to end: ``python -m daemon run`` with ``[preview] enabled = true`` on the footage paced in
  real time (``realtime = true``), the page fetched by Debian's headless Chromium and the
  screenshot checked (not blank, the region's red present), the MJPEG stream read with urllib.

Needs ../shared/assets (footage and model) and ``/usr/bin/chromium`` (``scripts/setup --test``
installs it); the tests that need them skip with a clear message otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import av
import cv2
import numpy as np
import pytest

from daemon.config import CameraConfig, PreviewConfig, RegionConfig, Settings
from daemon.draw import REGION_COLOR
from daemon.ops.httpd import OpsServer
from daemon.ops.metrics import Metrics
from daemon.ops.preview import BOUNDARY, Preview, attach_preview
from daemon.records import Frame

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
POLYGON = [[360, 330], [560, 330], [560, 412], [360, 412]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, method: str = "GET", timeout: float = 10.0) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class MjpegReader:
    """Reads a multipart/x-mixed-replace stream part by part (urllib, no helpers)."""

    def __init__(self, url: str, timeout: float = 15.0):
        self.resp = urllib.request.urlopen(url, timeout=timeout)
        ctype = self.resp.headers["Content-Type"]
        assert ctype.startswith("multipart/x-mixed-replace"), ctype
        self.boundary = ctype.split("boundary=", 1)[1].strip().encode()

    def next_jpeg(self) -> bytes:
        line = self.resp.readline()
        while line in (b"\r\n", b"\n"):
            line = self.resp.readline()
        assert line.rstrip(b"\r\n") == b"--" + self.boundary, line
        headers = {}
        while (line := self.resp.readline().rstrip(b"\r\n")):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        assert headers["content-type"] == "image/jpeg"
        data = self.resp.read(int(headers["content-length"]))
        assert self.resp.read(2) == b"\r\n"
        return data

    def close(self) -> None:
        self.resp.close()


def decode_jpeg(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, "not a JPEG"
    return img


def region_inside(shape) -> np.ndarray:
    m = np.zeros(shape[:2], np.uint8)
    cv2.fillPoly(m, [np.array(POLYGON, np.int32)], 1)
    return cv2.erode(m, np.ones((9, 9), np.uint8)).astype(bool)


def red_pixels(img: np.ndarray, tol: int = 45) -> int:
    return int((np.abs(img.astype(int) - np.array(REGION_COLOR)).max(axis=-1) <= tol).sum())


# -- in process -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def frames(footage) -> list[np.ndarray]:
    with av.open(str(footage)) as c:
        out = []
        for f in c.decode(video=0):
            out.append(f.to_ndarray(format="bgr24"))
            if len(out) == 40:
                return out
    return out


@contextlib.contextmanager
def serving(frames, cameras, config: PreviewConfig, max_clients: int):
    """A listener with the preview mounted, its first camera fed with the footage's frames."""
    srv = OpsServer("127.0.0.1:0", metrics=Metrics())
    preview = Preview(config, cameras, max_clients=max_clients)
    preview.mount(srv)
    srv.start()
    stop = threading.Event()
    cam = cameras[0].id

    def feed():  # what the pipeline thread does: call the observer for every frame, 25 per second
        i = 0
        while not stop.wait(0.04):
            preview.observer(cam)(Frame(cam, i, i / 25, time.time(), frames[i % len(frames)]), None, [])
            i += 1

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        yield srv, preview
    finally:
        stop.set()
        feeder.join(5)
        srv.stop()


@pytest.fixture
def served(frames, footage):
    hall = CameraConfig(id="hall", url=str(footage), regions=[RegionConfig(id="table", polygon=POLYGON)])
    door = CameraConfig(id="door", url="rtsp://192.0.2.10/stream1")  # never sends a frame
    with serving(frames, [hall, door], PreviewConfig(enabled=True, max_fps=5.0, jpeg_quality=80), 2) as sp:
        yield sp


def wait_until(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_latest_jpg_is_the_annotated_newest_frame(served, frames):
    srv, preview = served
    assert wait_until(lambda: preview.cameras["hall"].latest_index is not None)
    status, headers, body = get(f"{srv.url}/cameras/hall/latest.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert headers["Cache-Control"] == "no-store" and headers["X-Content-Type-Options"] == "nosniff"
    img = decode_jpeg(body)
    raw = frames[int(headers["X-Frame-Index"]) % len(frames)]
    assert img.shape == raw.shape == (432, 768, 3)
    inside = region_inside(img.shape)
    diff = img.astype(int) - raw.astype(int)
    assert diff[inside][:, 2].mean() > 12 and diff[inside][:, 1].mean() < -3  # the region tinted red
    assert red_pixels(img) > 300  # outline and count label


def test_unknown_camera_and_no_frame_yet(served):
    srv, _ = served
    status, _, body = get(f"{srv.url}/cameras/nope/latest.jpg")
    assert status == 404 and b'"door"' in body and b'"hall"' in body
    assert get(f"{srv.url}/cameras/nope/preview.mjpeg")[0] == 404
    status, _, body = get(f"{srv.url}/cameras/door/latest.jpg")
    assert status == 503 and b"no frame yet" in body


def test_index_lists_every_camera(served):
    srv, _ = served
    status, headers, body = get(f"{srv.url}/")
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    for cam in ("hall", "door"):
        assert f'href="cameras/{cam}/preview.mjpeg"' in page and f'src="cameras/{cam}/latest.jpg"' in page
    assert get(f"{srv.url}/metrics")[0] == 200  # the listener's own routes are still there


def test_mjpeg_parts_are_jpegs_at_the_capped_rate(served):
    srv, _ = served
    reader = MjpegReader(f"{srv.url}/cameras/hall/preview.mjpeg")
    try:
        assert reader.boundary == BOUNDARY.encode()
        t0 = time.monotonic()  # before the first part is sent
        imgs = [decode_jpeg(reader.next_jpeg()) for _ in range(6)]
        elapsed = time.monotonic() - t0
    finally:
        reader.close()
    assert all(img.shape == (432, 768, 3) for img in imgs)
    assert all(red_pixels(img) > 300 for img in imgs)
    # Frames arrive at 25/s (6 parts uncapped: 0.2 s); the stream sends at most max_fps = 5, so
    # 6 parts span 5 intervals: 1 s (less the head start of the first part, sent with the headers).
    assert elapsed >= 0.8, elapsed
    assert any(np.abs(a.astype(int) - b).mean() > 0.5 for a, b in zip(imgs, imgs[1:]))  # moving picture


def test_client_limit_and_slots_come_back(served):
    srv, preview = served
    url = f"{srv.url}/cameras/hall/preview.mjpeg"
    a, b = MjpegReader(url), MjpegReader(url)
    try:
        a.next_jpeg(), b.next_jpeg()
        assert preview.clients == 2
        status, _, body = get(url)
        assert status == 503 and b"too many preview clients" in body
        a.close()
        assert wait_until(lambda: preview.clients == 1, 5.0)  # the server notices on its next write
        c = MjpegReader(url)
        c.next_jpeg()
        c.close()
    finally:
        a.close()
        b.close()
    assert wait_until(lambda: preview.clients == 0, 5.0)
    assert get(url, method="HEAD")[0] == 200
    assert preview.clients == 0  # HEAD never starts a stream and never holds a slot


def test_streams_end_when_the_server_stops(served):
    srv, _ = served
    reader = MjpegReader(f"{srv.url}/cameras/hall/preview.mjpeg")
    reader.next_jpeg()
    t0 = time.monotonic()
    srv.stop()
    rest = reader.resp.read()  # returns at end of stream
    assert time.monotonic() - t0 < 5.0 and len(rest) < 2_000_000
    reader.close()


def test_attach_is_off_by_default_and_warns_when_it_cannot_or_should_not_serve(caplog, footage):
    cam = CameraConfig(id="hall", url=str(footage))
    pipe = SimpleNamespace(cam=cam, observers=[])
    assert PreviewConfig().enabled is False
    assert attach_preview(PreviewConfig(), OpsServer("127.0.0.1:0"), [pipe]) is None and pipe.observers == []
    with caplog.at_level(logging.WARNING, "daemon.ops.preview"):
        assert attach_preview(PreviewConfig(enabled=True), None, [pipe]) is None
        assert "[metrics] is disabled" in caplog.text
        caplog.clear()
        preview = attach_preview(PreviewConfig(enabled=True), OpsServer("0.0.0.0:0"), [pipe])
        assert preview is not None and pipe.observers == [preview.cameras["hall"]]
        assert "anyone who can connect sees the cameras" in caplog.text
        caplog.clear()
        attach_preview(PreviewConfig(enabled=True), OpsServer("127.0.0.1:0"), [SimpleNamespace(cam=cam, observers=[])])
        assert caplog.text == ""


def test_app_without_preview_serves_no_pictures(footage, yolo_model, tmp_path):
    from daemon.app import App

    s = Settings(
        detector={"model": str(yolo_model)},
        sinks={"stdout": {"enabled": False}},
        state={"dir": str(tmp_path / "state")},
        metrics={"listen": "127.0.0.1:0"},
        cameras=[{"id": "hall", "url": str(footage), "regions": [{"id": "table", "polygon": POLYGON}]}],
    )
    app = App(s)
    try:
        app.load()
        url = app.ops.server.url
        assert app.preview is None and app.pipelines[0].observers == []
        assert get(f"{url}/cameras/hall/latest.jpg")[0] == 404
        assert get(f"{url}/")[0] == 404
        assert get(f"{url}/metrics")[0] == 200
    finally:
        app.shutdown()


# -- the real daemon, seen through Chromium ---------------------------------------------------
def chromium_screenshot(url: str, out: Path, tmp: Path) -> np.ndarray:
    profile = tmp / f"chromium-profile-{out.stem}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
           f"--user-data-dir={profile}", f"--screenshot={out}", "--window-size=800,600", url]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                         env={**os.environ, "HOME": str(tmp)})
    try:
        log, _ = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"chromium did not finish a screenshot of {url} in 120 s")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0 and out.exists(), log.decode(errors="replace")[-2000:]
    img = cv2.imread(str(out), cv2.IMREAD_COLOR)
    assert img is not None and img.shape == (600, 800, 3)
    return img


@pytest.fixture
def daemon(tmp_path, footage, yolo_model):
    port = free_port()
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"""
[detector]
model = "{yolo_model}"
interval_s = 0.5
[sinks.stdout]
enabled = false
[sinks.jsonl]
path = "{tmp_path / 'events.jsonl'}"
[state]
dir = "{tmp_path / 'state'}"
[metrics]
listen = "127.0.0.1:{port}"
[preview]
enabled = true
max_fps = 4
[[cameras]]
id = "hall"
url = "{footage}"
realtime = true
[[cameras.regions]]
id = "table"
polygon = {POLYGON}
""")
    errlog = open(tmp_path / "daemon.stderr", "w+")
    p = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(cfg)], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=errlog)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and p.poll() is None:
            try:
                if get(f"{url}/cameras/hall/latest.jpg", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        else:
            errlog.seek(0)
            pytest.fail(f"no preview frame from the daemon: {errlog.read()[-3000:]}")
        yield SimpleNamespace(url=url, process=p, tmp=tmp_path, errlog=errlog)
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        errlog.close()


def test_daemon_preview_in_headless_chromium(daemon, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (scripts/setup --test installs Debian's chromium)")
    shot = chromium_screenshot(f"{daemon.url}/cameras/hall/latest.jpg", tmp_path / "latest.png", tmp_path)
    assert shot.std() > 25, "blank screenshot"
    assert red_pixels(shot) > 300, "no region drawn in the screenshot"
    page = chromium_screenshot(f"{daemon.url}/", tmp_path / "index.png", tmp_path)
    assert page.std() > 25 and red_pixels(page) > 200  # the index page shows the annotated frame
    assert (page[:40] < 40).all(axis=-1).mean() > 0.8  # on its dark background

    reader = MjpegReader(f"{daemon.url}/cameras/hall/preview.mjpeg")
    try:
        imgs = [decode_jpeg(reader.next_jpeg()) for _ in range(4)]
    finally:
        reader.close()
    assert all(img.shape == (432, 768, 3) and red_pixels(img) > 300 for img in imgs)

    p = daemon.process
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 0
    daemon.errlog.seek(0)
    err = daemon.errlog.read()
    assert "live preview enabled" in err and "Traceback" not in err


def test_clients_that_stop_reading_do_not_lock_out_viewers(frames, footage):
    """Probe: 8 non-reading MJPEG clients used to hold every slot (and a server thread each) forever."""
    hall = CameraConfig(id="hall", url=str(footage), regions=[RegionConfig(id="table", polygon=POLYGON)])
    with serving(frames, [hall], PreviewConfig(enabled=True, max_fps=30.0), 8) as (srv, preview):
        url = f"{srv.url}/cameras/hall/preview.mjpeg"
        hogs = []
        try:
            for _ in range(8):  # take every slot, read the response headers, then never read again
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.connect(("127.0.0.1", srv.port))
                s.sendall(b"GET /cameras/hall/preview.mjpeg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert s.recv(64).startswith(b"HTTP/1.1 200")
                hogs.append(s)
            assert wait_until(lambda: preview.clients == 8)
            t0 = time.monotonic()
            reader = None
            while reader is None and time.monotonic() - t0 < 60:
                assert get(f"{srv.url}/metrics")[0] == 200  # never starved by the streams
                try:
                    reader = MjpegReader(url)
                except urllib.error.HTTPError as e:
                    assert e.code == 503
                    time.sleep(0.5)
            assert reader is not None, "a viewer stayed locked out by clients that do not read"
            waited = time.monotonic() - t0
            imgs = [decode_jpeg(reader.next_jpeg()) for _ in range(3)]
            assert all(img.shape == (432, 768, 3) for img in imgs)
            reader.close()
            print(f"\na new viewer got a slot {waited:.1f} s after 8 non-reading clients took them all")
        finally:
            for s in hogs:
                s.close()
