"""Person detection with Ultralytics YOLO (any file ``ultralytics.YOLO`` loads: .pt, .onnx, OpenVINO).

Example:
    >>> import numpy as np
    >>> det = PersonDetector("../shared/assets/models/yolov8n_int8.onnx")
    >>> len(det(np.zeros((432, 768, 3), np.uint8)))
    0
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np

from daemon._ultralytics import ultralytics_offline
from daemon.records import Detections

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model file could not be loaded (message names the file and the reason)."""


class PersonDetector:
    """Runs a YOLO detector and keeps only the ``person`` class. Thread-safe (one call at a time)."""

    def __init__(
        self,
        model: str,
        *,
        confidence: float = 0.35,
        iou: float = 0.7,
        imgsz: int = 640,
        device: str = "cpu",
        min_box_area_px: float = 0.0,
    ):
        ultralytics_offline()
        from ultralytics import YOLO

        try:
            self.model = YOLO(model, task="detect")
            names = self.model.names
        except Exception as e:  # ultralytics raises many kinds; report them uniformly
            raise ModelLoadError(f"detector.model: cannot load {model}: {type(e).__name__}: {e}") from e
        persons = [int(k) for k, v in names.items() if str(v).lower() == "person"]
        if not persons:
            raise ModelLoadError(f"detector.model: {model} has no 'person' class (classes: {list(names.values())[:10]}…)")
        self.person_class = persons[0]
        self.model_name = os.path.basename(str(model).rstrip("/"))
        self.confidence, self.iou, self.imgsz, self.device = confidence, iou, imgsz, device
        self.min_box_area_px = min_box_area_px
        self._lock = threading.Lock()

    def __call__(self, image_bgr: np.ndarray) -> Detections:
        """Detect people on an HxWx3 BGR frame."""
        with self._lock:
            result = self.model.predict(
                image_bgr,
                classes=[self.person_class],
                conf=self.confidence,
                iou=self.iou,
                imgsz=self.imgsz,
                device=self.device,
                verbose=False,
            )[0]
        boxes = result.boxes
        xyxy = boxes.xyxy.cpu().numpy().astype(np.float32).reshape(-1, 4)
        conf = boxes.conf.cpu().numpy().astype(np.float32).reshape(-1)
        keep = boxes.cls.cpu().numpy().reshape(-1).astype(int) == self.person_class
        if self.min_box_area_px > 0:
            keep &= (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1]) >= self.min_box_area_px
        return Detections(xyxy[keep], conf[keep])


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

    def __call__(self, image_bgr: np.ndarray) -> Detections:
        return self.current(image_bgr)
