"""Listener under idle connections: the ops listener (waitress) against a stdlib
``ThreadingHTTPServer`` serving the same ``/metrics`` (what the daemon used before), same run.

    .venv/bin/python bench/listener.py [--idle 300] [--requests 20]

For each server: start it, time ``/metrics`` (median of ``--requests``), open ``--idle`` connections
that send nothing (half of them send a partial request line), then report the process's thread
count and virtual / resident memory growth, and time ``/metrics`` again with them open. Threads and
memory come from ``/proc/self``; times are wall clock, so report the machine load with them.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daemon.ops.httpd import OpsServer  # noqa: E402
from daemon.ops.metrics import Metrics  # noqa: E402


def vm_kib() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmSize"].split()[0]), int(fields["VmRSS"].split()[0])


def median_get_ms(url: str, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as r:
            r.read()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


class StdlibServer:
    """The baseline: http.server's ThreadingHTTPServer (a thread per connection, backlog 5)."""

    def __init__(self, metrics: Metrics):
        body = metrics.exposition

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 (stdlib name)
                data = body()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *a: None  # its tracebacks for reset clients are not the point here
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class WaitressServer:
    def __init__(self, metrics: Metrics):
        self.srv = OpsServer("127.0.0.1:0", metrics=metrics)
        self.srv.start()
        self.port = self.srv.port

    def stop(self) -> None:
        self.srv.stop()


def measure(name: str, make, idle: int, requests: int) -> dict:
    metrics = Metrics()
    server = make(metrics)
    url = f"http://127.0.0.1:{server.port}/metrics"
    quiet_ms = median_get_ms(url, requests)
    threads0, (vm0, rss0) = threading.active_count(), vm_kib()
    socks = []
    t0 = time.perf_counter()
    for i in range(idle):
        s = socket.socket()
        s.settimeout(30)
        s.connect(("127.0.0.1", server.port))
        if i % 2:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        socks.append(s)
    connect_s = time.perf_counter() - t0
    time.sleep(1.0)
    threads1, (vm1, rss1) = threading.active_count(), vm_kib()
    busy_ms = median_get_ms(url, requests)
    for s in socks:
        s.close()
    server.stop()
    return {"server": name, "threads": f"{threads0} -> {threads1}", "VM MiB": (vm1 - vm0) / 1024,
            "RSS MiB": (rss1 - rss0) / 1024, "connect s": connect_s, "metrics ms": quiet_ms, "with idle ms": busy_ms}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle", type=int, default=300)
    ap.add_argument("--requests", type=int, default=20)
    args = ap.parse_args()
    rows = [measure("stdlib ThreadingHTTPServer (before)", StdlibServer, args.idle, args.requests),
            measure("OpsServer on waitress (now)", WaitressServer, args.idle, args.requests)]
    print(f"{args.idle} idle connections; load {os.getloadavg()[0]:.1f}")
    print(f"{'server':<38} {'threads':>12} {'+VM MiB':>9} {'+RSS MiB':>9} {'connect s':>10} {'/metrics ms':>12} "
          f"{'with idle ms':>13}")
    for r in rows:
        print(f"{r['server']:<38} {r['threads']:>12} {r['VM MiB']:>9.1f} {r['RSS MiB']:>9.1f} {r['connect s']:>10.2f} "
              f"{r['metrics ms']:>12.1f} {r['with idle ms']:>13.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
