"""Fault injection for tests: a ClientApp whose site crashes in a given round.

Test machinery, not product code. The product's only hook is ``mods`` of
``training.federated.client.build_client_app`` (Flower client mods, which the product uses
for SecAgg+ anyway); the crash itself lives here. Only a simulation started with
``client_factory="federated_harness.faults:faulty_client_app"`` reads the fault plan, from
the sidecar file ``<payload>.faults.json``::

    {"crash": [{"site": "hospital-b", "round": 2}]}

The crash comes *after* the site's handler trained: the site read its rows, trained and
spent its round, then the reply is lost as an error (what a node dying before it answers
looks like to the server). The server can then not know whether the site touched its data,
and must charge the round as planned. Under SecAgg+ that is the stage that carries the
model (stage 2, "collect masked vectors"), where SecAgg+ is built to survive a dropout; a
site lost in the key stages before it breaks Flower 1.42's unmasking (a KeyError in
``secaggplus_mod._unmask``), so the round is lost (the server then fails the job).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp

from training.federated.client import build_client_app, payload_of, site_of


@dataclass(frozen=True)
class CrashAt:
    site: str
    round: int


class InjectedCrash(RuntimeError):
    """Raised by the fault mod; a test-only failure of a site's node."""


def fault_plan(payload_path: str) -> tuple[CrashAt, ...]:
    sidecar = Path(payload_path + ".faults.json")
    if not sidecar.exists():
        return ()
    data = json.loads(sidecar.read_text())
    return tuple(CrashAt(str(c["site"]), int(c["round"])) for c in data.get("crash", ()))


def faulty_client_app(payload_path: str) -> ClientApp:
    crashes = fault_plan(payload_path)

    def crash_mod(msg: Message, context: Context, call_next):  # type: ignore[no-untyped-def]
        reply = call_next(msg, context)
        arrays = msg.content.array_records if msg.has_content() else {}
        trained = "arrays" in arrays or "fitins.parameters" in arrays
        if msg.metadata.message_type != MessageType.TRAIN or not trained:
            return reply
        payload = payload_of(context, payload_path)
        site, _ = site_of(context, payload)
        group = msg.metadata.group_id
        for crash in crashes:
            if crash.site == site and group == str(crash.round):
                raise InjectedCrash(f"injected crash of site {site!r} in round {crash.round}")
        return reply

    return build_client_app(payload_path, mods=[crash_mod])
