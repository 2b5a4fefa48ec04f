"""systemd's notify protocol (``sd_notify``) without a dependency.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for the
abstract namespace) and, with ``WatchdogSec=``, ``$WATCHDOG_USEC``. The daemon sends datagrams
such as ``READY=1`` (models loaded), ``WATCHDOG=1`` (the main loop turns), ``STATUS=...``
(a human line shown by ``systemctl status``), ``RELOADING=1`` (a configuration reload, ended by
``READY=1``) and ``STOPPING=1``. Outside systemd every call is a
no-op that returns False.

Example:
    >>> n = SystemdNotifier(env={})  # not under systemd
    >>> n.enabled, n.ready(), n.watchdog()
    (False, False, False)
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Send notify messages to systemd; watchdog pings rate-limited to half of ``WatchdogSec``.

    Args:
        env: where to read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (default:
            ``os.environ``).
        clock: monotonic clock (seconds), replaceable in tests.
    """

    def __init__(self, env: Mapping[str, str] | None = None, *, clock: Callable[[], float] = time.monotonic):
        env = os.environ if env is None else env
        self._clock = clock
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._failed = False
        self._last_watchdog: float | None = None
        path = env.get("NOTIFY_SOCKET", "")
        if path.startswith("@"):
            path = "\0" + path[1:]  # abstract namespace
        self.address: str | None = path if path.startswith(("/", "\0")) else None
        self.watchdog_interval_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval_s = int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notify socket."""
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=value`` lines as one datagram. False when not under systemd or on error."""
        if self.address is None or not lines:
            return False
        payload = "\n".join(lines).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(payload, self.address)
            except OSError as e:
                if not self._failed:  # say it once, do not flood the journal
                    log.warning("sd_notify to %r failed: %s", self.address.replace("\0", "@"), e)
                    self._failed = True
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (with an optional ``STATUS=``): startup is done."""
        return self.notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        """``STATUS=...``: a free-form line for ``systemctl status``."""
        return self.notify(f"STATUS={_one_line(text)}")

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC=``: a configuration reload began; ``READY=1``
        (:meth:`ready`) ends it. ``systemctl reload`` shows the unit reloading meanwhile."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}",
                           *([f"STATUS={_one_line(status)}"] if status else []))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        return self.notify("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC``: ask for more time to start or stop (slow model loads)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def watchdog(self, *, force: bool = False) -> bool:
        """``WATCHDOG=1``, at most once per half watchdog interval (call it from the main loop).

        Returns True when a ping was sent.
        """
        if self.watchdog_interval_s is None or self.address is None:
            return False
        now = self._clock()
        if not force and self._last_watchdog is not None and now - self._last_watchdog < self.watchdog_interval_s / 2:
            return False
        self._last_watchdog = now
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
