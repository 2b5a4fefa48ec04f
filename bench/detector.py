"""Detector benchmark: CPU runtimes side by side (latency, CPU per run, idle spinning, accuracy), and batching.

    .venv/bin/python bench/detector.py [--runs 20] [--every 5] [--callers 1 2 4 8] [--skip-accuracy]

Three tables, every row measured in this process, one after the other (so they see the same
machine state):

1. **Runtimes** — for each model/runtime/threads setting, on a 432p frame of the sample footage and
   the same frame upscaled to 1080p: median wall ms per run, CPU ms per run (process CPU time /
   runs: every thread the runtime uses), and CPU ms the process burns in the second *after* the
   last run (threads spinning while idle steal that time from other cameras). The ``ultralytics``
   rows are what the daemon did before (ultralytics' predictor with its default session).
2. **Accuracy sanity** — every ``--every``-th frame of the footage through each model: frames with
   a person, boxes, and agreement with the reference (the first row, the previous default): frames
   with the same number of people, mean IoU of matched boxes.
3. **Batching** — K threads call one :class:`daemon.detector.PersonDetector` at once (K cameras
   whose frames are due together), ``max_batch = 1`` (one runtime call per frame) against
   ``max_batch = K``: frames/s and CPU ms per frame, and the mean batch size that formed.

Other processes competing for the cores inflate wall times; CPU figures are the ones to compare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import av
import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daemon.detector import PersonDetector  # noqa: E402
from daemon.geometry import box_iou  # noqa: E402

ASSETS = ROOT / ".." / "shared" / "assets"
FOOTAGE = ASSETS / "footage" / "one-by-one-person-detection.mp4"
ONNX = ASSETS / "models" / "yolov8n_int8.onnx"
OPENVINO = ASSETS / "models" / "yolo11n_int8_openvino_model"

# (label, model, kwargs): the first row is the reference (the daemon before this bench existed)
SETTINGS = [
    ("yolov8n INT8 onnx, ultralytics (before)", ONNX, dict(runtime="ultralytics")),
    ("yolov8n INT8 onnx, onnxruntime 1 thread", ONNX, dict(threads=1)),
    ("yolov8n INT8 onnx, onnxruntime 2 threads", ONNX, dict(threads=2)),
    ("yolo11n INT8 OpenVINO, ultralytics", OPENVINO, dict(runtime="ultralytics")),
    ("yolo11n INT8 OpenVINO, 1 thread", OPENVINO, dict(threads=1)),
    ("yolo11n INT8 OpenVINO, 2 threads", OPENVINO, dict(threads=2)),
]


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def frames(every: int) -> list[np.ndarray]:
    with av.open(str(FOOTAGE)) as c:
        return [vf.to_ndarray(format="bgr24") for i, vf in enumerate(c.decode(video=0)) if i % every == 0]


def speed(det: PersonDetector, image: np.ndarray, runs: int) -> tuple[float, float, float]:
    """(median wall ms, CPU ms per run, CPU ms burnt in the idle second after)."""
    for _ in range(3):
        det(image)
    walls = []
    c0 = cpu_s()
    for _ in range(runs):
        w0 = time.perf_counter()
        det(image)
        walls.append(time.perf_counter() - w0)
    per_run = (cpu_s() - c0) / runs
    c1 = cpu_s()
    time.sleep(1.0)
    return 1000 * statistics.median(walls), 1000 * per_run, 1000 * (cpu_s() - c1)


def agreement(ref: list, got: list) -> tuple[float, float]:
    """(share of frames with the same number of people, mean IoU of greedily matched boxes)."""
    same, ious = 0, []
    for a, b in zip(ref, got):
        same += len(a) == len(b)
        if len(a) and len(b):
            m = box_iou(a.xyxy, b.xyxy)
            while m.size and m.max() > 0:
                i, j = np.unravel_index(m.argmax(), m.shape)
                ious.append(m[i, j])
                m[i, :], m[:, j] = 0, 0
    return same / max(len(ref), 1), float(np.mean(ious)) if ious else float("nan")


def batching(model: Path, images: list[np.ndarray], callers: int, max_batch: int, rounds: int) -> tuple[float, float, float]:
    """K threads each detect ``rounds`` frames at once: (frames/s, CPU ms per frame, mean batch)."""
    det = PersonDetector(str(model), threads=1, max_batch=max_batch)
    barrier = threading.Barrier(callers)

    def caller(k: int) -> None:
        for r in range(rounds):
            barrier.wait()  # all cameras' frames become due together, as on a shared detector tick
            det(images[(k * rounds + r) % len(images)])

    for image in images[:3]:
        det(image)
    b0, f0 = det.batches, det.frames
    threads = [threading.Thread(target=caller, args=(k,)) for k in range(callers)]
    w0, c0 = time.perf_counter(), cpu_s()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - w0, cpu_s() - c0
    n = callers * rounds
    return n / wall, 1000 * cpu / n, (det.frames - f0) / max(det.batches - b0, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="runs per speed row")
    ap.add_argument("--every", type=int, default=5, help="accuracy: every n-th frame of the footage")
    ap.add_argument("--callers", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--rounds", type=int, default=10, help="batching: frames per caller")
    ap.add_argument("--tables", nargs="+", choices=["runtimes", "accuracy", "batching"],
                    default=["runtimes", "accuracy", "batching"])
    args = ap.parse_args(argv)
    for p in (FOOTAGE, ONNX, OPENVINO):
        if not p.exists():
            print(f"asset not found: {p}", file=sys.stderr)
            return 2
    sample = frames(args.every)
    f432 = sample[len(sample) // 2]
    f1080 = cv2.resize(f432, (1920, 1080), interpolation=cv2.INTER_LINEAR)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.runs} runs per row")
    if "runtimes" not in args.tables and "accuracy" not in args.tables:
        SETTINGS.clear()
    print("| model, runtime | 432p wall ms | 432p CPU ms/run | 1080p wall ms | 1080p CPU ms/run | idle CPU ms in 1 s after |")
    print("|---|---|---|---|---|---|")
    dets = {}
    for label, model, kw in SETTINGS:
        det = dets[label] = PersonDetector(str(model), **kw)
        if "runtimes" not in args.tables:
            continue
        w4, c4, _ = speed(det, f432, args.runs)
        w10, c10, idle = speed(det, f1080, args.runs)
        print(f"| {label} | {w4:.1f} | {c4:.1f} | {w10:.1f} | {c10:.1f} | {idle:.0f} |", flush=True)

    if "accuracy" in args.tables:
        print(f"\nAccuracy sanity: {len(sample)} frames (every {args.every}th of {FOOTAGE.name}); reference: {SETTINGS[0][0]}")
        print("| model, runtime | frames with a person | boxes | same count as reference | mean IoU of matched boxes |")
        print("|---|---|---|---|---|")
        ref = None
        for label, det in dets.items():
            got = [det(f) for f in sample]
            ref = ref or got
            same, iou = agreement(ref, got)
            print(f"| {label} | {sum(len(g) > 0 for g in got)} | {sum(len(g) for g in got)} | {same:.1%} | {iou:.3f} |",
                  flush=True)

    if "batching" not in args.tables:
        return 0
    print(f"\nBatching (OpenVINO yolo11n INT8, 1 thread; {args.rounds} frames per caller, load {os.getloadavg()[0]:.1f})")
    print("| callers (cameras due together) | per-camera calls: frames/s | CPU ms/frame | batched: frames/s | CPU ms/frame | mean batch | CPU saved |")
    print("|---|---|---|---|---|---|---|")
    for k in args.callers:
        fps1, cpu1, _ = batching(OPENVINO, sample, k, 1, args.rounds)
        fpsk, cpuk, mean = batching(OPENVINO, sample, k, k, args.rounds)
        print(f"| {k} | {fps1:.1f} | {cpu1:.1f} | {fpsk:.1f} | {cpuk:.1f} | {mean:.1f} | {1 - cpuk / cpu1:.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
