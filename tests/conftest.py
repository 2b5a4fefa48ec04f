"""Shared fixtures: paths to the real assets beside the repository (skip when absent)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
FOOTAGE = ASSETS / "footage" / "one-by-one-person-detection.mp4"
YOLO_ONNX = ASSETS / "models" / "yolov8n_int8.onnx"
VENV_BIN = Path(sys.executable).parent

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")
os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "regionwatch-ultralytics-tests"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"asset missing: {path} (../shared/assets must sit beside the repository)")
    return path


@pytest.fixture(scope="session")
def footage() -> Path:
    """The real CC-BY sample footage: 768x432, 10 fps, 1394 frames."""
    return _need(FOOTAGE)


@pytest.fixture(scope="session")
def yolo_model() -> Path:
    """Real YOLOv8n INT8 ONNX person detector weights."""
    return _need(YOLO_ONNX)


@pytest.fixture(scope="session")
def regionwatch_bin() -> Path:
    """The installed console script."""
    exe = VENV_BIN / "regionwatch"
    if not exe.exists():
        pytest.skip("regionwatch console script not installed (run scripts/setup)")
    return exe
