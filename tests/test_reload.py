"""App.reload in process, on a real camera (a file paced in real time, the real model): what is
swapped in place, what restarts, what only a restart applies, and a reload asked for while models
load. tests/sinks/test_reload.py runs the whole daemon with SIGHUP, cameras coming and going and
MQTT; this one looks inside (the same pipeline object, the detector object, the log).

One visitor steps into the table region 1.7 s into the 13 s clip and stays to the end.
"""

from __future__ import annotations

import json
import logging
import textwrap
import threading
import time

import pytest
from helpers import wait_until
from helpers.video import cut_clip

from daemon.app import App
from daemon.config import Settings

pytestmark = pytest.mark.slow

CONFIG = """
[detector]
model = "{model}"
confidence = {confidence}
interval_s = 1.0
tracking_interval_s = 1.0
imgsz = 320
[tracker]
lost_after_s = {lost_after_s}
{tracker}
[sinks.stdout]
enabled = false
[sinks.jsonl]
path = "{out}/events.jsonl"
[state]
dir = "{out}/state"
[metrics]
enabled = false
listen = "{listen}"
[[cameras]]
id = "hall"
url = "{clip}"
realtime = true
queue_frames = 256
[[cameras.regions]]
id = "table"
polygon = [[180, 165], [280, 165], [280, 206], [180, 206]]
anchor = "{anchor}"
"""



def test_reload_swaps_the_detector_keeps_restart_only_keys_and_restarts_cameras_for_tracker_changes(
        tmp_path, footage, yolo_model, caplog):
    caplog.set_level(logging.INFO)
    clip = tmp_path / "clip.mp4"
    cut_clip(footage, clip, 185, start=55, crf=18, size=(384, 216))

    def settings(**kw) -> Settings:
        values = {"model": yolo_model, "out": tmp_path, "clip": clip, "confidence": 0.35, "lost_after_s": 2.0,
                  "listen": "127.0.0.1:9108", "anchor": "bottom_center", "tracker": ""} | kw
        return Settings.from_toml_text(textwrap.dedent(CONFIG.format(**values)))

    def events() -> list[dict]:
        path = tmp_path / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    app = App(settings())
    app.load()
    first = app.detector.current
    # A reload asked for before the cameras start waits for them, then applies.
    results: list[bool] = []
    early = threading.Thread(target=lambda: results.append(app.reload(settings(confidence=0.4))))
    early.start()
    time.sleep(0.3)
    assert early.is_alive() and results == []
    runner = threading.Thread(target=lambda: results.append(app.run()))
    runner.start()
    try:
        early.join(60)
        assert results == [True]
        assert app.detector.current is not first and app.detector.current.confidence == 0.4
        assert wait_until(lambda: any(e["type"] == "entry" for e in events()), 120), caplog.text
        pipeline, tracker = app.pipelines[0], app.pipelines[0].tracker

        # The detector again, with keys only a restart applies: the camera keeps running untouched.
        assert app.reload(settings(confidence=0.5, listen="127.0.0.1:9200"))
        assert "metrics.listen: changed, but only a restart applies it (systemctl restart regionwatch); " \
               "keeping the running value" in caplog.text
        assert app.settings.metrics.listen == "127.0.0.1:9108" and app.detector.current.confidence == 0.5
        assert app.pipelines == [pipeline] and pipeline.tracker is tracker
        assert "cameras unchanged: hall; detector model reloaded" in caplog.text

        # Valid on its own, not with the running tracker (restart-only): rejected, nothing changes.
        sam2 = 'backend = "sam2"\n[tracker.sam2]\nrandom_weights_for_tests = true'
        assert not app.reload(settings(confidence=0.5, anchor="mask_overlap", tracker=sam2))
        assert ("cameras.hall.regions.table: anchor 'mask_overlap' needs tracker.backend = 'sam2' (with the "
                "running value of tracker.backend, tracker.sam2.random_weights_for_tests, which only a restart "
                "changes)") in caplog.text
        assert app.pipelines == [pipeline] and app.settings.cameras[0].regions[0].anchor == "bottom_center"

        assert [e["type"] for e in events()] == ["entry"]
        entered = events()[0]
        # A tracker setting restarts the camera: its visitor exits now, then its file plays again.
        assert app.reload(settings(confidence=0.5, lost_after_s=3.0))
        assert app.pipelines[0] is not pipeline and app.pipelines[0].identity.lost_after_s == 3.0
        assert [e["type"] for e in events()] == ["entry", "exit"]
        assert events()[1]["track_id"] == entered["track_id"] and events()[1]["reason"] == "track_lost"
        assert wait_until(lambda: len(events()) >= 3, 60), caplog.text
    finally:
        app.request_stop()
        runner.join(60)
    assert results == [True, 0]
    evs = events()
    assert [(e["type"], e["seq"]) for e in evs] == [("entry", 1), ("exit", 2), ("entry", 3), ("exit", 4)]
    assert evs[2]["frame"] < evs[1]["frame"] + 10  # the restarted camera read its file from the start
    reloads = app.metrics.registry.get_sample_value
    assert reloads("regionwatch_config_reloads_total", {"result": "applied"}) == 3
    assert reloads("regionwatch_config_reloads_total", {"result": "rejected"}) == 1
    assert reloads("regionwatch_config_last_reload_successful") == 1
