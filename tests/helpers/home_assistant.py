"""A real Home Assistant Core for tests: installed once into a cached venv, run headless.

Home Assistant Core 2024.3.3 is the last release that runs on Python 3.11. It is installed with
pip into its own virtual environment, ``$REGIONWATCH_HA_CACHE/venv-2024.3.3`` (default
``~/.cache/regionwatch-ha``), made with a Python 3.11 interpreter (``$REGIONWATCH_HA_PYTHON``,
else ``python3.11`` on the PATH, else ``/usr/bin/python3.11``). ``josepy<2`` is pinned: with
josepy 2, acme (a dependency of hass-nabucasa) fails to import and every HTTP request answers
500. The requirements of the integrations Home Assistant always loads (frontend, recorder, ...)
and of MQTT are installed up front, so it runs with ``--skip-pip`` and never reaches the network.
The first install takes a few minutes (about 600 MB); later runs find it ready at once.
``scripts/setup --test`` installs it, and the test does if it is missing.

Started headless on 127.0.0.1 with only ``http``, ``api`` and ``config`` in its configuration,
it is set up the way a person would, through its own HTTP API: onboarding creates the owner
(``/api/onboarding/users``), the auth code becomes an access token (``/auth/token``), and the
MQTT integration is added through its config flow (``/api/config/config_entries/flow``),
pointed at the test broker with discovery on.

Example (not run here: it installs and starts Home Assistant)::

    venv = ensure_installed()
    with HomeAssistant(venv, tmp_path / "ha", mqtt_port=broker.port) as ha:
        ha.states()["binary_sensor.regionwatch_hall_table_occupied"]["state"]

Run ``python tests/helpers/home_assistant.py install`` to install without running a test.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

HA_VERSION = "2024.3.3"
HA_PINS = ["josepy<2"]  # josepy 2 breaks acme's import: every HTTP request would answer 500
HA_EXTRA = ["numpy"]  # camera/stream import it (constrained to HA's pin)
# Integrations this test uses, besides the ones Home Assistant always loads.
HA_INTEGRATIONS = ["mqtt", "api", "config", "onboarding", "image", "event", "switch", "sensor", "binary_sensor",
                   "http"]
HERE = Path(__file__).resolve().parent
REQUIREMENTS_SCRIPT = HERE / "ha_requirements.py"
WATCH_SCRIPT = HERE / "ha_watch.py"
SPEC = f"homeassistant=={HA_VERSION} {' '.join(HA_PINS)} {' '.join(HA_EXTRA)} {' '.join(HA_INTEGRATIONS)} v2"


class HomeAssistantUnavailable(RuntimeError):
    """Home Assistant cannot be installed or started here (the test skips with this reason)."""


def cache_dir() -> Path:
    return Path(os.environ.get("REGIONWATCH_HA_CACHE") or Path.home() / ".cache" / "regionwatch-ha")


def venv_dir() -> Path:
    return cache_dir() / f"venv-{HA_VERSION}"


def find_python() -> str:
    """A Python 3.11 that can make virtual environments."""
    candidates = [os.environ.get("REGIONWATCH_HA_PYTHON", ""), shutil.which("python3.11") or "", "/usr/bin/python3.11"]
    for exe in filter(None, candidates):
        try:
            r = subprocess.run([exe, "-c", "import sys, venv, ensurepip; print(sys.version_info[:2])"],
                               capture_output=True, text=True, timeout=60)
        except OSError:
            continue
        if r.returncode == 0 and r.stdout.strip() == "(3, 11)":
            return exe
    raise HomeAssistantUnavailable(
        f"Home Assistant {HA_VERSION} needs Python 3.11 with venv/ensurepip (apt-get install python3.11-venv, "
        "or set REGIONWATCH_HA_PYTHON)")


def ensure_installed(log=print) -> Path:
    """The ready venv with Home Assistant (installs it on first use; a file lock serialises installs)."""
    venv = venv_dir()
    stamp = venv / ".regionwatch-ready"
    if stamp.is_file() and stamp.read_text() == SPEC:
        return venv
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text() == SPEC:
            return venv
        python = find_python()
        t0 = time.monotonic()
        log(f"installing Home Assistant {HA_VERSION} into {venv} (first time only, a few minutes)")
        shutil.rmtree(venv, ignore_errors=True)
        _run([python, "-m", "venv", str(venv)], "create the venv")
        pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q", "install"]
        _run([*pip, f"homeassistant=={HA_VERSION}", *HA_PINS], "pip install homeassistant")
        constraints = subprocess.run(
            [str(venv / "bin" / "python"), "-c",
             "import homeassistant, os; print(os.path.join(os.path.dirname(homeassistant.__file__), "
             "'package_constraints.txt'))"], capture_output=True, text=True, check=True).stdout.strip()
        reqs = subprocess.run([str(venv / "bin" / "python"), str(REQUIREMENTS_SCRIPT), *HA_INTEGRATIONS],
                              capture_output=True, text=True, check=True).stdout.split()
        _run([*pip, "-c", constraints, *reqs, *HA_EXTRA, *HA_PINS], "pip install the integrations' requirements")
        stamp.write_text(SPEC)
        log(f"Home Assistant {HA_VERSION} installed in {time.monotonic() - t0:.0f} s")
        return venv


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                       env={**os.environ, "PIP_NO_INPUT": "1"})
    if r.returncode:
        tail = "\n".join(line for line in (r.stderr or r.stdout).splitlines()
                         if not line.startswith("WARNING: Location"))[-1500:]
        raise HomeAssistantUnavailable(f"cannot {what} (no access to PyPI?): {tail}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIGURATION = """\
homeassistant:
  name: regionwatch test
  latitude: 52.5
  longitude: 13.4
  elevation: 30
  unit_system: metric
  time_zone: UTC
  currency: EUR
  country: DE
http:
  server_host: 127.0.0.1
  server_port: {port}
api:
config:
logger:
  default: warning
  logs:
    homeassistant.components.mqtt: info
"""


class HomeAssistant:
    """One headless Home Assistant with the MQTT integration on a given broker."""

    USER = "regionwatch-test"
    PASSWORD = "not-a-secret-test-password"

    def __init__(self, venv: Path, workdir: Path, *, mqtt_port: int):
        self.venv = venv
        self.dir = workdir
        self.config_dir = workdir / "config"
        self.mqtt_port = mqtt_port
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.client_id = f"{self.base}/"
        self.proc: subprocess.Popen | None = None
        self.token = ""
        self.refresh_token = ""
        self.started_s = 0.0

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> HomeAssistant:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        (self.config_dir / "configuration.yaml").write_text(CONFIGURATION.format(port=self.port))
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [str(self.venv / "bin" / "hass"), "-c", str(self.config_dir), "--skip-pip", "--log-no-color"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "hass.stderr", "wb"), start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise HomeAssistantUnavailable(f"Home Assistant exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                status, _ = self._request("GET", "/api/onboarding", auth=False)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise HomeAssistantUnavailable(f"Home Assistant did not answer within {timeout:.0f} s: {self.log_tail()}")
            time.sleep(0.5)
        self._onboard()
        self._add_mqtt()
        self.started_s = time.monotonic() - t0
        return self

    def _onboard(self) -> None:
        status, body = self._request("POST", "/api/onboarding/users", {
            "client_id": self.client_id, "name": "Tester", "username": self.USER,
            "password": self.PASSWORD, "language": "en"}, auth=False)
        if status != 200:
            raise HomeAssistantUnavailable(f"onboarding failed: {status} {body}")
        self._token({"grant_type": "authorization_code", "code": body["auth_code"], "client_id": self.client_id})

    def _token(self, form: dict) -> None:
        status, body = self._request("POST", "/auth/token", form, auth=False, form=True)
        if status != 200:
            raise HomeAssistantUnavailable(f"cannot get an access token: {status} {body}")
        self.token = body["access_token"]
        self.refresh_token = body.get("refresh_token", self.refresh_token)

    def _add_mqtt(self) -> None:
        status, flow = self.request("POST", "/api/config/config_entries/flow", {"handler": "mqtt"})
        if status != 200 or flow.get("step_id") != "broker":
            raise HomeAssistantUnavailable(f"MQTT config flow did not start: {status} {flow}")
        status, done = self.request("POST", f"/api/config/config_entries/flow/{flow['flow_id']}",
                                    {"broker": "127.0.0.1", "port": self.mqtt_port})
        if status != 200 or done.get("type") != "create_entry" or done["result"]["state"] != "loaded":
            raise HomeAssistantUnavailable(f"MQTT integration not set up: {status} {done}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def __enter__(self) -> HomeAssistant:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, n: int = 3000) -> str:
        path = self.config_dir / "home-assistant.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        err = (self.dir / "hass.stderr").read_text(errors="replace") if (self.dir / "hass.stderr").exists() else ""
        return (text + err)[-n:]

    # -- HTTP API ---------------------------------------------------------------------------
    def _request(self, method: str, path: str, body=None, *, auth: bool = True, form: bool = False,
                 raw: bool = False, timeout: float = 30.0):
        headers = {}
        data = None
        if body is not None:
            if form:
                data = urllib.parse.urlencode(body).encode()
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            else:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                payload = r.read()
                status = r.status
                ctype = r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            payload, status, ctype = e.read(), e.code, e.headers.get("Content-Type", "")
        if raw:
            return status, payload, ctype
        with contextlib.suppress(ValueError):
            return status, json.loads(payload or b"null")
        return status, payload.decode(errors="replace")

    def request(self, method: str, path: str, body=None, **kw):
        """An authenticated API call; the access token is refreshed when it expired."""
        result = self._request(method, path, body, **kw)
        if result[0] == 401 and self.refresh_token:
            self._token({"grant_type": "refresh_token", "refresh_token": self.refresh_token,
                         "client_id": self.client_id})
            result = self._request(method, path, body, **kw)
        return result

    def states(self) -> dict[str, dict]:
        status, body = self.request("GET", "/api/states")
        assert status == 200, (status, body)
        return {s["entity_id"]: s for s in body}

    def state(self, entity_id: str) -> dict | None:
        status, body = self.request("GET", f"/api/states/{entity_id}")
        return body if status == 200 else None

    def template(self, template: str) -> str:
        status, body = self.request("POST", "/api/template", {"template": template})
        assert status == 200, (status, body)
        return body

    def call(self, domain: str, service: str, **data) -> None:
        status, body = self.request("POST", f"/api/services/{domain}/{service}", data)
        assert status == 200, (status, body)

    def image(self, entity_id: str) -> tuple[int, bytes, str]:
        """``/api/image_proxy/<entity>``: what the image entity serves (status, bytes, content type)."""
        return self.request("GET", f"/api/image_proxy/{entity_id}", raw=True)

    def wait(self, predicate, timeout: float, what: str, interval: float = 0.2):
        """Poll ``predicate(states)`` until it returns something truthy; fail naming ``what``."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.states()
            result = predicate(last)
            if result:
                return result
            time.sleep(interval)
        raise AssertionError(f"Home Assistant: {what} not seen within {timeout:.0f} s; states: "
                             + json.dumps({k: v["state"] for k, v in (last or {}).items() if "regionwatch" in k}))

    # -- state timeline ---------------------------------------------------------------------
    def watch(self, path: Path) -> subprocess.Popen:
        """Record every ``state_changed`` event (websocket API) as JSON lines in ``path``."""
        proc = subprocess.Popen([str(self.venv / "bin" / "python"), str(WATCH_SCRIPT), self.base, self.token, str(path)],
                                stdout=subprocess.PIPE, stderr=open(self.dir / "watch.stderr", "wb"), text=True)
        line = proc.stdout.readline().strip()
        if line != "SUBSCRIBED":
            proc.kill()
            raise AssertionError(f"state watcher did not subscribe: {line!r} "
                                 f"{(self.dir / 'watch.stderr').read_text(errors='replace')[-2000:]}")
        return proc


def read_timeline(path: Path) -> list[dict]:
    """The recorded state changes: ``{"t", "entity_id", "state", "attributes"}`` (state None: removed)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["install"]:
        try:
            print(ensure_installed())
        except HomeAssistantUnavailable as e:
            print(f"Home Assistant not installed: {e}", file=sys.stderr)
            raise SystemExit(1) from None
    else:
        print(__doc__)
