"""Scoring against MOT ground truth: metric arithmetic by hand, and ``regionwatch evaluate`` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers.video import cut_clip

from daemon.config import RegionConfig
from daemon.evaluate import GroundTruthError, MotTable, gt_transitions, match_events, mot_summary
from daemon.events import RegionTransition

REPO = Path(__file__).resolve().parents[1]


def transition(kind: str, frame: int, region: str = "r") -> RegionTransition:
    return RegionTransition(kind, "c", region, 1, frame, frame / 10, 0.0, (0, 0, 1, 1), (0, 0), 1.0)


def test_mot_figures_match_a_hand_count():
    """Two people over 6 frames; B's id switches 20 -> 21 on frame 3; one false box on frame 4.

    12 true boxes, all matched; 1 false positive; 1 switch: MOTA = 1 - (0 + 1 + 1) / 12.
    Best id mapping: A-10 (6 frames), B-20 (3): IDF1 = 2 * 9 / (12 + 13).
    """
    rows = [(f, 1, 10, 10, 20, 50) for f in range(1, 7)] + [(f, 2, 100, 10, 20, 50) for f in range(1, 7)]
    gt = MotTable.from_rows(rows)
    hyp = {}
    for i in range(6):
        ids = [10, 20 if i < 3 else 21]
        boxes = [[11, 10, 31, 60], [101, 11, 121, 61]]
        if i == 4:
            ids.append(99)
            boxes.append([300, 10, 320, 60])
        hyp[i] = (np.array(ids), np.array(boxes, float))
    s = mot_summary(gt, hyp, 6)
    assert s.id_switches == 1
    assert s.mota == pytest.approx(1 - 2 / 12)
    assert s.idf1 == pytest.approx(18 / 25)
    assert s.precision == pytest.approx(12 / 13) and s.recall == 1.0


def test_flag_0_boxes_are_ignored_and_hypotheses_on_them_dropped():
    gt = MotTable.from_rows([(1, 1, 10, 10, 20, 50, 1), (1, 2, 100, 10, 20, 50, 0)])
    hyp = {0: (np.array([5, 6]), np.array([[10, 10, 30, 60], [100, 10, 120, 60]], float))}
    s = mot_summary(gt, hyp, 1)
    assert (s.mota, s.precision, s.recall) == (1.0, 1.0, 1.0)


def test_events_are_paired_one_to_one_closest_first():
    truth = [transition("entry", 10), transition("entry", 50), transition("exit", 80)]
    predicted = [transition("entry", 12), transition("entry", 30), transition("entry", 51), transition("exit", 70)]
    s = match_events(predicted, truth, tolerance_frames=5)
    assert (s["entry"].tp, s["entry"].fp, s["entry"].fn) == (2, 1, 0)
    assert s["entry"].median_error == 1.5
    assert (s["exit"].tp, s["exit"].fp, s["exit"].fn) == (0, 1, 1)  # 10 frames off: beyond tolerance
    assert s["all"].precision == pytest.approx(2 / 4) and s["all"].recall == pytest.approx(2 / 3)
    # Other regions never pair.
    assert match_events([transition("entry", 10, "q")], [transition("entry", 10)], tolerance_frames=5)["entry"].tp == 0


def test_a_late_event_is_not_stolen_by_an_unrelated_one():
    """Greedy pairing would give 48 to 45 and leave 50 unpaired; the assignment pairs both."""
    s = match_events([transition("entry", 48), transition("entry", 41)], [transition("entry", 45), transition("entry", 50)],
                     tolerance_frames=5)
    assert s["entry"].tp == 2 and sorted(s["entry"].errors) == [2, 4]


def test_gt_region_events_use_the_same_debounce_and_end_tracks_that_vanish():
    rows = [(f, 7, 20 * f, 0, 10, 40) for f in range(1, 9)]  # feet at x = 20 f + 5 (index f - 1), walking right
    gt = MotTable.from_rows(rows)
    region = RegionConfig(id="r", polygon=[[60, 0], [200, 0], [200, 100], [60, 100]])
    got = gt_transitions(gt, [region], camera="c", fps=10, size=(300, 100), debounce_s=0.2)
    assert [(t.type, t.frame, t.reason) for t in got] == [("entry", 2, None), ("exit", 7, "track_lost")]


def test_bad_ground_truth_files_name_file_and_line(tmp_path):
    bad = tmp_path / "gt.txt"
    bad.write_text("1,1,10,10,20,50\n0,1,10,10,20,50\n")
    with pytest.raises(GroundTruthError, match=r"gt.txt:2: frame numbers are 1-based"):
        MotTable.load(bad)
    bad.write_text("1,1,10,10,-2,50\n")
    with pytest.raises(GroundTruthError, match=r"gt.txt:1: box must be finite with positive width and height"):
        MotTable.load(bad)
    bad.write_text("1;1;10\n")
    with pytest.raises(GroundTruthError, match=r"gt.txt:1: not a comma-separated"):
        MotTable.load(bad)


CONFIG = """
[detector]
model = "{model}"
[[cameras]]
id = "hall"
url = "{clip}"
[[cameras.regions]]
id = "table"
polygon = [[360, 330], [560, 330], [560, 412], [360, 412]]
[[cameras.regions]]
id = "window"
polygon = [[0, 250], [150, 250], [150, 420], [0, 420]]
"""


def test_evaluate_command_on_a_real_clip_with_a_hand_made_ground_truth(tmp_path, footage, yolo_model):
    """40 frames of the sample footage (source frames 100-139): the first visitor stands at the
    table all along. The hand-made ground truth has her box on every frame (1-based frames 1-40)
    and a phantom, id 2, standing by the window on frames 11-20 whom nobody can see.

    Tracking: 50 true boxes, 40 found, none false, no switch: MOTA = 1 - 10/50 = 0.8,
    IDF1 = 2 * 40 / (50 + 40). Events: hers (entry at frame 0, exit at the last frame 39, when
    the clip ends) are found at exactly those frames; the phantom's entry (frame 10) and exit
    (frame 19) are missed.
    """
    clip = tmp_path / "clip.mp4"
    cut_clip(footage, clip, 140, start=100)
    gt = tmp_path / "gt.txt"
    rows = [f"{f},1,382,14,136,378,1,-1,-1,-1" for f in range(1, 41)]
    rows += [f"{f},2,40,200,60,180,1,-1,-1,-1" for f in range(11, 21)]
    gt.write_text("\n".join(rows) + "\n")
    cfg = tmp_path / "config.toml"
    cfg.write_text(textwrap.dedent(CONFIG.format(model=yolo_model, clip=clip)))
    r = subprocess.run([sys.executable, "-m", "daemon", "evaluate", "-c", str(cfg), "-g", str(gt), "--json"],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["frames"] == 40 and report["fps"] == 10
    t = report["tracking"]
    assert (t["mota"], t["idf1"], t["id_switches"]) == (0.8, round(80 / 90, 4), 0)
    e = report["events"]
    assert (e["entry"]["tp"], e["entry"]["fp"], e["entry"]["fn"], e["entry"]["median_frame_error"]) == (1, 0, 1, 0.0)
    assert (e["exit"]["tp"], e["exit"]["fp"], e["exit"]["fn"], e["exit"]["median_frame_error"]) == (1, 0, 1, 0.0)
    assert report["true_events"] == 4 and report["predicted_events"] == 2
    assert report["detector_runs"] >= 40 / 10 * 2  # at least every tracking interval while she is there

    table = subprocess.run([sys.executable, "-m", "daemon", "evaluate", "-c", str(cfg), "-g", str(gt)],
                           capture_output=True, text=True, timeout=600, cwd=REPO)
    assert table.returncode == 0 and "MOTA 0.800" in table.stdout and "IDF1 0.889" in table.stdout


def test_evaluate_command_reports_bad_input_in_one_line(tmp_path, footage, yolo_model):
    cfg = tmp_path / "config.toml"
    cfg.write_text(textwrap.dedent(CONFIG.format(model=yolo_model, clip=footage)))
    r = subprocess.run([sys.executable, "-m", "daemon", "evaluate", "-c", str(cfg), "-g", str(tmp_path / "none.txt")],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and r.stderr.startswith("evaluate: cannot read ground truth") and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "daemon", "evaluate", "-c", str(cfg), "-g", str(cfg)],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and "config.toml:2: not a comma-separated" in r.stderr and "Traceback" not in r.stderr
    gt = tmp_path / "gt.txt"
    gt.write_text("1,1,10,10,20,50\n")
    r = subprocess.run([sys.executable, "-m", "daemon", "evaluate", "-c", str(cfg), "-g", str(gt), "--camera", "nope"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and r.stderr.startswith("evaluate: no camera 'nope'") and "Traceback" not in r.stderr
