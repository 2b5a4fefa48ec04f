"""Keep ultralytics from reaching for the network or installing packages at run time."""

from __future__ import annotations

import os
import tempfile


def ultralytics_offline() -> None:
    """Set ultralytics' offline switches (call before importing ultralytics)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    if "YOLO_CONFIG_DIR" not in os.environ:
        os.environ["YOLO_CONFIG_DIR"] = os.path.join(tempfile.gettempdir(), "regionwatch-ultralytics")
    os.makedirs(os.environ["YOLO_CONFIG_DIR"], exist_ok=True)
