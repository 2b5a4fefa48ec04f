"""daemon/reconfig.py: what a configuration reload keeps, restarts and rebuilds."""

from __future__ import annotations

import textwrap

import pytest

from daemon.config import ConfigError, Settings
from daemon.fleet import FleetPlan, Shard
from daemon.reconfig import RESTART_ONLY, changed_keys, keep_restart_only, plan_reload

HALL = """
[[cameras]]
id = "hall"
url = "rtsp://cam/hall"
[[cameras.regions]]
id = "table"
polygon = [[0, 0], [90, 0], [90, 90]]
[[cameras.regions]]
id = "door"
polygon = [[100, 0], [190, 0], [190, 90]]
"""
YARD = """
[[cameras]]
id = "yard"
url = "rtsp://cam/yard"
"""


@pytest.fixture
def config(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not loaded here")

    def make(body: str = HALL + YARD, head: str = "") -> Settings:
        return Settings.from_toml_text(f'[detector]\nmodel = "{model}"\n' + textwrap.dedent(head) + body)

    return make


def test_changed_keys_name_cameras_and_regions_by_id_and_ignore_their_order(config):
    old = config()
    assert changed_keys(old, config(YARD + HALL)) == []
    swapped = HALL.replace('id = "table"', 'id = "tmp"').replace('id = "door"', 'id = "table"').replace(
        'id = "tmp"', 'id = "door"')
    assert changed_keys(old, config(swapped + YARD)) == ["cameras.hall.regions.door.polygon",
                                                         "cameras.hall.regions.table.polygon"]
    assert changed_keys(old, config(HALL, "[events]\ndebounce_s = 1\n")) == ["cameras.yard", "events.debounce_s"]


@pytest.mark.parametrize(("head", "key"), [
    ('[metrics]\nlisten = "127.0.0.1:9999"\n', "metrics.listen"),
    ('[state]\ndir = "/elsewhere"\n', "state.dir"),
    ('[fleet]\nshard = "1/2"\n', "fleet.shard"),
    ("[preview]\nenabled = true\n", "preview.enabled"),
    ("[snapshots]\nkeep_days = 1\n", "snapshots.keep_days"),
    ('[tracker]\nbackend = "sam2"\n[tracker.sam2]\nrandom_weights_for_tests = true\n', "tracker.backend"),
    ("[tracker.sam2]\ntrack_fps = 5\n", "tracker.sam2.track_fps"),
])
def test_restart_only_keys_keep_their_running_values_and_are_named(config, head, key):
    old = config()
    merged, kept = keep_restart_only(old, config(head=head))
    assert key in kept and all(any(k == p or k.startswith(p + ".") for p in RESTART_ONLY) for k in kept)
    assert changed_keys(old, merged) == []  # nothing else changed, and the running value is back


def test_other_changes_pass_through_with_the_restart_only_ones_put_back(config):
    old = config()
    merged, kept = keep_restart_only(old, config(HALL, '[metrics]\nlisten = "127.0.0.1:9999"\n'
                                                       "[tracker]\nlost_after_s = 5\n"))
    assert kept == ["metrics.listen"]
    assert merged.metrics.listen == old.metrics.listen
    assert merged.tracker.lost_after_s == 5 and [c.id for c in merged.cameras] == ["hall"]
    assert keep_restart_only(old, config())[1] == []


def test_a_config_that_only_works_with_another_tracker_is_rejected(config):
    """A mask_overlap region needs SAM2; the backend is restart-only, so ByteTrack stays: invalid."""
    sam2 = '[tracker]\nbackend = "sam2"\n[tracker.sam2]\nrandom_weights_for_tests = true\n'
    new = config(HALL.replace('id = "door"', 'id = "door"\nanchor = "mask_overlap"'), sam2)
    with pytest.raises(ConfigError) as e:
        keep_restart_only(config(), new)
    assert len(e.value.problems) == 1
    assert e.value.problems[0].startswith("cameras.hall.regions.door: anchor 'mask_overlap' needs tracker.backend")
    assert "running value of tracker.backend" in e.value.problems[0]


def test_cameras_added_removed_restarted_and_untouched(config):
    plan = plan_reload(config(), config(HALL.replace("[[0, 0], [90, 0]", "[[0, 0], [95, 0]")
                                        + '[[cameras]]\nid = "gate"\nurl = "rtsp://cam/gate"\n'))
    assert (plan.added, plan.removed, plan.restarted, plan.unchanged) == (("gate",), ("yard",), ("hall",), ())
    assert plan.describe() == "cameras started: gate; stopped: yard; restarted: hall"
    plan = plan_reload(config(), config(YARD + HALL))
    assert plan.empty and plan.unchanged == ("yard", "hall") and plan.keys == ()  # in the new order


def test_disabling_a_camera_stops_it_and_enabling_starts_it(config):
    off = config(HALL + YARD + "enabled = false\n")
    plan = plan_reload(config(), off)
    assert plan.removed == ("yard",) and plan.unchanged == ("hall",)
    assert plan_reload(off, config()).added == ("yard",)
    # A disabled camera's settings change nothing that runs.
    plan = plan_reload(off, config(HALL + YARD.replace("cam/yard", "cam/yard2") + "enabled = false\n"))
    assert plan.empty and plan.keys == ("cameras.yard.url",)


@pytest.mark.parametrize("head", [
    "[events]\ndebounce_s = 1.0\n",
    "[refine]\nenabled = true\n",
    "[tracker]\nlost_after_s = 4.0\n",
    "[tracker.bytetrack]\nmatch_thresh = 0.7\n",
])
def test_pipeline_settings_restart_every_camera(config, head):
    plan = plan_reload(config(), config(head=head))
    assert plan.restarted == ("hall", "yard") and not plan.detector and not plan.sinks


def test_detector_cadence_restarts_cameras_and_model_settings_swap_the_detector(tmp_path, config):
    base = config()
    cadence = base.model_copy(update={"detector": base.detector.model_copy(update={"interval_s": 2.0})})
    plan = plan_reload(base, cadence)
    assert plan.restarted == ("hall", "yard") and not plan.detector
    for update in ({"confidence": 0.5}, {"imgsz": 320}, {"iou": 0.5}, {"min_box_area_px": 100.0},
                   {"device": "cuda:0"}, {"model": str(tmp_path / "other.onnx")}):
        new = base.model_copy(update={"detector": base.detector.model_copy(update=update)})
        plan = plan_reload(base, new)
        assert plan.detector and plan.unchanged == ("hall", "yard") and not plan.restarted, update
        assert plan.describe() == "cameras unchanged: hall, yard; detector model reloaded"


def test_sinks_rebuilt_only_when_what_they_depend_on_changed(config):
    assert plan_reload(config(), config(head="[sinks.stdout]\nenabled = false\n")).sinks == {"stdout"}
    assert plan_reload(config(), config(head='[sinks.jsonl]\npath = "/tmp/x.jsonl"\n')).sinks == {"jsonl"}
    mqtt = "[sinks.mqtt]\nenabled = true\n"
    on = config(head=mqtt)
    assert plan_reload(config(), on).sinks == {"mqtt"}
    # The MQTT sink announces cameras, regions, names and the detector model to Home Assistant.
    assert plan_reload(on, config(HALL, mqtt)).sinks == {"mqtt"}  # a camera gone
    renamed = config(HALL.replace('id = "door"', 'id = "exit"') + YARD, mqtt)
    assert plan_reload(on, renamed).sinks == {"mqtt"} and plan_reload(on, renamed).restarted == ("hall",)
    named = config(HALL.replace('url = "rtsp://cam/hall"', 'url = "rtsp://cam/hall"\nname = "Hall"') + YARD, mqtt)
    assert plan_reload(on, named).sinks == {"mqtt"}
    moved = config(HALL.replace("[[0, 0], [90, 0]", "[[0, 0], [95, 0]") + YARD, mqtt)
    assert plan_reload(on, moved).sinks == frozenset() and plan_reload(on, moved).restarted == ("hall",)
    relocated = config(HALL.replace("cam/hall", "cam/hall2") + YARD, mqtt)
    assert plan_reload(on, relocated).sinks == frozenset()
    # Without MQTT, cameras come and go without rebuilding any sink.
    assert plan_reload(config(), config(HALL)).sinks == frozenset()


def test_a_shard_sees_only_its_own_cameras_change(config):
    ids = ["hall", "yard", "dock", "gate", "lobby", "roof"]
    cams = "".join(f'[[cameras]]\nid = "{c}"\nurl = "rtsp://cam/{c}"\n' for c in ids)
    shard = Shard(0, 2)
    extra = next(c for c in (f"cam{i}" for i in range(100)) if not shard.owns(c))
    mine = next(c for c in (f"cam{i}" for i in range(100)) if shard.owns(c))
    head = '[fleet]\nshard = "0/2"\n'
    old = FleetPlan.of(config(cams, head)).settings
    plan = plan_reload(old, FleetPlan.of(config(cams + f'[[cameras]]\nid = "{extra}"\nurl = "rtsp://cam/x"\n',
                                                head)).settings)
    assert plan.empty  # another replica runs it
    plan = plan_reload(old, FleetPlan.of(config(cams + f'[[cameras]]\nid = "{mine}"\nurl = "rtsp://cam/x"\n',
                                                head)).settings)
    assert plan.added == (mine,) and plan.unchanged == tuple(c for c in ids if shard.owns(c))


def test_every_key_of_the_configuration_has_a_reload_rule():
    """A key no rule covers would be "reloaded" without effect: each one must be restart-only,
    the detector's, every camera's, a camera's own, a sink's or logging."""
    from daemon.reconfig import DETECTOR_KEYS, EVERY_CAMERA_KEYS, _under

    def leaves(model, prefix=""):
        from pydantic import BaseModel

        for name, field in model.model_fields.items():
            key = f"{prefix}{field.alias or name}"
            ann = field.annotation
            sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            yield from leaves(sub, key + ".") if sub is not None else [key]

    covered = (*RESTART_ONLY, *DETECTOR_KEYS, *EVERY_CAMERA_KEYS, "cameras", "sinks", "logging")
    assert [k for k in leaves(Settings) if not _under(k, covered)] == []
