"""A loopback RTSP server for tests: ``/usr/bin/python3 gst_rtsp_server.py PORT [FILE.mp4]``.

Runs with Debian's python3 (GStreamer's ``gi`` bindings live there, not in the venv).
Mounts ``/live`` (a moving test pattern, H.264, 320x240 at 15 fps, shared by all clients) and,
with a file argument, ``/file`` (that H.264 MP4 passed through, one pipeline per client).
Prints ``READY rtsp://127.0.0.1:PORT`` once it listens.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

LIVE = (
    "( videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=15/1 "
    "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=15 bitrate=300 "
    "! video/x-h264,profile=baseline ! rtph264pay name=pay0 pt=96 config-interval=1 )"
)
FILE = (
    "( filesrc location={} ! qtdemux ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=1 )"
)


def main() -> None:
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(sys.argv[1])
    mounts = server.get_mount_points()
    live = GstRtspServer.RTSPMediaFactory()
    live.set_launch(LIVE)
    live.set_shared(True)
    mounts.add_factory("/live", live)
    if len(sys.argv) > 2:
        media = GstRtspServer.RTSPMediaFactory()
        media.set_launch(FILE.format(sys.argv[2]))
        mounts.add_factory("/file", media)
    server.attach(None)
    print(f"READY rtsp://127.0.0.1:{sys.argv[1]}", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
