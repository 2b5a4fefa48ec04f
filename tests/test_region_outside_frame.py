"""A region that lies entirely outside the picture is a WARNING naming it, once per camera and
stream size: the daemon (``regionwatch run``, real model) on a live RTSP camera (the GStreamer
test server) that comes back at another resolution after its server restarts.

Regions: ``table`` (inside both sizes), ``far`` (inside 768x432, outside 384x216) and ``gone``
(outside both). Expected: ``gone`` warned at 768x432; after the restart at 384x216 ``gone`` and
``far`` warned; reconnects at a size already seen warn no more; ``table`` never.
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap

import pytest
from helpers import wait_until
from helpers.rtsp import RtspServer, rtsp_server_unavailable
from helpers.video import cut_clip

pytestmark = pytest.mark.slow

CONFIG = """
[detector]
model = "{model}"
interval_s = 2.0
imgsz = 320
[sinks.stdout]
enabled = false
[state]
dir = "state"
[metrics]
enabled = false
[[cameras]]
id = "hall"
url = "{url}"
open_timeout_s = 2.0
read_timeout_s = 2.0
stall_timeout_s = 2.0
reconnect_base_s = 0.2
reconnect_max_s = 1.0
[[cameras.regions]]
id = "table"
polygon = [[180, 165], [280, 165], [280, 206], [180, 206]]
[[cameras.regions]]
id = "far"
polygon = [[500, 300], [700, 300], [700, 400], [500, 400]]
[[cameras.regions]]
id = "gone"
polygon = [[1000, 600], [1200, 600], [1100, 700]]
"""



def test_a_region_outside_the_picture_is_warned_once_per_stream_size(tmp_path, footage, yolo_model, regionwatch_bin):
    why = rtsp_server_unavailable()
    if why:
        pytest.skip(why)
    big, small = tmp_path / "big.mp4", tmp_path / "small.mp4"
    cut_clip(footage, big, 30, crf=23)
    cut_clip(footage, small, 30, crf=23, size=(384, 216))
    srv = RtspServer(big).start()
    log = tmp_path / "daemon.log"
    proc = None
    try:
        cfg = tmp_path / "config.toml"
        cfg.write_text(textwrap.dedent(CONFIG.format(model=yolo_model, url=srv.url())))
        env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "YOLO_CONFIG_DIR": str(tmp_path / "yolo")}
        proc = subprocess.Popen([str(regionwatch_bin), "run", "--config", str(cfg)], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=log.open("wb"))
        text = lambda: log.read_text(errors="replace")
        assert wait_until(lambda: "region gone lies entirely outside the 768x432 frame" in text(), 240), text()
        # The 3 s clip ends: the camera reconnects at the same size (no new warning), then the
        # server comes back serving another resolution (and that clip ends and reconnects too).
        again = lambda: text().count("/cam again after ")
        assert wait_until(lambda: again() >= 1, 60), text()
        srv.kill()
        srv.file = str(small)
        srv.start()
        assert wait_until(lambda: "region far lies entirely outside the 384x216 frame" in text(), 60), text()
        seen = again()
        assert wait_until(lambda: again() > seen, 60), text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, text()[-3000:]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        srv.stop()
    warnings = [line.split(" WARNING ", 1)[1] for line in text().splitlines()
                if " WARNING " in line and "lies entirely outside" in line]
    tail = "; nobody can ever be inside it (is the polygon drawn for another resolution?)"
    assert warnings == [
        "daemon.pipeline: camera hall: region gone lies entirely outside the 768x432 frame (polygon x 1000..1200, "
        "y 600..700)" + tail,
        "daemon.pipeline: camera hall: region far lies entirely outside the 384x216 frame (polygon x 500..700, "
        "y 300..400)" + tail,
        "daemon.pipeline: camera hall: region gone lies entirely outside the 384x216 frame (polygon x 1000..1200, "
        "y 600..700)" + tail,
    ], text()
