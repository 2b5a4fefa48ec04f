"""CPU time by stage: the calling thread's CPU clock, and the CPU of threads a library starts itself.

``time.thread_time()`` counts only the calling thread. That is exact for decoding (one decoder
thread per camera) and JPEG encoding (one encoder thread per camera), but an inference runtime
(OpenVINO, onnxruntime) may run its work on worker threads of its own, which Python does not see.
:class:`ForeignThreads` finds those threads (the ones a callable starts) and reads their CPU clocks
by kernel thread id (Linux; elsewhere it finds none and counts 0).

:class:`StageCpu` is the helper a pipeline wraps around a stage to add that stage's CPU seconds to
a counter (e.g. ``regionwatch_stage_cpu_seconds_total{camera, stage}``), with an optional extra
clock for work done on other threads on its behalf.

Example:
    >>> seen = []
    >>> with StageCpu(seen.append):
    ...     _ = sum(range(100_000))
    >>> len(seen) == 1 and seen[0] > 0
    True
    >>> threads = ForeignThreads.started_by(lambda: None)
    >>> threads.tids, threads.cpu_s()
    ((), 0.0)
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

_TASKS = "/proc/self/task"


def _thread_clock(tid: int) -> int:
    """The CPU-time clock id of a kernel thread (what glibc's pthread_getcpuclockid builds)."""
    return ((~tid) << 3) | 6  # CPUCLOCK_PERTHREAD | CPUCLOCK_SCHED


def _tids() -> set[int]:
    try:
        return {int(t) for t in os.listdir(_TASKS)}
    except OSError:  # not Linux: no per-thread clocks to read
        return set()


class ForeignThreads:
    """Threads started by a library outside Python's ``threading`` (e.g. an inference thread pool).

    :meth:`cpu_s` is the CPU seconds those threads used so far (threads that ended keep what they
    last reported). Build it with :meth:`started_by`, around the code that makes the library start
    its threads (load a model, run it once); threads other code starts meanwhile are counted too,
    so call it before other stages start.
    """

    def __init__(self, tids: tuple[int, ...] = ()):
        self.tids = tids
        self._clocks = [_thread_clock(t) for t in tids]
        self._last = [0.0] * len(tids)
        self._lock = threading.Lock()

    @classmethod
    def started_by(cls, fn: Callable[[], object]) -> ForeignThreads:
        """Run ``fn`` and return the threads that appeared during it, less Python's own threads."""
        before = _tids()
        fn()
        python = {t.native_id for t in threading.enumerate()}
        return cls(tuple(sorted(_tids() - before - python)))

    def cpu_s(self) -> float:
        with self._lock:
            for i, clock in enumerate(self._clocks):
                try:
                    self._last[i] = time.clock_gettime(clock)
                except OSError:  # the thread ended: keep its last reading
                    pass
            return float(sum(self._last))


class StageCpu:
    """Context manager: adds the CPU seconds the calling thread spends inside it to ``add``.

    ``add`` is typically a Prometheus counter child's ``inc``. Reusable, not re-entrant.
    """

    __slots__ = ("_add", "_t0")

    def __init__(self, add: Callable[[float], object]):
        self._add = add
        self._t0 = 0.0

    def __enter__(self) -> StageCpu:
        self._t0 = time.thread_time()
        return self

    def __exit__(self, *exc) -> None:
        self._add(time.thread_time() - self._t0)
