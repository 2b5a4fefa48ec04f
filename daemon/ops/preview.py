"""Live preview over HTTP: the annotated stream of each camera, on the metrics listener.

Off by default (``[preview] enabled = true`` turns it on). Routes, added to the
:class:`~daemon.ops.httpd.OpsServer` that serves ``/metrics``:

* ``/`` — a tiny index page listing the cameras, each with its live preview.
* ``/cameras/{id}/latest.jpg`` — the newest frame, annotated (503 until the first frame).
* ``/cameras/{id}/preview.mjpeg`` — ``multipart/x-mixed-replace`` MJPEG of the annotated stream,
  at most ``[preview] max_fps`` frames per second per client (at most ``max_clients`` streams).
  A client that stops reading cannot keep its slot: when the slots are full, streams whose
  client has not taken a part for ``STALL_S`` are closed to make room (and the listener closes
  any connection whose response has not moved for its write timeout).

The pipeline hot path only records a reference to the newest frame and its
:class:`~daemon.draw.Scene` (a few microseconds); drawing and JPEG encoding happen in the HTTP
threads, only when someone looks, once per frame however many clients watch.

Anyone who can reach the listener sees the camera images: it binds to loopback by default;
expose it only behind an authenticating reverse proxy.

Example:
    >>> import urllib.request
    >>> import numpy as np
    >>> from daemon.config import CameraConfig, PreviewConfig
    >>> from daemon.ops.httpd import OpsServer
    >>> from daemon.records import Frame
    >>> cam = CameraConfig(id="hall", url="rtsp://cam/1")
    >>> srv = OpsServer("127.0.0.1:0")
    >>> preview = Preview(PreviewConfig(enabled=True), [cam]); preview.mount(srv); srv.start()
    >>> preview.observer("hall")(Frame("hall", 0, 0.0, 0.0, np.zeros((48, 64, 3), np.uint8)), None, [])
    >>> urllib.request.urlopen(f"{srv.url}/cameras/hall/latest.jpg").read()[:2]
    b'\\xff\\xd8'
    >>> srv.stop()
"""

from __future__ import annotations

import html
import ipaddress
import logging
import threading
import time
from collections.abc import Sequence

from daemon.config import CameraConfig, PreviewConfig
from daemon.draw import Scene, SceneAnnotator, SceneBuilder, encode_jpeg
from daemon.events import RegionTransition
from daemon.ops.httpd import OpsServer, Request, Response
from daemon.records import Frame, TrackUpdate

log = logging.getLogger(__name__)

BOUNDARY = "regionwatch-frame"
KEEPALIVE_S = 2.0
"""With no new frame (a stalled camera), the last one is re-sent this often: it shows the
client the stream is alive and frees the slot of a client that went away."""
STALL_S = 3.0
"""A stream whose client has not taken its last part for this long is stalled: its slot goes to
the next viewer who needs one."""

_SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


class CameraPreview:
    """One camera's newest frame and scene; renders the annotated JPEG on demand (cached per frame).

    It is the pipeline observer for its camera: call it with (frame, update or None, transitions).
    """

    def __init__(self, cam: CameraConfig, jpeg_quality: int = 75):
        self.camera = cam.id
        self.jpeg_quality = jpeg_quality
        self._builder = SceneBuilder(cam.regions)
        self._annotator = SceneAnnotator(cam.regions)
        self._latest: tuple[Frame, Scene] | None = None
        self._cond = threading.Condition()
        self._render_lock = threading.Lock()
        self._rendered: tuple[int, bytes] | None = None

    def __call__(self, frame: Frame, update: TrackUpdate | None, transitions: list[RegionTransition]) -> None:
        scene = self._builder.observe(frame, update, transitions)
        with self._cond:
            self._latest = (frame, scene)
            self._cond.notify_all()

    @property
    def latest_index(self) -> int | None:
        latest = self._latest
        return None if latest is None else latest[0].index

    def wait_newer(self, index: int | None, timeout: float) -> bool:
        """Wait until a frame newer than ``index`` arrived; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._latest is not None and self._latest[0].index != index, timeout)

    def jpeg(self) -> tuple[int, bytes] | None:
        """(frame index, annotated JPEG) of the newest frame, or None before the first frame."""
        latest = self._latest
        if latest is None:
            return None
        frame, scene = latest
        with self._render_lock:
            if self._rendered is None or self._rendered[0] != frame.index:
                image = self._annotator.annotate(frame.image, scene)
                self._rendered = (frame.index, encode_jpeg(image, self.jpeg_quality))
            return self._rendered


class _MjpegStream:
    """The body of one MJPEG response: an iterator of multipart chunks, capped at ``max_fps``.

    ``close()`` (called by the server when the client leaves or the server stops) frees the
    client slot, even when iteration never began (HEAD). :meth:`evict` also closes the connection.
    """

    def __init__(self, cam: CameraPreview, max_fps: float, stopping: threading.Event, release, abort=lambda: None):
        self.cam = cam
        self.period = 1.0 / max_fps
        self.stopping = stopping
        self._release = release
        self._abort = abort
        self._last_index: int | None = None
        self._last_sent = float("-inf")
        self._handed_over = time.monotonic()  # when the server last got a part (or the headers)
        self._producing = False
        self._closed = False

    def __iter__(self) -> _MjpegStream:
        return self

    @property
    def stalled(self) -> bool:
        """The server has not come back for the next part for ``STALL_S``: it is stuck writing to a
        client that does not read."""
        return not self._producing and time.monotonic() - self._handed_over > STALL_S

    def __next__(self) -> bytes:
        self._producing = True
        try:
            while not (self._closed or self.stopping.is_set()):
                wait = self._last_sent + self.period - time.monotonic()
                if wait > 0 and self.stopping.wait(wait):
                    break
                # Short waits, so a stopping server is noticed at once; re-send after KEEPALIVE_S.
                fresh = self.cam.wait_newer(self._last_index, timeout=0.25)
                if not fresh and (self._last_index is None or time.monotonic() - self._last_sent < KEEPALIVE_S):
                    continue
                item = self.cam.jpeg()
                if item is None:
                    continue
                self._last_index, jpeg = item
                self._last_sent = time.monotonic()
                head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode()
                return head + jpeg + b"\r\n"
            self.close()
            raise StopIteration
        finally:
            self._producing = False
            self._handed_over = time.monotonic()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release(self)

    def evict(self) -> None:
        """Free the slot and close the connection (its client stopped reading)."""
        self.close()
        self._abort()


class Preview:
    """The preview routes for a set of cameras.

    Args:
        config: the ``[preview]`` section (``max_fps``, ``jpeg_quality``).
        cameras: the cameras to show (each one's regions are drawn).
        max_clients: concurrent MJPEG streams allowed in all; more get 503.
    """

    def __init__(self, config: PreviewConfig, cameras: Sequence[CameraConfig], *, max_clients: int = 8):
        self.config = config
        self.cameras = {c.id: CameraPreview(c, config.jpeg_quality) for c in cameras}
        self.max_clients = max_clients
        self._streams: set[_MjpegStream] = set()
        self._lock = threading.Lock()

    def observer(self, camera: str) -> CameraPreview:
        """The pipeline observer of ``camera``."""
        return self.cameras[camera]

    def watch(self, cam: CameraConfig) -> CameraPreview:
        """Show ``cam`` (a camera started by a configuration reload, or restarted with new regions);
        returns its pipeline observer."""
        preview = CameraPreview(cam, self.config.jpeg_quality)
        self.cameras = {**self.cameras, cam.id: preview}  # a new dict: HTTP threads iterate the old one
        return preview

    def forget(self, camera: str) -> None:
        """Stop showing ``camera`` (stopped by a configuration reload): its pages answer 404."""
        self.cameras = {c: p for c, p in self.cameras.items() if c != camera}

    def mount(self, server: OpsServer) -> None:
        server.reserve_threads(self.max_clients)  # streams never take the threads /metrics needs
        server.add_route("/", self.index)
        server.add_route("/cameras/{camera}/latest.jpg", self.latest)
        server.add_route("/cameras/{camera}/preview.mjpeg", self.mjpeg)

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._streams)

    # -- handlers ---------------------------------------------------------------------------
    def index(self, req: Request) -> Response:
        items = []
        for cid in self.cameras:
            c = html.escape(cid)
            items.append(
                f'<li><h2>{c}</h2><a href="cameras/{c}/preview.mjpeg">'
                f'<img src="cameras/{c}/latest.jpg" alt="{c}, latest annotated frame"></a>'
                f'<p><a href="cameras/{c}/preview.mjpeg">live (MJPEG)</a> · '
                f'<a href="cameras/{c}/latest.jpg">latest.jpg</a></p></li>'
            )
        page = (
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>regionwatch preview</title>"
            "<style>body{font:14px sans-serif;margin:1em;background:#111;color:#ddd}a{color:#8cf}"
            "ul{list-style:none;padding:0}h2{margin:.3em 0;font-size:1.1em}img{max-width:100%;display:block}</style>"
            "</head><body><h1>regionwatch</h1><ul>" + "".join(items) + "</ul></body></html>"
        )
        headers = {**_SECURITY_HEADERS,
                   "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"}
        return Response(200, page.encode(), "text/html; charset=utf-8", headers)

    def _camera(self, req: Request) -> CameraPreview | Response:
        cam = self.cameras.get(req.params.get("camera", ""))
        if cam is None:
            return Response.json({"error": "unknown camera", "cameras": sorted(self.cameras)}, 404)
        return cam

    def latest(self, req: Request) -> Response:
        cam = self._camera(req)
        if isinstance(cam, Response):
            return cam
        item = cam.jpeg()
        if item is None:
            return Response.json({"error": "no frame yet"}, 503)
        index, jpeg = item
        return Response(200, jpeg, "image/jpeg", {**_SECURITY_HEADERS, "X-Frame-Index": str(index)})

    def mjpeg(self, req: Request) -> Response:
        cam = self._camera(req)
        if isinstance(cam, Response):
            return cam
        with self._lock:
            if len(self._streams) >= self.max_clients:
                stalled = [s for s in self._streams if s.stalled]
            else:
                stalled = []
        for s in stalled:  # outside the lock: evicting releases the slot
            log.info("preview: closing a %s stream whose client stopped reading, to make room", s.cam.camera)
            s.evict()
        with self._lock:
            if len(self._streams) >= self.max_clients:
                return Response.json({"error": f"too many preview clients (max {self.max_clients})"}, 503)
            stream = _MjpegStream(cam, self.config.max_fps, req.stopping, self._release, req.abort)
            self._streams.add(stream)
        headers = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
        return Response(200, stream, f"multipart/x-mixed-replace; boundary={BOUNDARY}", headers)

    def _release(self, stream: _MjpegStream) -> None:
        with self._lock:
            self._streams.discard(stream)


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def attach_preview(config: PreviewConfig, server: OpsServer | None, pipelines: Sequence) -> Preview | None:
    """Mount the preview on ``server`` and observe every pipeline, when ``[preview] enabled``.

    ``pipelines`` are :class:`daemon.pipeline.CameraPipeline` objects (``cam`` and ``observers``).
    Returns None when the preview is off or there is no listener (``[metrics] enabled = false``).
    """
    if not config.enabled:
        return None
    if server is None:
        log.warning("[preview] is enabled but [metrics] is disabled: there is no HTTP listener to serve it on")
        return None
    preview = Preview(config, [p.cam for p in pipelines])
    preview.mount(server)
    for p in pipelines:
        p.observers.append(preview.observer(p.cam.id))
    if not _is_loopback(server.host):
        log.warning("preview is reachable beyond this machine (%s): anyone who can connect sees the cameras",
                    server.listen)
    log.info("live preview enabled (%d camera(s), at most %.1f frames/s)", len(preview.cameras), config.max_fps)
    return preview
