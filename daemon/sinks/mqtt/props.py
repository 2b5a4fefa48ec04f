"""MQTT 5 PUBLISH properties (content type, user properties); nothing on MQTT 3.1.1.

Example:
    >>> p = PublishProps(v5=True).make("application/json", [("event_id", "e1")])
    >>> p.ContentType, p.UserProperty
    ('application/json', [('event_id', 'e1')])
    >>> PublishProps(v5=False).make("text/plain") is None
    True
"""

from __future__ import annotations

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


class PublishProps:
    """Makes PUBLISH properties for the protocol in use."""

    def __init__(self, v5: bool):
        self.v5 = v5
        # Built once: the retained state asks for these on every change of a count.
        self._text = self.make("text/plain")
        self._json = self.make("application/json")

    def make(self, content_type: str, user: list[tuple[str, str]] | None = None) -> Properties | None:
        if not self.v5:
            return None
        p = Properties(PacketTypes.PUBLISH)
        p.ContentType = content_type
        if not content_type.startswith("image/"):
            p.PayloadFormatIndicator = 1  # UTF-8 text
        if user:
            p.UserProperty = user
        return p

    def text(self) -> Properties | None:
        return self._text

    def json(self) -> Properties | None:
        return self._json
