"""Helpers shared by the deploy and daemon tests: the dashboard's PromQL, made evaluable."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "regionwatch-dashboard.json"


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> list[dict]:
    """Every panel, rows' nested panels included (rows themselves excluded)."""
    out = []
    for p in dash["panels"]:
        if p.get("type") == "row":
            out += p.get("panels", [])
        else:
            out.append(p)
    return out


def queries(dash: dict) -> list[tuple[str, str]]:
    """(``panel title / refId``, expr) for every PromQL target of every panel."""
    return [(f"{p['title']} / {t['refId']}", t["expr"]) for p in panels(dash) for t in p.get("targets", [])
            if t.get("expr")]


def substitute(expr: str, rate_interval: str = "1m", camera: str = ".*") -> str:
    """Grafana's template variables as Grafana would expand them with "All" selected."""
    out = expr.replace("$__rate_interval", rate_interval).replace("${camera}", camera).replace("$camera", camera)
    leftover = re.findall(r"\$\{?\w+", out)
    if leftover:
        raise AssertionError(f"unknown template variable(s) {leftover} in {expr!r}")
    return out
