"""Graceful shutdown: end every live session cleanly within a grace period.

SIGTERM (or ``Gproxy.stop(grace)`` from an embedding program) must not look
like a crash to the brokers: a broker whose client vanishes publishes the
client's Will, and every device behind gproxy would be reported offline.  So
``drain`` asks each session to end at an MQTT packet boundary
(``Registry.end``: the broker gets a DISCONNECT and publishes no Will; an
MQTT 5 client gets DISCONNECT 0x8B Server shutting down, or 0x9C Use another
server with ``gproxy.shutdown.server_reference``).  Ends are spread over the
first half of the grace period, so the clients' reconnects do not all land
on the surviving brokers in the same instant; the second half is for the
last packets to finish.  Whatever is still open at the deadline is closed
by the caller.
"""

import logging
import math
import time

import gevent

from gproxy.protocols.mqttstream import SERVER_SHUTTING_DOWN, USE_ANOTHER_SERVER

log = logging.getLogger("gproxy.server")

STEP = 0.05  # seconds between batches of ends


def shutdown_code(server_reference):
    return USE_ANOTHER_SERVER if server_reference else SERVER_SHUTTING_DOWN


def drain(registry, grace, server_reference=None):
    """End ``registry``'s sessions cleanly within ``grace`` s; returns how many are left."""
    if not grace or not len(registry):
        return len(registry)
    code = shutdown_code(server_reference)
    start = time.monotonic()
    deadline = start + grace
    spread = grace / 2
    ended = set()
    log.warning("shutting down: ending %d sessions cleanly within %.1fs", len(registry), grace)
    while True:
        now = time.monotonic()
        live = registry.ids()
        if not live or now >= deadline:
            break
        todo = [sid for sid in live if sid not in ended]
        if todo:
            share = min(1.0, (now - start + STEP) / spread)
            allowed = max(1, math.ceil(share * (len(ended) + len(todo))) - len(ended))
            for sid in todo[:allowed]:
                registry.end(sid, code, deadline - now, server_reference or None)
                ended.add(sid)
        gevent.sleep(STEP)
    left = len(registry)
    log.warning("shutting down: asked %d sessions to end, %d still open after %.1fs",
                len(ended), left, time.monotonic() - start)
    return left
