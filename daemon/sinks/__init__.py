"""Event sinks: stdout, JSONL file, MQTT."""

from daemon.sinks.base import Sink

__all__ = ["Sink"]
