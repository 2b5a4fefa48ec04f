"""Health: /healthz (main loop turning) and /readyz (models loaded, a camera streaming)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.ops.health import Health
from daemon.ops.metrics import Metrics
from daemon.sources import SourceState


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def sample(metrics: Metrics, name: str) -> float:
    for fam in text_string_to_metric_families(metrics.exposition().decode()):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise KeyError(name)


def test_ready_needs_models_and_a_streaming_camera():
    h = Health()
    ok, detail = h.readyz()
    assert not ok
    assert detail["models_loaded"] is False
    assert detail["reasons"] == ["models not loaded", "no camera streaming"]

    states = {"hall": SourceState.CONNECTING, "yard": SourceState.RECONNECTING}
    h.set_streams(lambda: states)
    h.set_models_loaded()
    ok, detail = h.readyz()
    assert not ok and detail["reasons"] == ["no camera streaming"]
    assert detail["cameras"] == {"hall": "connecting", "yard": "reconnecting"}  # enums shown by value

    states["yard"] = SourceState.STREAMING
    ok, detail = h.readyz()
    assert ok and detail["status"] == "ready" and detail["cameras_streaming"] == 1
    assert "reasons" not in detail

    h.set_stopping()
    ok, detail = h.readyz()
    assert not ok and detail["reasons"] == ["stopping"]


def test_models_unloaded_again_is_not_ready():
    h = Health()
    h.set_streams(lambda: {"hall": "streaming"})
    h.set_models_loaded()
    assert h.readyz()[0]
    h.set_models_loaded(False)
    assert not h.readyz()[0] and not h.models_loaded


def test_a_failing_stream_provider_makes_not_ready_instead_of_raising():
    h = Health()
    h.set_models_loaded()

    def broken():
        raise RuntimeError("rtsp://user:secret@cam/x")

    h.set_streams(broken)
    ok, detail = h.readyz()
    assert not ok
    assert detail["error"] == "stream state provider failed: RuntimeError"  # no message: could hold secrets


def test_healthz_follows_the_main_loop_heartbeat():
    clock = Clock()
    h = Health(heartbeat_timeout_s=30, startup_grace_s=120, clock=clock)
    ok, detail = h.healthz()
    assert ok and detail["status"] == "starting" and detail["main_loop_age_s"] is None

    clock.t += 121  # models took too long and the loop never turned
    ok, detail = h.healthz()
    assert not ok and detail["status"] == "stuck"

    h.beat()
    clock.t += 29.5
    ok, detail = h.healthz()
    assert ok and detail["main_loop_age_s"] == 29.5

    clock.t += 1.0
    ok, detail = h.healthz()
    assert not ok and detail["status"] == "stalled" and detail["main_loop_age_s"] == 30.5

    h.beat()
    assert h.healthz()[0]


def test_metrics_gauges_follow_health():
    m = Metrics()
    h = Health(metrics=m)
    assert sample(m, "regionwatch_ready") == 0.0
    assert sample(m, "regionwatch_main_loop_heartbeat_timestamp_seconds") == 0.0

    h.set_models_loaded()
    h.set_streams(lambda: {"hall": "streaming"})
    h.beat()
    assert sample(m, "regionwatch_ready") == 1.0  # computed at scrape time
    assert sample(m, "regionwatch_main_loop_heartbeat_timestamp_seconds") > 1.7e9


def test_heartbeat_timeout_must_be_positive():
    with pytest.raises(ValueError):
        Health(heartbeat_timeout_s=0)
