"""``pyctr events``: stream events until interrupted, in ``ctr events``' format or as JSON lines."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

import betterproto2

from pyctr.api import typeurl
from pyctr.api._pb.containerd.services.events.v1 import Envelope, SubscribeRequest
from pyctr.ctr.client import Client


def register(sub: Any) -> None:
    p = sub.add_parser("events", aliases=["event"], help="display events (filters: topic==…, namespace==…)")
    p.add_argument("filters", nargs="*")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=run)


def event_dict(env: Envelope) -> dict[str, Any] | None:
    if env.event is None:
        return {}
    try:
        msg = typeurl.unmarshal(env.event.type_url, env.event.value)
    except (KeyError, ValueError):
        return None
    return msg.to_dict(casing=betterproto2.Casing.SNAKE)


def go_time(ts: datetime.datetime | None) -> str:
    """A time as Go prints a time.Time: ``2006-01-02 15:04:05.999999999 +0000 UTC``."""
    if ts is None:
        return "0001-01-01 00:00:00 +0000 UTC"
    ts = ts.astimezone(datetime.UTC)
    frac = f".{ts.microsecond:06d}".rstrip("0").rstrip(".")
    return ts.strftime("%Y-%m-%d %H:%M:%S") + frac + " +0000 UTC"


async def run(args: argparse.Namespace, client: Client) -> int:
    async for env in client.events.subscribe(SubscribeRequest(filters=args.filters)):
        body = event_dict(env)
        if body is None:
            url = env.event.type_url if env.event else ""
            print(f"pyctr: cannot decode an event of type {url}", file=sys.stderr)
            continue
        if args.format == "json":
            line = json.dumps(
                {
                    "timestamp": env.timestamp.isoformat() if env.timestamp else None,
                    "namespace": env.namespace,
                    "topic": env.topic,
                    "event": body,
                },
                separators=(",", ":"),
            )
        else:
            body_json = json.dumps(body, separators=(",", ":"))
            line = f"{go_time(env.timestamp)} {env.namespace} {env.topic} {body_json}"
        print(line, flush=True)
    return 0
