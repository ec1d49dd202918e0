"""In-process data paths with real relaying sessions, for measuring and testing handovers.

``data_path()`` is what ``runtime.handover`` needs of a process (a Proxy with
its registry and relays, an accept gate, listeners, health, the load-aware
balancers' shared state, the sessions view with its evictions; a store, as
the base class, that keeps nothing) without listeners; ``relaying(app, name)`` adds one session relaying
between two socket pairs, registered as the session room registers its own,
and returns ``(client socket, broker socket, session)``.  Used by
scripts/handoff_cost.py and tests/integration/test_handover_inprocess.py.
"""

import socket
import types

from gproxy.model.loadaware import Shared
from gproxy.proxy.accept.overload import Gate
from gproxy.proxy.health import HealthCheckers
from gproxy.proxy.session.session import Proxy, Session
from gproxy.proxy.sessions.live import LiveSessions
from gproxy.store.base import Store


class Listener:
    text = "127.0.0.1:1883"
    pipeline = ()

    def __init__(self, gate):
        self.gate = gate


def data_path(store=None):
    proxy = Proxy()
    gate = Gate()
    live = LiveSessions(proxy.registry, lambda: proxy.table)
    app = types.SimpleNamespace(proxy=proxy, registry=proxy.registry, gate=gate,
                                listeners=[], health=HealthCheckers(), listener=Listener(gate),
                                balancing=Shared(), discovery=None, fleet=None,
                                store=store or Store(), live=lambda: live, standby=False)
    app.go_live = lambda: setattr(app, "standby", False)
    return app


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
