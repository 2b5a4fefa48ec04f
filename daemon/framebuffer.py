"""Per-camera frame handoff and rolling JPEG buffer of recent frames.

The source thread ``put``s decoded frames; the pipeline thread takes them with ``get``.

* Handoff: files are lossless (``put`` blocks while the consumer is behind). Live streams (and
  files paced in real time) never block the decoder: when the consumer falls behind, the oldest
  pending frame is skipped and counted by reason (``consumer_behind``), so the detector and
  tracker always work on fresh frames.
* Rolling history: every frame that is ``put`` is also JPEG-encoded, on the buffer's own encoder
  thread (so encoding overlaps decoding and never slows the pipeline thread), and kept with its
  index, pts and wall time for the last ``buffer_s`` seconds of stream time, at most
  ``buffer_mb`` of JPEG bytes; the oldest frames go first. ``remember(frame)`` returns a
  frame's buffered JPEG (encoding it on the spot only if the history does not hold it).

Example:
    >>> import numpy as np
    >>> from daemon.records import Frame
    >>> buf = FrameBuffer("hall", lossless=True, capacity=2, buffer_s=1.0)
    >>> buf.put(Frame("hall", 0, 0.0, 0.0, np.zeros((8, 8, 3), np.uint8)))
    True
    >>> buf.get(timeout=1).index
    0
    >>> buf.remember(Frame("hall", 0, 0.0, 0.0, np.zeros((8, 8, 3), np.uint8))).decode().shape
    (8, 8, 3)
    >>> buf.close()
    >>> buf.join() and buf.stats()[0]
    1
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import cv2
import numpy as np

from daemon.records import Frame

if TYPE_CHECKING:
    from daemon.config import CameraConfig

SKIP_CONSUMER_BEHIND = "consumer_behind"
"""Skip reason: a live frame was dropped from the handoff queue because the pipeline lagged."""
SKIP_ENCODER_BEHIND = "encoder_behind"
"""History-skip reason: a live frame was not JPEG-encoded because the encoder lagged."""


@dataclass(frozen=True, slots=True)
class BufferedFrame:
    """A frame as kept in the rolling buffer: JPEG bytes plus its index and times."""

    index: int
    pts_s: float
    wall_time: float
    jpeg: bytes

    def decode(self) -> np.ndarray:
        """The frame as HxWx3 BGR uint8."""
        return cv2.imdecode(np.frombuffer(self.jpeg, np.uint8), cv2.IMREAD_COLOR)


@dataclass(frozen=True, slots=True)
class BufferCounts:
    """Running totals of one buffer, for metrics and benchmarks."""

    put: int
    taken: int
    skipped: dict[str, int] = field(default_factory=dict)
    history_skipped: dict[str, int] = field(default_factory=dict)
    encoded: int = 0
    encode_cpu_s: float = 0.0
    pending: int = 0
    to_encode: int = 0


class FrameBuffer:
    """Bounded handoff queue from source to pipeline, plus a rolling JPEG history.

    ``capacity`` bounds both the handoff queue and the encoder's queue (raw frames), so at most
    ``2 * capacity`` decoded frames are held besides the JPEG history. ``on_skip(reason, n)`` is
    called (outside the buffer's lock) for every frame the pipeline will not see.
    ``encode_all=False`` keeps only the frames passed to :meth:`remember` in the history, encoded
    on the caller's thread.
    """

    def __init__(
        self,
        camera: str,
        *,
        lossless: bool,
        capacity: int = 8,
        buffer_s: float = 10.0,
        buffer_mb: float = 128.0,
        jpeg_quality: int = 85,
        on_skip: Callable[[str, int], None] | None = None,
        encode_all: bool = True,
    ):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.camera = camera
        self.lossless = lossless
        self.capacity = capacity
        self.buffer_s = buffer_s
        self.max_bytes = int(buffer_mb * 1024 * 1024)
        self.jpeg_quality = jpeg_quality
        self.encode_all = encode_all
        self._on_skip = on_skip or (lambda reason, n: None)
        self._pending: collections.deque[Frame] = collections.deque()
        self._to_encode: collections.deque[Frame] = collections.deque()
        self._encoding: int | None = None  # index of the frame on the encoder right now
        self._history: collections.deque[BufferedFrame] = collections.deque()
        self._history_bytes = 0
        # One lock, one condition per kind of waiter: a put wakes the consumer and the encoder,
        # not every thread (spurious wake-ups cost measurable CPU at hundreds of frames/s).
        self._cond = threading.Condition()
        self._can_get = threading.Condition(self._cond)  # pipeline: pending frames or closed
        self._can_put = threading.Condition(self._cond)  # lossless producer: room or closed
        self._can_encode = threading.Condition(self._cond)  # encoder: work or closed
        self._encoded_cv = threading.Condition(self._cond)  # remember/flush: encoder progress
        self._closed = False
        self._encoder: threading.Thread | None = None
        self._put = self._taken = self._encoded = 0
        self._encode_cpu_s = 0.0
        self._skipped: collections.Counter[str] = collections.Counter()
        self._history_skipped: collections.Counter[str] = collections.Counter()

    @classmethod
    def for_camera(cls, cfg: CameraConfig, *, on_skip: Callable[[str, int], None] | None = None) -> FrameBuffer:
        """The buffer a camera's config asks for: lossless only for files not paced in real time.

        Example:
            >>> from daemon.config import CameraConfig
            >>> FrameBuffer.for_camera(CameraConfig(id="door", url="rtsp://cam/1")).lossless
            False
        """
        return cls(
            cfg.id,
            lossless=not (cfg.is_live or cfg.realtime),
            capacity=cfg.queue_frames,
            buffer_s=cfg.buffer_s,
            buffer_mb=cfg.buffer_mb,
            jpeg_quality=cfg.jpeg_quality,
            on_skip=on_skip,
        )

    # -- producer side -------------------------------------------------------------------
    def put(self, frame: Frame, timeout: float | None = None) -> bool:
        """Hand a frame to the consumer (and the history encoder).

        Returns False if the buffer was closed (or, lossless only, on ``timeout``).
        """
        skipped = 0
        with self._cond:
            if self.lossless:
                room = lambda: self._closed or (  # noqa: E731
                    len(self._pending) < self.capacity and len(self._to_encode) < self.capacity
                )
                if not self._can_put.wait_for(room, timeout) or self._closed:
                    return False
            else:
                if self._closed:
                    return False
                while len(self._pending) >= self.capacity:
                    self._pending.popleft()
                    skipped += 1
                if skipped:
                    self._skipped[SKIP_CONSUMER_BEHIND] += skipped
                if self.encode_all:
                    while len(self._to_encode) >= self.capacity:
                        self._to_encode.popleft()
                        self._history_skipped[SKIP_ENCODER_BEHIND] += 1
            self._pending.append(frame)
            self._put += 1
            self._can_get.notify()
            if self.encode_all:
                self._to_encode.append(frame)
                if self._encoder is None:
                    self._encoder = threading.Thread(target=self._encode_loop, name=f"jpeg-{self.camera}", daemon=True)
                    self._encoder.start()
                self._can_encode.notify()
        if skipped:
            self._on_skip(SKIP_CONSUMER_BEHIND, skipped)
        return True

    def close(self) -> None:
        """No more frames will come; ``get`` returns None once the pending frames are taken.

        The encoder thread finishes the frames already queued, then exits (see :meth:`join`).
        """
        with self._cond:
            self._closed = True
            for cv in (self._can_get, self._can_put, self._can_encode, self._encoded_cv):
                cv.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the encoder thread to exit after :meth:`close`. True if it did."""
        thread = self._encoder
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    # -- consumer side -------------------------------------------------------------------
    def get(self, timeout: float | None = None) -> Frame | None:
        """The next frame to process, or None on timeout / when closed and drained."""
        with self._cond:
            if not self._can_get.wait_for(lambda: self._pending or self._closed, timeout):
                return None
            if not self._pending:
                return None
            frame = self._pending.popleft()
            self._taken += 1
            self._can_put.notify()
        return frame

    @property
    def closed(self) -> bool:
        """True once closed and every pending frame was taken."""
        with self._cond:
            return self._closed and not self._pending

    # -- rolling history -----------------------------------------------------------------
    def _encode(self, frame: Frame) -> BufferedFrame:
        ok, enc = cv2.imencode(".jpg", frame.image, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            raise RuntimeError(f"camera {self.camera}: JPEG encoding failed for frame {frame.index}")
        return BufferedFrame(frame.index, frame.pts_s, frame.wall_time, enc.tobytes())

    def _encode_loop(self) -> None:
        while True:
            with self._cond:
                self._can_encode.wait_for(lambda: self._to_encode or self._closed)
                if not self._to_encode:
                    return
                frame = self._to_encode.popleft()
                self._encoding = frame.index
                self._can_put.notify()
            t0 = time.thread_time()
            try:
                item = self._encode(frame)
            except Exception:  # a frame cv2 cannot encode must not kill the history
                item = None
            cpu = time.thread_time() - t0
            with self._cond:
                if item is not None:
                    self._insert(item)
                    self._encoded += 1
                else:
                    self._history_skipped["encode_failed"] += 1
                self._encode_cpu_s += cpu
                self._encoding = None
                self._encoded_cv.notify_all()

    def _insert(self, item: BufferedFrame) -> None:
        """Add to the history in index order and evict beyond the bounds (lock held)."""
        h = self._history
        if not h or item.index > h[-1].index:
            h.append(item)
        else:
            pos = len(h)
            while pos > 0 and h[pos - 1].index > item.index:
                pos -= 1
            if pos > 0 and h[pos - 1].index == item.index:
                return
            h.insert(pos, item)
        self._history_bytes += len(item.jpeg)
        while h and (self._history_bytes > self.max_bytes or h[-1].pts_s - h[0].pts_s > self.buffer_s):
            self._history_bytes -= len(h.popleft().jpeg)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every frame put so far went through the encoder. True if it did."""
        with self._cond:
            return self._encoded_cv.wait_for(lambda: not self._to_encode and self._encoding is None, timeout)

    def remember(self, frame: Frame, timeout: float = 5.0) -> BufferedFrame:
        """The buffered JPEG of ``frame``: the history's copy, encoded now if it has none.

        With ``encode_all`` the encoder thread has usually done it already (this waits up to
        ``timeout`` for it); a frame the history does not hold is encoded on the calling thread
        and added in index order (unless it is already older than the bounds allow).
        """
        idx = frame.index
        if self.encode_all:
            with self._cond:
                self._encoded_cv.wait_for(
                    lambda: self._encoding != idx and all(f.index != idx for f in self._to_encode), timeout
                )
                found = self._find(idx)
            if found is not None:
                return found
        item = self._encode(frame)
        with self._cond:
            self._insert(item)
            self._encoded += 1
        return item

    def _find(self, index: int) -> BufferedFrame | None:
        for f in reversed(self._history):
            if f.index == index:
                return f
            if f.index < index:
                break
        return None

    def history(self, since_index: int = -1) -> list[BufferedFrame]:
        """Buffered frames with index > ``since_index``, oldest first."""
        with self._cond:
            return [f for f in self._history if f.index > since_index]

    def find(self, index: int) -> BufferedFrame | None:
        """The buffered frame with this index, or None if it is not (or no longer) held."""
        with self._cond:
            return self._find(index)

    def latest(self) -> BufferedFrame | None:
        """The newest buffered frame, if any."""
        with self._cond:
            return self._history[-1] if self._history else None

    def nearest(self, pts_s: float) -> BufferedFrame | None:
        """The buffered frame whose pts is closest to ``pts_s`` (looking back in time)."""
        with self._cond:
            if not self._history:
                return None
            return min(self._history, key=lambda f: abs(f.pts_s - pts_s))

    def stats(self) -> tuple[int, int]:
        """(frames, bytes) in the rolling history."""
        with self._cond:
            return len(self._history), self._history_bytes

    def counts(self) -> BufferCounts:
        """Totals since creation: frames put, taken, skipped by reason, encoded, encoder CPU."""
        with self._cond:
            return BufferCounts(
                put=self._put,
                taken=self._taken,
                skipped=dict(self._skipped),
                history_skipped=dict(self._history_skipped),
                encoded=self._encoded,
                encode_cpu_s=self._encode_cpu_s,
                pending=len(self._pending),
                to_encode=len(self._to_encode),
            )
