"""Fixtures for sink tests: a real mosquitto broker, a recording subscriber, a test PKI.

* ``mosquitto(**opts)`` starts ``/usr/sbin/mosquitto`` on a free 127.0.0.1 port (stopped and
  cleaned up by the fixture). ``Broker.stop()`` / ``start()`` simulate an outage on the same
  port; with ``persistence=True`` a subscriber's session (and its queued QoS 1 messages)
  survives the restart, as with a production broker.
* ``collector(broker, ...)`` subscribes to ``#`` and records every message.
* ``pki`` is a CA plus server (127.0.0.1) and client certificates made with the ``openssl`` CLI.

Needs the ``mosquitto`` and ``openssl`` executables (Debian: ``apt-get install mosquitto
openssl``); tests skip with a clear message without them.
"""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
OPENSSL = shutil.which("openssl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class Broker:
    """One mosquitto process with a generated config, restartable on the same port."""

    def __init__(self, workdir: Path, *, persistence: bool = False, users: dict[str, str] | None = None,
                 tls: dict[str, str] | None = None, require_certificate: bool = False):
        if not Path(MOSQUITTO).exists():
            pytest.skip(f"mosquitto broker not installed ({MOSQUITTO}); apt-get install mosquitto")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = self.dir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None
        self.tls = tls
        self.password_file = self.dir / "passwd" if users is not None else None
        if users is not None:
            self.password_file.write_text("")
            for user, password in users.items():
                self.set_password(user, password, reload=False)
        lines = [
            f"user {getpass.getuser()}",  # when run as root, do not drop to the 'mosquitto' user
            "per_listener_settings false",
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'false' if users is not None else 'true'}",
            "max_queued_messages 100000",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            f"log_dest file {self.log_path}",
        ]
        if self.password_file:
            lines.append(f"password_file {self.password_file}")
        if tls:
            lines += [f"cafile {tls['ca']}", f"certfile {tls['cert']}", f"keyfile {tls['key']}",
                      f"require_certificate {'true' if require_certificate else 'false'}"]
        if persistence:
            lines += ["persistence true", f"persistence_location {self.dir}/", "autosave_interval 1"]
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    def set_password(self, user: str, password: str, *, reload: bool = True) -> None:
        """Add or change a user in the password file; ``reload`` makes a running broker re-read it."""
        subprocess.run([MOSQUITTO_PASSWD, "-b", str(self.password_file), user, password], check=True,
                       capture_output=True)
        if reload and self.running:
            self.proc.send_signal(signal.SIGHUP)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> Broker:
        assert not self.running
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)

        def accepting() -> bool:
            if self.proc.poll() is not None:
                return True
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_until(accepting, 10)
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode(errors="replace")
            raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {err}\n{self.log_text()}")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.running:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    user_properties: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None

    @property
    def text(self) -> str:
        return self.payload.decode()


class Collector:
    """A subscriber that records every message on ``topic`` (QoS 1, persistent session)."""

    def __init__(self, broker: Broker, topic: str = "#", *, client_id: str = "test-collector",
                 username: str | None = None, password: str | None = None, tls: dict[str, str] | None = None):
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self.topic = topic
        self.subscribed = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if username:
            c.username_pw_set(username, password)
        if tls:
            c.tls_set(ca_certs=tls["ca"], certfile=tls.get("client_cert"), keyfile=tls.get("client_key"))
        c.reconnect_delay_set(0.05, 0.2)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_subscribe = lambda *a: self.subscribed.set()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600  # queued QoS 1 messages survive our reconnects
        c.connect_async("127.0.0.1", broker.port, keepalive=10, clean_start=False, properties=props)
        c.loop_start()
        self.client = c
        if not self.subscribed.wait(10):
            raise RuntimeError(f"collector could not subscribe:\n{broker.log_text()}")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure and not flags.session_present:
            client.subscribe(self.topic, qos=1)

    def _on_message(self, client, userdata, msg):
        props = getattr(msg, "properties", None)
        user = dict(getattr(props, "UserProperty", []) or [])
        with self._lock:
            self.messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos, user,
                                         getattr(props, "ContentType", None)))

    def on(self, topic: str) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def all(self) -> list[Message]:
        with self._lock:
            return list(self.messages)

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        return wait_until(lambda: predicate(self), timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def mosquitto(tmp_path):
    """Factory: ``mosquitto(persistence=..., users=..., tls=...)`` → a started :class:`Broker`."""
    brokers: list[Broker] = []

    def make(**kwargs) -> Broker:
        b = Broker(tmp_path / f"broker{len(brokers)}", **kwargs)
        brokers.append(b)
        return b.start()

    yield make
    for b in brokers:
        b.stop(signal.SIGKILL)


@pytest.fixture
def collector():
    """Factory: ``collector(broker, topic="#", ...)`` → a subscribed :class:`Collector`."""
    made: list[Collector] = []

    def make(broker: Broker, topic: str = "#", **kwargs) -> Collector:
        c = Collector(broker, topic, client_id=f"test-collector-{len(made)}", **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> dict[str, str]:
    """A test CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    if not OPENSSL:
        pytest.skip("openssl CLI not installed; needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")

    def ossl(*args: str) -> None:
        subprocess.run([OPENSSL, *args], cwd=d, check=True, capture_output=True)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
         "-subj", "/CN=regionwatch test CA")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, cn in (("server", "127.0.0.1"), ("client", "regionwatch-client")):
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={cn}")
        ossl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    # A second, unrelated CA: a client trusting only this must refuse the broker.
    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other-ca.key", "-out", "other-ca.crt",
         "-days", "2", "-subj", "/CN=some other CA")
    return {
        "ca": str(d / "ca.crt"), "cert": str(d / "server.crt"), "key": str(d / "server.key"),
        "client_cert": str(d / "client.crt"), "client_key": str(d / "client.key"),
        "other_ca": str(d / "other-ca.crt"),
    }
