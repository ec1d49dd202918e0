"""In-process data paths with real relaying sessions, for measuring and testing handovers.

``data_path()`` is what ``runtime.handover`` needs of a process (a Proxy with
its registry and relays, an accept gate, listeners, health) without
listeners or a store; ``relaying(app, name)`` adds one session relaying
between two socket pairs, registered as the session room registers its own,
and returns ``(client socket, broker socket, session)``.  Used by
scripts/handoff_cost.py and tests/integration/test_handover_inprocess.py.
"""

import socket
import types

from gproxy.proxy.accept.overload import Gate
from gproxy.proxy.health import HealthCheckers
from gproxy.proxy.session.session import Proxy, Session


class Listener:
    text = "127.0.0.1:1883"
    pipeline = ()

    def __init__(self, gate):
        self.gate = gate


def data_path():
    proxy = Proxy()
    gate = Gate()
    return types.SimpleNamespace(proxy=proxy, registry=proxy.registry, gate=gate,
                                 listeners=[], health=HealthCheckers(),
                                 listener=Listener(gate))


def relaying(app, name):
    """A session relaying between a test-side client socket and broker socket."""
    client, client_end = socket.socketpair()
    upstream_end, broker = socket.socketpair()
    for s in (client_end, upstream_end):
        s.setblocking(False)
    info = app.registry.new_session(("127.0.0.1", 40000), ("127.0.0.1", 1883))
    info.client_id, info.protocol_level, info.route_id = name, 4, "1"
    session = Session(app.proxy, app.listener, client_end, info)
    app.gate.enter()
    session.cleanup.append(app.gate.leave)
    session.track()
    session.set_state("relaying")
    session.relay = app.proxy.relays.start(client_end, upstream_end, info, session._relay_done,
                                           60.0, mqtt=True)
    return client, broker, session
