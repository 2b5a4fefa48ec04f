"""Person detection: one detector shared by every camera, its runtime calls batched across cameras.

:class:`PersonDetector` is called as ``detector(image) -> Detections`` from every camera's
pipeline thread at once. On the CPU an OpenVINO IR folder or an ``.onnx`` file runs on its runtime
directly (:mod:`daemon.inference`: threads chosen here, no idle spinning); anything else (a
``.pt`` file, ``device = "cuda"``) goes through ultralytics' predictor.

Batching: the runtime does one call at a time. Frames that become due while it is busy wait in a
queue; when it frees, the thread whose frame is first in the queue runs everything queued (up to
``max_batch`` frames, from any cameras) as one call. Nothing waits for a batch to fill, so a lone
camera's latency is unchanged. Letterboxing and box decoding run on each caller's own thread.

CPU accounting: each call's CPU time, including the share of a batched runtime call and the work
of the runtime's own threads (:class:`daemon.ops.cpu.ForeignThreads`), is available right after
the call, on the calling thread, as :attr:`PersonDetector.last_cpu_s` (for
``regionwatch_stage_cpu_seconds_total{stage="detect"}``).

Example:
    >>> import numpy as np
    >>> det = PersonDetector("../shared/assets/models/yolo11n_int8_openvino_model")
    >>> det.runtime, len(det(np.zeros((432, 768, 3), np.uint8))), det.last_cpu_s > 0
    ('openvino', 0, True)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from daemon._ultralytics import ultralytics_offline
from daemon.inference import Letterbox, blob, letterbox, open_runtime, person_boxes
from daemon.ops.cpu import ForeignThreads
from daemon.records import Detections

if TYPE_CHECKING:
    from daemon.config import DetectorConfig

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model file could not be loaded (message names the file and the reason)."""


@dataclass(eq=False, slots=True)
class _Due:
    """One caller's letterboxed frame waiting for (or back from) the runtime."""

    image: np.ndarray
    geo: Letterbox
    out: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False
    share_s: float = 0.0  # this frame's share of the batch's runtime CPU
    led_s: float = 0.0  # runtime CPU this caller's thread spent running batches for others


class PersonDetector:
    """Detects people on HxWx3 BGR frames; thread-safe, batches concurrent callers (module doc).

    ``threads``: the runtime's threads for one call (1 spends the least CPU per frame: no
    synchronisation between threads; more lower one frame's latency when cores are idle).
    ``max_batch``: most frames in one runtime call (1 = never batch; OpenVINO only).
    ``runtime``: "auto" (direct OpenVINO/onnxruntime on the CPU, else ultralytics) or "ultralytics".
    """

    def __init__(
        self,
        model: str,
        *,
        confidence: float = 0.35,
        iou: float = 0.7,
        imgsz: int = 640,
        device: str = "cpu",
        min_box_area_px: float = 0.0,
        threads: int = 1,
        max_batch: int = 1,
        runtime: str = "auto",
    ):
        self.model_name = os.path.basename(str(model).rstrip("/"))
        self.confidence, self.iou, self.imgsz, self.device = confidence, iou, imgsz, device
        self.min_box_area_px = min_box_area_px
        self.max_batch = max(1, max_batch)
        self._rt = None
        self._yolo = None
        self._cond = threading.Condition()
        self._queue: list[_Due] = []
        self._busy = False
        self._local = threading.local()
        self.batches = 0  # runtime calls
        self.frames = 0  # frames detected (sum of batch sizes)
        self._workers = ForeignThreads()
        self._workers_seen = 0.0

        def load() -> None:
            direct = runtime == "auto" and device == "cpu" and (
                Path(model).suffix in (".onnx", ".xml") or Path(model).is_dir()
            )
            try:
                if direct:
                    self._rt = open_runtime(model, threads=threads, max_batch=self.max_batch)
                    names = self._rt.names
                else:
                    ultralytics_offline()
                    from ultralytics import YOLO

                    self._yolo = YOLO(model, task="detect")
                    names = self._yolo.names
            except Exception as e:  # runtimes raise many kinds; report them uniformly
                raise ModelLoadError(f"detector.model: cannot load {model}: {type(e).__name__}: {e}") from e
            persons = [int(k) for k, v in names.items() if str(v).lower() == "person"]
            if not persons:
                raise ModelLoadError(
                    f"detector.model: {model} has no 'person' class (classes: {list(names.values())[:10]}…)"
                )
            self.person_class = persons[0]
            self.names = dict(names)
            self._infer_one(np.zeros((64, 64, 3), np.uint8))  # warm-up: runtimes start their threads lazily

        # The runtime's own worker threads, to count their CPU (started while loading and warming up).
        self._workers = ForeignThreads.started_by(load)
        self.runtime = "ultralytics" if self._rt is None else self._rt.name
        if self._rt is not None:
            if tuple(self._rt.input_hw) != (imgsz, imgsz):
                log.info("detector: %s takes %dx%d images; detector.imgsz = %d is not used", self.model_name,
                         *self._rt.input_hw[::-1], imgsz)
            self.max_batch = min(self.max_batch, getattr(self._rt, "max_batch", 1))
        self._workers_seen = self._workers.cpu_s()

    @classmethod
    def from_config(cls, d: DetectorConfig) -> PersonDetector:
        """The detector ``[detector]`` describes.

        Example:
            >>> from daemon.config import DetectorConfig
            >>> PersonDetector.from_config(DetectorConfig(model="../shared/assets/models/yolov8n_int8.onnx")).runtime
            'onnxruntime'
        """
        return cls(
            d.model, confidence=d.confidence, iou=d.iou, imgsz=d.imgsz, device=d.device,
            min_box_area_px=d.min_box_area_px, threads=d.threads, max_batch=d.max_batch, runtime=d.runtime,
        )

    # -- public ------------------------------------------------------------------------------
    def __call__(self, image_bgr: np.ndarray) -> Detections:
        """Detect people on an HxWx3 BGR frame."""
        t0 = time.thread_time()
        if self._rt is None:
            xyxy, conf, extra = self._ultralytics(image_bgr)
        else:
            lb, geo = letterbox(image_bgr, self._rt.input_hw)
            due = _Due(lb, geo)
            self._run(due)
            if due.error is not None:
                raise RuntimeError(f"detector {self.model_name}: inference failed: {due.error}") from due.error
            xyxy, conf = person_boxes(
                due.out, geo, image_bgr.shape[:2], person=self.person_class, conf=self.confidence, iou=self.iou,
                end2end=self._rt.end2end,
            )
            extra = due.share_s - due.led_s
        if self.min_box_area_px > 0:
            keep = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1]) >= self.min_box_area_px
            xyxy, conf = xyxy[keep], conf[keep]
        self._local.last = time.thread_time() - t0 + extra
        return Detections(xyxy, conf)

    @property
    def last_cpu_s(self) -> float:
        """CPU seconds of the calling thread's last call, all threads included (0 before any call)."""
        return getattr(self._local, "last", 0.0)

    # -- the runtime queue ---------------------------------------------------------------------
    def _run(self, due: _Due) -> None:
        """Queue ``due``; run batches while the runtime is free, until ``due`` is done."""
        with self._cond:
            self._queue.append(due)
            while not due.done:
                if self._busy:
                    self._cond.wait()
                    continue
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                self._busy = True
                self._cond.release()
                try:
                    self._run_batch(batch, due)
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._cond.notify_all()

    def _run_batch(self, batch: list[_Due], leader: _Due) -> None:
        c0 = time.thread_time()
        out, error = None, None
        try:
            out = self._rt.infer(blob([d.image for d in batch]))
        except Exception as e:  # every frame of the batch fails with it, none is lost silently
            error = e
        own = time.thread_time() - c0
        workers = self._workers.cpu_s()
        spent = own + workers - self._workers_seen  # since the last call: trailing runtime work too
        self._workers_seen = workers
        self.batches += 1
        self.frames += len(batch)
        with self._cond:
            for i, d in enumerate(batch):
                d.out = None if out is None else out[i]
                d.error = error
                d.share_s = spent / len(batch)
                d.done = True
            leader.led_s += own

    def _infer_one(self, image: np.ndarray) -> None:
        if self._rt is None:
            self._ultralytics(image)
        else:
            self._rt.infer(blob([letterbox(image, self._rt.input_hw)[0]]))

    # -- ultralytics (.pt files, GPUs) ------------------------------------------------------------
    def _ultralytics(self, image_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """(boxes, scores, CPU of the runtime's own threads) from ultralytics' predictor."""
        with self._cond:  # one predictor call at a time
            result = self._yolo.predict(
                image_bgr, classes=[self.person_class], conf=self.confidence, iou=self.iou, imgsz=self.imgsz,
                device=self.device, verbose=False,
            )[0]
            workers = self._workers.cpu_s()
            extra, self._workers_seen = workers - self._workers_seen, workers
        boxes = result.boxes
        xyxy = boxes.xyxy.cpu().numpy().astype(np.float32).reshape(-1, 4)
        conf = boxes.conf.cpu().numpy().astype(np.float32).reshape(-1)
        keep = boxes.cls.cpu().numpy().reshape(-1).astype(int) == self.person_class
        return xyxy[keep], conf[keep], extra


class ReplaceableDetector:
    """The detector every camera calls, replaceable while they run (a configuration reload).

    A call in progress finishes on the detector it started with; the next one uses the new one,
    so cameras keep their tracks when only the detector changes.

    Example:
        >>> d = ReplaceableDetector(lambda image: "old")
        >>> old = d.replace(lambda image: "new")
        >>> old(None), d(None)
        ('old', 'new')
    """

    def __init__(self, detector):
        self.current = detector

    def replace(self, detector):
        """Use ``detector`` from the next call on; returns the previous one."""
        old, self.current = self.current, detector
        return old

    @property
    def model_name(self) -> str:
        return self.current.model_name

    @property
    def last_cpu_s(self) -> float:
        """CPU of the calling thread's last call (see :attr:`PersonDetector.last_cpu_s`)."""
        return getattr(self.current, "last_cpu_s", 0.0)

    def __call__(self, image_bgr: np.ndarray) -> Detections:
        return self.current(image_bgr)
