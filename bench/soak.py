"""Soak test: at least 100,000 frames through the whole daemon, watching for leaks.

    .venv/bin/python bench/soak.py [--frames 100000] [--every 10000] [--imgsz 160] [--interval-s 5]

The sample clip is looped with FFmpeg's concat demuxer (an ``.ffconcat`` list naming it as many
times as needed; timestamps keep increasing, so the daemon sees one long file) and run through
``python -m daemon run`` with every stage on: decode, rolling JPEG buffer, YOLO detector,
ByteTrack, region logic, events to a JSONL file, the state folder (``seq``), and the HTTP listener,
which this script polls once a second for ``regionwatch_frames_processed_total`` (so the listener
is soaked too). Every ``--every`` frames it prints one row: frames, wall seconds, frames/s since
the previous row, resident memory (VmRSS), open file descriptors and threads of the daemon
process (from ``/proc``), its CPU seconds, and events so far. The summary compares the last row
with the first: memory, descriptors and threads must stay flat on an endless stream.

``--imgsz`` and ``--interval-s`` make the detector cheap so 100,000 frames take minutes on a small
CPU; the rest of the pipeline runs on every frame as in production. Exit status 1 with
``--strict`` when RSS grew more than ``--max-rss-growth-mib`` or fds or threads by more than 2.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / ".." / "shared" / "assets"
DEFAULT_FILE = ASSETS / "footage" / "one-by-one-person-detection.mp4"
DEFAULT_MODEL = ASSETS / "models" / "yolov8n_int8.onnx"
CLIP_FRAMES = 1394

CONFIG = """
[detector]
model = "{model}"
interval_s = {interval_s}
imgsz = {imgsz}
[tracker]
backend = "bytetrack"
[sinks.jsonl]
path = "{work}/events.jsonl"
[sinks.stdout]
enabled = false
[state]
dir = "{work}/state"
[metrics]
listen = "127.0.0.1:{port}"
[logging]
level = "WARNING"
[[cameras]]
id = "hall"
url = "{work}/soak.ffconcat"
buffer_s = 5.0
[[cameras.regions]]
id = "table"
polygon = [[360, 330], [560, 330], [560, 412], [360, 412]]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_stats(pid: int) -> tuple[float, int, int, float]:
    """(RSS MiB, open fds, threads, CPU s) of a live process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    rss_mib = int(fields["VmRSS"].split()[0]) / 1024
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_s = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return rss_mib, fds, int(fields["Threads"]), cpu_s


def frames_processed(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("regionwatch_frames_processed_total{")))


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100_000, help="frames to push through (rounded up to whole loops)")
    ap.add_argument("--every", type=int, default=10_000, help="print a row every N frames")
    ap.add_argument("--file", type=Path, default=DEFAULT_FILE)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--interval-s", type=float, default=5.0, help="detector interval (stream seconds)")
    ap.add_argument("--strict", action="store_true")
    ap.add_argument("--max-rss-growth-mib", type=float, default=50.0)
    args = ap.parse_args()
    for p in (args.file, args.model):
        if not p.exists():
            print(f"missing: {p}", file=sys.stderr)
            return 2

    work = Path(tempfile.mkdtemp(prefix="regionwatch-soak-"))
    (work / "clip.mp4").symlink_to(args.file.resolve())
    loops = math.ceil(args.frames / CLIP_FRAMES)
    (work / "soak.ffconcat").write_text("ffconcat version 1.0\n" + "file 'clip.mp4'\n" * loops)
    port = free_port()
    cfg = work / "config.toml"
    cfg.write_text(CONFIG.format(model=args.model.resolve(), interval_s=args.interval_s, imgsz=args.imgsz,
                                 work=work, port=port))
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0",
           "YOLO_CONFIG_DIR": str(work / "ultralytics")}
    print(f"soak: {loops} loops of {args.file.name} (~{loops * CLIP_FRAMES} frames), imgsz {args.imgsz}, "
          f"detector every {args.interval_s:g} s of stream; work dir {work}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(work / "daemon.log", "wb"))
    header = f"{'frames':>8} {'wall s':>8} {'fps':>6} {'RSS MiB':>8} {'fds':>5} {'threads':>7} {'CPU s':>8} {'events':>7}"
    print(header)
    print("-" * len(header), flush=True)
    rows: list[tuple] = []
    next_mark, last_frames, last_t = args.every, 0, t0
    try:
        while proc.poll() is None:
            time.sleep(1.0)
            n = frames_processed(port)
            if n is None or proc.poll() is not None:
                continue
            if n >= next_mark:
                now = time.monotonic()
                rss, fds, threads, cpu = proc_stats(proc.pid)
                fps = (n - last_frames) / max(now - last_t, 1e-9)
                row = (n, now - t0, fps, rss, fds, threads, cpu, count_lines(work / "events.jsonl"))
                rows.append(row)
                print(f"{row[0]:>8} {row[1]:>8.0f} {row[2]:>6.1f} {row[3]:>8.1f} {row[4]:>5} {row[5]:>7} "
                      f"{row[6]:>8.0f} {row[7]:>7}", flush=True)
                next_mark = (n // args.every + 1) * args.every
                last_frames, last_t = n, now
    except KeyboardInterrupt:
        proc.terminate()
    code = proc.wait()
    wall = time.monotonic() - t0
    events = count_lines(work / "events.jsonl")
    print(f"daemon exit {code} after {wall:.0f} s; {events} events; log: {work / 'daemon.log'}")
    if len(rows) < 2:
        print("too few samples for a summary")
        return 1
    first, last = rows[0], rows[-1]
    growth = last[3] - first[3]
    print(f"from {first[0]} to {last[0]} frames: RSS {first[3]:.1f} -> {last[3]:.1f} MiB ({growth:+.1f}), "
          f"fds {first[4]} -> {last[4]}, threads {first[5]} -> {last[5]}; "
          f"CPU {(last[6] - first[6]) / (last[0] - first[0]) * 1000:.2f} ms/frame")
    leak = growth > args.max_rss_growth_mib or last[4] > first[4] + 2 or last[5] > first[5] + 2  # +2: sampling noise
    if args.strict and (leak or code != 0):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
