#!/usr/bin/python3
"""A GStreamer RTSP server for tests: serves a video file as-is (H.264, no re-encoding).

Run it with the SYSTEM python (python3-gi and gir1.2-gst-rtsp-server-1.0 are system packages,
not in the project's virtualenv)::

    /usr/bin/python3 tests/rtsp_server.py --file clip.mp4 --port 8554 --mount /cam

It binds 127.0.0.1 only and prints ``READY rtsp://127.0.0.1:<port><mount>`` on stdout once it
listens (``--port 0`` picks a free port; the line tells which). Every client gets its own
session that starts at the beginning of the file, paced at the file's frame rate (``--speed``
scales the pace and the RTP timestamps together, so a 139 s clip can be served in 35 s).

Options for fault tests:
  --user/--password   require RTSP basic authentication
  --defer-mount       start without the mount (clients get 404) until the process gets SIGUSR1
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def _speed_probe(speed: float):
    """A pad probe that compresses buffer timestamps by ``speed`` (serve faster than real time).

    Times are scaled around the first buffer's timestamp so that none falls before the segment
    start (B-frame streams start with PTS > 0).
    """
    base: list[int] = []

    def scale(t: int) -> int:
        return t if t == Gst.CLOCK_TIME_NONE else max(0, base[0] + int((t - base[0]) / speed))

    def probe(_pad, info):
        buf = info.get_buffer()
        if buf is None:
            return Gst.PadProbeReturn.OK
        if not base:
            base.append(buf.pts if buf.pts != Gst.CLOCK_TIME_NONE else 0)
        buf.pts, buf.dts = scale(buf.pts), scale(buf.dts)
        if buf.duration != Gst.CLOCK_TIME_NONE:
            buf.duration = int(buf.duration / speed)
        return Gst.PadProbeReturn.OK

    return probe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", required=True, help="an MP4/MOV file with an H.264 video track")
    ap.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free port)")
    ap.add_argument("--mount", default="/cam")
    ap.add_argument("--speed", type=float, default=1.0, help="playback speed factor")
    ap.add_argument("--user", default="")
    ap.add_argument("--password", default="")
    ap.add_argument("--defer-mount", action="store_true", help="add the mount only on SIGUSR1")
    args = ap.parse_args(argv)

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))

    factory = GstRtspServer.RTSPMediaFactory()
    location = args.file.replace("\\", "\\\\").replace('"', '\\"')
    factory.set_launch(
        f'( filesrc location="{location}" ! qtdemux ! h264parse name=parse '
        "! rtph264pay name=pay0 pt=96 config-interval=-1 )"
    )
    factory.set_shared(False)
    factory.set_eos_shutdown(False)

    if args.speed != 1.0:

        def configure(_factory, media):
            parse = media.get_element().get_by_name("parse")
            parse.get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, _speed_probe(args.speed))

        factory.connect("media-configure", configure)

    if args.user:
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "viewer")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(args.user, args.password), token)
        server.set_auth(auth)
        factory.add_role_from_structure(
            Gst.Structure.new_from_string(
                "viewer, media.factory.access=(boolean)true, media.factory.construct=(boolean)true"
            )
        )

    mounts = server.get_mount_points()
    if not args.defer_mount:
        mounts.add_factory(args.mount, factory)

    def on_usr1() -> bool:
        mounts.add_factory(args.mount, factory)
        print(f"MOUNTED {args.mount}", flush=True)
        return GLib.SOURCE_CONTINUE

    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGUSR1, on_usr1)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, lambda: (loop.quit(), False)[1])
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, lambda: (loop.quit(), False)[1])

    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
        return 2
    print(f"READY rtsp://127.0.0.1:{server.get_bound_port()}{args.mount}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
