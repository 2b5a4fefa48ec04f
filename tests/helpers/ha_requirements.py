"""Print the pip requirements of the Home Assistant integrations a test run loads (one a line).

Run with the Home Assistant venv's python (it reads the installed integrations' manifests)::

    venv/bin/python tests/helpers/ha_requirements.py mqtt api config

Covers the integrations Home Assistant always loads (``bootstrap.DEFAULT_INTEGRATIONS`` and the
core and logging ones), those named on the command line, and everything they depend on, also
through ``after_dependencies`` (imported at load time by some, e.g. analytics imports recorder).
Sentry is left out: it only loads when configured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(extra: list[str]) -> int:
    import homeassistant
    from homeassistant import bootstrap

    components = Path(homeassistant.__file__).parent / "components"
    todo = set(bootstrap.DEFAULT_INTEGRATIONS) | set(bootstrap.CORE_INTEGRATIONS) | set(extra)
    todo |= set(bootstrap.LOGGING_INTEGRATIONS) - {"sentry"}
    seen: set[str] = set()
    requirements: set[str] = set()
    while todo:
        domain = todo.pop()
        if domain in seen:
            continue
        seen.add(domain)
        manifest = components / domain / "manifest.json"
        if not manifest.is_file():
            continue
        data = json.loads(manifest.read_text())
        requirements.update(data.get("requirements", []))
        todo.update(data.get("dependencies", []))
        todo.update(data.get("after_dependencies", []))
    print("\n".join(sorted(requirements)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
