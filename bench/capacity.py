"""Capacity benchmark: how many live cameras one machine holds in real time, and what each costs.

    .venv/bin/python bench/capacity.py [--cameras 1 2 4 8] [--seconds 30] [--sources 432p 1080p]
                                       [--tree PATH] [--baseline PATH] [--set detector.interval_s=1.0 ...]

For every source kind and camera count N it runs the real daemon (:class:`daemon.app.App`, in a
fresh subprocess per row, so rows do not share threads or memory) on N copies of the sample
footage as live cameras (``realtime = true``: frames come at the file's rate and are skipped when
the pipeline lags, like a camera), waits ``--warmup`` seconds, then measures ``--seconds``:

* processed fps per camera (min / mean) and frames skipped (``regionwatch_frames_skipped_total``)
  — a camera that keeps up processes every frame: 10 fps for ``432p`` (the sample, 768x432),
  15 fps for ``1080p`` (made from the sample by this bench: upscaled to 1920x1080, 15 fps, H.264
  without B-frames, cached under ``--cache``);
* CPU in cores (CPU seconds / wall seconds), total and per camera, split by thread: ``decode``
  (source threads and codec threads), ``jpeg`` (frame-buffer encoder threads), ``detect``
  (detector calls on pipeline threads + the inference runtime's own threads), ``pipeline``
  (the rest of the pipeline threads: tracking, regions, events), ``other`` (main loop, GC...).
  Per-thread CPU comes from ``/proc/self/task/*/schedstat``, so the split works for any version of
  the daemon (``--tree`` runs another checkout, e.g. the previous main, for a before/after table
  from the same bench, or ``--baseline PATH`` for both, row by row: each baseline row runs right
  before the same row of ``--tree``, so both see the same machine load); where the daemon feeds
  ``regionwatch_stage_cpu_seconds_total`` its per-stage figures are printed too;
* detector runs per second and CPU milliseconds per run.

The last line names the largest N with no skipped frame and every camera at full rate. Settings
are the tree's demo settings (``demo/sample-footage.toml``: detector model and interval) with the
cameras replaced; ``--set section.key=value`` overrides any (TOML value syntax). The machine's
load average is printed with every row: other processes competing for the cores inflate wall
time more than CPU seconds, so compare CPU figures across machines, and rows side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOOTAGE = ROOT / ".." / "shared" / "assets" / "footage" / "one-by-one-person-detection.mp4"
REGION_432P = [[360, 330], [560, 330], [560, 412], [360, 412]]  # the demo's table region
GROUPS = ("decode", "jpeg", "detect", "pipeline", "other")
FULL_RATE = 0.97  # a camera "keeps up" when it processes at least this share of its frame rate


# -- footage ------------------------------------------------------------------------------
def make_1080p(src: Path, dst: Path, seconds: float, fps: int = 15) -> Path:
    """The sample upscaled to 1920x1080 at ``fps`` (nearest earlier source frame), H.264 like a camera."""
    import av
    import cv2

    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".part.mp4")
    with av.open(str(src)) as inp, av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 1920, 1080, "yuv420p"
        # Cameras send no B-frames and a key frame every couple of seconds.
        stream.options = {"preset": "veryfast", "crf": "23", "bf": "0", "g": str(2 * fps)}
        src_rate = float(inp.streams.video[0].average_rate)
        n_out = int(seconds * fps)
        k = 0
        for i, vf in enumerate(inp.decode(video=0)):
            image = None
            # output frame k shows the source frame on screen at k / fps
            while k < n_out and int(k * src_rate / fps) == i:
                if image is None:
                    image = cv2.resize(vf.to_ndarray(format="bgr24"), (1920, 1080), interpolation=cv2.INTER_LINEAR)
                frame = av.VideoFrame.from_ndarray(image, format="bgr24")
                frame.pts, frame.time_base = k, Fraction(1, fps)
                out.mux(stream.encode(frame))
                k += 1
            if k >= n_out:
                break
        out.mux(stream.encode(None))
    tmp.rename(dst)
    return dst


# -- one row, in a subprocess ------------------------------------------------------------
def _thread_cpu() -> dict[int, float]:
    """CPU seconds of every live thread of this process, by kernel thread id (ns precision)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            pass  # the thread ended meanwhile
    return out


class _MeteredDetector:
    """Wraps the app's detector: counts runs and the calling threads' CPU inside them."""

    def __init__(self, inner):
        self.inner = inner
        self.cpu_s = 0.0
        self.runs = 0
        self._lock = threading.Lock()

    def __call__(self, image):
        t0 = time.thread_time()
        try:
            return self.inner(image)
        finally:
            cpu = time.thread_time() - t0
            with self._lock:
                self.cpu_s += cpu
                self.runs += 1

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _counter_values(metrics, name: str) -> dict[tuple, float]:
    """{label values: value} of a counter family (``_total`` samples), by registry name."""
    out = {}
    for fam in metrics.registry.collect():
        if fam.name == name:
            for s in fam.samples:
                if s.name.endswith("_total"):
                    out[tuple(sorted(s.labels.items()))] = s.value
    return out


def run_one(args: argparse.Namespace) -> dict:
    """Run the daemon with N cameras; return the measured figures (in this process)."""
    tree = Path(args.tree).resolve()
    sys.path.insert(0, str(tree))
    import daemon
    from daemon.app import App
    from daemon.config import Settings

    if not Path(daemon.__file__).resolve().is_relative_to(tree):
        raise SystemExit(f"--tree {tree}: imported {daemon.__file__} instead")

    demo = tomllib.loads((tree / "demo" / "sample-footage.toml").read_text())
    model = (tree / "demo" / demo["detector"]["model"]).resolve()
    if not model.exists():  # a checkout elsewhere (e.g. --tree /tmp/main): the assets beside this one
        model = (ROOT / "demo" / demo["detector"]["model"]).resolve()
    det = {k: v for k, v in demo["detector"].items() if k != "model"}
    size = 1080 if args.source == "1080p" else 432
    scale = size / 432
    region = [[round(x * scale), round(y * scale)] for x, y in REGION_432P]
    state = tempfile.mkdtemp(prefix="rw-capacity-")
    lines = [
        "[detector]",
        f"model = {json.dumps(str(model))}",
        *(f"{k} = {json.dumps(v)}" for k, v in det.items()),
        "[sinks.stdout]\nenabled = false",
        f"[sinks.jsonl]\npath = {json.dumps(state + '/events.jsonl')}",
        f"[state]\ndir = {json.dumps(state)}",
        "[metrics]\nenabled = false",
    ]
    for i in range(args.n):
        lines += [
            "[[cameras]]", f'id = "cam{i}"', f"url = {json.dumps(args.file)}", "realtime = true",
            "[[cameras.regions]]", 'id = "table"', f"polygon = {json.dumps(region)}",
        ]
    data = tomllib.loads("\n".join(lines))
    for item in args.set or []:  # section.key=value, TOML value syntax
        key, _, value = item.partition("=")
        *path, leaf = key.strip().split(".")
        node = data
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = tomllib.loads(f"v = {value}")["v"]
    settings = Settings(**data)

    before_load = set(_thread_cpu())
    app = App(settings)
    app.load()
    import numpy as np

    app.detector(np.zeros((size, size * 16 // 9, 3), np.uint8))  # warm-up: runtimes start their threads lazily
    if hasattr(app.detector, "replace"):  # the pipelines hold a ReplaceableDetector: meter what it calls
        metered = _MeteredDetector(app.detector.current)
        app.detector.replace(metered)
    else:  # an older tree: the pipelines call app.detector
        metered = _MeteredDetector(app.detector)
        app.detector = metered
    runtime_tids = set(_thread_cpu()) - before_load
    done = threading.Event()
    result: dict = {}

    def measure():
        try:
            time.sleep(args.warmup)
            c0, w0, t0 = _thread_cpu(), time.perf_counter(), os.times()
            det0 = (metered.cpu_s, metered.runs)
            m0 = {n: _counter_values(app.metrics, n) for n in
                  ("regionwatch_frames_processed", "regionwatch_frames_skipped", "regionwatch_stage_cpu_seconds")}
            time.sleep(args.seconds)
            c1, wall, t1 = _thread_cpu(), time.perf_counter() - w0, os.times()
            det1 = (metered.cpu_s, metered.runs)
            m1 = {n: _counter_values(app.metrics, n) for n in m0}
            names = {t.native_id: t.name for t in threading.enumerate()}
            groups = dict.fromkeys(GROUPS, 0.0)
            for tid, cpu in c1.items():
                d = cpu - c0.get(tid, 0.0)
                name = names.get(tid)
                if name is None:  # a native thread: the inference runtime's, or a codec's
                    groups["detect" if tid in runtime_tids else "decode"] += d
                elif name.startswith("source-"):
                    groups["decode"] += d
                elif name.startswith("jpeg-"):
                    groups["jpeg"] += d
                elif name.startswith("pipeline-"):
                    groups["pipeline"] += d
                else:
                    groups["other"] += d
            det_caller = det1[0] - det0[0]
            groups["detect"] += det_caller
            groups["pipeline"] -= det_caller
            # threads that ended during the window (rare) are counted in "other" via the process total
            total = (t1.user + t1.system) - (t0.user + t0.system)
            groups["other"] += max(0.0, total - sum(groups.values()))

            def delta(name):
                d = {}
                for k, v in m1[name].items():
                    d[k] = v - m0[name].get(k, 0.0)
                return d

            fps = {}
            for k, v in delta("regionwatch_frames_processed").items():
                fps[dict(k)["camera"]] = v / wall
            skipped = sum(delta("regionwatch_frames_skipped").values())
            stages: dict[str, float] = {}
            for k, v in delta("regionwatch_stage_cpu_seconds").items():
                stage = dict(k)["stage"]
                stages[stage] = stages.get(stage, 0.0) + v / wall
            result.update(
                wall=wall, cpu_total=total / wall, groups={g: v / wall for g, v in groups.items()}, fps=fps,
                skipped=skipped, det_runs=(det1[1] - det0[1]) / wall,
                det_cpu_ms=1000 * (groups["detect"] / max(det1[1] - det0[1], 1)),
                stages=stages, load=os.getloadavg()[0], model=model.name,
            )
        finally:
            done.set()
            app.request_stop()

    threading.Thread(target=measure, daemon=True).start()
    app.run()  # starts the cameras; returns once measure() asked it to stop
    done.wait()
    return result


# -- the table --------------------------------------------------------------------------
def _row(source: str, n: int, nominal: float, r: dict, tree: str) -> str:
    fps = list(r["fps"].values()) or [0.0]
    per = {g: v / n for g, v in r["groups"].items()}
    stages = r["stages"] if any(r["stages"].values()) else {}  # series created at 0 but not fed: not shown
    stage = " ".join(f"{s} {v / n:.3f}" for s, v in sorted(stages.items())) or "-"
    return (
        f"| {tree} | {source} | {n} | {min(fps):.1f} / {sum(fps) / len(fps):.1f} (of {nominal:g}) | {r['skipped']:.0f} "
        f"| {r['cpu_total']:.2f} | {r['cpu_total'] / n:.3f} | "
        + " | ".join(f"{per[g]:.3f}" for g in GROUPS)
        + f" | {r['det_runs']:.1f} | {r['det_cpu_ms']:.0f} | {stage} | {r['load']:.1f} |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cameras", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--seconds", type=float, default=30.0, help="measured time per row")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring (streams start)")
    ap.add_argument("--sources", nargs="+", choices=["432p", "1080p"], default=["432p", "1080p"])
    ap.add_argument("--tree", default=str(ROOT), help="checkout whose daemon to run (default: this one)")
    ap.add_argument("--baseline", help="another checkout (e.g. the previous main) to run before each row, for comparison")
    ap.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a setting")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "regionwatch-bench"),
                    help="where the 1080p footage is made once")
    ap.add_argument("--stop-at-skip", action="store_true", help="stop a source's rows at the first row that skips")
    ap.add_argument("--json", help="also write every row as JSON lines here")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one row, print JSON
    args = ap.parse_args(argv)

    if args.one:
        args.source, n, args.file = args.one.split(":", 2)
        args.n = int(n)
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return 0

    if not FOOTAGE.is_file():
        print(f"footage not found: {FOOTAGE}", file=sys.stderr)
        return 2
    files = {"432p": (FOOTAGE.resolve(), 10.0)}
    if "1080p" in args.sources:
        need = args.warmup + args.seconds + 10
        dst = Path(args.cache) / f"one-by-one-1080p15-{int(need)}s.mp4"
        print(f"1080p footage: {make_1080p(FOOTAGE, dst, need)}", file=sys.stderr)
        files["1080p"] = (dst, 15.0)
    trees = {"after": args.tree} if not args.baseline else {"before": args.baseline, "after": args.tree}
    print(f"trees: {', '.join(f'{k} = {Path(v).resolve()}' for k, v in trees.items())}; measured {args.seconds:g} s after {args.warmup:g} s warm-up; "
          f"settings: demo + {args.set or 'nothing'}; CPU in cores (CPU s / wall s); {os.cpu_count()} CPUs")
    print("| tree | source | cameras | processed fps min / mean | skipped | CPU total | CPU per camera | "
          + " | ".join(f"{g} per cam" for g in GROUPS)
          + " | detector runs/s | detect CPU ms/run | stage metric per cam | load 1m |")
    print("|" + "---|" * (11 + len(GROUPS)))
    best: dict[tuple[str, str], int] = {}
    for source in args.sources:
        path, nominal = files[source]
        for n in args.cameras:
            keeps = []
            for label, tree in trees.items():
                cmd = [sys.executable, str(Path(__file__).resolve()), "--one", f"{source}:{n}:{path}", "--tree", tree,
                       "--seconds", str(args.seconds), "--warmup", str(args.warmup)]
                for s in args.set or []:
                    cmd += ["--set", s]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode or line is None:
                    print(f"| {label} | {source} | {n} | failed (exit {proc.returncode}): {proc.stderr.strip()[-400:]} |")
                    continue
                r = json.loads(line[7:])
                print(_row(source, n, nominal, r, label), flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps({"tree": label, "path": tree, "source": source, "cameras": n,
                                            "set": args.set, **r}) + "\n")
                keeps_up = r["skipped"] == 0 and min(r["fps"].values() or [0]) >= FULL_RATE * nominal
                if keeps_up:
                    best[(label, source)] = max(best.get((label, source), 0), n)
                keeps.append(keeps_up)
            if args.stop_at_skip and not any(keeps):
                break
    for label in trees:
        for source in args.sources:
            print(f"{label}, {source}: largest N with no skipped frame and every camera at full rate: "
                  f"{best.get((label, source), 0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
