"""Per-camera frame handoff and rolling JPEG buffer of recent frames.

The source thread ``put``s decoded frames; the pipeline thread takes them with ``get``.

* Handoff: files are lossless (``put`` blocks while the consumer is behind). Live streams (and
  files paced in real time) never block the decoder: when the consumer falls behind, the oldest
  pending frame is skipped and counted by reason (``consumer_behind``), so the detector and
  tracker always work on fresh frames.
* Recent frames (the daemon's default, ``encode_all=False``): the frames the pipeline took in the
  last ``recent_s`` seconds of stream time (at most ``buffer_s``, at most ``buffer_mb`` of image
  bytes) are kept as decoded, by reference — no copy, no encoding. A reader gets a
  :class:`RecentFrame`; its JPEG is encoded the first time someone asks for it (an entry snapshot
  encodes one frame per entry, not every frame of the stream). Frames skipped before the pipeline
  took them are never needed, so never kept.
* Rolling JPEG history (``encode_all=True``, or :meth:`keep_history`: what entry refinement asks
  for, since it looks back over ``buffer_s``): every frame that is ``put`` is JPEG-encoded on the
  buffer's own encoder thread (so encoding overlaps decoding and never slows the pipeline
  thread), and kept with its index, pts and wall time for the last ``buffer_s`` seconds of stream
  time, at most ``buffer_mb`` of JPEG bytes; the oldest frames go first.
* ``remember(frame)`` returns a frame's buffered copy (encoding it into the JPEG history on the
  spot only if the buffer does not hold it). Every encoding's CPU time goes to ``on_cpu(seconds)``.

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
    >>> live = FrameBuffer("door", lossless=False, encode_all=False, recent_s=0.5)
    >>> for i in range(10):
    ...     _ = live.put(Frame("door", i, i / 10, 0.0, np.zeros((8, 8, 3), np.uint8))); _ = live.get()
    >>> [f.index for f in live.history()], live.counts().encoded  # the last 0.5 s, nothing encoded
    ([4, 5, 6, 7, 8, 9], 0)
    >>> live.find(9).jpeg[:2], live.counts().encoded  # encoded when read
    (b'\xff\xd8', 1)
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


class RecentFrame:
    """A frame the pipeline took, kept as decoded; same reading interface as :class:`BufferedFrame`.

    ``jpeg`` is encoded on first access (then kept); ``decode()`` returns a copy of the image.
    """

    __slots__ = ("index", "pts_s", "wall_time", "image", "_jpeg", "_encode")

    def __init__(self, frame: Frame, encode: Callable[[np.ndarray], bytes]):
        self.index, self.pts_s, self.wall_time, self.image = frame.index, frame.pts_s, frame.wall_time, frame.image
        self._jpeg: bytes | None = None
        self._encode = encode

    @property
    def jpeg(self) -> bytes:
        if self._jpeg is None:  # two readers at once may both encode: harmless, and rare
            self._jpeg = self._encode(self.image)
        return self._jpeg

    def decode(self) -> np.ndarray:
        """The frame as HxWx3 BGR uint8 (a copy: readers may draw on it)."""
        return self.image.copy()


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
    recent: int = 0
    recent_bytes: int = 0


class FrameBuffer:
    """Bounded handoff queue from source to pipeline, plus a rolling JPEG history.

    ``capacity`` bounds both the handoff queue and the encoder's queue (raw frames), so at most
    ``2 * capacity`` decoded frames are held besides the history. ``on_skip(reason, n)`` is
    called (outside the buffer's lock) for every frame the pipeline will not see.
    ``encode_all=False`` keeps the frames the pipeline took in the last ``recent_s`` seconds as
    decoded (:class:`RecentFrame`) and only the frames passed to :meth:`remember` in the JPEG
    history, encoded on the caller's thread. ``on_cpu(seconds)`` gets the CPU time of every JPEG
    encoding, on whichever thread it ran.
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
        recent_s: float = 2.0,
        on_cpu: Callable[[float], object] | None = None,
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
        self.recent_s = min(recent_s, buffer_s)
        self._on_skip = on_skip or (lambda reason, n: None)
        self._on_cpu = on_cpu
        self._recent: collections.deque[RecentFrame] = collections.deque()
        self._recent_bytes = 0
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
    def for_camera(
        cls,
        cfg: CameraConfig,
        *,
        on_skip: Callable[[str, int], None] | None = None,
        on_cpu: Callable[[float], object] | None = None,
        recent_s: float = 2.0,
    ) -> FrameBuffer:
        """The buffer a camera's config asks for: lossless only for files not paced in real time.

        Frames are kept as decoded for ``recent_s`` seconds and JPEG-encoded only when read (entry
        snapshots); a reader that looks further back calls :meth:`keep_history`. ``recent_s`` must
        cover the time from an entry frame to its event: ``events.debounce_s`` plus, while the
        tracker only moves people on detector frames, ``detector.interval_s``.

        Example:
            >>> from daemon.config import CameraConfig
            >>> buf = FrameBuffer.for_camera(CameraConfig(id="door", url="rtsp://cam/1"))
            >>> buf.lossless, buf.encode_all, buf.recent_s
            (False, False, 2.0)
        """
        return cls(
            cfg.id,
            lossless=not (cfg.is_live or cfg.realtime),
            capacity=cfg.queue_frames,
            buffer_s=cfg.buffer_s,
            buffer_mb=cfg.buffer_mb,
            jpeg_quality=cfg.jpeg_quality,
            on_skip=on_skip,
            encode_all=False,
            recent_s=recent_s,
            on_cpu=on_cpu,
        )

    def keep_history(self) -> None:
        """JPEG-encode every frame from now on into the history (a reader looks back over ``buffer_s``)."""
        with self._cond:
            self.encode_all = True

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
            if not self.encode_all:
                self._keep_recent(frame)
        return frame

    def _keep_recent(self, frame: Frame) -> None:
        """Keep a taken frame as decoded; drop what falls out of ``recent_s`` / ``buffer_mb`` (lock held)."""
        r = self._recent
        r.append(RecentFrame(frame, self._encode_recent))
        self._recent_bytes += frame.image.nbytes
        while len(r) > 1 and (self._recent_bytes > self.max_bytes or r[-1].pts_s - r[0].pts_s > self.recent_s):
            self._recent_bytes -= r.popleft().image.nbytes

    @property
    def closed(self) -> bool:
        """True once closed and every pending frame was taken."""
        with self._cond:
            return self._closed and not self._pending

    # -- rolling history -----------------------------------------------------------------
    def _encode_bytes(self, image: np.ndarray) -> bytes:
        t0 = time.thread_time()
        ok, enc = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if self._on_cpu is not None:
            self._on_cpu(time.thread_time() - t0)
        if not ok:
            raise RuntimeError(f"camera {self.camera}: JPEG encoding failed")
        return enc.tobytes()

    def _encode_recent(self, image: np.ndarray) -> bytes:
        jpeg = self._encode_bytes(image)
        with self._cond:
            self._encoded += 1
        return jpeg

    def _encode(self, frame: Frame) -> BufferedFrame:
        return BufferedFrame(frame.index, frame.pts_s, frame.wall_time, self._encode_bytes(frame.image))

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
        with self._cond:
            if self.encode_all:
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

    def _find(self, index: int) -> BufferedFrame | RecentFrame | None:
        for store in (self._recent, self._history):
            for f in reversed(store):
                if f.index == index:
                    return f
                if f.index < index:
                    break
        return None

    def _all(self) -> list[BufferedFrame | RecentFrame]:
        """Every held frame once, in index order (the recent copy where both hold it; lock held)."""
        if not self._recent:
            return list(self._history)
        if not self._history:
            return list(self._recent)
        recent = {f.index for f in self._recent}
        return sorted([f for f in self._history if f.index not in recent] + list(self._recent), key=lambda f: f.index)

    def history(self, since_index: int = -1) -> list[BufferedFrame | RecentFrame]:
        """Buffered frames with index > ``since_index``, oldest first."""
        with self._cond:
            return [f for f in self._all() if f.index > since_index]

    def find(self, index: int) -> BufferedFrame | RecentFrame | None:
        """The buffered frame with this index, or None if it is not (or no longer) held."""
        with self._cond:
            return self._find(index)

    def latest(self) -> BufferedFrame | RecentFrame | None:
        """The newest buffered frame, if any."""
        with self._cond:
            newest = [s[-1] for s in (self._recent, self._history) if s]
            return max(newest, key=lambda f: f.index) if newest else None

    def nearest(self, pts_s: float) -> BufferedFrame | RecentFrame | None:
        """The buffered frame whose pts is closest to ``pts_s`` (looking back in time)."""
        with self._cond:
            held = self._all()
            return min(held, key=lambda f: abs(f.pts_s - pts_s)) if held else None

    def stats(self) -> tuple[int, int]:
        """(frames, bytes) held: the JPEG history and the recent decoded frames."""
        with self._cond:
            return len(self._history) + len(self._recent), self._history_bytes + self._recent_bytes

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
                recent=len(self._recent),
                recent_bytes=self._recent_bytes,
            )
