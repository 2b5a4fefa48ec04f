"""What signals do to ``regionwatch run``: never a silent death.

* ``SIGTERM`` / ``SIGINT``: stop gracefully (exit events for everyone inside, sinks flushed, MQTT
  ``stopped``), exit 0. The same signal again means "now": the process exits within
  ``force_exit_after_s`` (1.5 s) with 128 + the signal number, whatever the shutdown is waiting for.
* Every other signal whose default action is to end the process (``SIGUSR1``, ``SIGUSR2``,
  ``SIGALRM``, ``SIGVTALRM``, ``SIGPROF``, ``SIGIO``, ``SIGPWR``, ``SIGXCPU``): the same graceful stop,
  then exit 128 + the signal number, so a supervisor sees a failure and restarts the daemon.
* ``SIGHUP`` (``systemctl reload``): ``on_reload`` re-reads the configuration, in a thread of
  its own so that a stop signal meanwhile is still handled at once. One reload runs at a time;
  signals during one make one more reload after it (the file may have changed again). Without
  ``on_reload``, and once stopping, SIGHUP is logged and ignored.
* Core-dumping signals (``SIGQUIT``, ``SIGABRT`` from the systemd watchdog, ``SIGSEGV``…) keep
  their default: they are for crashes and debugging.

Signals are watched by a thread reading the interpreter's wakeup file descriptor
(:func:`signal.set_wakeup_fd`): the C-level handler writes each signal there at once, so a main
thread busy in a long C call (loading a model) cannot delay the reaction.

Example:
    >>> import os, signal, threading
    >>> stopped = threading.Event()
    >>> sigs = SignalHandling(on_stop=stopped.set)
    >>> sigs.install()
    >>> os.kill(os.getpid(), signal.SIGUSR1)
    >>> stopped.wait(5), sigs.exit_code
    (True, 138)
    >>> sigs.uninstall()
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable

log = logging.getLogger("regionwatch")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FATAL_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGIO", "SIGPWR", "SIGXCPU")
    if hasattr(signal, name)
)
RELOAD_SIGNAL = signal.SIGHUP


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class SignalHandling:
    """Installs the handlers above for one run (main thread only).

    Args:
        on_stop: called (from the watcher thread) on the first stop or fatal signal.
        on_reload: called (from the ``reload`` thread) for SIGHUP; exceptions are logged.
        force_exit_after_s: after a second stop signal, the process exits this soon.
        exit: how to end the process when forced (``os._exit``; replaceable in tests).
    """

    def __init__(self, on_stop: Callable[[], None], *, on_reload: Callable[[], None] | None = None,
                 force_exit_after_s: float = 1.5, exit: Callable[[int], None] = os._exit):
        self.on_stop = on_stop
        self.on_reload = on_reload
        self._reload_lock = threading.Lock()
        self._reload_pending = False
        self._reloader: threading.Thread | None = None
        self.force_exit_after_s = force_exit_after_s
        self._exit = exit
        self.exit_code: int | None = None
        """None, 0 after SIGTERM/SIGINT, 128 + n after a fatal signal n."""
        self._stops = 0
        self._previous: dict[int, object] = {}
        self._previous_fd = -1
        self._rx: socket.socket | None = None
        self._tx: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def install(self) -> None:
        self._rx, self._tx = socket.socketpair()
        self._rx.setblocking(True)
        self._tx.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._tx.fileno(), warn_on_full_buffer=False)
        for signum in (*STOP_SIGNALS, *FATAL_SIGNALS, RELOAD_SIGNAL):
            # The Python-level handler does nothing: it only makes the C handler write the
            # signal to the wakeup descriptor, which the watcher thread reads.
            self._previous[signum] = signal.signal(signum, lambda *_: None)
        self._thread = threading.Thread(target=self._watch, name="signals", daemon=True)
        self._thread.start()

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()
        signal.set_wakeup_fd(self._previous_fd)
        if self._tx is not None:
            self._tx.close()  # the watcher reads EOF and ends
        if self._thread is not None:
            self._thread.join(2)
        if self._rx is not None:
            self._rx.close()

    def _watch(self) -> None:
        while True:
            try:
                data = self._rx.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                try:
                    self.handle(signum)
                except Exception:  # never lose the watcher
                    log.exception("handling %s failed", _name(signum))

    def handle(self, signum: int) -> None:
        """React to one signal (called by the watcher thread)."""
        name = _name(signum)
        if signum == RELOAD_SIGNAL:
            if self.on_reload is None or self._stops:
                log.warning("received %s: ignored (%s)", name,
                            "stopping" if self._stops else "this command does not reload its configuration")
                return
            log.info("received %s: reloading the configuration", name)
            self._request_reload()
            return
        if signum not in STOP_SIGNALS and signum not in FATAL_SIGNALS:
            return
        self._stops += 1
        if self._stops == 1:
            self.exit_code = 0 if signum in STOP_SIGNALS else 128 + signum
            if signum in STOP_SIGNALS:
                log.info("received %s, stopping", name)
            else:
                log.warning("received %s: stopping gracefully (exit events flushed), then exit %d",
                            name, self.exit_code)
            self.on_stop()
            return
        code = 128 + signum
        log.warning("received %s again: exiting within %.1f s without waiting for the shutdown to finish (exit %d)",
                    name, self.force_exit_after_s, code)
        timer = threading.Timer(self.force_exit_after_s, self._force, (code,))
        timer.daemon = True
        timer.start()

    def _request_reload(self) -> None:
        with self._reload_lock:
            self._reload_pending = True
            if self._reloader is None:
                self._reloader = threading.Thread(target=self._reloads, name="reload", daemon=True)
                self._reloader.start()

    def _reloads(self) -> None:
        while True:
            with self._reload_lock:
                if not self._reload_pending:
                    self._reloader = None
                    return
                self._reload_pending = False
            try:
                self.on_reload()
            except Exception:
                log.exception("configuration reload failed; the daemon keeps running")

    def _force(self, code: int) -> None:
        for handler in logging.getLogger().handlers:
            try:
                handler.flush()
            except Exception:
                pass
        self._exit(code)
