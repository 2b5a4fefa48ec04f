"""Region events and identities on labelled footage: regionwatch's defaults against the alternatives.

For each clip (PETS09-S2L1 frames 1-300, TUD-Stadtmitte, the one-by-one sample), one table row per
way of running:

* ``defaults``: regionwatch as configured out of the box (detector every ``interval_s``, every
  ``tracking_interval_s`` while someone is tracked, median-flow following in between);
* ``every frame``: the same pipeline with the detector on every frame;
* ``model.track``: a plain ultralytics ``model.track(persist=True)`` loop (ByteTrack, detector on
  every frame), its tracks fed to the same region logic.

Region events are scored against events derived from the ground-truth boxes with the same regions,
anchors and debounce (:mod:`daemon.evaluate`); IDF1 and ID switches come from py-motmetrics. CPU is
the process CPU time of the run (decode, detector, tracking, regions; model loading excluded) per
second of video. Targets (issue 11) are checked at the end.

    .venv/bin/python bench/events.py                 # all clips, all rows (~10 min on 2 cores)
    .venv/bin/python bench/events.py --clips pets --rows defaults

The regions are fixed here, chosen once as parts of each scene people walk through (a walkway
crossing, a shopping street, the floor in front of a table and the two edges people enter and leave
by) — never tuned to the scores. ``bench/data/one-by-one-person-detection.gt.txt`` is the one-by-one
sample's ground truth (see ``bench/data/README.md``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("YOLO_OFFLINE", "1")

from daemon.config import RegionConfig, Settings  # noqa: E402
from daemon.evaluate import (  # noqa: E402
    HypothesisRecorder, MotTable, gt_transitions, match_events, mot_summary,
)
from daemon.records import Frame, TrackedPerson, TrackUpdate  # noqa: E402
from daemon.regions import RegionLogic  # noqa: E402

SHARED = ROOT.parent / "shared"
MODEL = SHARED / "assets" / "models" / "yolov8n_int8.onnx"


@dataclass(frozen=True)
class Clip:
    name: str
    video: Path
    gt: Path
    regions: list[dict]


CLIPS = {
    "pets": Clip(
        "pets09-s2l1", SHARED / "datasets/pets09-s2l1/pets09_s2l1_f1-300.mp4",
        SHARED / "datasets/pets09-s2l1/gt_f1-300.txt",
        [dict(id="west", polygon=[[30, 190], [250, 200], [250, 310], [30, 255]]),
         dict(id="centre", polygon=[[330, 225], [500, 225], [500, 335], [330, 335]]),
         dict(id="east", polygon=[[560, 210], [720, 180], [760, 340], [600, 380]])]),
    "tud": Clip(
        "tud-stadtmitte", SHARED / "datasets/tud-stadtmitte/tud_stadtmitte.mp4",
        SHARED / "datasets/tud-stadtmitte/gt.txt",
        [dict(id="west", polygon=[[0, 250], [300, 235], [300, 345], [0, 345]]),
         dict(id="east", polygon=[[330, 225], [640, 215], [640, 340], [330, 345]])]),
    "one-by-one": Clip(
        "one-by-one", SHARED / "assets/footage/one-by-one-person-detection.mp4",
        ROOT / "bench/data/one-by-one-person-detection.gt.txt",
        [dict(id="table", polygon=[[360, 330], [560, 330], [560, 412], [360, 412]]),
         dict(id="bottom_edge", polygon=[[0, 395], [768, 395], [768, 432], [0, 432]]),
         dict(id="right_edge", polygon=[[640, 300], [768, 300], [768, 432], [640, 432]])]),
}

ROWS = ("defaults", "every frame", "model.track")


def settings(clip: Clip, **detector) -> Settings:
    toml = [f'[detector]\nmodel = "{MODEL}"'] + [f"{k} = {v}" for k, v in detector.items()]
    toml += ['[[cameras]]\nid = "cam"', f'url = "{clip.video}"']
    for r in clip.regions:
        toml += ["[[cameras.regions]]", f'id = "{r["id"]}"', f"polygon = {r['polygon']}"]
    return Settings.from_toml_text("\n".join(toml))


def run_daemon(clip: Clip, gt: MotTable, **detector) -> dict:
    from daemon.evaluate import evaluate

    r = evaluate(settings(clip, **detector), "cam", clip.gt, gt=gt)
    return {"events": r.events, "idf1": r.tracking.idf1, "idsw": r.tracking.id_switches,
            "cpu": r.cpu_s / r.video_s, "runs": r.detector_runs / r.frames}


def run_plain_track(clip: Clip, gt: MotTable) -> dict:
    """The loop a user would write with ultralytics alone: model.track(persist=True) on every frame."""
    import av

    from daemon._ultralytics import ultralytics_offline
    from daemon.jobs import VideoInfo

    ultralytics_offline()
    from ultralytics import YOLO

    s = settings(clip)
    info = VideoInfo.probe(clip.video)
    fps = float(info.rate)
    model = YOLO(str(MODEL), task="detect")
    regions = [RegionConfig(**r) for r in clip.regions]
    logic = RegionLogic("cam", regions, debounce_s=s.events.debounce_s)
    recorder = HypothesisRecorder()
    events = []
    cpu0 = time.process_time()
    with av.open(str(clip.video)) as c:
        for i, f in enumerate(c.decode(video=0)):
            image = f.to_ndarray(format="bgr24")
            boxes = model.track(image, persist=True, classes=[0], conf=s.detector.confidence, verbose=False,
                                tracker="bytetrack.yaml")[0].boxes
            people = () if boxes.id is None else tuple(
                TrackedPerson(int(t), b.astype(np.float32), float(p))
                for t, b, p in zip(boxes.id.numpy(), boxes.xyxy.numpy(), boxes.conf.numpy()))
            frame = Frame("cam", i, i / fps, i / fps, image)
            update = TrackUpdate(frame, people)
            recorder(frame, update)
            events += logic.update(update)
    events += logic.finish()
    cpu = time.process_time() - cpu0
    frames = i + 1
    truth = gt_transitions(gt, regions, camera="cam", fps=fps, size=(info.width, info.height),
                           debounce_s=s.events.debounce_s, frames=frames)
    mot = mot_summary(gt, recorder.by_frame, frames)
    return {"events": match_events(events, truth, tolerance_frames=round(fps)), "idf1": mot.idf1,
            "idsw": mot.id_switches, "cpu": cpu / (frames / fps), "runs": 1.0}


def fmt(e) -> str:
    err = "-" if e.median_error is None else f"{e.median_error:g}"
    return f"{e.precision:.2f}/{e.recall:.2f}/{err}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", nargs="+", choices=list(CLIPS), default=list(CLIPS))
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    args = ap.parse_args()
    missing = [str(p) for c in args.clips for p in (CLIPS[c].video, CLIPS[c].gt) if not p.exists()]
    if missing or not MODEL.exists():
        print(f"bench/events.py: missing {', '.join(missing or [str(MODEL)])} (../shared must sit beside the repo)")
        return 2
    import logging

    logging.basicConfig(level=logging.WARNING)
    print(f"load: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; detector {MODEL.name}")
    print(f"{'clip':<15} {'run':<12} {'entry P/R/err':>15} {'exit P/R/err':>15} {'IDF1':>6} {'IDsw':>5} "
          f"{'CPU s/s':>8} {'det/frame':>9}")
    results: dict[tuple[str, str], dict] = {}
    for key in args.clips:
        clip = CLIPS[key]
        gt = MotTable.load(clip.gt)
        for row in args.rows:
            if row == "defaults":
                r = run_daemon(clip, gt)
            elif row == "every frame":
                r = run_daemon(clip, gt, interval_s=0, tracking_interval_s=0, motion_gate="false")
            else:
                r = run_plain_track(clip, gt)
            results[key, row] = r
            e = r["events"]
            print(f"{clip.name:<15} {row:<12} {fmt(e['entry']):>15} {fmt(e['exit']):>15} {r['idf1']:>6.3f} "
                  f"{r['idsw']:>5} {r['cpu']:>8.2f} {r['runs']:>9.2f}", flush=True)
    print("\ntargets (issue 11): defaults P, R >= 0.95 and median error <= 2 frames for entries and exits; "
          "IDF1 >= model.track; CPU <= 0.5 x every frame")
    ok = True
    for key in args.clips:
        d = results.get((key, "defaults"))
        if d is None:
            continue
        checks = []
        for kind in ("entry", "exit"):
            e = d["events"][kind]
            checks.append((f"{kind} P/R", e.precision >= 0.95 and e.recall >= 0.95))
            checks.append((f"{kind} error", e.median_error is not None and e.median_error <= 2))
        if (key, "model.track") in results:
            checks.append(("IDF1", d["idf1"] >= results[key, "model.track"]["idf1"]))
        if (key, "every frame") in results:
            checks.append(("CPU", d["cpu"] <= 0.5 * results[key, "every frame"]["cpu"]))
        failed = [name for name, good in checks if not good]
        ok &= not failed
        print(f"  {CLIPS[key].name:<15} {'met' if not failed else 'NOT met: ' + ', '.join(failed)}")
    return 0 if ok else 1


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        raise SystemExit(main())
