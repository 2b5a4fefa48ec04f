"""Command line: ``regionwatch run | annotate | evaluate | check-config | schema | version``.

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
from pydantic import ValidationError

from daemon.config import ConfigError, FleetConfig, Settings, format_validation_error, load_settings
from daemon.redact import RedactingFilter

log = logging.getLogger("regionwatch")

SHARD_HELP = ("run only shard I of N of the cameras (rendezvous hashing of camera ids); overrides [fleet] shard; "
              "also POD-NAME-I/N, e.g. regionwatch-2/3")


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


def _load(path: str, shard: str | None = None) -> Settings:
    """Load and validate; ``shard`` (``--shard I/N``) overrides ``[fleet] shard``.

    Raises :class:`ConfigError` with ``section.key: problem`` lines."""
    try:
        settings = load_settings(path)
        if shard is not None:
            settings.fleet = FleetConfig(shard=shard)
        return settings
    except ValidationError as e:  # from --shard
        raise ConfigError([p.replace("shard: ", "--shard: ", 1) for p in format_validation_error(e)]) from None


def _load_or_exit(path: str, shard: str | None = None) -> Settings:
    """:func:`_load`, or print the problems and exit 2."""
    try:
        return _load(path, shard)
    except ConfigError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        raise SystemExit(2) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load_or_exit(args.config, args.shard)
    cams = ", ".join(f"{c.id} ({len(c.regions)} regions)" for c in settings.cameras)
    print(f"{args.config}: OK — {len(settings.cameras)} camera(s): {cams}; tracker {settings.tracker.backend}")
    if settings.fleet.shard:
        from daemon.fleet import FleetPlan

        print(FleetPlan.of(settings).describe())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    settings = _load_or_exit(args.config, args.shard)
    setup_logging(args.log_level or settings.logging.level, settings.logging.format)
    from daemon.app import App
    from daemon.detector import ModelLoadError
    from daemon.ops.signals import SignalHandling
    from daemon.preflight import PreflightError
    from daemon.sinks.mqtt import MqttConfigError

    app = App(settings)
    logging_config = settings.logging

    def reload() -> None:
        """SIGHUP: read the file again; an invalid one changes nothing (each problem logged)."""
        nonlocal logging_config
        log.info("reading the configuration again from %s", args.config)
        try:
            new = _load(args.config, args.shard)
        except ConfigError as e:
            app.reload_rejected(e.problems, args.config)
            return
        if app.reload(new) and new.logging != logging_config:
            logging_config = new.logging  # [logging] applies at once (--log-level still wins)
            setup_logging(args.log_level or new.logging.level, new.logging.format)
            log.info("logging: level %s, format %s", args.log_level or new.logging.level, new.logging.format)

    # SIGTERM/SIGINT stop gracefully (twice: exit now); other fatal signals stop gracefully and
    # exit 128+n; SIGHUP reloads the configuration (see daemon/ops/signals.py).
    signals = SignalHandling(on_stop=app.request_stop, on_reload=reload)
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
    cams = ", ".join(p.cam.id for p in app.pipelines) or "(none)"
    shard = f", shard {app.fleet.shard} ({len(app.pipelines)} of {app.fleet.configured} cameras)" if app.fleet.shard else ""
    log.info("regionwatch %s running: cameras %s, tracker %s%s", __version__, cams, settings.tracker.backend, shard)
    code = app.run()
    frames = sum(p.frames for p in app.pipelines)
    log.info("stopped after %.1f s, %d frames processed", time.monotonic() - started, frames)
    return signals.exit_code or code  # a fatal signal (SIGUSR1...) is a failure for the supervisor


def cmd_annotate(args: argparse.Namespace) -> int:
    settings = _load_or_exit(args.config)
    setup_logging(args.log_level or "WARNING", settings.logging.format)  # quiet: the progress bar speaks
    from daemon.annotate import run_command

    return run_command(settings, args)


def cmd_evaluate(args: argparse.Namespace) -> int:
    settings = _load_or_exit(args.config)
    setup_logging(args.log_level or "WARNING", settings.logging.format)
    from daemon.evaluate import GroundTruthError, MotTable, evaluate
    from daemon.jobs import JobError

    try:
        gt = MotTable.load(args.ground_truth)
        report = evaluate(settings, args.camera, args.ground_truth, tolerance_s=args.tolerance_s, gt=gt)
    except (GroundTruthError, JobError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return getattr(e, "code", 2)
    except Exception as e:  # model loading and the like: one readable line
        log.debug("evaluate failed", exc_info=True)
        print(f"evaluate: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0


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
    run.add_argument("--shard", metavar="I/N", help=SHARD_HELP)
    run.set_defaults(func=cmd_run)

    chk = sub.add_parser("check-config", help="validate a configuration file (exit 0 valid, 2 invalid)")
    chk.add_argument("config")
    chk.add_argument("--shard", metavar="I/N", help="also print the cameras shard I of N runs")
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

    ev = sub.add_parser("evaluate", help="score tracking and region events of a file camera against MOT ground truth")
    ev.add_argument("--config", "-c", required=True, help="TOML configuration file")
    ev.add_argument("--camera", help="camera id (may be left out when the config has one camera)")
    ev.add_argument("--ground-truth", "-g", required=True, metavar="GT.txt",
                    help="MOTChallenge boxes: frame,id,left,top,width,height[,flag,...], 1-based frames")
    ev.add_argument("--tolerance-s", type=float, default=1.0, metavar="S",
                    help="an event matches a true one at most this far away in time (default 1.0)")
    ev.add_argument("--json", action="store_true", help="print the figures as JSON")
    ev.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    ev.set_defaults(func=cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
