"""Fleet sharding (daemon/fleet.py): properties of the rendezvous hashing, shard parsing, the
per-shard names and state, and the CLI (``run/check-config --shard``, ``REGIONWATCH_FLEET__SHARD``).

The local fleet of real processes publishing to a real broker is tests/sinks/test_fleet.py.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.config import ConfigError, FleetConfig, load_settings
from daemon.fleet import FleetPlan, Shard, assign, client_id, jsonl_path, owner, state_dir, status_topic, weight
from daemon.ops.health import Health
from daemon.ops.metrics import Metrics
from daemon.state import SeqStore

REPO = Path(__file__).resolve().parents[1]
IDS = [f"cam-{i:04d}" for i in range(1000)]  # a big site: the statistics below are about 1000 cameras

# Owners for N = 1..8, computed once and kept: a change here means every fleet reshuffles on upgrade.
GOLDEN = {
    "hall": [0, 1, 1, 3, 4, 4, 4, 4],
    "door": [0, 1, 2, 3, 3, 5, 6, 7],
    "yard": [0, 0, 0, 0, 4, 4, 4, 4],
    "dock": [0, 1, 1, 1, 1, 1, 1, 1],
    "gate": [0, 1, 1, 3, 3, 3, 6, 6],
    "lobby": [0, 0, 0, 0, 0, 0, 6, 6],
    "parking-east": [0, 0, 2, 3, 3, 3, 6, 6],
    "cam-01": [0, 1, 1, 3, 3, 3, 3, 3],
    "cam-17": [0, 0, 2, 2, 2, 5, 5, 5],
    "Z9": [0, 1, 1, 1, 1, 1, 1, 1],
}


def move_problems(owner_fn, ids: list[str], n_max: int = 8) -> list[str]:
    """What is wrong with an assignment function for N -> N+1, N = 1..n_max-1 (empty: nothing).

    Rendezvous hashing: a camera moves only to the new shard N, and about 1/(N+1) of them move
    (allowing 4 standard deviations of binomial noise, so the bound is not luck).
    """
    problems = []
    for n in range(1, n_max):
        before = {c: owner_fn(c, n) for c in ids}
        after = {c: owner_fn(c, n + 1) for c in ids}
        moved = [c for c in ids if before[c] != after[c]]
        elsewhere = [c for c in moved if after[c] != n]
        if elsewhere:
            problems.append(f"{n}->{n + 1}: {len(elsewhere)} camera(s) moved between old shards, e.g. {elsewhere[0]}")
        p = 1 / (n + 1)
        slack = 4 * math.sqrt(p * (1 - p) / len(ids))
        if not p - slack <= len(moved) / len(ids) <= p + slack:
            problems.append(f"{n}->{n + 1}: {len(moved)}/{len(ids)} moved, expected about {p:.3f}")
    return problems


# -- the hashing ----------------------------------------------------------------------------

@pytest.mark.parametrize("n", range(1, 9))
def test_every_camera_is_run_by_exactly_one_of_n_shards(n):
    shards = [Shard(i, n) for i in range(n)]
    for cid in IDS:
        assert sum(s.owns(cid) for s in shards) == 1, cid
    groups = assign(IDS, n)
    assert sorted(c for g in groups.values() for c in g) == sorted(IDS)
    # Balanced within binomial noise (4 sigma), so no shard is starved or flooded.
    p = 1 / n
    for i, g in groups.items():
        assert abs(len(g) - p * len(IDS)) <= 4 * math.sqrt(len(IDS) * p * (1 - p)) + 1e-9, (i, len(g))


def test_growing_the_fleet_moves_only_what_the_new_shard_wins():
    assert move_problems(owner, IDS) == []


def test_the_move_check_catches_modulo_hashing():
    """The property test above fails on the usual mistake: weight % N reshuffles most cameras."""
    problems = move_problems(lambda cid, n: weight(0, cid) % n, IDS)
    assert len(problems) >= 6 and "moved between old shards" in problems[0]


def test_assignment_is_pinned():
    for cid, owners in GOLDEN.items():
        assert [owner(cid, n) for n in range(1, 9)] == owners, cid


def _owners_in(python: str, env: dict[str, str]) -> list:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from daemon.fleet import owner; "
            "print(json.dumps([[owner(c, n) for n in range(1, 9)] for c in json.loads(sys.argv[2])]))")
    r = subprocess.run([python, "-c", code, str(REPO), json.dumps(list(GOLDEN))], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_same_assignment_whatever_the_hash_seed_and_python_version():
    want = list(GOLDEN.values())
    for seed in ("0", "1", "12345"):  # str hash() differs with the seed; owners must not
        assert _owners_in(sys.executable, {**os.environ, "PYTHONHASHSEED": seed}) == want
    # Other CPython versions on this machine (daemon/fleet.py needs only the standard library).
    others = {p for p in glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3"))}
    others |= {shutil.which(f"python3.{m}") for m in range(10, 15)} - {None}
    checked = []
    for python in sorted(others):
        r = subprocess.run([python, "-c", "import sys; print(sys.version_info >= (3, 10))"], capture_output=True,
                           text=True, timeout=30)
        if r.stdout.strip() != "True" or os.path.realpath(python) == os.path.realpath(sys.executable):
            continue
        assert _owners_in(python, {"PATH": os.environ.get("PATH", "")}) == want, python
        checked.append(python)
    print(f"\nsame owners under: {sys.executable} and {checked or 'no other Python found'}")


# -- shard spec, names --------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [("0/1", (0, 1)), ("2/3", (2, 3)), ("regionwatch-3/5", (3, 5)),
                                        ("rw2-12/16", (12, 16)), (" 1/2 ", (1, 2))])
def test_shard_parses_plain_and_pod_name_forms(text, want):
    s = Shard.parse(text)
    assert (s.index, s.count) == want


@pytest.mark.parametrize("text, problem", [
    ("3/3", "shard index 3 is not in 0..2"), ("regionwatch-3/3", "not in 0..2"), ("0/0", "count must be 1..1024"),
    ("1", "is not I/N"), ("regionwatch-3", "is not I/N"), ("-1/3", "is not I/N"), ("a/b", "is not I/N"),
    ("1/2000", "count must be 1..1024"),
])
def test_bad_shard_specs_are_refused_with_a_reason(text, problem):
    with pytest.raises(ValueError, match=problem):
        Shard.parse(text)


def test_per_shard_names():
    s = Shard(2, 3)
    assert client_id("regionwatch", s) == "regionwatch-2" and client_id("regionwatch", None) == "regionwatch"
    assert status_topic("site/rw/", s) == "site/rw/shard/2/status"
    assert state_dir("/var/lib/regionwatch", s) == "/var/lib/regionwatch/shard-2"
    assert state_dir("/var/lib/regionwatch", None) == "/var/lib/regionwatch"
    assert jsonl_path("/out/events.jsonl", s) == "/out/events-shard-2.jsonl"
    assert jsonl_path("", s) == "" and jsonl_path("/out/events.jsonl", None) == "/out/events.jsonl"


# -- configuration and CLI ------------------------------------------------------------------

def write_config(tmp: Path, ids: list[str], extra: str = "") -> Path:
    (tmp / "model.onnx").write_bytes(b"")  # validation only checks that files exist
    (tmp / "clip.mp4").write_bytes(b"")
    cams = "".join(f'[[cameras]]\nid = "{c}"\nurl = "clip.mp4"\n' for c in ids)
    cfg = tmp / "config.toml"
    cfg.write_text(textwrap.dedent(f"""
        [detector]
        model = "model.onnx"
        [state]
        dir = "state"
        [sinks.jsonl]
        path = "events.jsonl"
        """) + extra + cams)
    return cfg


SITE = ["hall", "door", "yard", "dock", "gate", "lobby", "parking-east"]


def test_fleet_plan_cuts_the_settings_down_to_the_shard(tmp_path):
    settings = load_settings(write_config(tmp_path, SITE, '[fleet]\nshard = "regionwatch-1/3"\n'))
    plan = FleetPlan.of(settings)
    assert plan.shard == Shard(1, 3)
    assert [c.id for c in plan.settings.cameras] == [c for c in SITE if owner(c, 3) == 1]
    assert sorted(plan.others) == sorted(c for c in SITE if owner(c, 3) != 1)
    assert plan.settings.state.dir == str(tmp_path / "state" / "shard-1")
    assert plan.settings.sinks.jsonl.path == str(tmp_path / "events-shard-1.jsonl")
    assert plan.configured == len(SITE) and plan.all_files
    assert settings.cameras and len(settings.cameras) == len(SITE)  # the loaded settings are untouched
    m = Metrics()
    plan.export(m)
    text = m.exposition().decode()
    assert 'regionwatch_shard_info{shard="1",shards="3"} 1.0' in text
    assert f"regionwatch_cameras {float(len(plan.settings.cameras))}" in text
    assert f"regionwatch_cameras_configured {float(len(SITE))}" in text

    alone = FleetPlan.of(load_settings(write_config(tmp_path, SITE)))
    assert alone.shard is None and alone.settings.state.dir == str(tmp_path / "state") and alone.others == ()
    m = Metrics()
    alone.export(m)
    assert 'regionwatch_shard_info{shard="0",shards="1"} 1.0' in m.exposition().decode()


def test_a_camera_that_moved_away_forgets_its_seq_here(tmp_path, caplog):
    settings = load_settings(write_config(tmp_path, SITE, '[fleet]\nshard = "1/3"\n'))
    plan = FleetPlan.of(settings)
    seq = SeqStore(plan.settings.state.dir)
    try:
        mine, theirs = plan.settings.cameras[0].id, plan.others[0]
        for cam in (mine, mine, theirs, theirs, theirs, "removed-from-config"):
            seq.next(cam)
        assert plan.release(seq) == [theirs]
        assert theirs in caplog.text and "restarts at 1" in caplog.text
        assert seq.next(mine) == 3 and seq.next(theirs) == 1  # ours goes on; the moved one restarts
        assert seq.next("removed-from-config") == 2  # not ours to judge: no shard runs it
    finally:
        seq.close()


def test_a_replica_without_cameras_is_ready_once_loaded():
    h = Health()
    h.set_streams(dict)  # this shard runs no camera
    assert not h.readyz()[0]
    h.set_models_loaded()
    ok, detail = h.readyz()
    assert ok and "reasons" not in detail
    h.set_streams(lambda: {"hall": "connecting"})
    assert not h.readyz()[0]


def test_environment_gives_the_shard_from_a_pod_name(tmp_path, monkeypatch, capsys):
    cfg = write_config(tmp_path, SITE)
    monkeypatch.setenv("REGIONWATCH_FLEET__SHARD", "regionwatch-2/3")
    assert load_settings(cfg).fleet.parsed == Shard(2, 3)
    assert main(["check-config", str(cfg)]) == 0
    want = [c for c in SITE if owner(c, 3) == 2]
    assert f"shard 2/3 runs {len(want)} of {len(SITE)} cameras: {', '.join(want)}" in capsys.readouterr().out
    assert main(["check-config", str(cfg), "--shard", "0/3"]) == 0  # the flag wins over the environment
    assert "shard 0/3 runs" in capsys.readouterr().out

    monkeypatch.setenv("REGIONWATCH_FLEET__SHARD", "regionwatch-3/3")  # scaled without changing N
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    assert e.value.problems[0].startswith("fleet.shard: shard index 3 is not in 0..2")


def test_check_config_shards_partition_the_cameras(tmp_path, capsys):
    cfg = write_config(tmp_path, SITE)
    seen = []
    for i in range(3):
        assert main(["check-config", str(cfg), "--shard", f"{i}/3"]) == 0
        line = capsys.readouterr().out.splitlines()[-1]
        assert line.startswith(f"shard {i}/3 runs ")
        listed = line.split(": ", 1)[1]
        seen += [] if listed == "(none)" else listed.split(", ")
    assert sorted(seen) == sorted(SITE)


@pytest.mark.parametrize("cmd", ["check-config", "run"])
def test_bad_shard_flag_exits_2_naming_the_flag(tmp_path, capsys, cmd):
    cfg = str(write_config(tmp_path, SITE))
    argv = ["check-config", cfg] if cmd == "check-config" else ["run", "--config", cfg]
    with pytest.raises(SystemExit) as e:
        main(argv + ["--shard", "3/3"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("--shard: shard index 3 is not in 0..2")


def test_bad_shard_in_the_file_exits_2(tmp_path, capsys):
    cfg = write_config(tmp_path, SITE, '[fleet]\nshard = "two of three"\n')
    with pytest.raises(SystemExit) as e:
        main(["check-config", str(cfg)])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("fleet.shard: 'two of three' is not I/N")
    assert FleetConfig(shard="").parsed is None
