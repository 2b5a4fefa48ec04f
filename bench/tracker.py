"""SAM2 tracking cost per frame for k people: notebook method vs official predictor vs session.

One table, one run, the same frames (from the shared footage) for every method:

* (a) ``notebook``: the reference notebook's method, one ``SAM2VideoPredictor`` state and
  propagation per person, so every image is encoded once per person;
* (b) ``official``: one ``SAM2VideoPredictor`` state holding all k people (1.1.0 steps each
  object separately on the cached image features);
* (c) ``session``: :class:`daemon.tracking.sam2_session.StreamingSam2Session`, frames fed one at a
  time (its per-frame time includes resizing the frame and copying the masks to numpy).

Every person is prompted on the first frame with the notebook's points (``points_from_box``).
The three methods advance frame by frame in turn (rotating who goes first) in one process, so
load from other processes hits them alike; a frame's time is the wall time to track all k
people on it. The table gives the median over frames 1..N-1 (set-up and the prompt frame
excluded: ``init_state`` JPEG loading, prompting) and the best frame (the least disturbed by
other load). "Retained" is what each method keeps after N frames (the predictor's inference
state tensors, or ``session.memory_bytes()``). Resident set size (RSS) is measured for (b) and
(c) in fresh processes that run only that method.

SAM2 has random weights (no checkpoint here): the timings are real, the masks mean nothing.

``--long-frames N`` adds the session alone with 3 people over N frames of the footage (looping),
with retained bytes and RSS every N/10 frames, to show memory stays flat on a long stream.

Example::

    .venv/bin/python bench/tracker.py --image-size 512 --frames 12 --ks 1 2 4 8
    .venv/bin/python bench/tracker.py --image-size 256 --ks --long-frames 2000
    .venv/bin/python bench/tracker.py --image-size 1024 --device cuda --bf16
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FOOTAGE = ROOT.parent / "shared/assets/footage/one-by-one-person-detection.mp4"
FIRST_FRAME = 80  # a person stands at the table from here on
METHODS = ("notebook", "official", "session")


# ----------------------------------------------------------------------------- helpers
def rss_mib() -> float:
    """Current resident set size of this process (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def tensor_bytes(obj, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages reachable through dicts, lists and tuples."""
    import torch

    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(item, seen) for item in obj)
    return 0


def person_boxes(k: int, width: int, height: int) -> list[list[float]]:
    """k fixed, distinct, person-shaped boxes side by side across the frame."""
    step = width / k
    return [[i * step + 0.1 * step, 0.1 * height, (i + 0.9) * step, 0.95 * height] for i in range(k)]


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line),
        platform.processor(),
    )
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def footage_frames(start: int) -> Iterator[np.ndarray]:
    """RGB frames of the footage from ``start``, looping forever."""
    import av

    while True:
        with av.open(str(FOOTAGE)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index >= start:
                    yield frame.to_ndarray(format="rgb24")
        start = 0


def write_clip(folder: Path, frames: int) -> None:
    """The benchmark clip as a JPEG folder (what SAM2VideoPredictor.init_state reads)."""
    from PIL import Image

    for index, frame in zip(range(frames), footage_frames(FIRST_FRAME)):
        Image.fromarray(frame).save(folder / f"{index:05d}.jpg", quality=95)


# ----------------------------------------------------------------------------- worker
class Worker:
    """Sets the three methods up for k people in this process and measures them."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        from PIL import Image
        from sam2.build_sam import build_sam2_video_predictor

        torch.manual_seed(0)
        self.args = args
        self.torch = torch
        self.model = build_sam2_video_predictor(
            "configs/sam2.1/sam2.1_hiera_t.yaml",
            ckpt_path=None,
            device=args.device,
            hydra_overrides_extra=[f"++model.image_size={args.image_size}"],
            apply_postprocessing=False,
        )
        self.clip = Path(args.clip)
        self.frames = [np.array(Image.open(p).convert("RGB")) for p in sorted(self.clip.glob("*.jpg"))]
        self.autocast_dtype = torch.bfloat16 if args.bf16 else None

    @contextlib.contextmanager
    def compute(self) -> Iterator[None]:
        """The context every method runs in (the notebook's: inference mode, optional autocast)."""
        dtype = self.autocast_dtype
        with self.torch.inference_mode(), self.torch.autocast(self.args.device, dtype=dtype, enabled=dtype is not None):
            yield

    def sync(self) -> None:
        if self.args.device == "cuda":
            self.torch.cuda.synchronize()

    def prompts(self, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        from daemon.tracking.sam2_session import points_from_box

        height, width = self.frames[0].shape[:2]
        return [points_from_box(box) for box in person_boxes(k, width, height)]

    def predictor(self, prompts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[dict, Iterator]:
        """A predictor state with ``prompts`` on frame 0, propagated through frame 0."""
        with self.compute():
            state = self.model.init_state(str(self.clip))
            for obj_id, (points, labels) in enumerate(prompts):
                self.model.add_new_points_or_box(state, frame_idx=0, obj_id=obj_id, points=points, labels=labels)
            frames = self.model.propagate_in_video(state)
            next(frames)
        return state, frames

    def session(self, k: int):
        from daemon.tracking.sam2_session import StreamingSam2Session

        session = StreamingSam2Session(self.model, autocast_dtype=self.autocast_dtype, max_batch=self.args.max_batch)
        session.step(self.frames[0])
        for obj_id, (points, labels) in enumerate(self.prompts(k)):
            session.add_person(obj_id, points=points, labels=labels)
        return session

    def setup(self, method: str, k: int) -> tuple[Callable[[int], object], Callable[[], int | None]]:
        """(track frame i, retained bytes) for ``method`` with k people prompted on frame 0."""
        if method == "notebook":
            runs = [self.predictor([prompt]) for prompt in self.prompts(k)]
            return lambda i: [next(frames) for _, frames in runs], lambda: None
        if method == "official":
            state, frames = self.predictor(self.prompts(k))
            return lambda i: next(frames), lambda: tensor_bytes(state)
        session = self.session(k)
        return lambda i: session.step(self.frames[i]), session.memory_bytes

    def timings(self, k: int) -> dict:
        """All methods interleaved frame by frame; median wall and mean CPU seconds per frame."""
        self.warm_up()
        runs = {method: self.setup(method, k) for method in METHODS}
        wall = {method: [] for method in METHODS}
        cpu = {method: [] for method in METHODS}
        for i in range(1, len(self.frames)):
            for method in METHODS[i % 3 :] + METHODS[: i % 3]:
                self.sync()
                start, cpu_start = time.perf_counter(), time.process_time()
                with self.compute():
                    runs[method][0](i)
                self.sync()
                wall[method].append(time.perf_counter() - start)
                cpu[method].append(time.process_time() - cpu_start)
        return {
            method: {
                "s_per_frame": statistics.median(wall[method]),
                "best": min(wall[method]),
                "cpu_per_frame": statistics.fmean(cpu[method]),
                "retained": runs[method][1](),
            }
            for method in METHODS
        }

    def resident(self, method: str, k: int) -> dict:
        """RSS after tracking k people over all frames with ``method`` alone."""
        self.warm_up()
        gc.collect()
        baseline = rss_mib()
        track, retained = self.setup(method, k)
        for i in range(1, len(self.frames)):
            with self.compute():
                track(i)
        gc.collect()
        return {"rss": rss_mib(), "rss_delta": rss_mib() - baseline, "retained": retained()}

    def warm_up(self) -> None:
        """Every module once, so lazy caches (e.g. RoPE tables) are filled before timing."""
        session = self.session(1)
        session.step(self.frames[1])

    def long_run(self, frames: int) -> list[dict]:
        from daemon.tracking.sam2_session import StreamingSam2Session, points_from_box

        session = StreamingSam2Session(self.model, autocast_dtype=self.autocast_dtype, max_batch=self.args.max_batch)
        height, width = self.frames[0].shape[:2]
        boxes = person_boxes(3, width, height)
        enters = {0: 0, 1: 1, 3: 2}  # frame -> person entering on it
        rows, start, every = [], time.perf_counter(), max(1, frames // 10)
        for index, frame in zip(range(frames), footage_frames(FIRST_FRAME)):
            session.step(frame)
            if index in enters:
                points, labels = points_from_box(boxes[enters[index]])
                session.add_person(enters[index], points=points, labels=labels)
            if (index + 1) % every == 0:
                self.sync()
                gc.collect()
                now = time.perf_counter()
                rss = rss_mib()
                rows.append({"frame": index + 1, "retained": session.memory_bytes(), "rss": rss, "s": (now - start) / every})
                start = now
        return rows


# ----------------------------------------------------------------------------- driver
def run_worker(args: argparse.Namespace, job: str, n: int) -> dict | list:
    command = [sys.executable, str(Path(__file__).resolve()), "--image-size", str(args.image_size)]
    command += ["--device", args.device, "--clip", args.clip, "--worker", job, str(n)]
    if args.bf16:
        command.append("--bf16")
    if args.max_batch is not None:
        command += ["--max-batch", str(args.max_batch)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"worker {job} {n} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=12, help="frames per run (N)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA)")
    parser.add_argument("--max-batch", type=int, help="the session's max_batch (default: no cap)")
    parser.add_argument("--ks", type=int, nargs="*", default=[1, 2, 4, 8], help="people counts")
    parser.add_argument("--long-frames", type=int, default=0, help="also run the session alone with 3 people this long")
    parser.add_argument("--clip", help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=2, metavar=("JOB", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    if args.worker:
        job, n = args.worker[0], int(args.worker[1])
        worker = Worker(args)
        jobs = {"timings": worker.timings, "long": worker.long_run}
        result = jobs[job](n) if job in jobs else worker.resident(job, n)
        print(json.dumps(result))
        return
    if not FOOTAGE.is_file():
        sys.exit(f"footage not found: {FOOTAGE}")
    import torch

    precision = "bf16 autocast" if args.bf16 else "fp32"
    print(f"device: {device_name(args.device)}; torch {torch.__version__}; sam2.1 hiera_t, random weights")
    print(f"image_size {args.image_size}, {precision}, session max_batch {args.max_batch}")
    print(f"N = {args.frames} frames of {FOOTAGE.name} from frame {FIRST_FRAME}")
    print(f"load average at start: {os.getloadavg()[0]:.1f} (other processes share the CPU)")
    with tempfile.TemporaryDirectory() as clip:
        args.clip = clip
        write_clip(Path(clip), args.frames)
        if args.ks:
            print("\n| k | method | s/frame (median wall) | vs notebook | best frame, s | CPU s/frame (mean) | retained MiB after N |")
            print("|---|---|---|---|---|---|---|")
        for k in args.ks:
            results = run_worker(args, "timings", k)
            base = results["notebook"]["s_per_frame"]
            for label, method in zip("abc", METHODS):
                r = results[method]
                print(
                    f"| {k} | ({label}) {method} | {r['s_per_frame']:.3f} | {r['s_per_frame'] / base:.2f}x "
                    f"| {r['best']:.3f} | {r['cpu_per_frame']:.2f} | {mib(r['retained'])} |",
                    flush=True,
                )
        if args.ks:
            k = max(args.ks)
            print(f"\n| k = {k}, alone in a process | RSS MiB after N | RSS growth during the run, MiB | retained MiB |")
            print("|---|---|---|---|")
            for label, method in (("b", "official"), ("c", "session")):
                r = run_worker(args, method, k)
                print(f"| ({label}) {method} | {r['rss']:.0f} | {r['rss_delta']:+.0f} | {mib(r['retained'])} |", flush=True)
        if args.long_frames:
            print(f"\nsession alone, 3 people, {args.long_frames} frames (footage looped):\n")
            print("| frame | retained MiB | RSS MiB | s/frame (interval mean) |")
            print("|---|---|---|---|")
            for row in run_worker(args, "long", args.long_frames):
                print(f"| {row['frame']} | {mib(row['retained'])} | {row['rss']:.0f} | {row['s']:.3f} |", flush=True)
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
