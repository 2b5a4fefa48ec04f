"""Record Home Assistant's state changes as JSON lines (run with the Home Assistant venv's python).

    venv/bin/python tests/helpers/ha_watch.py http://127.0.0.1:8123 ACCESS_TOKEN timeline.jsonl

Connects to the websocket API, authenticates, subscribes to ``state_changed`` and prints
``SUBSCRIBED`` once it listens; then appends one line per change of a ``regionwatch`` entity:
``{"t": unix time received, "fired": HA's time, "entity_id", "state", "attributes"}`` (``state``
null: the entity was removed). Ends when the connection closes or on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def watch(base: str, token: str, path: str) -> None:
    import aiohttp  # Home Assistant's venv has it; the project's venv does not need it

    async with aiohttp.ClientSession() as session, session.ws_connect(base.replace("http", "ws", 1) + "/api/websocket") as ws:
        assert (await ws.receive_json())["type"] == "auth_required"
        await ws.send_json({"type": "auth", "access_token": token})
        reply = await ws.receive_json()
        if reply["type"] != "auth_ok":
            raise SystemExit(f"auth failed: {reply}")
        await ws.send_json({"id": 1, "type": "subscribe_events", "event_type": "state_changed"})
        reply = await ws.receive_json()
        if not reply.get("success"):
            raise SystemExit(f"subscribe failed: {reply}")
        print("SUBSCRIBED", flush=True)
        with open(path, "a", encoding="utf-8") as out:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                data = json.loads(msg.data)
                if data.get("type") != "event":
                    continue
                ev = data["event"]
                entity = ev["data"]["entity_id"]
                if "regionwatch" not in entity:
                    continue
                new = ev["data"].get("new_state")
                out.write(json.dumps({"t": time.time(), "fired": ev.get("time_fired"), "entity_id": entity,
                                      "state": None if new is None else new["state"],
                                      "attributes": None if new is None else new["attributes"]}) + "\n")
                out.flush()


if __name__ == "__main__":
    asyncio.run(watch(*sys.argv[1:4]))
