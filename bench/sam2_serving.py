"""SAM2 serving across cameras: per-camera sessions vs the one-worker server, same frames, one run.

    .venv/bin/python bench/sam2_serving.py                                  # CPU, small (image 128)
    .venv/bin/python bench/sam2_serving.py --device cuda --bf16 --image-size 1024 \\
        --frame-size 1920x1080 --cameras 1 4 16 32 --people 1 4 16 --steps 8  # one GPU, <= 5 min

For each (cameras x people) cell, every camera gets its own footage frames (staggered starts,
resized to ``--frame-size``) and its people are prompted on the first frame (boxes side by side);
then ``--steps`` ticks, a tick being one new frame for every camera. Three methods advance tick by
tick in turn (rotating who goes first), so machine load hits them alike:

* (a) ``sessions``: today's per-camera :class:`StreamingSam2Session`\\s, stepped one after the
  other (what the per-model lock serialised): PIL resize on the host, full-resolution masks
  copied back;
* (b) ``sessions+dev``: (a) with the uint8 upload and resize on the device (outside the lock);
* (c) ``server``: :class:`Sam2Server` (no worker thread; the tick runs in the caller): encoder
  batched over cameras, attention/heads/memory encoder batched over everyone, device
  post-processing, one copy back per tick, masks not copied (only boxes, footprints, areas).

Columns: tick p50/p95 (wall; CUDA synchronised), camera-frames/s and person-frames/s (over the
mean tick), TFLOP/s (counted FLOPs, below), peak device memory over the method's ticks (all
three methods' state is resident; CUDA only), host syncs per tick (CUDA sync debug mode, one
extra tick), speed-up of throughput vs (a), and equivalence with (a) on the last tick: the
lowest mask IoU and the largest object-score difference over every person (image features
differ slightly: (a) resizes with PIL). (b) and (c) share preprocessing, so (c) vs (b) should be
near 1.0 / 0; the tests check (c) vs sessions exactly at the inputs of memory attention.

SAM2 has random weights (no checkpoint here): timings and FLOPs are real, masks mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FOOTAGE = ROOT.parent / "shared/assets/footage/one-by-one-person-detection.mp4"
METHODS = ("sessions", "sessions+dev", "server")


def person_boxes(k: int, width: int, height: int) -> list[tuple[float, float, float, float]]:
    """k distinct, person-shaped boxes side by side across the frame."""
    step = width / k
    return [(i * step + 0.1 * step, 0.1 * height, (i + 0.9) * step, 0.95 * height) for i in range(k)]


def footage_frames(count: int, size: tuple[int, int] | None) -> list[np.ndarray]:
    """``count`` RGB frames of the footage from frame 80 (looping), resized to ``size`` (w, h)."""
    import av
    import cv2

    frames: list[np.ndarray] = []
    while len(frames) < count:
        with av.open(str(FOOTAGE)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index >= 80 or frames:
                    image = frame.to_ndarray(format="rgb24")
                    frames.append(cv2.resize(image, size, interpolation=cv2.INTER_LINEAR) if size else image)
                if len(frames) == count:
                    break
    return frames


class Bench:
    """The model, the frames and the three methods for one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        from sam2.build_sam import build_sam2_video_predictor

        self.torch, self.args = torch, args
        torch.manual_seed(0)
        self.model = build_sam2_video_predictor(
            "configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device=args.device,
            hydra_overrides_extra=[f"++model.image_size={args.image_size}"], apply_postprocessing=False,
        )
        if args.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.autocast = torch.bfloat16 if args.bf16 else None
        self.cuda = args.device == "cuda"
        max_cameras = max(args.cameras)
        self.pool = footage_frames(args.steps + 2 + 7 * max_cameras, args.frame_size)

    def frames(self, camera: int) -> list[np.ndarray]:
        """A camera's frames: the pool from a staggered start."""
        return self.pool[7 * camera : 7 * camera + self.args.steps + 2]

    @contextlib.contextmanager
    def compute(self) -> Iterator[None]:
        dtype = self.autocast
        with self.torch.inference_mode(), self.torch.autocast(self.args.device, dtype=dtype, enabled=dtype is not None):
            yield

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    # ------------------------------------------------------------------------- FLOPs
    def flops(self) -> tuple[float, float]:
        """(FLOPs of one camera-frame's encoding, FLOPs of one person-frame with full memory)."""
        from torch.utils.flop_counter import FlopCounterMode

        from daemon.tracking.sam2_session import StreamingSam2Session

        frames = self.frames(0)
        session = StreamingSam2Session(self.model, autocast_dtype=self.autocast, preprocess="device")
        session.step(frames[0])
        box = person_boxes(1, frames[0].shape[1], frames[0].shape[0])[0]
        session.add_person(1, box=box)
        for i in range(17):  # 16 pointers and 6 recent mask memories: the steady state
            session.step(frames[1 + i % (len(frames) - 1)])
        counter = FlopCounterMode(display=False)
        with counter, self.compute():
            session.step(frames[0])
        step = counter.get_total_flops()
        image = self.torch.zeros(1, 3, self.args.image_size, self.args.image_size, device=self.args.device)
        counter = FlopCounterMode(display=False)
        with counter, self.compute():
            self.model.forward_image(image)
        encoder = counter.get_total_flops()
        return float(encoder), float(step - encoder)

    # ------------------------------------------------------------------------- methods
    def setup(self, method: str, cameras: int, people: int) -> tuple[Callable[[int, bool], dict], Callable[[], int]]:
        """(tick(step, masks) -> {(camera, person): (mask or None, score)}, retained bytes) with
        everyone prompted on frame 0."""
        from daemon.tracking.sam2_server import Prompt, Sam2Server
        from daemon.tracking.sam2_session import StreamingSam2Session

        frames = [self.frames(c) for c in range(cameras)]
        height, width = frames[0][0].shape[:2]
        boxes = person_boxes(people, width, height)
        if method == "server":
            server = Sam2Server(
                self.model, max_people=cameras * people, autocast_dtype=self.autocast, thread=False,
                encoder_batches=self.args.encoder_batches, max_batch=self.args.max_batch,
            )
            clients = [server.camera(f"cam{c}") for c in range(cameras)]
            futures = [cl.submit(frames[c][0], prompts=[Prompt(i, box=b) for i, b in enumerate(boxes)])
                       for c, cl in enumerate(clients)]
            for f in futures:
                f.result()

            def tick(step: int, masks: bool) -> dict:
                futures = [cl.submit(frames[c][step], masks=masks) for c, cl in enumerate(clients)]
                out = {}
                for c, f in enumerate(futures):
                    for i, r in f.result().people.items():
                        mask = r.mask.full(width, height) if r.mask else np.zeros((height, width), bool)
                        out[(c, i)] = (mask if masks else None, r.score)
                return out

            return tick, lambda: server.banks.nbytes

        preprocess = "device" if method == "sessions+dev" else "pil"
        sessions = [StreamingSam2Session(self.model, autocast_dtype=self.autocast, preprocess=preprocess,
                                         max_batch=self.args.max_batch) for _ in range(cameras)]
        for c, s in enumerate(sessions):
            s.step(frames[c][0])
            for i, b in enumerate(boxes):
                s.add_person(i, box=b)

        def tick(step: int, masks: bool) -> dict:
            out = {}
            for c, s in enumerate(sessions):
                for i, r in s.step(frames[c][step]).items():
                    out[(c, i)] = (r.mask, r.score)
            return out

        return tick, lambda: sum(s.memory_bytes() for s in sessions)

    def syncs(self, tick: Callable[[int, bool], dict], step: int) -> int | None:
        """Host synchronisations in one tick (CUDA sync debug mode), or None on a CPU."""
        if not self.cuda:
            return None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.torch.cuda.set_sync_debug_mode("warn")
            try:
                with self.compute():
                    tick(step, False)
                self.torch.cuda.synchronize()
            finally:
                self.torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message) for w in caught)

    def cell(self, cameras: int, people: int) -> dict[str, dict]:
        torch, steps = self.torch, self.args.steps
        runs = {m: self.setup(m, cameras, people) for m in METHODS}
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        peaks = dict.fromkeys(METHODS, 0)
        for step in range(1, steps + 1):
            order = METHODS[step % 3 :] + METHODS[: step % 3]
            for method in order:
                if self.cuda:
                    torch.cuda.reset_peak_memory_stats()
                self.sync()
                start = time.perf_counter()
                with self.compute():
                    runs[method][0](step, False)
                self.sync()
                times[method].append(time.perf_counter() - start)
                if self.cuda:
                    peaks[method] = max(peaks[method], torch.cuda.max_memory_allocated())
        last = steps + 1
        finals = {}
        for method in METHODS:
            with self.compute():
                finals[method] = runs[method][0](last, True)
        out = {}
        for method in METHODS:
            syncs = self.syncs(runs[method][0], last)  # steps on past the last frame: memory only
            out[method] = {
                "times": times[method], "peak": peaks[method] if self.cuda else None, "syncs": syncs,
                "retained": runs[method][1](), "equivalence": equivalence(finals["sessions"], finals[method]),
            }
        return out


def equivalence(ref: dict, got: dict) -> tuple[float, float]:
    """(lowest mask IoU, largest |score difference|) over every (camera, person)."""
    ious, diffs = [], []
    for key, (mask, score) in ref.items():
        other, other_score = got[key]
        union = np.logical_or(mask, other).sum()
        ious.append(np.logical_and(mask, other).sum() / union if union else float(not mask.any() and not other.any()))
        diffs.append(abs(score - other_score))
    return min(ious), max(diffs)


def versions(args: argparse.Namespace) -> str:
    import sam2
    import torch

    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if "model name" in line), platform.processor())
        device = f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    sam2_version = getattr(sam2, "__version__", None) or _dist_version("sam2")
    return f"{device}; python {platform.python_version()}, torch {torch.__version__}, sam2 {sam2_version}"


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--frame-size", type=lambda s: tuple(int(v) for v in s.split("x")), default=None,
                        help="camera frame size WxH (default: the footage's 768x432)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA)")
    parser.add_argument("--cameras", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--people", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=4, help="timed ticks per cell")
    parser.add_argument("--encoder-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--max-batch", type=int, default=64, help="people per attention/decoder forward")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--budget-s", type=float, default=280.0, help="skip the remaining cells after this long")
    args = parser.parse_args(argv)
    if not FOOTAGE.is_file():
        sys.exit(f"footage not found: {FOOTAGE}")
    import torch

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    bench = Bench(args)
    flops_cam, flops_person = bench.flops()
    precision = "bf16 autocast" if args.bf16 else "fp32"
    height, width = bench.pool[0].shape[:2]
    print(f"# {versions(args)}")
    print(f"# sam2.1 hiera_t, random weights, image_size {args.image_size}, {precision}, frames {width}x{height}, "
          f"{args.steps} timed ticks per cell, encoder batches {args.encoder_batches}, max_batch {args.max_batch}")
    print(f"# FLOPs: {flops_cam / 1e9:.1f} GFLOP per camera-frame (encoder), "
          f"{flops_person / 1e9:.1f} GFLOP per person-frame (memory attention, heads, memory encoder, post)")
    print(f"# load average at start: {os.getloadavg()[0]:.1f}")
    print("\n| cameras | people | method | tick p50 ms | tick p95 ms | camera-frames/s | person-frames/s | TFLOP/s "
          "| peak MiB | syncs/tick | vs (a) | min IoU vs (a) | max score diff vs (a) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cameras in args.cameras:
        for people in args.people:
            if time.monotonic() - started > args.budget_s:
                print(f"| {cameras} | {people} | skipped: time budget {args.budget_s:.0f} s spent | | | | | | | | | | |")
                continue
            result = bench.cell(cameras, people)
            base = statistics.fmean(result["sessions"]["times"])
            for label, method in zip("abc", METHODS):
                r = result[method]
                mean = statistics.fmean(r["times"])
                p50 = statistics.median(r["times"])
                p95 = sorted(r["times"])[min(len(r["times"]) - 1, round(0.95 * (len(r["times"]) - 1)))]
                tflops = (cameras * flops_cam + cameras * people * flops_person) / mean / 1e12
                peak = "-" if r["peak"] is None else f"{r['peak'] / 2**20:.0f}"
                syncs = "-" if r["syncs"] is None else str(r["syncs"])
                iou, score = r["equivalence"]
                print(f"| {cameras} | {people} | ({label}) {method} | {p50 * 1e3:.1f} | {p95 * 1e3:.1f} "
                      f"| {cameras / mean:.2f} | {cameras * people / mean:.2f} | {tflops:.3f} | {peak} | {syncs} "
                      f"| {base / mean:.2f}x | {iou:.4f} | {score:.2g} |", flush=True)
    print(f"\n# load average at end: {os.getloadavg()[0]:.1f}; {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
