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


# -- direct runtimes (daemon.inference), batching, CPU accounting ------------------------------------
import os  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

import daemon.inference as inference  # noqa: E402
from daemon.geometry import box_iou  # noqa: E402

OPENVINO = Path(__file__).resolve().parents[1] / ".." / "shared" / "assets" / "models" / "yolo11n_int8_openvino_model"


@pytest.fixture(scope="module")
def openvino_model() -> Path:
    if not OPENVINO.is_dir():
        pytest.skip(f"asset missing: {OPENVINO} (../shared/assets must sit beside the repository)")
    return OPENVINO


@pytest.fixture(scope="module")
def walking(footage) -> list[np.ndarray]:
    """Every 80th frame (empty room, visitors walking, standing) and one upscaled to 1080p."""
    with av.open(str(footage)) as c:
        out = [f.to_ndarray(format="bgr24") for i, f in enumerate(c.decode(video=0)) if i % 80 == 0]
    import cv2

    return out + [cv2.resize(out[4], (1920, 1080))]


def same_detections(a, b, *, iou: float, conf: float) -> bool:
    if len(a) != len(b):
        return False
    if not len(a):
        return True
    return bool(box_iou(a.xyxy, b.xyxy).diagonal().min() >= iou and np.abs(a.confidence - b.confidence).max() <= conf)


def test_openvino_direct_equals_ultralytics(openvino_model, walking):
    direct = PersonDetector(str(openvino_model))
    ref = PersonDetector(str(openvino_model), runtime="ultralytics")
    assert (direct.runtime, ref.runtime) == ("openvino", "ultralytics")
    found = 0
    for f in walking:
        a, b = direct(f), ref(f)
        found += len(a)
        assert same_detections(a, b, iou=0.999, conf=1e-4), (a, b)
    assert found >= 10, "the footage shows a person on most of these frames"


def test_onnxruntime_direct_matches_ultralytics(yolo_model, walking):
    direct = PersonDetector(str(yolo_model))
    ref = PersonDetector(str(yolo_model), runtime="ultralytics")
    assert direct.runtime == "onnxruntime"
    for f in walking[::2]:  # same people; boxes within a pixel or two (ultralytics' session differs slightly)
        assert same_detections(direct(f), ref(f), iou=0.95, conf=0.02)


def test_the_equivalence_check_fails_on_a_wrong_letterbox(openvino_model, walking, monkeypatch):
    """Padding at the top-left instead of centred (a plausible bug) is caught by the check above."""
    ref = PersonDetector(str(openvino_model), runtime="ultralytics")
    real = inference.letterbox

    def top_left(image, hw):
        out, geo = real(image, hw)
        shifted = np.full_like(out, inference.PAD_VALUE)
        h, w = out.shape[0] - 2 * geo.pad_y, out.shape[1] - 2 * geo.pad_x
        shifted[:h, :w] = out[geo.pad_y : geo.pad_y + h, geo.pad_x : geo.pad_x + w]
        return shifted, geo

    monkeypatch.setattr("daemon.detector.letterbox", top_left)
    broken = PersonDetector(str(openvino_model))
    assert not all(same_detections(broken(f), ref(f), iou=0.999, conf=1e-4) for f in walking)


def test_runtime_settings_reach_the_runtime(openvino_model, yolo_model):
    ov = PersonDetector(str(openvino_model), threads=2)
    assert ov._rt._compiled[1].get_compiled_model().get_property("INFERENCE_NUM_THREADS") == 2
    ort = PersonDetector(str(yolo_model), threads=1)
    opts = ort._rt._session.get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_batched_calls_give_the_same_detections(openvino_model, walking):
    single = PersonDetector(str(openvino_model))
    want = [single(f) for f in walking]
    det = PersonDetector(str(openvino_model), max_batch=4)
    got: dict[int, object] = {}
    barrier = threading.Barrier(4)

    def camera(k):
        for r in range(-(-len(walking) // 4)):
            barrier.wait(60)  # four cameras' frames due at once
            if (i := 4 * r + k) < len(walking):
                got[i] = det(walking[i])

    threads = [threading.Thread(target=camera, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(got) == list(range(len(walking))) and not barrier.broken
    assert det.frames == len(walking) and det.batches < det.frames, "no batch formed"
    for i, w in enumerate(want):  # each batch row is computed exactly as a single frame
        assert same_detections(got[i], w, iou=0.9999, conf=1e-6), i


def _process_cpu() -> float:
    t = os.times()
    return t.user + t.system


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_per_call_includes_the_runtime_threads(yolo_model, walking, threads):
    """The CPU charged to the calls adds up to what the process spent (onnxruntime's pool included)."""
    det = PersonDetector(str(yolo_model), threads=threads)
    det(walking[0])
    c0, charged = _process_cpu(), 0.0
    for f in walking[:8]:
        det(f)
        charged += det.last_cpu_s
    spent = _process_cpu() - c0
    assert 0.8 * spent <= charged <= 1.1 * spent, (charged, spent)


def test_a_failing_runtime_call_fails_every_frame_in_it(openvino_model, walking, monkeypatch):
    det = PersonDetector(str(openvino_model))

    def boom(x):
        raise RuntimeError("device lost")

    monkeypatch.setattr(det._rt, "infer", boom)
    with pytest.raises(RuntimeError, match="inference failed: device lost"):
        det(walking[2])
    monkeypatch.undo()
    assert len(det(walking[2])) == 1, "the next call works again"
