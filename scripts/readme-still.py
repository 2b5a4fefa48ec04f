#!/usr/bin/env python3
"""Make the README's picture: one frame of ``regionwatch annotate`` on the sample footage.

Runs the real ``annotate`` command (demo/sample-footage.toml: YOLO + ByteTrack, the "table"
region) on the first frames of ../shared/assets/footage/one-by-one-person-detection.mp4, then
saves one frame of the annotated MP4 — by default frame 84, just after the first visitor stepped
into the region: her box and track id, the region's count at 1 and the "entered" banner.

The footage is "one-by-one-person-detection.mp4" from Intel's intel-iot-devkit/sample-videos,
licensed CC BY 4.0; the still is a derivative and keeps that attribution in the README.

Usage:  .venv/bin/python scripts/readme-still.py [--frame N] [--output docs/annotate-still.jpg]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOOTAGE = REPO.parent / "shared" / "assets" / "footage" / "one-by-one-person-detection.mp4"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "demo" / "sample-footage.toml"))
    ap.add_argument("--camera", default="hall")
    ap.add_argument("--frame", type=int, default=84, help="0-based frame index of the still")
    ap.add_argument("--output", default=str(REPO / "docs" / "annotate-still.jpg"))
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality")
    args = ap.parse_args(argv)
    if not FOOTAGE.exists():
        print(f"readme-still: the sample footage is missing: {FOOTAGE}", file=sys.stderr)
        return 2

    import av
    import cv2

    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0"}
    env.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "regionwatch-ultralytics"))
    with tempfile.TemporaryDirectory(prefix="regionwatch-still-") as tmp:
        video = Path(tmp) / "annotated.mp4"
        cmd = [sys.executable, "-m", "daemon", "annotate", "--config", args.config, "--camera", args.camera,
               "--output", str(video), "--max-frames", str(args.frame + 1), "--crf", "16"]
        print("+", " ".join(cmd), file=sys.stderr)
        r = subprocess.run(cmd, cwd=REPO, env=env)
        if r.returncode != 0:
            return r.returncode
        with av.open(str(video)) as c:
            image = None
            for i, frame in enumerate(c.decode(video=0)):
                if i == args.frame:
                    image = frame.to_ndarray(format="bgr24")
                    break
    if image is None:
        print(f"readme-still: the video has no frame {args.frame}", file=sys.stderr)
        return 1
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), image, [cv2.IMWRITE_JPEG_QUALITY, args.quality, cv2.IMWRITE_JPEG_OPTIMIZE, 1])
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB, frame {args.frame})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
