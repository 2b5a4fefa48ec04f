"""The operations side of a running app in one object: HTTP listener, health, sd_notify.

The app calls these hooks; everything else (probes, watchdog rate limit, status line, GPU gauge,
pre-created series) happens here:

- :meth:`Ops.start` before loading models: the listener comes up, ``/readyz`` says 503.
- :meth:`Ops.loaded` once models are loaded: ``READY=1``.
- :meth:`Ops.tick` each main-loop turn: heartbeat, ``WATCHDOG=1``, ``STATUS=``, GPU gauge.
- :meth:`Ops.reloading` / :meth:`Ops.reloaded` around a configuration reload (SIGHUP):
  ``RELOADING=1``, then ``READY=1``.
- :meth:`Ops.finished` when a file-only run completed by itself (allows the linger below).
- :meth:`Ops.begin_stop` when shutdown begins: ``STOPPING=1``, ``/readyz`` says 503.
- :meth:`Ops.close` when shutdown is done: the listener stops (after ``[metrics] linger_s``
  for finished file runs, so the final values can still be scraped).

Example:
    >>> from daemon.config import MetricsConfig
    >>> from daemon.ops.metrics import Metrics
    >>> ops = Ops(MetricsConfig(listen="127.0.0.1:0"), Metrics(), env={})
    >>> ops.start(lambda: {"hall": "streaming"})
    >>> ops.health.readyz()[0]
    False
    >>> ops.loaded(); ops.tick()
    >>> ops.health.readyz()[0], ops.health.healthz()[0]
    (True, True)
    >>> ops.close()
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping

from daemon.ops.gpu import update_gpu_memory
from daemon.ops.health import Health, StreamStates
from daemon.ops.metrics import STAGES
from daemon.ops.httpd import OpsServer
from daemon.ops.systemd import SystemdNotifier

log = logging.getLogger(__name__)

SKIP_REASONS = ("consumer_behind",)
"""Frame-skip reasons known up front (pre-created at 0 so dashboards show 0, not "no data")."""


def allowed_hosts(config) -> list[str]:
    """``[metrics] allowed_hosts`` plus the host of ``public_url`` (links in events point there).

    Example:
        >>> from daemon.config import MetricsConfig
        >>> allowed_hosts(MetricsConfig(allowed_hosts=["box.lan"], public_url="https://cams.example.org/rw"))
        ['box.lan', 'cams.example.org']
    """
    from urllib.parse import urlsplit

    hosts = list(config.allowed_hosts)
    public = urlsplit(config.public_url).hostname if config.public_url else None
    if public and public not in hosts:
        hosts.append(public)
    return hosts


class Ops:
    """Health, the HTTP listener and systemd notifications for one app.

    Args:
        config: the ``[metrics]`` section (``enabled``, ``listen``, ``linger_s``).
        metrics: the app's :class:`daemon.ops.metrics.Metrics`.
        env: environment for sd_notify (default ``os.environ``).
        status_every_s: how often ``STATUS=`` is refreshed from the main loop.
    """

    def __init__(self, config, metrics, *, env: Mapping[str, str] | None = None, status_every_s: float = 5.0,
                 heartbeat_timeout_s: float = 30.0):
        self.config = config
        self.metrics = metrics
        self.health = Health(metrics=metrics, heartbeat_timeout_s=heartbeat_timeout_s)
        self.notifier = SystemdNotifier(env)
        self.server: OpsServer | None = (
            OpsServer(config.listen, metrics=metrics, health=self.health, allowed_hosts=allowed_hosts(config))
            if config.enabled else None
        )
        self.status_every_s = status_every_s
        self._last_status = float("-inf")
        self._finished = False
        self._stopping = False
        self._closed = False

    def start(self, streams: StreamStates) -> None:
        """Serve metrics and probes (not ready yet) and tell systemd models are loading."""
        self.health.set_streams(streams)
        if self.server is not None and not self.server.running:
            try:
                self.server.start()
            except OSError as e:  # e.g. the port is taken: fatal, with a readable reason
                raise RuntimeError(f"metrics.listen {self.config.listen}: cannot listen: {e.strerror or e}") from None
        self.notifier.status("loading models")

    def loaded(self, status: str = "models loaded, starting cameras") -> None:
        """Models are loaded: ready as soon as a camera streams; ``READY=1`` to systemd."""
        self.health.set_models_loaded()
        self.notifier.ready(status)

    def reloading(self) -> None:
        """A configuration reload begins (``RELOADING=1``); cameras keep running meanwhile."""
        self.notifier.reloading("reloading the configuration")

    def reloaded(self) -> None:
        """The reload is over, applied or not (``READY=1`` with a fresh status line)."""
        self.notifier.ready(self.status_line())

    def init_series(self, cameras: Iterable, sinks: Iterable[str] = ()) -> None:
        """Create the known label sets at 0, so rates and panels exist before the first event."""
        m = self.metrics
        for cam in cameras:
            m.reconnects.labels(cam.id)
            for reason in SKIP_REASONS:
                m.frames_skipped.labels(cam.id, reason)
            for stage in STAGES:
                m.stage_cpu.labels(cam.id, stage)
            for region in cam.regions:
                for kind in ("entry", "exit"):
                    m.events.labels(cam.id, region.id, kind)
        for sink in sinks:
            for result in ("ok", "error"):
                m.sink_publish.labels(sink, result)

    def tick(self) -> None:
        """One main-loop turn: heartbeat, watchdog ping, status line, GPU gauge (rate-limited)."""
        self.health.beat()
        self.notifier.watchdog()
        now = time.monotonic()
        if now - self._last_status >= self.status_every_s:
            self._last_status = now
            update_gpu_memory(self.metrics)
            self.notifier.status(self.status_line())

    def status_line(self) -> str:
        """A one-line summary for ``systemctl status``, e.g. ``1/1 cameras streaming, 120 frames, 2 events``."""
        ok, detail = self.health.readyz()
        reg = self.metrics.registry
        frames = events = 0.0
        for fam in reg.collect():
            if fam.name == "regionwatch_frames_processed":
                frames = sum(s.value for s in fam.samples if s.name.endswith("_total"))
            elif fam.name == "regionwatch_events":
                events = sum(s.value for s in fam.samples if s.name.endswith("_total"))
        cams = detail["cameras"]
        return (f"{detail['cameras_streaming']}/{len(cams)} cameras streaming, {int(frames)} frames, "
                f"{int(events)} events" + ("" if ok else " (not ready)"))

    def finished(self) -> None:
        """A file-only run completed by itself: :meth:`close` may linger for a final scrape."""
        self._finished = True

    def begin_stop(self) -> None:
        """Shutdown begins: ``STOPPING=1`` and no longer ready (idempotent)."""
        if self._stopping:
            return
        self._stopping = True
        self.health.set_stopping()
        self.notifier.stopping(self.status_line())

    def close(self) -> None:
        """Stop the listener, after ``linger_s`` if the file run finished (idempotent)."""
        self.begin_stop()
        if self._closed:
            return
        self._closed = True
        linger = self.config.linger_s if self._finished else 0.0
        if self.server is not None and self.server.running:
            if linger > 0:
                log.info("run finished; serving metrics %.1f s more (metrics.linger_s)", linger)
                time.sleep(linger)
            self.server.stop()
        self.notifier.close()
