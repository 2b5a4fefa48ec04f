"""Short clips cut from the sample footage, so end-to-end tests stay cheap.

Example (not run here: it needs the footage)::

    cut_clip(FOOTAGE, tmp_path / "clip.mp4", 90)             # frames 0..89
    cut_clip(FOOTAGE, tmp_path / "clip.mp4", 125, start=55)  # frames 55..124, timestamps from 0
    cut_clip(FOOTAGE, tmp_path / "small.mp4", 90, size=(384, 216))  # half the width and height
"""

from __future__ import annotations

from pathlib import Path

import av


def cut_clip(src: Path, dst: Path, stop: int, *, start: int = 0, crf: int = 12,
             size: tuple[int, int] | None = None) -> None:
    """Frames ``[start, stop)`` of ``src`` re-encoded as H.264 (near-lossless by default) with the
    same frame rate and size (or scaled to ``size`` = (width, height)), numbered from 0 (one tick a
    frame)."""
    with av.open(str(src)) as i, av.open(str(dst), "w") as o:
        s = i.streams.video[0]
        out = o.add_stream("libx264", rate=s.average_rate)
        out.width, out.height = size or (s.codec_context.width, s.codec_context.height)
        out.pix_fmt = "yuv420p"
        out.options = {"crf": str(crf), "preset": "ultrafast"}
        for k, f in enumerate(i.decode(s)):
            if k == stop:
                break
            if k >= start:
                if size:
                    f = f.reformat(width=size[0], height=size[1])
                f.pts, f.time_base = k - start, 1 / s.average_rate
                o.mux(out.encode(f))
        o.mux(out.encode(None))
