"""Event records: numbering, JSON shape, and the committed JSON Schema."""

from __future__ import annotations

import json
import uuid

import jsonschema
import pytest

from daemon.events import SCHEMA_PATH, EventFactory, RegionTransition, json_schema
from daemon.state import SeqStore


def transition(kind="entry", camera="hall", **kw) -> RegionTransition:
    base = dict(
        type=kind, camera=camera, region="table", track_id=7, frame=75, pts_s=7.5, wall_time=1_700_000_000.25,
        bbox=(1.234, 2.0, 3.0, 4.0), anchor=(2.0, 4.0), score=0.91234,
    )
    base.update(kw)
    return RegionTransition(**base)


def test_committed_schema_is_current():
    assert json.loads(SCHEMA_PATH.read_text()) == json_schema(), "run: python -m daemon.events"


def test_events_validate_against_schema(tmp_path):
    validator = jsonschema.Draft202012Validator(json_schema(), format_checker=jsonschema.FormatChecker())
    f = EventFactory(SeqStore(tmp_path))
    entry = f.make(transition())
    exit_ = f.make(transition("exit", dwell_s=12.5, reason="left_region", frame=200, pts_s=20.0))
    for e in (entry, exit_):
        validator.validate(json.loads(e.to_json()))
    d = json.loads(exit_.to_json())
    assert d["schema"] == "regionwatch.event/1"
    assert uuid.UUID(d["id"]).version == 4
    assert (d["type"], d["dwell_s"], d["reason"], d["frame"]) == ("exit", 12.5, "left_region", 200)
    assert d["time"] == "2023-11-14T22:13:20.250Z"
    assert d["bbox"] == [1.23, 2.0, 3.0, 4.0]
    assert "dwell_s" not in json.loads(entry.to_json())


def test_schema_rejects_malformed_events(tmp_path):
    validator = jsonschema.Draft202012Validator(json_schema())
    good = json.loads(EventFactory(SeqStore(tmp_path)).make(transition()).to_json())
    for broken in (
        {**good, "type": "enter"},
        {**good, "bbox": [1, 2, 3]},
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "seq"},
        {**good, "schema": "regionwatch.event/2"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(broken)


def test_seq_is_per_camera_and_survives_restart(tmp_path):
    store = SeqStore(tmp_path)
    f = EventFactory(store)
    assert [f.make(transition(camera=c)).seq for c in ("a", "a", "b", "a")] == [1, 2, 1, 3]
    store.close()
    assert EventFactory(SeqStore(tmp_path)).make(transition(camera="a")).seq == 4
    ids = {EventFactory(SeqStore(tmp_path)).make(transition()).id for _ in range(5)}
    assert len(ids) == 5
