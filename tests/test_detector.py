"""The YOLO person detector on real frames of the sample footage."""

from __future__ import annotations

import av
import numpy as np
import pytest

from daemon.detector import ModelLoadError, PersonDetector


@pytest.fixture(scope="module")
def frames(footage) -> dict[int, np.ndarray]:
    want = {0, 150, 300, 600, 1000}
    out = {}
    with av.open(str(footage)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i in want:
                out[i] = f.to_ndarray(format="bgr24")
            if i >= max(want):
                break
    return out


@pytest.fixture(scope="module")
def detector(yolo_model) -> PersonDetector:
    return PersonDetector(str(yolo_model), confidence=0.35)


@pytest.mark.parametrize("index", [150, 300, 600, 1000])
def test_finds_the_person_at_the_table(detector, frames, index):
    d = detector(frames[index])
    assert len(d) == 1, d
    x1, y1, x2, y2 = d.xyxy[0]
    assert d.confidence[0] > 0.8
    # Each visitor stands at the small table: feet near y≈380–400, centred x≈420–500.
    assert 360 <= y2 <= 415 and 400 <= (x1 + x2) / 2 <= 510
    assert y2 - y1 > 250  # a whole person, not a part


def test_no_people_in_the_empty_room_or_a_black_frame(detector, frames):
    assert len(detector(frames[0])) == 0
    assert len(detector(np.zeros((432, 768, 3), np.uint8))) == 0


def test_person_class_only_and_min_area(yolo_model, frames):
    det = PersonDetector(str(yolo_model), min_box_area_px=1e6)
    assert len(det(frames[150])) == 0
    assert det.names[det.person_class] == "person"


def test_bad_model_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "weights.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match=r"detector.model: cannot load .*weights.onnx"):
        PersonDetector(str(bad))
