"""The per-camera detection switch, in the real pipeline on the real footage.

Detection is switched off at frame 300, while visitor 2 stands in the region (observed inside from
frame 244 to 438), and on again at frame 600, while visitor 3 stands there (520 to 688). Expected:
visitor 2 gets an exit (``track_lost``) at the switch, the detector never runs while it is off,
people in view and occupancy drop to 0, visitor 3 gets an entry as soon as it is on again, and
the choice is in the state directory throughout.
"""

from __future__ import annotations

import json
import textwrap

from daemon.app import App
from daemon.config import Settings
from daemon.sinks.base import Sink
from daemon.switches import DetectionSwitches

CONFIG = """
[detector]
model = "{model}"
interval_s = 0.5
imgsz = 320
[tracker]
backend = "bytetrack"
[sinks.jsonl]
path = "{out}/events.jsonl"
[sinks.stdout]
enabled = false
[state]
dir = "{out}/state"
[metrics]
enabled = false
[[cameras]]
id = "hall"
url = "{footage}"
[[cameras.regions]]
id = "table"
polygon = [[360, 330], [560, 330], [560, 412], [360, 412]]
"""
OFF_AT, ON_AT, STOP_AT = 300, 600, 720


class Recorder(Sink):
    """A sink that records what the app tells sinks besides events."""

    name = "recorder"

    def __init__(self):
        self.calls: list[tuple] = []

    def publish(self, event, snapshot=None):
        self.calls.append(("event", event.type, event.frame))

    def people(self, camera, count):
        self.calls.append(("people", camera, count))

    def occupancy(self, camera, region, count):
        self.calls.append(("occupancy", region, count))

    def detection_state(self, camera, enabled):
        self.calls.append(("detection", camera, enabled))


def test_switch_off_and_on_mid_stream(tmp_path, footage, yolo_model):
    settings = Settings.from_toml_text(textwrap.dedent(CONFIG.format(model=yolo_model, out=tmp_path, footage=footage)))
    app = App(settings)
    app.load()
    recorder = Recorder()
    app.sinks.append(recorder)
    state_file = tmp_path / "state" / "detection.json"
    runs: dict[int, float] = {}
    seen: dict[int, tuple] = {}

    def detector_runs() -> float:
        return app.metrics.registry.get_sample_value("regionwatch_detector_runs_total", {"camera": "hall"}) or 0.0

    def observer(frame, update, transitions):
        runs[frame.index] = detector_runs()
        if frame.index == OFF_AT:
            app.set_detection("hall", False)
        elif frame.index == (OFF_AT + ON_AT) // 2:
            seen["saved"] = json.loads(state_file.read_text())["cameras"]
            seen["calls"] = list(recorder.calls)
        elif frame.index == ON_AT:
            app.set_detection("hall", True)
        elif frame.index == STOP_AT:
            app.request_stop()

    app.pipelines[0].observers.append(observer)
    assert app.run() == 0
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    summary = [(e["type"], e["frame"], e.get("reason")) for e in events]

    # No detector run while switched off (frames OFF_AT+1 .. ON_AT), runs before and after.
    assert runs[OFF_AT + 1] == runs[ON_AT], (runs[OFF_AT + 1], runs[ON_AT])
    assert runs[OFF_AT] > 0 and runs[STOP_AT] > runs[ON_AT]
    # Visitor 2 leaves at the switch; nothing happens while off; visitor 3 enters when it is on.
    before = [s for s in summary if s[1] <= OFF_AT]
    during = [s for s in summary if OFF_AT < s[1] < ON_AT]
    after = [s for s in summary if s[1] >= ON_AT]
    assert [s[0] for s in before] == ["entry", "exit", "entry", "exit"], summary
    assert before[-1][2] == "track_lost" and before[-1][1] >= OFF_AT - 5, summary
    assert during == [], summary
    assert after and after[0][0] == "entry" and after[0][1] <= ON_AT + 10, summary
    # What the sinks were told: the switch, then the exit, occupancy 0 and people 0.
    calls = seen["calls"]
    i = calls.index(("detection", "hall", False))
    assert calls[i:] == [("detection", "hall", False), ("event", "exit", before[-1][1]), ("occupancy", "table", 0),
                         ("people", "hall", 0)], calls[i:]
    assert seen["saved"] == {"hall": False}
    assert json.loads(state_file.read_text())["cameras"] == {"hall": True}
    assert ("detection", "hall", True) in recorder.calls
    # The choice outlives the app: the next one starts with it.
    app.set_detection("hall", False)
    assert DetectionSwitches(settings.state.dir, ["hall"]).enabled("hall") is False
