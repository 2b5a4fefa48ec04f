"""Liveness and readiness of the daemon, as served on ``/healthz`` and ``/readyz``.

The app tells a :class:`Health` what happens (models loaded, the main loop turned) and gives it
a provider of per-camera stream states; the HTTP listener asks it. ``healthz`` answers "is the
process alive and its main loop turning?" (restart me if not); ``readyz`` answers "are the models
loaded and is at least one camera streaming?" (do not count on my output yet if not); a fleet
replica whose shard has no camera is ready once loaded. Other parts add conditions with
:meth:`Health.add_check` (the state stores: not ready while their disk fails).

Example:
    >>> h = Health(heartbeat_timeout_s=30)
    >>> h.set_streams(lambda: {"hall": "connecting"})
    >>> h.readyz()[0]
    False
    >>> h.set_models_loaded()
    >>> h.set_streams(lambda: {"hall": "streaming"})
    >>> h.beat()
    >>> h.healthz()[0], h.readyz()[0]
    (True, True)
    >>> h.readyz()[1]["cameras"]
    {'hall': 'streaming'}
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

StreamStates = Callable[[], Mapping[str, Any]]
"""Returns ``{camera id: state}``; a state is a string or a ``str`` enum such as ``SourceState``."""

STREAMING = "streaming"


def _state_name(state: Any) -> str:
    if isinstance(state, enum.Enum):
        state = state.value
    return str(state)


class Health:
    """What ``/healthz`` and ``/readyz`` report.

    Args:
        heartbeat_timeout_s: ``healthz`` fails when the main loop has not turned for this long.
        startup_grace_s: before the first heartbeat (models loading), ``healthz`` stays OK this long
            after the object was created.
        metrics: optional :class:`daemon.ops.metrics.Metrics`; the heartbeat timestamp gauge is set
            on each :meth:`beat` and the ``ready`` gauge is computed at scrape time.
        clock: monotonic clock (seconds), replaceable in tests.
    """

    def __init__(
        self,
        *,
        heartbeat_timeout_s: float = 30.0,
        startup_grace_s: float = 600.0,
        metrics=None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if heartbeat_timeout_s <= 0:
            raise ValueError("heartbeat_timeout_s must be > 0")
        self.heartbeat_timeout_s = float(heartbeat_timeout_s)
        self.startup_grace_s = float(startup_grace_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._started = clock()
        self._last_beat: float | None = None
        self._models_loaded = False
        self._streams: StreamStates | None = None  # None: not told yet
        self._stopping = False
        self._checks: list[Callable[[], list[str]]] = []
        self._metrics = metrics
        if metrics is not None:
            metrics.ready.set_function(lambda: 1.0 if self.readyz()[0] else 0.0)

    # -- updates from the app -------------------------------------------------------------
    def set_models_loaded(self, loaded: bool = True) -> None:
        """The detector (and tracker) models are loaded and warmed up."""
        with self._lock:
            self._models_loaded = bool(loaded)

    def beat(self) -> None:
        """The main loop turned (call once per iteration, including idle ones)."""
        now = self._clock()
        with self._lock:
            self._last_beat = now
        if self._metrics is not None:
            self._metrics.loop_heartbeat.set(time.time())

    def set_streams(self, provider: StreamStates) -> None:
        """Where to read per-camera stream states from (called at each ``readyz``)."""
        with self._lock:
            self._streams = provider

    def add_check(self, check: Callable[[], list[str]]) -> None:
        """Another readiness condition: ``check()`` returns the reasons it is not met (empty: met)."""
        with self._lock:
            self._checks.append(check)

    def set_stopping(self) -> None:
        """The daemon is shutting down: no longer ready (still alive)."""
        with self._lock:
            self._stopping = True

    @property
    def models_loaded(self) -> bool:
        with self._lock:
            return self._models_loaded

    # -- probes ---------------------------------------------------------------------------
    def healthz(self) -> tuple[bool, dict[str, Any]]:
        """(ok, detail): the process is alive and the main loop turned within the timeout."""
        now = self._clock()
        with self._lock:
            last = self._last_beat
        if last is None:
            waited = now - self._started
            ok = waited <= self.startup_grace_s
            return ok, {"status": "starting" if ok else "stuck", "main_loop_age_s": None, "uptime_s": round(waited, 3)}
        age = now - last
        ok = age <= self.heartbeat_timeout_s
        return ok, {
            "status": "ok" if ok else "stalled",
            "main_loop_age_s": round(age, 3),
            "heartbeat_timeout_s": self.heartbeat_timeout_s,
            "uptime_s": round(now - self._started, 3),
        }

    def readyz(self) -> tuple[bool, dict[str, Any]]:
        """(ok, detail): models loaded and at least one camera streaming, or none to run (not while stopping)."""
        with self._lock:
            loaded, provider, stopping, checks = self._models_loaded, self._streams, self._stopping, list(self._checks)
        try:
            cameras = {str(cam): _state_name(state) for cam, state in (provider or dict)().items()}
        except Exception as e:  # a broken provider must not break the probe
            cameras, error = {}, f"stream state provider failed: {type(e).__name__}"
        else:
            error = None
        streaming = sum(1 for s in cameras.values() if s == STREAMING)
        # A fleet replica whose shard has no camera ([fleet] shard) has nothing to wait for.
        idle = provider is not None and not cameras and error is None
        failed_checks = [reason for check in checks for reason in check()]
        ok = loaded and (streaming > 0 or idle) and not stopping and not failed_checks
        reasons = []
        if not loaded:
            reasons.append("models not loaded")
        if streaming == 0 and not idle:
            reasons.append("no camera streaming")
        if stopping:
            reasons.append("stopping")
        reasons += failed_checks
        detail: dict[str, Any] = {
            "status": "ready" if ok else "not ready",
            "models_loaded": loaded,
            "cameras_streaming": streaming,
            "cameras": cameras,
        }
        if reasons:
            detail["reasons"] = reasons
        if error:
            detail["error"] = error
        return ok, detail
