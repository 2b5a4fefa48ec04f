"""YOLO inference on the CPU runtimes directly: OpenVINO (IR folders) and onnxruntime (.onnx).

Ultralytics' predictor works with any model but gives no say over the runtime's threads (its
onnxruntime session spins idle cores, OpenVINO gets every core) and runs one image per call. Here
the runtime is built with the thread settings the daemon chooses, several images go in one call
where the model allows it, and pre/post-processing are the library calls ultralytics makes:

* :func:`letterbox`: resize keeping the aspect ratio and pad with grey (114) to the model's input,
  exactly as ultralytics' ``LetterBox`` (centre padding, the same rounding);
* :func:`person_boxes`: best class per box, keep ``person`` above the confidence, NMS
  (``cv2.dnn.NMSBoxes``), boxes mapped back to the frame and clipped — ultralytics'
  ``non_max_suppression`` + ``scale_boxes``. End-to-end models (YOLO26, ``[B, 300, 6]`` output)
  skip the NMS.

``tests/test_detector.py`` checks the boxes equal ultralytics' own predictions on real frames.

Batching: both shipped exports have batch 1 baked into their reshapes. :func:`openvino_batchable`
rewrites those reshapes to take the batch from the input (OpenVINO's ``special_zero``), which
gives bit-identical rows; each batch size is then compiled as a static shape (dynamic INT8 shapes
are unsafe on AMX CPUs). onnxruntime models run one image per call.

Example:
    >>> import numpy as np
    >>> rt = open_runtime("../shared/assets/models/yolo11n_int8_openvino_model", threads=1)
    >>> type(rt).__name__, rt.input_hw, rt.names[0]
    ('OpenVinoYolo', (640, 640), 'person')
    >>> img, geo = letterbox(np.zeros((432, 768, 3), np.uint8), rt.input_hw)
    >>> img.shape, geo
    ((640, 640, 3), Letterbox(gain_x=0.8333333333333334, gain_y=0.8333333333333334, pad_x=0, pad_y=140))
    >>> out = rt.infer(blob([img]))
    >>> person_boxes(out[0], geo, (432, 768), person=0, conf=0.35, iou=0.7)[0].shape
    (0, 4)
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

PAD_VALUE = 114


@dataclass(frozen=True, slots=True)
class Letterbox:
    """How a frame was mapped into the model input: per-axis scale, then left/top padding."""

    gain_x: float
    gain_y: float
    pad_x: int
    pad_y: int


def letterbox(image: np.ndarray, input_hw: tuple[int, int]) -> tuple[np.ndarray, Letterbox]:
    """Resize (aspect ratio kept) and centre-pad with grey to ``input_hw``, as ultralytics does."""
    h, w = image.shape[:2]
    th, tw = input_hw
    r = min(th / h, tw / w)
    nw, nh = max(round(w * r), 1), max(round(h * r), 1)
    if (nw, nh) != (w, h):
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    dw, dh = (tw - nw) / 2, (th - nh) / 2
    top, bottom, left, right = round(dh - 0.1), round(dh + 0.1), round(dw - 0.1), round(dw + 0.1)
    if top or bottom or left or right:
        image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return image, Letterbox(nw / w, nh / h, left, top)


def blob(images: list[np.ndarray]) -> np.ndarray:
    """Letterboxed BGR uint8 images -> one ``[B, 3, H, W]`` float32 RGB blob scaled to 0..1."""
    return cv2.dnn.blobFromImages(images, scalefactor=1 / 255.0, swapRB=True)


def person_boxes(
    out: np.ndarray, geo: Letterbox, frame_hw: tuple[int, int], *, person: int, conf: float, iou: float,
    end2end: bool = False, max_det: int = 300,
) -> tuple[np.ndarray, np.ndarray]:
    """One image's raw output -> (xyxy float32 [N, 4] in frame pixels, scores [N]), best first."""
    if end2end or (out.ndim == 2 and out.shape[-1] == 6 and out.shape[0] != 6):  # [300, 6]: x1 y1 x2 y2 score class
        keep = (out[:, 4] > conf) & (out[:, 5] == person)
        xyxy, scores = out[keep, :4].astype(np.float32), out[keep, 4].astype(np.float32)
    else:  # [4 + classes, anchors]: cx cy w h, class scores
        cls = out[4:]
        best = cls.argmax(0)
        score = cls[best, np.arange(cls.shape[1])]
        keep = (best == person) & (score > conf)
        cxcywh, scores = out[:4, keep].T, score[keep].astype(np.float32)
        if len(scores) == 0:
            return np.zeros((0, 4), np.float32), scores
        xywh = np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, 2:]], axis=1)
        idx = np.asarray(cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), conf, iou), np.int64).reshape(-1)[:max_det]
        xywh, scores = xywh[idx], scores[idx]
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32)
    order = np.argsort(-scores, kind="stable")
    xyxy, scores = xyxy[order], scores[order]
    xyxy[:, [0, 2]] = ((xyxy[:, [0, 2]] - geo.pad_x) / geo.gain_x).clip(0, frame_hw[1])
    xyxy[:, [1, 3]] = ((xyxy[:, [1, 3]] - geo.pad_y) / geo.gain_y).clip(0, frame_hw[0])
    return xyxy, scores


def openvino_batchable(model):
    """Make an OpenVINO model with batch 1 baked into its reshapes take the batch from its input.

    Every ``Reshape`` whose target shape is a constant starting with 1 gets 0 there with
    ``special_zero`` (0 = copy that dimension from the input). Returns how many were changed.
    """
    from openvino import opset13

    changed = 0
    for op in model.get_ops():
        if op.get_type_name() != "Reshape":
            continue
        src = op.input_value(1).get_node()
        if src.get_type_name() != "Constant":
            continue
        target = src.get_data().copy()
        if target.size and target[0] == 1:
            target[0] = 0
            op.input(1).replace_source_output(opset13.constant(target).output(0))
            op.set_special_zero(True)
            changed += 1
    return changed


class OpenVinoYolo:
    """A YOLO OpenVINO IR (an ultralytics ``*_openvino_model`` folder, or its ``.xml``) on the CPU.

    ``threads`` is OpenVINO's ``INFERENCE_NUM_THREADS`` for one call, in one stream; CPU pinning is
    off (the cores are shared with decoding). ``max_batch`` > 1 compiles larger batches on first use.
    Calls must not overlap (the detector front serialises them).
    """

    name = "openvino"

    def __init__(self, path: str | Path, *, threads: int = 1, max_batch: int = 1):
        import openvino as ov
        import yaml

        p = Path(path)
        xml = p if p.suffix == ".xml" else next(iter(sorted(p.glob("*.xml"))), None)
        if xml is None:
            raise FileNotFoundError(f"no .xml model in {p}")
        meta_file = xml.parent / "metadata.yaml"
        meta = yaml.safe_load(meta_file.read_text()) if meta_file.is_file() else {}
        self.names = {int(k): str(v) for k, v in (meta.get("names") or {}).items()}
        self.end2end = bool(meta.get("end2end", False))
        self._core = ov.Core()
        self._config = {
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "INFERENCE_NUM_THREADS": int(threads),
            "ENABLE_CPU_PINNING": False,
        }
        self._model = self._core.read_model(str(xml))
        shape = self._model.input(0).get_partial_shape()
        if shape.is_dynamic:
            raise ValueError(f"{xml}: dynamic input shape {shape} (export with a fixed imgsz)")
        self.input_hw = (shape[2].get_length(), shape[3].get_length())
        self._compiled = {1: self._compile(self._model, 1)}
        self._batchable = None
        self.max_batch = max(1, int(max_batch))
        for b in range(2, self.max_batch + 1):  # compiled now, not while cameras wait for their first batch
            self._request(b)

    def _compile(self, model, batch: int):
        if batch != 1:
            model.reshape([batch, 3, *self.input_hw])
        return self._core.compile_model(model, "CPU", self._config).create_infer_request()

    def _request(self, batch: int):
        req = self._compiled.get(batch)
        if req is None:
            if self._batchable is None:
                self._batchable = self._model.clone()
                openvino_batchable(self._batchable)
            log.debug("compiling the detector for batches of %d", batch)
            req = self._compiled[batch] = self._compile(self._batchable.clone(), batch)
        return req

    def infer(self, x: np.ndarray) -> np.ndarray:
        """``[B, 3, H, W]`` float32 -> the model's first output, ``[B, ...]``."""
        req = self._request(len(x))
        req.infer({0: x})
        return req.get_output_tensor(0).data.copy()


class OnnxYolo:
    """A YOLO ``.onnx`` export on onnxruntime's CPU provider.

    ``threads`` is the intra-op pool size; its threads do not spin while waiting for work (spinning
    keeps idle cores busy between runs, which other cameras need). One image per call.
    """

    name = "onnxruntime"
    max_batch = 1

    def __init__(self, path: str | Path, *, threads: int = 1):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        meta = self._session.get_modelmeta().custom_metadata_map
        self.names = {int(k): str(v) for k, v in ast.literal_eval(meta.get("names", "{}")).items()}
        self.end2end = meta.get("end2end", "False") == "True"
        inp = self._session.get_inputs()[0]
        if not all(isinstance(d, int) for d in inp.shape[2:]):
            raise ValueError(f"{path}: dynamic input shape {inp.shape} (export with a fixed imgsz)")
        self._input = inp.name
        self.input_hw = (int(inp.shape[2]), int(inp.shape[3]))

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: x})[0]


def open_runtime(path: str | Path, *, threads: int = 1, max_batch: int = 1):
    """The direct runtime for a model file: OpenVINO for an IR folder/.xml, onnxruntime for .onnx.

    Raises ValueError for any other kind of file (the detector then uses ultralytics).
    """
    p = Path(path)
    if p.suffix == ".xml" or (p.is_dir() and any(p.glob("*.xml"))):
        return OpenVinoYolo(p, threads=threads, max_batch=max_batch)
    if p.suffix == ".onnx":
        return OnnxYolo(p, threads=threads)
    raise ValueError(f"{path}: not an OpenVINO IR or .onnx model")
