"""Command line: ``regionwatch run | annotate | check-config | schema | version``.

Exit codes: 0 success, 1 runtime failure (e.g. a model cannot be loaded), 2 invalid
configuration or usage (including I/O preconditions of ``run``: state folder, JSONL path, listen
port), 128 + n after a fatal signal n (see :mod:`daemon.ops.signals`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from daemon import __version__
from daemon.config import ConfigError, Settings, load_settings
from daemon.redact import RedactingFilter

log = logging.getLogger("regionwatch")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:  # already formatted (and redacted) by RedactingFilter
            out["exc"] = record.exc_text
        return json.dumps(out)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Logs go to stderr (stdout carries events), with URL credentials redacted."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(
        _JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("ultralytics", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load_or_exit(path: str) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        raise SystemExit(2) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load_or_exit(args.config)
    cams = ", ".join(f"{c.id} ({len(c.regions)} regions)" for c in settings.cameras)
    print(f"{args.config}: OK — {len(settings.cameras)} camera(s): {cams}; tracker {settings.tracker.backend}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    settings = _load_or_exit(args.config)
    setup_logging(args.log_level or settings.logging.level, settings.logging.format)
    from daemon.app import App
    from daemon.detector import ModelLoadError
    from daemon.ops.signals import SignalHandling
    from daemon.preflight import PreflightError
    from daemon.sinks.mqtt import MqttConfigError

    app = App(settings)
    # SIGTERM/SIGINT stop gracefully (twice: exit now); other fatal signals stop gracefully and
    # exit 128+n; SIGHUP is logged and ignored (see daemon/ops/signals.py).
    signals = SignalHandling(on_stop=app.request_stop)
    signals.install()
    started = time.monotonic()
    try:
        app.load()
    except PreflightError as e:  # state folder, JSONL path, listen port: checked before models load
        for problem in e.problems:
            print(problem, file=sys.stderr)
        app.shutdown()
        return 2
    except MqttConfigError as e:  # e.g. the password file is missing: a configuration problem
        print(f"sinks.mqtt: {e}", file=sys.stderr)
        app.shutdown()
        return 2
    except (ModelLoadError, FileNotFoundError, RuntimeError) as e:
        log.error("%s", e)
        app.shutdown()
        return 1
    except Exception as e:  # anything else at start: one clear line (the traceback at DEBUG)
        log.error("startup failed: %s: %s", type(e).__name__, e)
        log.debug("startup failure", exc_info=True)
        app.shutdown()
        return 1
    cams = ", ".join(p.cam.id for p in app.pipelines)
    log.info("regionwatch %s running: cameras %s, tracker %s", __version__, cams, settings.tracker.backend)
    code = app.run()
    frames = sum(p.frames for p in app.pipelines)
    log.info("stopped after %.1f s, %d frames processed", time.monotonic() - started, frames)
    return signals.exit_code or code  # a fatal signal (SIGUSR1...) is a failure for the supervisor


def cmd_annotate(args: argparse.Namespace) -> int:
    settings = _load_or_exit(args.config)
    setup_logging(args.log_level or "WARNING", settings.logging.format)  # quiet: the progress bar speaks
    from daemon.annotate import run_command

    return run_command(settings, args)


def cmd_schema(args: argparse.Namespace) -> int:
    from daemon.events import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regionwatch", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"regionwatch {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon (files: process once and exit)")
    run.add_argument("--config", "-c", required=True, help="TOML configuration file")
    run.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.set_defaults(func=cmd_run)

    chk = sub.add_parser("check-config", help="validate a configuration file (exit 0 valid, 2 invalid)")
    chk.add_argument("config")
    chk.set_defaults(func=cmd_check_config)

    sch = sub.add_parser("schema", help="print the event JSON Schema")
    sch.set_defaults(func=cmd_schema)

    ann = sub.add_parser("annotate", help="write an annotated H.264 MP4 of a file camera (regions, people, events)")
    ann.add_argument("--config", "-c", required=True, help="TOML configuration file")
    ann.add_argument("--camera", help="camera id (may be left out when the config has one camera)")
    ann.add_argument("--output", "-o", required=True, help="the MP4 file to write")
    ann.add_argument("--max-frames", type=int, metavar="N", help="stop after the first N frames")
    ann.add_argument("--crf", type=int, default=20, choices=range(0, 52), metavar="0-51",
                     help="x264 quality: lower is better and bigger (default 20)")
    ann.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    ann.set_defaults(func=cmd_annotate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
